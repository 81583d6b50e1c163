"""The one error hierarchy of objstream.

Every error a user can meet derives from :class:`ObjstreamError`. Each subclass carries the facts
as fields and words its message as "observed vs expected", so a log line or a CLI line names the
thing and what to do. pika's exceptions are translated at the boundary (``raise ... from e``).
"""

from __future__ import annotations

from enum import StrEnum


class FailureCode(StrEnum):
    """Every machine-readable reason a stream or a request fails, as it travels on the wire
    (``done.code``, ``reply.code``) and as :class:`TransferFailed` / :class:`Refused` carry it."""

    # A stream failed (``done`` messages, :class:`TransferFailed`).
    CHECKSUM = "checksum"
    SIZE = "size"
    TIMEOUT = "timeout"
    REFUSED = "refused"
    TOO_LARGE = "too_large"
    IO = "io"
    ABORTED = "aborted"
    PROTOCOL = "protocol"
    # The sender's file changed while it was being sent (written, truncated, replaced): what
    # was sent is no longer the file, whatever the receiver verified.
    SOURCE_CHANGED = "source_changed"
    # A retrieval request was refused (``reply`` messages, :class:`Refused`).
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    OUTSIDE_SOURCE_DIR = "outside_source_dir"
    BUSY = "busy"
    UNSUPPORTED = "unsupported"
    # A message of another protocol version (a verdict, or the dead-letter reason).
    UNSUPPORTED_VERSION = "unsupported_version"


class ObjstreamError(Exception):
    """Root of every error objstream raises on purpose."""


class ConfigError(ObjstreamError):
    """A setting or command-line value is invalid."""


class SaveError(ObjstreamError):
    """A received container cannot be stored in the format its receiver asked for (a bfloat16
    array as ``.npz``, a string as ``.safetensors``...): the stream is refused, with code
    ``refused`` and this message."""


ENV_PREFIX = "OBJSTREAM_"
"""Each setting ``name`` can be given as the environment variable ``OBJSTREAM_NAME``."""
CLI_OPTIONS = {
    "url": "--url",
    "connect_timeout": "--connect-timeout",
    "tls_ca": "--tls-ca",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
}
"""The settings every command also takes as an option."""


def setting(name: str) -> str:
    """Where a user sets ``name``, for a hint that serves the command line and the library
    alike: ``--tls-ca, OBJSTREAM_TLS_CA or Settings.tls_ca``."""
    ways = [*filter(None, [CLI_OPTIONS.get(name)]), f"{ENV_PREFIX}{name}".upper()]
    return f"{', '.join(ways)} or Settings.{name}"


UNREACHABLE_HINT = f"check that RabbitMQ runs there ({setting('url')})"


class BrokerMismatch(ConfigError):
    """``admin permissions --apply`` (or ``admin cleanup``: ``what``): the node rabbitmqctl
    manages does not see this command's connection to ``--url``, so it is a node of another
    broker; nothing was changed."""

    def __init__(
        self, node: str, url: str, cluster: str | None = None, what: str = "--apply"
    ) -> None:
        self.node = node
        """The node in words: "rabbitmqctl's default node" or "rabbitmqctl's node 'N'"."""
        self.url = url
        """The broker URL, password masked."""
        self.cluster = cluster
        """The cluster name that node reported, if it did."""
        where = f"{node} (cluster {cluster!r})" if cluster else node
        super().__init__(
            f"{what} refused, nothing changed: {where} does not see this command's connection "
            f"to {url}, so it manages another broker; run this on a node of that broker, or "
            "name one with --node"
        )


class RabbitmqctlFailed(ObjstreamError):
    """A ``rabbitmqctl`` command failed (node unreachable, no such user...), in its words."""

    def __init__(self, verb: str, returncode: int, reason: str) -> None:
        self.verb = verb
        self.returncode = returncode
        self.reason = reason
        super().__init__(f"rabbitmqctl {verb} failed (exit {returncode}): {reason}")


class BrokerUnreachable(ObjstreamError):
    """The broker could not be reached (or the connection dropped)."""

    def __init__(self, url: str, detail: str, hint: str = "") -> None:
        self.url = url
        self.detail = detail
        self.hint = hint or UNREACHABLE_HINT
        """What to check; :data:`UNREACHABLE_HINT` when nothing seems to answer there."""
        super().__init__(f"broker unreachable at {url}: {detail}; {self.hint}")


class ConnectionLost(BrokerUnreachable):
    """An open connection went away (broker restart, node death, closed by an operator).

    Workers that can reconnect catch this one; where nobody does, it is "broker unreachable".
    """

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(url, f"connection lost: {detail}")


class BrokerRefused(ObjstreamError):
    """The broker refused an operation and closed the channel (a channel-level AMQP error).

    ``reply_code`` and ``reply_text`` are the broker's own (for example 406
    PRECONDITION_FAILED when a queue exists with other arguments, 403 ACCESS_REFUSED when the
    user lacks a permission, 404 NOT_FOUND for a queue that is gone); ``operation`` says what
    was attempted.
    """

    def __init__(self, reply_code: int, reply_text: str, operation: str = "") -> None:
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.operation = operation
        where = f" {operation}" if operation else ""
        super().__init__(f"broker refused{where}: {reply_code} {reply_text}")

    @property
    def access_refused(self) -> bool:
        return self.reply_code == ACCESS_REFUSED

    @property
    def not_found(self) -> bool:
        return self.reply_code == NOT_FOUND

    @property
    def precondition_failed(self) -> bool:
        return self.reply_code == PRECONDITION_FAILED


# AMQP 0-9-1 reply codes objstream tells apart.
ACCESS_REFUSED = 403
NOT_FOUND = 404
PRECONDITION_FAILED = 406


class AuthenticationRefused(ObjstreamError):
    """The broker refused the credentials."""

    def __init__(
        self, url: str, certificate_user: str | None = None, *, separate: bool = False
    ) -> None:
        self.url = url
        self.certificate_user = certificate_user
        """Set for a certificate login (EXTERNAL): the user the certificate names."""
        if certificate_user is None:
            where = (
                "OBJSTREAM_USER / OBJSTREAM_PASSWORD (Settings.user, Settings.password), which "
                "replace the URL's"
                if separate
                else f"the URL ({setting('url')})"
            )
            super().__init__(
                f"broker at {url} refused the credentials; check the user and password in {where}"
            )
        else:
            super().__init__(
                f"broker at {url} refused the certificate login (EXTERNAL) as user "
                f"{certificate_user!r}, the certificate's common name; check that this broker "
                "user exists and the rabbitmq_auth_mechanism_ssl plugin is enabled"
            )


class VhostRefused(AuthenticationRefused):
    """The credentials were taken, but not the virtual host: it does not exist, or the user
    has no permission on it."""

    def __init__(self, url: str, vhost: str, reason: str) -> None:
        self.vhost = vhost
        ObjstreamError.__init__(
            self,
            f"broker at {url} refused virtual host {vhost!r}: {reason} (the vhost is the URL's "
            f"path, %2F for '/'; {setting('url')})",
        )
        self.url = url
        self.certificate_user = None


class ProtocolError(ObjstreamError):
    """A message does not follow the objstream wire protocol (it gets dead-lettered)."""


class TransferFailed(ObjstreamError):
    """A stream to or from one site ended without a verified object."""

    def __init__(self, site: str, stream_id: str, code: FailureCode, detail: str) -> None:
        self.site = site
        self.stream_id = stream_id
        self.code = code
        self.detail = detail
        super().__init__(f"transfer {stream_id} with site {site!r} failed ({code}): {detail}")


class TimedOut(TransferFailed):
    """No progress for longer than the configured timeout."""

    def __init__(self, site: str, stream_id: str, seconds: float, detail: str = "") -> None:
        self.seconds = seconds
        text = f"timed out after {seconds:g} s without progress"
        super().__init__(
            site, stream_id, FailureCode.TIMEOUT, f"{text}{'; ' + detail if detail else ''}"
        )


class SenderGone(TransferFailed):
    """A stream a receiver took over from an earlier one (that stopped or died) whose sender had
    gone meanwhile (it aborted or fell silent): nothing arrived, the verified prefix is kept for
    a retrieval to resume, and ``listen --count`` does not count it as an object."""


class OfferRefused(TransferFailed):
    """An offer a receiver refused before any data moved (``forbidden``, ``busy``, ``refused``,
    ``too_large``...): :meth:`Receiver.receive` raises it as any failed stream."""


class SendFailed(ObjstreamError):
    """At least one target of a send did not store and verify the object.

    ``failures`` holds one :class:`TransferFailed` per failed target; ``results`` the outcome of
    every target (successful ones included).
    """

    def __init__(self, failures: list[TransferFailed], results: list[object]) -> None:
        self.failures = failures
        self.results = results
        super().__init__("; ".join(str(f) for f in failures))


class ObjectTooLarge(ObjstreamError):
    """An object is larger than the configured ``max_object_size``."""

    def __init__(self, name: str, size: int, limit: int) -> None:
        self.name = name
        self.size = size
        self.limit = limit
        super().__init__(
            f"{name!r} is {size} bytes, larger than the limit of {limit} bytes "
            "(OBJSTREAM_MAX_OBJECT_SIZE)"
        )


class Refused(ObjstreamError):
    """A serving site refused a retrieval request (``code``: not_found, forbidden, ...)."""

    def __init__(self, site: str, name: str, code: FailureCode, detail: str) -> None:
        self.site = site
        self.name = name
        self.code = code
        self.detail = detail
        super().__init__(f"site {site!r} refused {name!r}: {code}{': ' + detail if detail else ''}")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` as part of one line: what is not printable becomes ``?``, and it is cut."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ListingFailed(ObjstreamError):
    """A serving site did not list what it serves: it refused (``code``: forbidden...), does not
    know list requests (``unsupported``: an older objstream), or answered with a listing that is
    not one (``protocol``)."""

    def __init__(self, site: str, code: FailureCode, message: str, detail: str = "") -> None:
        self.site = site
        self.code = code
        self.detail = detail
        super().__init__(message)

    @classmethod
    def refused(cls, site: str, code: FailureCode, detail: str) -> ListingFailed:
        detail = one_line(detail)
        if code == FailureCode.UNSUPPORTED:
            message = (
                f"site {site!r} does not support listing (it refused the list request as "
                "unsupported: an objstream from before listing, or another implementation)"
            )
        else:
            message = f"site {site!r} refused to list what it serves: {code}" + (
                f": {detail}" if detail else ""
            )
        return cls(site, code, message, detail)

    @classmethod
    def invalid(cls, site: str, reason: str) -> ListingFailed:
        reason = one_line(reason)
        return cls(
            site, FailureCode.PROTOCOL, f"site {site!r} sent an invalid listing: {reason}", reason
        )
