"""What a sender reads: pieces by number for its cursors, and the one digest of the source.

A random-access source (a file) is read again for every resend and every target; an iterator
(a container) keeps its last window of pieces for resends. Either way the source is hashed once,
in order, by whichever cursor first reads each piece.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator

from objstream.common.digests import RunningSha256
from objstream.common.errors import ObjstreamError
from objstream.common.streaming import ObjectStreamer, Piece

log = logging.getLogger(__name__)


class SharedDigest:
    """One SHA-256 of the source, fed by whichever cursor first reads each chunk in order.

    Every cursor reads chunks 0..n-1 in order at least once (resends only go back), so the
    leading cursor always reads the next unhashed chunk: the source is hashed once, however many
    targets there are.
    """

    def __init__(self) -> None:
        self._sha = RunningSha256()  # on a worker thread, while the chunk is published
        self.hashed = 0

    def prefix_matches(self, expected: str) -> bool:
        return bool(self._sha.copy().hexdigest() == expected)

    def feed(self, seq: int, data: bytes) -> None:
        if seq == self.hashed:
            self._sha.update(data)
            self.hashed += 1

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class PieceReader:
    """Pieces by number, for the cursors: straight from a random-access streamer, or from the
    streamer's iterator with the last pieces kept for resends.

    For an iterator, every target is held within one window of the slowest (``lockstep``), so
    the kept pieces never exceed one window.
    """

    def __init__(self, streamer: ObjectStreamer) -> None:
        self.streamer = streamer
        self.digest = SharedDigest()
        self.lockstep = not streamer.random_access
        self.count = streamer.chunk_count
        self.size = streamer.size if streamer.size is not None else 0
        self._produced = 0
        self._kept: deque[Piece] = deque()  # pieces _kept_from .. _produced-1
        self._kept_from = 0
        self._iterator: Iterator[Piece] | None = None
        if streamer.random_access:
            if streamer.chunk_count is None or streamer.size is None:
                raise ObjstreamError(
                    f"{streamer.kind} {streamer.name!r}: random access "
                    "streamers must know size and chunk_count"
                )
        else:
            self._iterator = iter(streamer.pieces())

    def get(self, seq: int) -> Piece | None:
        """Piece ``seq``, or ``None`` past the last one."""
        if self.count is not None and seq >= self.count:
            return None
        if self._iterator is None:
            piece = self.streamer.piece(seq)
        elif seq < self._produced:
            if seq < self._kept_from:
                raise AssertionError(f"piece {seq} was already released")
            return self._kept[seq - self._kept_from]
        else:
            assert seq == self._produced
            try:
                piece = next(self._iterator)
            except StopIteration:
                self.count = seq  # now the number of pieces is known
                return None
            self._kept.append(piece)
            self._produced += 1
            self.size += len(piece.data)
        self._check(seq, piece)
        self.digest.feed(seq, piece.data)
        return piece

    def _check(self, seq: int, piece: Piece) -> None:
        if len(piece.data) > self.streamer.chunk_size:
            raise ObjstreamError(
                f"{self.streamer.kind} {self.streamer.name!r}: piece {seq} has "
                f"{len(piece.data)} bytes, more than the chunk size {self.streamer.chunk_size}"
            )

    def release_before(self, seq: int) -> None:
        """Every target stored the pieces before ``seq``: forget them."""
        while self._kept and self._kept_from < seq:
            self._kept.popleft()
            self._kept_from += 1


def check_prefix(reader: PieceReader, resume_from: int, expected: str) -> int:
    """``resume_from`` if the source's first ``resume_from`` chunks hash to ``expected`` (the
    reader's digest then holds them, as the end's SHA-256 covers the whole), else 0."""
    source = reader.streamer
    if not source.random_access or reader.count is None or resume_from > reader.count:
        log.info(
            "%s %r cannot resume from chunk %d; sending it whole",
            source.kind,
            source.name,
            resume_from,
        )
        return 0
    try:
        for seq in range(resume_from):
            reader.get(seq)  # feeds the digest, one chunk at a time
    except (OSError, ObjstreamError) as e:
        log.info(
            "%s %r: cannot read the kept prefix (%s); sending it whole", source.kind, source.name, e
        )
        reader.digest = SharedDigest()
        return 0
    if not reader.digest.prefix_matches(expected):
        log.info(
            "%s %r changed since the requester's first %d chunks; sending it whole",
            source.kind,
            source.name,
            resume_from,
        )
        reader.digest = SharedDigest()
        return 0
    log.info(
        "%s %r resumes from chunk %d of %d", source.kind, source.name, resume_from, reader.count
    )
    return resume_from
