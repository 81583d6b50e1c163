"""Broker URLs: checked, split (a cluster's nodes), masked for logs, given credentials.

Pure: no I/O.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

from objstream.common.errors import ConfigError

URL_SCHEMES = ("amqp", "amqps")


def check_url(url: str) -> str:
    """``url`` if it is an AMQP URL, or a comma-separated list of them (a cluster's nodes) that
    all use TLS (``amqps://``) or all do not (``amqp://``).

    A list that mixes them would fail over from a TLS node to a plain one without a word,
    sending the password and every object in the clear: it is refused, not downgraded.

    Raises:
        ConfigError: no URL, one of another scheme, or a mix of amqp:// and amqps:// (the
            passwords masked).
    """
    urls = split_urls(url)
    if not urls:
        raise ConfigError("no broker URL given")
    for element in urls:
        scheme = urlsplit(element).scheme
        if scheme.lower() not in URL_SCHEMES:
            shown = _mask_one(element)
            raise ConfigError(f"{shown} is not a broker URL: use amqp:// or amqps://")
    # pika takes the scheme in any case (AMQPS:// is TLS too).
    if len({urlsplit(element).scheme.lower() for element in urls}) > 1:
        raise ConfigError(
            f"{mask_url(url)} mixes amqps:// and amqp:// nodes: a failover would drop TLS; "
            "give every node amqps:// (or every node amqp://)"
        )
    return url


def split_urls(text: str) -> list[str]:
    """The broker URLs in ``text``: one, or several separated by commas (the nodes of a cluster,
    tried in order). A comma in a password is written ``%2C``."""
    return [url.strip() for url in text.split(",") if url.strip()]


def _netloc(host: str | None, port: int | None, user: str | None, password: str | None) -> str:
    host = host or ""
    if ":" in host:
        host = f"[{host}]"
    if port is not None:
        host += f":{port}"
    if user is None and password is None:
        return host
    return f"{user or ''}:{password}@{host}" if password is not None else f"{user}@{host}"


def _mask_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = _netloc(parts.hostname, parts.port, parts.username, "***")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def mask_url(url: str) -> str:
    """Return ``url`` (or a comma-separated list of URLs) with every password replaced by
    ``***``, for logs and error lines."""
    return ",".join(_mask_one(one) for one in split_urls(url)) or url


def with_credentials(url: str, user: str | None, password: str | None) -> str:
    """``url`` logging in as ``user`` with ``password`` (each URL-encoded here, so any
    characters work); ``None`` keeps what the URL says."""
    parts = urlsplit(url)
    user = quote(user, safe="") if user is not None else parts.username
    password = quote(password, safe="") if password is not None else parts.password
    netloc = _netloc(parts.hostname, parts.port, user, password)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def without_credentials(url: str) -> str:
    """``url`` with no user or password: how RabbitMQ's federation plugin names a link's
    upstream in the ``x-received-from`` header."""
    parts = urlsplit(url)
    netloc = _netloc(parts.hostname, parts.port, None, None)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
