"""Receiving a container so that it survives the receiving process: spooled, decoded at the end.

``listen`` receives containers this way. Each chunk's bytes go to a partial file exactly as a
file stream's do, so the state file, the take-over after a crash and the prefix's SHA-256 work
unchanged (see :mod:`~objstream.consumer.resume`); each chunk's length and meta go to a side
file, one JSON line per chunk. Once the whole stream is verified, the spool is read back chunk
by chunk into a :class:`~objstream.consumer.container_assembler.ContainerAssembler` (which
hands the entries to ``on_entry`` or builds the container) and removed.

The price: the container's size on disk a second time while it is in transit, and one more read
of it at the end. Memory stays what the entry decoding needs (one entry at a time with
``on_entry``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from objstream.common.errors import ObjstreamError
from objstream.common.naming import PARTIAL_PREFIX
from objstream.common.protocol import Offer
from objstream.common.streaming import ObjectAssembler
from objstream.consumer.container_assembler import ContainerAssembler, OnEntry
from objstream.consumer.file_sink import PartialFile, ReadBehind

READ_BLOCK = 1 << 20


def meta_path(dest: Path, stream_id: str) -> Path:
    return dest / f"{PARTIAL_PREFIX}{stream_id}.meta"


class ContainerSpool(ObjectAssembler):
    """The chunks of a container stream on disk, decoded when the stream is complete.

    ``reopen`` takes over the spool a dead receiver left with ``stored`` chunks
    (``stored_bytes`` bytes) recorded; lines or bytes past that are dropped.
    """

    resumable: ClassVar[bool] = True
    takes_inline: ClassVar[bool] = True  # a pwrite at its offset

    def __init__(
        self,
        dest: Path,
        offer: Offer,
        on_entry: OnEntry | None = None,
        *,
        reopen: bool = False,
        stored: int = 0,
        stored_bytes: int = 0,
        as_torch: bool = False,
    ) -> None:
        self.offer = offer
        self.on_entry = on_entry
        self.as_torch = as_torch
        self.dest = dest.resolve()
        # The decoder is built now too: a bad container description is refused with the offer.
        ContainerAssembler(offer)
        self.meta_path = meta_path(self.dest, offer.stream_id)
        self.sink = PartialFile(self.dest, offer.stream_id, offer.size or 0, reopen=reopen)
        try:
            if reopen:
                self._metas = self._reopen_metas(stored, stored_bytes)
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
                self._metas = os.open(self.meta_path, flags, 0o600)
        except BaseException:
            self.sink.suspend() if reopen else self.sink.discard()
            raise

    def _reopen_metas(self, stored: int, stored_bytes: int) -> int:
        with open(self.meta_path, "rb") as f:
            lines = [f.readline() for _ in range(stored)]
        try:
            total = sum(int(json.loads(line)[0]) for line in lines if line.endswith(b"\n"))
        except (ValueError, TypeError, KeyError, IndexError):
            total = -1
        if total != stored_bytes or not all(line.endswith(b"\n") for line in lines):
            raise ValueError(f"{self.meta_path} does not match the {stored} chunks recorded")
        os.truncate(self.meta_path, sum(len(line) for line in lines))
        os.truncate(self.sink.path, stored_bytes)
        return os.open(self.meta_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def take(self, offset: int, data: bytes, meta: Mapping[str, Any] | None) -> None:
        self.sink.write(offset, data)
        line = json.dumps([len(data), dict(meta) if meta else None], separators=(",", ":"))
        os.write(self._metas, line.encode() + b"\n")

    def finish(self) -> Any:
        """Decode the verified spool into entries (``on_entry``) or the container."""
        self.sink.suspend()  # written back; now only read
        assembler = ContainerAssembler(self.offer, self.on_entry, as_torch=self.as_torch)
        offset = 0
        try:
            with ReadBehind(self.sink.path) as spool, open(self.meta_path, "rb") as metas:
                for line in metas:
                    length, meta = json.loads(line)
                    data = spool.read(length)
                    if len(data) != length:
                        raise ObjstreamError(f"spool of {self.offer.name!r} does not match")
                    assembler.take(offset, data, meta)
                    offset += length
            result = assembler.finish()
        except (ObjstreamError, OSError):
            raise
        except Exception as e:  # an on_entry callback failed
            raise ObjstreamError(f"the receiving side failed: {e!r}") from e
        finally:
            self.discard()
        return result

    def suspend(self) -> None:
        self.sink.suspend()
        self._close_metas(sync=True)

    def discard(self) -> None:
        self.sink.discard()
        self._close_metas(sync=False)
        self.meta_path.unlink(missing_ok=True)

    def _close_metas(self, sync: bool) -> None:
        if self._metas >= 0:
            if sync:
                os.fsync(self._metas)
            os.close(self._metas)
            self._metas = -1
