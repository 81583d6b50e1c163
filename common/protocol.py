"""The objstream wire protocol, version 1: one frozen pydantic model per message type.

Payload bytes travel raw in message bodies; everything else travels in the AMQP ``type`` property
(the message type) and the ``headers`` table (the fields of the model below). See
``docs/protocol.md`` for the full description a compatible peer needs.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from objstream.common.errors import FailureCode, ProtocolError
from objstream.common.settings import MAX_CHUNK_SIZE, MAX_NAME_LENGTH, NAME_PATTERN

PROTOCOL_VERSION: Literal[2] = 2
VERSION_HEADER = "objstream"
REASON_HEADER = "x-objstream-reason"
BROKER_HEADER_PREFIX = "x-"
"""Headers a broker adds to a message (and the reason objstream adds to a dead-lettered
copy): ignored when a message is parsed."""
CONTENT_TYPE = "application/octet-stream"

# Hard bounds on what a header may claim, whatever the settings say (STYLE.md 7).
MAX_OBJECT_BYTES = 2**62
MAX_CHUNKS = 2**40

StreamId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="uuid4 hex of the stream.")]
SiteName = Annotated[str, Field(pattern=NAME_PATTERN, description="A site name.")]
Seq = Annotated[int, Field(ge=0, lt=MAX_CHUNKS)]
Count = Annotated[int, Field(ge=0, le=MAX_CHUNKS)]
MAX_KEY_PATTERNS = 64
"""Most entry patterns one container request carries (``Request.keys``)."""
MAX_KEY_PATTERN = 256
"""Longest entry pattern, in characters."""
KeyPattern = Annotated[
    str,
    Field(min_length=1, max_length=MAX_KEY_PATTERN, description="A glob pattern on entry names."),
]


ByteCount = Annotated[int, Field(ge=0, le=MAX_OBJECT_BYTES)]
Kind = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.\-]{0,31}$", description="Object kind.")]
MAX_INFO_TEXT = 256
MAX_HOLDS_TEXT = 44 * 1024
"""Longest ``progress.holds`` (the base64 of a bitmap of 262,144 chunks, and some room)."""
Scalar = Annotated[str, Field(max_length=MAX_INFO_TEXT)] | int | float | bool
MetaKey = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")]
# Small, flat descriptions of an object (offer.info) or of a piece (chunk.meta).
MAX_INFO_ENTRIES = 16
Meta = Annotated[dict[MetaKey, Scalar], Field(max_length=MAX_INFO_ENTRIES)]

FILE_KIND = "file"
CONTAINER_KIND = "container"
LAYOUT_INFO = "layout"
DIRECTORY_LAYOUT = "directory"
"""``info[LAYOUT_INFO] == DIRECTORY_LAYOUT``: the container offered is a directory of files,
whatever its name (a name ending in ``/`` says the same)."""
PIPE_KIND = "pipe"
"""A file whose size only its end tells (a sender's standard input): stored like a file."""


class MessageType(StrEnum):
    """Values of the AMQP ``type`` property."""

    OFFER = "offer"
    CHUNK = "chunk"
    END = "end"
    PROGRESS = "progress"
    DONE = "done"
    ABORT = "abort"
    REQUEST = "request"
    REPLY = "reply"
    MANIFEST = "manifest"


class _Versioned(BaseModel):
    """Common base: frozen, no unknown fields, carries the protocol version."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    objstream: Literal[2] = Field(
        PROTOCOL_VERSION, description="Protocol version; receivers refuse others."
    )

    @property
    def ident(self) -> str:
        """What the message is about (its correlation id)."""
        raise NotImplementedError


class _Header(_Versioned):
    """Messages of one stream."""

    stream_id: StreamId

    @property
    def ident(self) -> str:
        return self.stream_id


# Objects up to this size travel inside their offer: one message, no data queue (small-object
# latency is then one message each way plus the receiver's fsync).
INLINE_MAX = 64 * 1024


class Inline(BaseModel):
    """An offer that carries the whole object in its body (at most one chunk, INLINE_MAX)."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    crc32: int = Field(ge=0, lt=2**32, description="CRC-32 (zlib.crc32) of the body.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the content.")
    meta: Meta | None = Field(None, description="The meta of its one piece.")


class Offer(_Header):
    """Sender -> receiver inbox: a stream is coming on its data queue (or is in the body)."""

    kind: Kind = Field(description="What the stream carries: file, container, or a custom kind.")
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, description="Sender's name for it.")
    size: ByteCount | None = Field(None, description="Total content bytes (None: told by the end).")
    chunk_size: int = Field(ge=1, le=MAX_CHUNK_SIZE, description="Most bytes in one chunk.")
    chunk_count: Count | None = Field(None, description="Number of chunks (None: told by the end).")
    window: int = Field(ge=1, le=4096, description="Chunks the sender keeps in flight.")
    sender: SiteName = Field(description="Sending site.")
    target: SiteName = Field(description="Receiving site.")
    info: Meta | None = Field(None, description="Kind-specific description (container type...).")
    inline: Inline | None = Field(None, description="Set: the body is the whole content.")
    resume_from: Count = Field(
        0, description="Chunks before this one are not sent: the receiver kept them (retrievals)."
    )

    @model_validator(mode="after")
    def _count_matches_size(self) -> Offer:
        if self.resume_from and (self.chunk_count is None or self.resume_from > self.chunk_count):
            raise ValueError(
                f"resume_from {self.resume_from} needs a known chunk_count at least as large"
            )
        if self.resume_from and self.inline is not None:
            raise ValueError("an inline offer cannot resume")
        if self.inline is not None and (
            self.size is None
            or self.chunk_count is None
            or self.chunk_count > 1
            or self.size > INLINE_MAX
        ):
            raise ValueError(f"an inline offer carries at most one chunk of {INLINE_MAX} bytes")
        if (self.size is None) != (self.chunk_count is None):
            raise ValueError("size and chunk_count are either both given or both left out")
        if self.size is None or self.chunk_count is None:
            if self.kind == FILE_KIND:
                raise ValueError("a file offer must give size and chunk_count")
            return self
        if self.kind == FILE_KIND:
            expected = -(-self.size // self.chunk_size)
            if self.chunk_count != expected:
                raise ValueError(
                    f"chunk_count {self.chunk_count} != ceil(size {self.size} / chunk_size "
                    f"{self.chunk_size}) = {expected}"
                )
        elif self.chunk_count * self.chunk_size < self.size:
            raise ValueError(
                f"{self.chunk_count} chunks of at most {self.chunk_size} bytes cannot carry "
                f"{self.size} bytes"
            )
        return self

    def chunk_length(self, seq: int) -> int | None:
        """Exact body length of chunk ``seq`` for files; ``None`` where pieces vary."""
        if self.kind != FILE_KIND or self.size is None:
            return None
        return min(self.chunk_size, self.size - seq * self.chunk_size)


class Chunk(_Header):
    """Sender -> data queue: one piece of content; the body holds the raw bytes."""

    seq: Seq = Field(description="0-based, contiguous chunk number.")
    crc32: int = Field(ge=0, lt=2**32, description="CRC-32 (zlib.crc32) of the body.")
    meta: Meta | None = Field(None, description="What the piece is (for containers: entry...).")
    encoding: Literal["blosc2"] | None = Field(
        None, description="Set: the body is a Blosc2 chunk of the piece (the target asked)."
    )


class End(_Header):
    """Sender -> data queue, after the last chunk: what the whole must add up to."""

    chunk_count: Count
    size: ByteCount
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the content.")


class Progress(_Header):
    """Receiver -> sender's reply queue: chunks ``0 .. stored-1`` are written."""

    site: SiteName
    stored: Count = Field(description="Number of contiguous chunks durably written.")
    resend_from: Count | None = Field(
        None, description="Set when the receiver dropped a chunk (corrupt or ahead of a gap)."
    )
    encoding: Literal["blosc2"] | None = Field(
        None, description="Set (when the offer said its sender may): chunks may come so encoded."
    )
    delta: bool | None = Field(
        None, description="Set (when the offer said its sender may): send me the manifest."
    )
    holds: str | None = Field(
        None,
        max_length=MAX_HOLDS_TEXT,
        description="Answer to the manifest: base64 bitmap of the chunks held already.",
    )


class Manifest(_Header):
    """Sender -> a target's data key, asked for: the body holds every chunk's SHA-256 and a
    container's entry layout (:class:`objstream.common.delta.Manifest`)."""

    chunk_count: Count
    entries: Count = 0


class Done(_Header):
    """Receiver -> sender's reply queue: the verdict on the stream."""

    site: SiteName
    ok: bool
    code: FailureCode | None = Field(None, description="Why it failed, when ok is false.")
    detail: str = Field("", max_length=2000)
    stored_as: str | None = Field(None, max_length=4096, description="Final name in the dest.")


class Abort(_Header):
    """Sender -> data queue: the sender gave up; drop the partial object."""

    reason: str = Field("", max_length=2000)


LIST_KIND = "list"


class Request(_Versioned):
    """Requester -> owner's service queue: please stream me this object (or, ``kind=list``:
    tell me what you serve me)."""

    request_id: StreamId = Field(description="uuid4 hex chosen by the requester.")
    kind: Literal["file", "container", "list"]
    name: str = Field(
        max_length=MAX_NAME_LENGTH,
        description="The object (not empty); with kind=list, a prefix: only names that begin "
        "with it ('': all).",
    )
    of: Literal["file", "container"] | None = Field(
        None, description="With kind=list: list only objects of this kind (absent: both)."
    )
    resume_from: Count = Field(
        0, description="First chunk wanted (0: the whole object); the requester has the rest."
    )
    chunk_size: int | None = Field(
        None, ge=1, le=MAX_CHUNK_SIZE, description="With resume_from: the chunk size it counts in."
    )
    prefix_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="With resume_from: hex SHA-256 of the bytes the requester has.",
    )
    requester: SiteName
    range_start: ByteCount | None = Field(
        None, description="With kind=file: the first byte wanted (with range_end)."
    )
    range_end: ByteCount | None = Field(
        None,
        description="With kind=file: the byte after the last one wanted; the owner sends "
        "bytes range_start to range_end - 1 of the file, as a file of its own.",
    )
    keys: list[KeyPattern] | None = Field(
        None,
        min_length=1,
        max_length=MAX_KEY_PATTERNS,
        description="With kind=container: only the entries whose names match one of these "
        "glob patterns (fnmatch: *, ?, [...]; case-sensitive); absent: every entry.",
    )

    @model_validator(mode="after")
    def _resume_is_complete(self) -> Request:
        if self.kind == LIST_KIND:
            if self.resume_from or self.chunk_size is not None or self.prefix_sha256 is not None:
                raise ValueError("a list request does not resume")
            if self.keys is not None or self.range_start is not None:
                raise ValueError("a list request names no entries (keys) nor bytes (range)")
            return self
        if not self.name:
            raise ValueError(f"a {self.kind} request needs a name")
        if self.of is not None:
            raise ValueError("only a list request says what it lists (of)")
        if self.keys is not None and self.kind != "container":
            raise ValueError("only a container request selects entries (keys)")
        self._check_range()
        if self.resume_from and (self.chunk_size is None or self.prefix_sha256 is None):
            raise ValueError("resume_from needs chunk_size and prefix_sha256")
        return self

    def _check_range(self) -> None:
        if (self.range_start is None) != (self.range_end is None):
            raise ValueError("range_start and range_end go together")
        if self.range_start is None or self.range_end is None:
            return
        if self.kind != "file":
            raise ValueError("only a file request asks for a byte range")
        if self.range_start >= self.range_end:
            raise ValueError("range_end must be after range_start")
        if self.resume_from:
            raise ValueError("a byte range does not resume")

    @property
    def ident(self) -> str:
        return self.request_id


class Reply(_Versioned):
    """Owner -> requester's private queue: accepted (a stream follows) or refused."""

    request_id: StreamId
    ok: bool
    stream_id: StreamId | None = Field(None, description="The stream that follows, if ok.")
    size: ByteCount | None = None
    entries: Count | None = Field(None, description="Containers: number of entries.")
    code: FailureCode | None = Field(None, description="Why not, if not ok (a refusal code).")
    detail: str = Field("", max_length=2000)
    listed: Count | None = Field(
        None, description="To a list request: the number of objects the body lists."
    )
    truncated: bool | None = Field(
        None, description="To a list request: more objects matched than the body lists."
    )

    @model_validator(mode="after")
    def _listing_is_whole(self) -> Reply:
        if self.listed is None and self.truncated is None:
            return self
        if self.listed is None or not self.ok or self.stream_id is not None:
            raise ValueError("a listing says listed (and truncated), is ok, and has no stream_id")
        return self

    @property
    def ident(self) -> str:
        return self.request_id


Message = Offer | Chunk | End | Progress | Done | Abort | Request | Reply | Manifest

MODELS: dict[MessageType, type[_Versioned]] = {
    MessageType.OFFER: Offer,
    MessageType.CHUNK: Chunk,
    MessageType.END: End,
    MessageType.PROGRESS: Progress,
    MessageType.DONE: Done,
    MessageType.ABORT: Abort,
    MessageType.REQUEST: Request,
    MessageType.REPLY: Reply,
    MessageType.MANIFEST: Manifest,
}
TYPES: dict[type[_Versioned], MessageType] = {model: t for t, model in MODELS.items()}


def new_stream_id() -> str:
    """A fresh stream id (uuid4 hex)."""
    return uuid.uuid4().hex


def to_headers(message: _Versioned) -> dict[str, Any]:
    """The AMQP headers table for ``message`` (None fields are left out)."""
    return message.model_dump(mode="json", exclude_none=True)


class UnsupportedVersion(ProtocolError):
    """A message of another protocol version (``code``: unsupported_version)."""

    code = FailureCode.UNSUPPORTED_VERSION

    def __init__(self, version: object) -> None:
        self.version = version
        super().__init__(
            f"{FailureCode.UNSUPPORTED_VERSION}: protocol version {version!r}, this peer "
            f"speaks {PROTOCOL_VERSION}"
        )


def parse(message_type: str | None, headers: Mapping[str, Any] | None) -> Message:
    """Validate a received message's type and headers into its model.

    Raises:
        ProtocolError: missing/unknown type or version, or invalid headers; the text is the
            reason recorded when the message is dead-lettered.
    """
    if not isinstance(headers, Mapping):
        raise ProtocolError("no headers table")
    version = headers.get(VERSION_HEADER)
    if version is None:
        raise ProtocolError("missing protocol version header 'objstream'")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(version)
    try:
        kind = MessageType(message_type or "")
    except ValueError:
        raise ProtocolError(f"unknown message type {message_type!r}") from None
    # Names beginning with "x-" are the broker's (a quorum queue's x-delivery-count on a
    # redelivery, x-death after dead-lettering, a shovel's x-received-from), never the protocol's.
    fields = {k: v for k, v in headers.items() if not str(k).startswith(BROKER_HEADER_PREFIX)}
    try:
        return MODELS[kind].model_validate(fields)  # type: ignore[return-value]
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or kind}: {err['msg']}" for err in e.errors()
        )
        raise ProtocolError(f"invalid {kind} headers: {problems}") from None


@dataclass(frozen=True)
class Envelope:
    """What came with a message besides its header fields, as the broker delivered it: what the
    sessions judge a message's origin by (see :mod:`objstream.common.identity`)."""

    routing_key: str
    """The key it was published with (an answer's names its publisher)."""
    user_id: str | None
    """The publishing broker user, which RabbitMQ validated."""
    reply_to: str | None = None
    body_length: int = 0
    via: str | None = None
    """The federation link it came by (:func:`objstream.common.federation.arrival_link`),
    None if it was published on this broker."""


@dataclass(frozen=True)
class Properties:
    """The AMQP properties objstream sets and reads, independent of the AMQP client.

    The adapter (:mod:`objstream.common.amqp`) turns these into pika's and back; values a peer
    sent with the wrong type arrive as ``None``.
    """

    type: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    content_type: str | None = None
    persistent: bool = True
    expiration: str | None = None
    """Milliseconds, as a decimal string (AMQP's convention)."""
    user_id: str | None = None
    """The publishing broker user; RabbitMQ refuses a message whose user_id is not the
    connection's user."""
    headers: Mapping[str, Any] | None = None

    def replace(self, **changes: Any) -> Properties:
        return dataclasses.replace(self, **changes)


def envelope(
    message: _Versioned,
    *,
    persistent: bool = True,
    message_id: str | None = None,
    reply_to: str | None = None,
    expiration_s: float | None = None,
    user_id: str | None = None,
) -> Properties:
    """The AMQP properties carrying ``message``: type, headers, ids, delivery mode.

    ``expiration_s`` becomes the per-message TTL (at least 1 ms).
    """
    return Properties(
        type=TYPES[type(message)].value,
        headers=to_headers(message),
        message_id=message_id or message.ident,
        correlation_id=message.ident,
        reply_to=reply_to,
        content_type=CONTENT_TYPE,
        persistent=persistent,
        expiration=None if expiration_s is None else str(max(1, int(expiration_s * 1000))),
        user_id=user_id,
    )
