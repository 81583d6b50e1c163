"""Reassembly of one stream, without I/O: feed it chunks and the end, get back what to do.

Like h11's connection object: the transport only moves bytes. :class:`Reassembler` decides whether
a chunk is to be written (and where), is a duplicate, is corrupt, or runs ahead of a gap; it keeps
the running SHA-256 of the contiguous prefix and, at the end, the verdict. The caller writes the
bytes it is told to write. Chunks are only ever taken in sequence order, so the digest is computed
on the fly from the bodies (by :mod:`objstream.common.digests`, on a worker thread: the same
digest, no I/O) and nothing is assembled out of order by mistake; a chunk that runs
ahead of a gap is dropped and a resend is asked for (the sender keeps the source until the
verdict, so it can always resend).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from objstream.common import checksum, compression
from objstream.common.digests import RunningSha256
from objstream.common.errors import FailureCode, ProtocolError
from objstream.common.protocol import End, Offer


class State(StrEnum):
    """Life cycle of a stream on the receiving side."""

    OFFERED = "offered"
    RECEIVING = "receiving"
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"
    SUSPENDED = "suspended"  # left on disk, checkpointed, for the receiver that takes it over


class Event(StrEnum):
    ACCEPT = "accept"
    CHUNK = "chunk"
    END = "end"
    COMPLETE = "complete"  # every chunk stored and the end known
    VERIFIED = "verified"
    FAIL = "fail"
    SUSPEND = "suspend"  # this receiver stops; a successor goes on from the checkpoint


# The legal transitions; anything else is "can't handle EVENT in state STATE".
TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.OFFERED, Event.ACCEPT): State.RECEIVING,
    (State.OFFERED, Event.FAIL): State.FAILED,
    (State.RECEIVING, Event.CHUNK): State.RECEIVING,
    (State.RECEIVING, Event.END): State.RECEIVING,
    (State.RECEIVING, Event.COMPLETE): State.VERIFYING,
    (State.RECEIVING, Event.FAIL): State.FAILED,
    (State.RECEIVING, Event.SUSPEND): State.SUSPENDED,
    (State.VERIFYING, Event.VERIFIED): State.DONE,
    (State.VERIFYING, Event.FAIL): State.FAILED,
}


class ChunkVerdict(Enum):
    """What the caller must do with a chunk."""

    WRITE = "write"  # take the body (content bytes from ``offset`` on); counted and hashed
    DUPLICATE = "duplicate"  # already stored; ack and drop
    AHEAD = "ahead"  # beyond a gap; drop, and ask for a resend if ``resend_from`` is set
    CORRUPT = "corrupt"  # CRC mismatch; dead-letter, ask for a resend if ``resend_from`` is set


@dataclass(frozen=True)
class ChunkOutcome:
    verdict: ChunkVerdict
    offset: int = 0
    resend_from: int | None = None
    detail: str = ""
    piece: bytes = b""  # WRITE: what to write (the body, decoded if encoded)


@dataclass(frozen=True)
class Failure:
    """Why a stream failed, as it goes into the ``done`` message."""

    code: FailureCode
    detail: str


class Reassembler:
    """The receiving state of one stream described by an :class:`Offer`."""

    def __init__(self, offer: Offer) -> None:
        self.offer = offer
        self.state = State.OFFERED
        self.stored = 0  # chunks 0 .. stored-1 are written
        self.stored_bytes = 0
        self.end: End | None = None
        self.failure: Failure | None = None
        self._sha = RunningSha256()
        self._resend_asked_at: int | None = None

    @classmethod
    def resumed(cls, offer: Offer, stored: int, stored_bytes: int, prefix_sha: Any) -> Reassembler:
        """A receiving reassembler that already holds chunks ``0 .. stored-1``.

        ``prefix_sha`` is a hashlib SHA-256 object fed with those chunks' bytes.
        """
        reassembler = cls(offer)
        reassembler.accept()
        reassembler.stored = stored
        reassembler.stored_bytes = stored_bytes
        reassembler._sha = RunningSha256(prefix_sha)
        return reassembler

    def _apply(self, event: Event) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise ProtocolError(
                f"stream {self.offer.stream_id}: can't handle {event} in state {self.state}"
            ) from None

    @property
    def finished(self) -> bool:
        return self.state in (State.DONE, State.FAILED, State.SUSPENDED)

    def accept(self) -> None:
        self._apply(Event.ACCEPT)

    @property
    def encoding(self) -> compression.Encoding | None:
        """The chunk encoding this stream takes (its sender may send it), or None."""
        return compression.welcome(self.offer.info)

    def chunk(
        self, seq: int, crc32: int | None, body: bytes, encoding: str | None = None
    ) -> ChunkOutcome:
        """Judge chunk ``seq``; on WRITE it has been counted and hashed. ``crc32`` None: the
        body was checked otherwise (a held chunk, against its SHA-256 in the manifest).

        An ``encoding`` (a compressed body) is checked by its CRC-32 as it came, then decoded:
        the lengths the offer implies, the size and the digest are the piece's.

        Raises:
            ProtocolError: the stream is not receiving, the seq is beyond the announced count,
                the body length is not what the offer implies for that seq, or it does not
                decode to such a piece.
        """
        self._apply(Event.CHUNK)
        offer = self.offer
        count = self.chunk_count
        if count is not None and seq >= count:
            raise ProtocolError(
                f"chunk {seq} of stream {offer.stream_id}: beyond the announced {count} chunks"
            )
        if seq < self.stored:
            return ChunkOutcome(ChunkVerdict.DUPLICATE)
        expected_len = offer.chunk_length(seq)
        if encoding is None and expected_len is not None and len(body) != expected_len:
            raise ProtocolError(
                f"chunk {seq} of stream {offer.stream_id}: {len(body)} bytes != expected "
                f"{expected_len}"
            )
        if len(body) > offer.chunk_size:
            raise ProtocolError(
                f"chunk {seq} of stream {offer.stream_id}: {len(body)} bytes > chunk size "
                f"{offer.chunk_size}"
            )
        if seq > self.stored:
            return ChunkOutcome(
                ChunkVerdict.AHEAD,
                resend_from=self._ask_resend(),
                detail=f"chunk {seq} ahead of missing chunk {self.stored}",
            )
        if crc32 is not None and (actual := checksum.crc32(body)) != crc32:
            return ChunkOutcome(
                ChunkVerdict.CORRUPT,
                resend_from=self._ask_resend(),
                detail=f"chunk {seq} of stream {offer.stream_id}: crc32 {actual:#010x} != "
                f"{crc32:#010x}",
            )
        if encoding is not None:
            if self.encoding is None:
                raise ProtocolError(
                    f"chunk {seq} of stream {offer.stream_id}: encoded {encoding}, but its offer "
                    "did not say such chunks may come"
                )
            try:
                body = compression.decode(body, encoding, expected_len, offer.chunk_size)
            except ProtocolError as e:
                raise ProtocolError(f"chunk {seq} of stream {offer.stream_id}: {e}") from None
        offset = self.stored_bytes
        if offer.size is not None and offset + len(body) > offer.size:
            raise ProtocolError(
                f"chunk {seq} of stream {offer.stream_id}: ends at byte {offset + len(body)}, "
                f"beyond the announced {offer.size}"
            )
        self._sha.update(body)
        self.stored += 1
        self.stored_bytes += len(body)
        self._resend_asked_at = None
        return ChunkOutcome(ChunkVerdict.WRITE, offset=offset, piece=body)

    def _ask_resend(self) -> int | None:
        # One request per gap position; the sender's own silence timer covers a lost request.
        if self._resend_asked_at == self.stored:
            return None
        self._resend_asked_at = self.stored
        return self.stored

    def record_end(self, end: End) -> None:
        """Take the sender's end message (a repeat with the same values is fine).

        Raises:
            ProtocolError: it contradicts the offer or an earlier end.
        """
        self._apply(Event.END)
        offer = self.offer
        if offer.chunk_count is not None and (
            end.chunk_count != offer.chunk_count or end.size != offer.size
        ):
            raise ProtocolError(
                f"end of stream {offer.stream_id}: {end.chunk_count} chunks / {end.size} bytes "
                f"!= offered {offer.chunk_count} / {offer.size}"
            )
        if end.chunk_count < self.stored:
            raise ProtocolError(
                f"end of stream {offer.stream_id}: {end.chunk_count} chunks, but {self.stored} "
                "are stored already"
            )
        if self.end is not None and self.end != end:
            raise ProtocolError(f"end of stream {offer.stream_id}: differs from the first end")
        self.end = end

    @property
    def complete(self) -> bool:
        """Every chunk is stored and the end is known: time to verify."""
        return (
            self.state == State.RECEIVING
            and self.end is not None
            and self.stored == self.end.chunk_count
        )

    @property
    def chunk_count(self) -> int | None:
        """Chunks in the stream, once known (from the offer, else from the end)."""
        if self.offer.chunk_count is not None:
            return self.offer.chunk_count
        return None if self.end is None else self.end.chunk_count

    def verify(self) -> Failure | None:
        """Check size and SHA-256 of the stored content against the end.

        On success the stream is VERIFYING until the caller has committed it (:meth:`mark_done`);
        on failure it is FAILED and the failure is returned.
        """
        self._apply(Event.COMPLETE)
        assert self.end is not None
        failure: Failure | None = None
        digest = self._sha.hexdigest()
        if self.stored_bytes != self.end.size:
            failure = Failure(
                FailureCode.SIZE, f"stored {self.stored_bytes} bytes != announced {self.end.size}"
            )
        elif digest != self.end.sha256:
            failure = Failure(
                FailureCode.CHECKSUM,
                f"stream {self.offer.stream_id}: sha256 {digest} != announced {self.end.sha256}",
            )
        if failure is not None:
            self.fail(failure)
        return failure

    def mark_done(self) -> None:
        """The verified content is committed under its final name."""
        self._apply(Event.VERIFIED)

    def suspend(self) -> None:
        """This receiver lets go of the stream; what is stored stays for a successor."""
        self._apply(Event.SUSPEND)

    def fail(self, failure: Failure) -> None:
        """Mark the stream failed (no-op if it already ended)."""
        if self.finished:
            return
        self._apply(Event.FAIL)
        self.failure = failure

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()
