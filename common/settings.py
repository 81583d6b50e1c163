"""The one settings object, read from ``OBJSTREAM_*`` environment variables and CLI options.

Nothing reads the environment at import time: :class:`Settings` is built in ``main()`` (or by the
caller of the Python API) and passed down.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from objstream.common.errors import ENV_PREFIX, ConfigError
from objstream.common.urls import (
    check_url,
    mask_url,
    split_urls,
    with_credentials,
    without_credentials,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"

# RabbitMQ 4 caps a message at 16 MiB by default; stay well below it (STYLE.md 11).
MAX_CHUNK_SIZE = 8 * MiB

_SIZE = TypeAdapter(ByteSize)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"


def check_site(name: str) -> str:
    """``name`` if it is a valid site name.

    Raises:
        ConfigError: it is not (one line, naming it and the rule).
    """
    if not re.match(NAME_PATTERN, name):
        raise ConfigError(f"invalid site name {name!r} (letters, digits, '_', '.', '-')")
    return name


MAX_NAME_LENGTH = 1024  # an object's name on the wire (protocol.py holds headers to it too)


def check_object_name(name: str) -> str:
    """``name`` if it can name an object in a request: not empty, at most 1,024 characters
    (where it may point, a file server checks: it confines every path to its source dir).

    Raises:
        ConfigError: it cannot (one line).
    """
    if not name:
        raise ConfigError("an object name cannot be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"object name of {len(name)} characters (at most {MAX_NAME_LENGTH})")
    return name


_ONE_LETTER_UNIT = re.compile(r"^\s*([0-9.]+)\s*([kKmMgGtT])\s*$")


def parse_size(text: str | int) -> int:
    """Parse a size such as ``256KiB``, ``4MiB`` or ``1048576`` into bytes.

    ``K``, ``M``, ``G``, ``T`` alone are powers of 1024 (``1M`` is 1 MiB, as ``head -c`` and
    ``dd`` read it); ``KB``, ``MB``... are powers of 1000; ``KiB``, ``MiB``... of 1024.

    Raises:
        ConfigError: the text is not a size.
    """
    if isinstance(text, str) and (letter := _ONE_LETTER_UNIT.match(text)):
        text = f"{letter[1]}{letter[2].upper()}iB"
    try:
        return int(_SIZE.validate_python(text))
    except ValidationError as e:
        raise ConfigError(f"not a size: {text!r} (use bytes, or a unit as in 256KiB, 4MiB)") from e


_BIT_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?)?bit(?:/s)?\s*$", re.IGNORECASE)
_BYTE_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?\s*(?:[kmgt]i?)?b?)\s*(?:/s)?\s*$", re.IGNORECASE)
_BITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BITS |= {f"{unit}i": 1024 ** (i + 1) for i, unit in enumerate("kmgt")}
RATE_FORMS = "bytes per second as 10MiB, 10M (MiB) or 10MB, or bits per second as 80mbit, 1gbit"


def parse_rate(text: str | int) -> int:
    """Parse a rate limit into bytes per second.

    Bytes per second as :func:`parse_size` reads a size (``10MiB`` and ``10M`` are 10 MiB/s,
    ``10MB`` 10,000,000 B/s), ``/s`` after it optional; or bits per second as ``tc`` writes
    them: ``bit``, ``kbit``, ``mbit``, ``gbit``, ``tbit`` (powers of 1000: ``80mbit`` is
    10,000,000 B/s) or ``kibit``... (powers of 1024), in any case.

    Raises:
        ConfigError: not a rate, or not at least 1 byte per second.
    """
    rate: float
    if isinstance(text, str):
        if bits := _BIT_RATE.match(text):
            rate = float(bits[1]) * _BITS[(bits[2] or "").lower()] / 8
        elif byte_rate := _BYTE_RATE.match(text):
            rate = parse_size(byte_rate[1])
        else:
            raise ConfigError(f"not a rate: {text!r} (use {RATE_FORMS})")
    else:
        rate = text
    if rate < 1:
        raise ConfigError(
            f"rate limit {text!r} is below 1 byte per second (leave it unset for no limit)"
        )
    return int(rate)


def check_chunk_size(size: int) -> int:
    """Return ``size`` if it is a usable chunk size.

    Raises:
        ConfigError: outside 1 byte .. :data:`MAX_CHUNK_SIZE`.
    """
    if not 1 <= size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"chunk size {size} outside 1 B .. {MAX_CHUNK_SIZE} B")
    return size


class Settings(BaseModel):
    """Everything an objstream process can be configured with.

    Each field is also an environment variable: ``OBJSTREAM_`` + the field name in capitals
    (``OBJSTREAM_URL``, ``OBJSTREAM_CHUNK_SIZE=4MiB``...), read when the object is built;
    keyword arguments win over the environment.

    A pydantic model that reads its environment variables itself, rather than
    pydantic-settings' ``BaseSettings``: importing pydantic-settings took longer than the rest
    of ``objstream producer send-file`` together (docs/performance.md), and objstream uses
    nothing of it beyond a prefix.
    """

    # A ValidationError repeats the value it refused: for a URL that is its password, in a
    # traceback or log of whoever builds Settings directly (load_settings words its own line).
    model_config = ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)

    def __init__(self, **values: Any) -> None:
        """Raises:
        ConfigError: a value is invalid; the message names the setting (never its value).
        """
        try:
            super().__init__(**{**_environment(type(self).model_fields), **values})
        except ValidationError as e:
            raise ConfigError(f"invalid setting: {_problems(e)}") from None

    url: str = Field(
        DEFAULT_URL,
        description="AMQP URL of the broker, or a comma-separated list of the URLs of a cluster's "
        "nodes (a worker connects to the first that answers, and to another when its node dies).",
    )
    user: str | None = Field(
        None, description="Broker user: replaces the user of every URL (unset: the URL's)."
    )
    password: SecretStr | None = Field(
        None,
        description="Broker password: replaces the password of every URL, any characters, no "
        "URL-encoding needed (unset: the URL's).",
    )
    namespace: Annotated[str, Field(pattern=NAME_PATTERN)] = Field(
        "objstream",
        description="Prefix of every exchange and queue objstream declares; separates deployments.",
    )
    chunk_size: ByteSize = Field(ByteSize(MiB), description="Bytes per chunk message.")
    window: int = Field(
        32, ge=1, le=4096, description="Chunks in flight beyond what the receiver stored."
    )
    receive_window: int = Field(
        64,
        ge=1,
        le=4096,
        description="Most chunks a receiver lets the broker deliver ahead of its acks, per stream "
        "(its prefetch); an offer with a larger window gets this many.",
    )
    timeout: float = Field(
        60.0, gt=0, description="Seconds without progress after which a transfer fails."
    )
    resend_after: float = Field(
        5.0,
        gt=0,
        description="Seconds of silence after which the sender resends unconfirmed chunks.",
    )
    rate_limit: int | None = Field(
        None,
        description="Most bytes a second one transfer publishes (a send, a broadcast, a served "
        f"stream): {RATE_FORMS}; unset: no limit.",
    )
    compress: Literal["auto", "zstd", "none"] = Field(
        "none",
        description="Compressed chunks to targets that decode them: auto (while it pays), "
        "zstd (always) or none.",
    )
    delta: bool = Field(
        True,
        description="Send a target only the pieces it lacks, and as a target ask for only those "
        "(false: always the whole object).",
    )
    persistent_chunks: bool = Field(
        False, description="Publish chunk messages as persistent (delivery_mode 2)."
    )
    declare_peers: bool = Field(
        True, description="Declare a target's inbox, an owner's service queue (false: regions)."
    )
    max_object_size: ByteSize = Field(
        ByteSize(TiB), description="Largest object a receiver accepts or a sender offers."
    )
    max_streams: int = Field(
        8, ge=1, le=1024, description="Streams a receiver works on at once (more offers wait)."
    )
    stream_ttl: float = Field(
        3600.0,
        gt=0,
        description="Seconds a kept partial file lives; an unused data queue lives twice the "
        "timeout and 60 s, at most this.",
    )
    backlog_windows: float = Field(
        8.0,
        gt=0,
        le=64,
        description="Most chunks a target's data queue holds ready for it, in the sender's "
        "windows: how far a slower target of a broadcast may fall behind the others before it "
        "sets their pace (the broker holds what it has not taken). Beyond, the broker drops what "
        "is published to it (a target that does not take asks for it again, or is gone).",
    )
    queue_type: Literal["classic", "quorum"] = Field(
        "classic",
        description="Queue type of inboxes, service and data queues; quorum for a cluster.",
    )
    heartbeat: int = Field(60, ge=0, description="AMQP heartbeat in seconds.")
    connect_wait: float = Field(
        0.0, ge=0, description="Seconds to keep retrying a broker that is down at start (0: none)."
    )
    connect_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds one connect attempt may take (TCP, TLS and the AMQP handshake).",
    )
    tls_ca: Path | None = Field(
        None,
        description="amqps://: CA bundle (PEM) the broker's certificate must chain to "
        "(default: the system's CAs).",
    )
    tls_cert: Path | None = Field(
        None,
        description="amqps://: client certificate (PEM); with no password in the URL, "
        "the login is EXTERNAL as the certificate's common name.",
    )
    tls_key: Path | None = Field(
        None, description="amqps://: the client certificate's private key (PEM)."
    )
    accept_from: tuple[str, ...] = Field(
        (),
        description="Receivers: broker users whose pushes are taken (empty: anyone who may "
        "publish to the inbox); others are refused with code forbidden.",
    )
    site_users: dict[str, str] = Field(
        default_factory=dict,
        description="The broker user of each site, as site=user,... (a site not named has the "
        "user of its own name): a message claiming a site counts only from that user.",
    )
    route_settle: float = Field(
        1.0,
        ge=0,
        le=60,
        description="Regions: seconds a receiver (a server) waits before it answers an offer (a "
        "request) that crossed a federation link, so its new bindings reach the other broker.",
    )
    site_links: dict[str, str] = Field(
        default_factory=dict,
        description="Regions: the federation link each remote site's messages come by, as "
        "site=URI,... (a site not named must publish on this broker; empty: no check).",
    )
    shared_users: tuple[str, ...] = Field(
        ("guest",),
        description="Broker users several sites share (they may speak for any site): the default "
        "guest, or one application user for a whole deployment.",
    )
    user_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Largest share of a site's streams (max_streams) one broker user may hold at "
        "once, receiving or serving (at least one stream).",
    )
    contact_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a stream slot waits for its peer's first contact (a requester taking "
        "the offer, a sender's first data) before it is released.",
    )
    log_level: str = Field(
        "warning",
        description="Log level of the command line: debug, info, warning, error ('error' "
        "with --quiet).",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Format of the command line's stderr: text, or one JSON object a line."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            return check_url(value)
        except ConfigError as e:
            raise ValueError(str(e)) from None

    @field_validator("chunk_size", "max_object_size", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, bool):
            raise ValueError(f"not a rate: {value!r}")
        try:
            return parse_rate(value)
        except ConfigError as e:
            raise ValueError(str(e)) from None

    @field_validator("chunk_size")
    @classmethod
    def _chunk_bounds(cls, value: ByteSize) -> ByteSize:
        try:
            check_chunk_size(value)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return value

    @field_validator("accept_from", "shared_users", mode="before")
    @classmethod
    def _users(cls, value: Any) -> Any:
        # OBJSTREAM_ACCEPT_FROM=alice,bob
        return (
            tuple(u.strip() for u in value.split(",") if u.strip())
            if isinstance(value, str)
            else value
        )

    @field_validator("site_users", "site_links", mode="before")
    @classmethod
    def _site_pairs(cls, value: Any, info: ValidationInfo) -> Any:
        # OBJSTREAM_SITE_USERS=server=srv-user,site-1=alice
        # OBJSTREAM_SITE_LINKS=site-1=amqps://broker.eu:5671/%2F,...
        if not isinstance(value, str):
            return value
        what = "user" if info.field_name == "site_users" else "URI"
        pairs: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            site, sep, other = item.partition("=")
            if not sep or not site.strip() or not other.strip():
                raise ValueError(f"{mask_url(item)!r} is not site={what}")
            pairs[check_site(site.strip())] = other.strip()
        return pairs

    @field_validator("site_links", mode="after")
    @classmethod
    def _links(cls, value: dict[str, str]) -> dict[str, str]:
        # As the federation plugin names a link in x-received-from: no user, no password.
        try:
            return {site: without_credentials(check_url(uri)) for site, uri in value.items()}
        except ConfigError as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _tls_pairs(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (a client certificate and its key)")
        return self

    @model_validator(mode="after")
    def _credentials(self) -> Self:
        if self.user is None and self.password is None:
            return self
        password = self.password.get_secret_value() if self.password is not None else None
        urls = [with_credentials(url, self.user, password) for url in split_urls(self.url)]
        object.__setattr__(self, "url", ",".join(urls))  # frozen: set once, while validating
        return self

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError(f"unknown log level {value!r}")
        return value

    @property
    def masked_url(self) -> str:
        """The broker URL with its password masked, safe to log."""
        return mask_url(self.url)

    def __repr_args__(self) -> Any:
        # Keep the password out of reprs that may end up in logs or tracebacks.
        for key, value in super().__repr_args__():
            yield key, (mask_url(value) if key == "url" else value)


def _environment(fields: Mapping[str, object]) -> dict[str, str]:
    """The ``OBJSTREAM_*`` variables that name a field (in any case, as environment variables
    conventionally are in capitals), by field name."""
    wanted = {f"{ENV_PREFIX}{name}".upper(): name for name in fields}
    return {
        wanted[key.upper()]: value for key, value in os.environ.items() if key.upper() in wanted
    }


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings` from the environment, with explicit ``overrides`` on top.

    ``None`` overrides are ignored, so CLI options that were not given keep the env/defaults.

    Raises:
        ConfigError: a value is invalid; the message names the setting.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**given)


def _problems(error: ValidationError) -> str:
    """What pydantic refused, one ``field: why`` per problem, without the values."""
    return "; ".join(
        ": ".join(
            filter(
                None,
                (
                    ".".join(str(p) for p in err["loc"]),
                    err["msg"].removeprefix("Value error, "),
                ),
            )
        )
        for err in error.errors()
    )
