"""Chunk sources: what the sender reads chunks from.

A source is random access by sequence number, because the sender may have to resend any chunk the
receiver has not stored yet (it keeps the source until the receiver's verdict). pika's
``basic_publish`` takes only ``bytes``, so a chunk is read straight into a fresh ``bytes`` object
(``os.pread``: one copy, from the kernel) and dropped once published: the sender holds one chunk
at a time, whatever the object's size.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol

from common.errors import ObjstreamError


class ChunkSource(Protocol):
    """What :class:`producer.sender.StreamSender` needs from an object to stream."""

    kind: str
    name: str
    size: int
    chunk_size: int

    @property
    def chunk_count(self) -> int: ...

    def read_chunk(self, seq: int) -> bytes:
        """The bytes of chunk ``seq`` (``chunk_size`` long, the last one maybe shorter)."""
        ...

    def close(self) -> None: ...


class SourceChanged(ObjstreamError):
    """The source changed while it was being streamed (for example a file was truncated)."""


class FileSource:
    """A regular file, read with ``preadv`` at ``seq * chunk_size``."""

    kind = "file"

    def __init__(self, path: str | os.PathLike[str], chunk_size: int) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.chunk_size = chunk_size
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise ObjstreamError(f"{self.path} is not a regular file")
            self.size = st.st_size
            # We read it front to back (resends aside): tell the kernel to read ahead.
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def read_chunk(self, seq: int) -> bytes:
        offset = seq * self.chunk_size
        length = min(self.chunk_size, self.size - offset)
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
                        f"{offset + got} of {self.size}"
                    )
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
