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
from pathlib import Path

from objstream.common.errors import ObjstreamError
from objstream.common.protocol import FILE_KIND
from objstream.common.streaming import ObjectStreamer, Piece


class SourceChanged(ObjstreamError):
    """The source changed while it was being streamed (for example a file was truncated)."""


class FileSource(ObjectStreamer):
    """A regular file, read with ``pread`` at ``seq * chunk_size``."""

    kind = FILE_KIND
    random_access = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise ObjstreamError(f"{self.path} is not a regular file")
            self.size = self._file_size = st.st_size
            # We read it front to back (resends aside): tell the kernel to read ahead.
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            os.close(self._fd)
            raise

    def prepare(self, chunk_size: int) -> None:
        super().prepare(chunk_size)
        self.chunk_count = -(-self._file_size // chunk_size)

    def pieces(self) -> Iterator[Piece]:
        for seq in range(self.chunk_count or 0):
            yield self.piece(seq)

    def piece(self, seq: int) -> Piece:
        return Piece(self.read_chunk(seq))

    def read_chunk(self, seq: int) -> bytes:
        """The bytes of chunk ``seq`` (``chunk_size`` long, the last one maybe shorter)."""
        offset = seq * self.chunk_size
        length = min(self.chunk_size, self._file_size - offset)
        data = os.pread(self._fd, length, offset)
        if len(data) < length:
            # Rare (a signal, a huge chunk): finish the read piecewise before calling it shrunk.
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(self._fd, length - got, offset + got)
                if not more:
                    raise SourceChanged(
                        f"{self.path} shrank while streaming: chunk {seq} ends at byte "
                        f"{offset + got} of {self._file_size}"
                    )
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
