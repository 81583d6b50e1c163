"""Producing halves for files: :class:`FileSource` cuts a file into chunks by offset.

A file is random access by sequence number, so the sender can resend any chunk the receiver has
not stored yet (it keeps the file open until the receiver's verdict) without keeping a copy.
pika's ``basic_publish`` takes only ``bytes``, so a chunk is read straight into a fresh ``bytes``
object (``os.pread``: one copy, from the kernel) and dropped once published: the sender holds one
chunk at a time, whatever the file's size.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from objstream.common.errors import FailureCode, ObjstreamError
from objstream.common.protocol import FILE_KIND
from objstream.common.streaming import ObjectStreamer, Piece


class SourceChanged(ObjstreamError):
    """The source changed while it was being streamed: written to, truncated, or replaced.

    What the receivers got (and verified against the sender's running digest) is then not the
    file as it is now, nor necessarily as it was at any one moment.
    """

    code = FailureCode.SOURCE_CHANGED

    def __init__(self, path: Path, changes: str) -> None:
        self.path = path
        self.changes = changes
        """What differs, observed at the start -> now (``size 10 -> 5, mtime ...``)."""
        super().__init__(f"{path} changed while it was being sent: {changes}")


_Identity = tuple[int, int, int, int, int]
"""``(st_size, st_mtime_ns, st_ctime_ns, st_ino, st_dev)``: a regular file, as fstat sees it."""


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _when(ns: int) -> str:
    seconds, fraction = divmod(ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{moment}.{fraction:09d}Z"


def _differences(was: _Identity, now: _Identity) -> list[str]:
    """What differs between two fstats of one open file, in words."""
    (size, mtime, ctime, *_), (size2, mtime2, ctime2, *_) = was, now
    words = []
    if mtime != mtime2:
        words.append(f"mtime {_when(mtime)} -> {_when(mtime2)}")
    if size != size2:
        words.append(f"size {size} -> {size2}")
    if ctime != ctime2 and mtime == mtime2:  # written with its mtime put back, or chmod...
        words.append(f"ctime {_when(ctime)} -> {_when(ctime2)}")
    return words


class FileSource(ObjectStreamer):
    """A regular file, read with ``pread`` at ``seq * chunk_size``.

    The file must stay as it was when opened until the receivers' verdict: its size, times,
    inode and device are taken at open and compared after each chunk read (``fstat`` of the
    open file, which sees writes and truncation) and with ``stat`` of the path (which sees a
    new file renamed over it), and :meth:`check_unchanged` does the same before the end is
    published. Any difference raises :class:`SourceChanged`. Time stamps are all there is to see
    a same-size write by, short of reading twice: where they are coarse (Linux before 6.13: a
    clock tick, some ms), such a write within the tick of the file's last change before the
    open goes unseen.
    """

    kind = FILE_KIND
    random_access = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self._where = os.path.abspath(self.path)  # a chdir meanwhile is no replacement
        # Non-blocking: opening a FIFO for reading would wait for a writer, for ever.
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise ObjstreamError(f"{self.path} is not a regular file")
            os.set_blocking(self._fd, True)
            self.size = self._file_size = st.st_size
            self._base = 0  # where the bytes streamed begin (restrict)
            self._identity = _identity(st)
            # We read it front to back (resends aside): tell the kernel to read ahead.
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            os.close(self._fd)
            raise

    def restrict(self, start: int, end: int) -> None:
        """Stream only bytes ``start`` to ``end`` (exclusive) of the file, before
        :meth:`prepare`: chunk 0 begins at ``start``. The whole file is still watched for
        changes.

        Raises:
            ValueError: the range is empty or not within the file.
        """
        if not 0 <= start < end <= self._file_size:
            raise ValueError(
                f"bytes {start}:{end} are not within the {self._file_size} of {self.name}"
            )
        self._base, self._file_size = start, end - start
        self.size = self._file_size

    def prepare(self, chunk_size: int) -> None:
        super().prepare(chunk_size)
        self.chunk_count = -(-self._file_size // chunk_size)

    def pieces(self) -> Iterator[Piece]:
        for seq in range(self.chunk_count or 0):
            yield self.piece(seq)

    def piece(self, seq: int) -> Piece:
        return Piece(self.read_chunk(seq))

    def read_chunk(self, seq: int) -> bytes:
        """The bytes of chunk ``seq`` (``chunk_size`` long, the last one maybe shorter).

        Raises:
            SourceChanged: the file is not as it was when opened (checked after the read: a
                write updates the times before it copies, so one racing the read is seen).
        """
        offset = self._base + seq * self.chunk_size
        length = min(self.chunk_size, self._base + self._file_size - offset)
        data = os.pread(self._fd, length, offset)
        if len(data) < length:
            data = self._read_rest(seq, data, offset, length)
        self.check_unchanged()
        return data

    def _read_rest(self, seq: int, data: bytes, offset: int, length: int) -> bytes:
        # Rare (a signal, a huge chunk): finish the read piecewise before calling it shrunk.
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(self._fd, length - got, offset + got)
            if not more:
                self.check_unchanged()  # says how, when the file system shows it
                raise SourceChanged(
                    self.path,
                    f"it shrank: chunk {seq} ends at byte {offset + got} of {self._file_size}",
                )
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def check_unchanged(self) -> None:
        """Check that the file is still the one opened, as it was: call it before publishing
        the end of the stream (the last read may be long before).

        Raises:
            SourceChanged: its size, modification or change time differ, or its path now
                names another file (replaced) or nothing (removed).
        """
        now = _identity(os.fstat(self._fd))
        try:
            named = os.stat(self._where)
            found: tuple[int, int] | None = (named.st_ino, named.st_dev)
        except FileNotFoundError:
            found = None
        opened = self._identity[3:]
        if now == self._identity and found == opened:
            return
        changes = _differences(self._identity, now)
        if found is None:
            changes.insert(0, "removed or renamed")
        elif found != opened:
            changes.insert(
                0,
                "replaced (inode {} on device {} -> inode {} on device {})".format(*opened, *found),
            )
        raise SourceChanged(self.path, ", ".join(changes))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
