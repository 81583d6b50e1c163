"""The one error hierarchy of objstream.

Every error a user can meet derives from :class:`ObjstreamError`. Each subclass carries the facts
as fields and words its message as "observed vs expected", so a log line or a CLI line names the
thing and what to do. pika's exceptions are translated at the boundary (``raise ... from e``).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Machine-readable failure reasons, as they travel in ``done`` messages."""

    CHECKSUM = "checksum"
    SIZE = "size"
    TIMEOUT = "timeout"
    REFUSED = "refused"
    TOO_LARGE = "too_large"
    IO = "io"
    ABORTED = "aborted"
    PROTOCOL = "protocol"


class ObjstreamError(Exception):
    """Root of every error objstream raises on purpose."""


class ConfigError(ObjstreamError):
    """A setting or command-line value is invalid."""


class BrokerUnreachable(ObjstreamError):
    """The broker could not be reached (or the connection dropped)."""

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        self.detail = detail
        super().__init__(
            f"broker unreachable at {url}: {detail}; check that RabbitMQ runs there "
            "(--url / OBJSTREAM_URL)"
        )


class AuthenticationRefused(ObjstreamError):
    """The broker refused the credentials."""

    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__(
            f"broker at {url} refused the credentials; check the user and password in "
            "--url / OBJSTREAM_URL"
        )


class ProtocolError(ObjstreamError):
    """A message does not follow the objstream wire protocol (it gets dead-lettered)."""


class TransferFailed(ObjstreamError):
    """A stream to or from one site ended without a verified object."""

    def __init__(self, site: str, stream_id: str, code: ErrorCode, detail: str) -> None:
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
            site, stream_id, ErrorCode.TIMEOUT, f"{text}{'; ' + detail if detail else ''}"
        )


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

    def __init__(self, site: str, name: str, code: str, detail: str) -> None:
        self.site = site
        self.name = name
        self.code = code
        self.detail = detail
        super().__init__(f"site {site!r} refused {name!r}: {code}{': ' + detail if detail else ''}")
