"""Receiving a container straight into the file it is saved as, chunk by chunk.

A container's stream is its entries one after the other, each a small msgpack structure
followed by its payload buffers (arrays, bytes; see ``producer/container_source.py``). The sink
collects an entry's structure (at most :data:`STRUCTURE_LIMIT` bytes), parses it without
allocating anything (:func:`~objstream.common.decoding.describe_structure`), asks the output
(:mod:`objstream.consumer.container_outputs`) where each buffer goes, and writes the payload
bytes there with ``pwrite`` as they arrive. No entry is ever whole in memory, and no byte is
written twice: the commit only finishes the file (a header, a zip directory), syncs and
renames it.

Like a file stream, it survives the receiving process: next to the output
(``.objstream-<id>.part``, a file, or a directory for a directory container) the sink keeps a
journal (``.objstream-<id>.meta``: a first line naming the output, then one JSON line per
entry as it starts, ``{"entry": i, "head": h, "size": s, "safetensors_header": n}``, and a
line for the bytes of a byte-swapped item cut by a chunk's end) and the entries' structures
(``.objstream-<id>.heads``, one after the other). A receiver that takes the stream over
replays the journal up to what the state file says is stored: the output is laid out again the
same way, and the prefix's SHA-256 (and a ``.npz`` member's CRC-32) is recomputed from what is
on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from objstream.common.decoding import Described, describe_structure
from objstream.common.errors import ProtocolError, SaveError
from objstream.common.naming import PARTIAL_PREFIX, partial_name
from objstream.common.protocol import Offer
from objstream.common.safetensors_format import HEADER_META, announced_header
from objstream.common.streaming import ObjectAssembler
from objstream.consumer.container_assembler import INLINE_STRUCTURE, container_facts, piece_of
from objstream.consumer.container_outputs import DirOutput, FileOutput
from objstream.consumer.destinations import Destination, Output
from objstream.consumer.file_sink import WriteBehind, free_bytes
from objstream.consumer.output_formats import check_offer, final_name, is_directory
from objstream.consumer.streams import Stored

STRUCTURE_LIMIT = 16 * 1024 * 1024
"""The largest entry structure a stored container takes: arrays and bytes travel as payload,
so only a great many plain values (a list of a million floats) make one this big."""
READ_BLOCK = 4 * 1024 * 1024
JOURNAL = 1


def journal_path(dest: Path, stream_id: str) -> Path:
    return dest / f"{PARTIAL_PREFIX}{stream_id}.meta"


def heads_path(dest: Path, stream_id: str) -> Path:
    return dest / f"{PARTIAL_PREFIX}{stream_id}.heads"


@dataclass(frozen=True)
class StoreOptions:
    """How a receiver stores containers (its ``store_containers`` options): under ``name``
    (None: each container's own), and whether to hand out memory maps of their arrays."""

    name: str | None = None
    memmap: bool = False


@dataclass
class _Entry:
    """The entry being received."""

    index: int
    head: int
    size: int
    at: int  # where its structure starts in the heads file
    header: int | None = None  # the safetensors header length it announces
    received: int = 0
    parts: int = 1
    structure: bytearray = field(default_factory=bytearray)
    destinations: list[Destination] | None = None
    buffer: int = 0  # the destination being filled
    position: int = 0  # bytes of it written
    carry: bytes = b""  # the start of a byte-swapped item cut by a chunk's end


class ContainerSink(ObjectAssembler):
    """Writes container stream ``offer`` into ``dest`` as the file ``name`` says (the offer's
    name by default): ``.npz``, ``.safetensors``, ``.json``, or a directory for a name ending
    in ``/`` (see :func:`~objstream.consumer.container_outputs.final_name`).

    ``as_memmap``: :meth:`finish` returns the arrays of a ``.safetensors`` or ``.npz`` as
    read-only memory maps of the stored file. ``reopen``: take over the stream a dead receiver
    left, ``stored`` chunks (``stored_bytes`` bytes) of it recorded.

    Raises:
        SaveError: the offer says the container cannot be stored as ``name`` asks.
        ProtocolError: the offer does not describe a container.
        OSError: the destination has no room for it, or cannot be written.
    """

    resumable: ClassVar[bool] = True
    takes_inline: ClassVar[bool] = True  # pwrites at known offsets

    def __init__(
        self,
        dest: Path,
        offer: Offer,
        name: str | None = None,
        *,
        as_memmap: bool = False,
        reopen: bool = False,
        stored: int = 0,
        stored_bytes: int = 0,
    ) -> None:
        self.dest = dest.resolve()
        self.offer = offer
        self.container_type, self.entries = container_facts(offer)
        self.as_memmap = as_memmap
        self.partial = self.dest / partial_name(offer.stream_id)
        self.journal_path = journal_path(self.dest, offer.stream_id)
        self.heads_path = heads_path(self.dest, offer.stream_id)
        self.done = 0
        self._current: _Entry | None = None
        self._heads_end = 0  # where the next structure goes in the heads file
        self._behind: dict[int, WriteBehind] = {}
        self._sha: Any = None
        if reopen:
            self.name = self._journal_name()
        else:
            directory = is_directory(offer)
            self.name = final_name(name if name is not None else offer.name, directory=directory)
            check_offer(offer, self.name, self.container_type)
            free = free_bytes(self.dest)
            if (offer.size or 0) > free:
                raise OSError(f"{offer.size} bytes do not fit: {free} bytes free in {self.dest}")
        self.output = self._output()
        try:
            self._journal = os.open(
                self.journal_path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
            self._heads = os.open(self.heads_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if reopen:
                self._replay(stored, stored_bytes)
            else:
                self._log({"journal": JOURNAL, "name": self.name})
        except BaseException:
            self._close_files()
            if reopen:
                self.output.close()
            else:
                self.output.discard()
                self._remove_files()
            raise

    def _output(self) -> Output:
        kind = DirOutput if self.name.endswith("/") else FileOutput
        return kind(self.dest, self.partial, self.name, self.container_type, self.entries)

    # -- taking pieces -----------------------------------------------------------------------------

    def inline(self, size: int, meta: Mapping[str, Any] | None) -> bool:
        """Pieces are ``pwrite`` calls, taken on the connection's thread; but one that may
        complete a structure over 1 MiB (parsed then) is taken on a thread of its own."""
        meta = meta or {}
        if "head" in meta:
            head = meta.get("head")
        else:
            current = self._current
            head = current.head if current is not None and current.destinations is None else 0
        return not (type(head) is int and head > INLINE_STRUCTURE)

    def take(self, offset: int, data: bytes, meta: Mapping[str, Any] | None) -> None:
        entry = self._entry_of(meta or {})
        view = memoryview(data)
        if entry.received + len(view) > entry.size:
            raise ProtocolError(
                f"entry {entry.index}: {entry.received + len(view)} bytes > announced {entry.size}"
            )
        self._feed(entry, view)
        if entry.carry:
            self._log({"carry": entry.carry.hex(), "end": offset + len(view)})
        if entry.received == entry.size:
            self._end(entry)

    def _entry_of(self, meta: Mapping[str, Any]) -> _Entry:
        """The entry a piece with ``meta`` belongs to (a new one for its first piece)."""
        current = self._current
        where = None if current is None else (current.index, current.parts)
        start = piece_of(meta, where, self.done, self.entries, self.name)
        if start is None:
            assert current is not None
            current.parts += 1
            return current
        head, size = start
        self._check_head(self.done, head)
        header = announced_header(meta)
        self._log({"entry": self.done, "head": head, "size": size, HEADER_META: header})
        self._current = _Entry(self.done, head, size, self._heads_end, header)
        self._heads_end += head
        return self._current

    @staticmethod
    def _check_head(index: int, head: int) -> None:
        if head > STRUCTURE_LIMIT:
            raise SaveError(
                f"entry {index}: its structure is {head} bytes, more than the "
                f"{STRUCTURE_LIMIT} a stored container takes (send big values as arrays)"
            )

    def _feed(self, entry: _Entry, data: memoryview) -> None:
        entry.received += len(data)
        if entry.destinations is None:
            need = entry.head - len(entry.structure)
            part = data[:need]
            os.pwrite(self._heads, part, entry.at + len(entry.structure))
            entry.structure += part
            data = data[need:]
            if len(entry.structure) < entry.head:
                return
            self._begin(entry)
        self._payload(entry, data)

    def _begin(self, entry: _Entry) -> None:
        """The entry's structure is whole: where its payload goes."""
        payload = entry.size - entry.head
        described = describe_structure(bytes(entry.structure), max_payload=payload)
        if described.payload_size != payload:
            raise ProtocolError(
                f"entry {entry.index}: its value announces {described.payload_size} payload "
                f"bytes, the entry carries {payload}"
            )
        _check_pair(entry.index, described, self.container_type)
        entry.structure = bytearray()
        entry.destinations = self.output.begin(entry.index, described, entry.header)
        for destination in entry.destinations:
            if destination.fd not in self._behind:
                self._behind[destination.fd] = WriteBehind(destination.fd)

    def _payload(self, entry: _Entry, data: memoryview) -> None:
        destinations = entry.destinations
        assert destinations is not None
        while data:
            target = destinations[entry.buffer]
            room = target.size - entry.position
            if room == 0:
                entry.buffer += 1
                entry.position = 0
                entry.carry = b""
                continue
            part = data[:room]
            self._put(entry, target, part)
            entry.position += len(part)
            data = data[len(part) :]

    def _put(self, entry: _Entry, target: Destination, part: memoryview) -> None:
        if target.crc is not None:
            target.crc.value = zlib.crc32(part, target.crc.value)
        at = target.offset + entry.position
        if target.swap is not None:  # whole items only, swapped; a cut one waits in carry
            at -= len(entry.carry)
            joined = entry.carry + part
            whole = len(joined) - len(joined) % target.swap.itemsize
            entry.carry = joined[whole:]
            swapped = np.frombuffer(joined[:whole], target.swap).byteswap()
            part = memoryview(swapped.tobytes())
        _pwrite(target.fd, part, at)
        self._behind[target.fd].wrote(len(part), at + len(part))

    def _end(self, entry: _Entry) -> None:
        self.output.end(entry.index)
        self.done += 1
        self._current = None

    # -- the end -----------------------------------------------------------------------------------

    def finish(self) -> Stored:
        if self._current is not None or self.done != self.entries:
            raise ProtocolError(
                f"container {self.offer.name!r}: {self.done} complete entries != announced "
                f"{self.entries}"
            )
        for behind in self._behind.values():
            behind.wait()
        path = self.output.finish()
        self._close_files()
        self._remove_files()
        value = self._memmaps(path) if self.as_memmap else None
        return Stored(path, value)

    def _memmaps(self, path: Path) -> Any:
        if not isinstance(self.output, FileOutput) or self.output.fmt == ".json":
            return None
        maps = [
            (
                a.name,
                np.memmap(
                    path,
                    a.dtype,
                    "r",
                    a.offset,
                    a.shape,
                    "F" if a.fortran else "C",
                )
                if math.prod(a.shape)
                else np.empty(a.shape, a.dtype),  # mmap cannot map zero bytes
            )
            for a in self.output.arrays()
        ]
        if self.container_type == "dict":
            return dict(maps)
        return [array for _, array in maps]

    def suspend(self) -> None:
        """Keep what was written (synced) for a receiver that takes the stream over."""
        for fd, behind in self._behind.items():
            behind.wait()
            os.fdatasync(fd)
        for fd in (self._journal, self._heads):
            if fd >= 0:
                os.fdatasync(fd)
        self.output.close()
        self._close_files()

    def discard(self) -> None:
        for behind in self._behind.values():
            behind.wait()
        self.output.discard()
        self._close_files()
        self._remove_files()

    def prefix_sha256(self) -> Any:
        """The SHA-256 (a hashlib object) of the stream's bytes stored, recomputed by
        :meth:`_replay` (a taken-over stream only)."""
        assert self._sha is not None, "only a reopened sink knows its prefix"
        return self._sha

    def _log(self, record: dict[str, Any]) -> None:
        os.write(self._journal, json.dumps(record).encode() + b"\n")

    def _close_files(self) -> None:
        for name in ("_journal", "_heads"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def _remove_files(self) -> None:
        self.journal_path.unlink(missing_ok=True)
        self.heads_path.unlink(missing_ok=True)

    # -- taking a stream over ----------------------------------------------------------------------

    def _journal_name(self) -> str:
        with open(self.journal_path, "rb") as f:
            first = _record(f.readline())
        name = first.get("name")
        if first.get("journal") != JOURNAL or not isinstance(name, str) or final_name(name) != name:
            raise ValueError(f"{self.journal_path} is not a container journal this version reads")
        return name

    def _replay(self, stored: int, stored_bytes: int) -> None:
        """Lay the output out again from the journal, up to ``stored_bytes`` of the stream, and
        hash those bytes back from disk."""
        entries, carries, keep = self._read_journal(stored_bytes)
        sha = hashlib.sha256()
        at = chunks = 0
        chunk_size = self.offer.chunk_size
        for index, head, size, header in entries:
            if index != self.done:
                raise ValueError(f"journal: entry {index} where {self.done} was expected")
            self._check_head(index, head)
            entry = _Entry(index, head, size, self._heads_end, header)
            self._heads_end += head
            self._current = entry
            got = min(size, stored_bytes - at)
            entry.parts = max(1, -(-got // chunk_size))
            chunks += entry.parts if got < size else max(1, -(-size // chunk_size))
            structure = os.pread(self._heads, min(head, got), entry.at)
            if len(structure) != min(head, got):
                raise ValueError("journal: an entry's structure is short")
            sha.update(structure)
            entry.structure = bytearray(structure)
            entry.received = len(structure)
            if got >= head:
                self._begin(entry)
                self._reread(entry, got - head, sha, carries.get(at + got, b""))
                entry.received = got
            at += size
            if got == size:
                self._end(entry)
        if at < stored_bytes or chunks != stored:
            raise ValueError(
                f"journal: {chunks} chunks ({min(at, stored_bytes)} bytes) where the state "
                f"says {stored} ({stored_bytes})"
            )
        os.ftruncate(self._journal, keep)
        os.ftruncate(self._heads, self._heads_end)
        self._sha = sha

    def _read_journal(
        self, stored_bytes: int
    ) -> tuple[list[tuple[int, int, int, int | None]], dict[int, bytes], int]:
        """The entries begun within the first ``stored_bytes`` (index, head, size, announced
        header), the carried bytes by where their chunk ends, and the journal's length up to
        the last entry kept."""
        entries: list[tuple[int, int, int, int | None]] = []
        carries: dict[int, bytes] = {}
        at = 0
        with open(self.journal_path, "rb") as f:
            keep = len(f.readline())
            for line in f:
                if not line.endswith(b"\n"):
                    break  # torn by the crash: past anything recorded
                record = _record(line)
                if "carry" in record:
                    carries[_int(record, "end")] = bytes.fromhex(str(record["carry"]))
                elif at >= stored_bytes:
                    break
                else:
                    index, head, size = (_int(record, k) for k in ("entry", "head", "size"))
                    entries.append((index, head, size, announced_header(record)))
                    at += size
                keep += len(line)
        return entries, carries, keep

    def _reread(self, entry: _Entry, payload: int, sha: Any, carry: bytes) -> None:
        """Read the first ``payload`` bytes of the entry's payload back from the output: into
        the prefix's hash (as they came: un-swapped), a ``.npz`` member's CRC-32, and the
        entry's place (``carry``: the journal's bytes of a swapped item cut at the end)."""
        assert entry.destinations is not None
        for index, target in enumerate(entry.destinations):
            length = min(payload, target.size)
            cut = length % target.swap.itemsize if target.swap is not None else 0
            if cut and len(carry) != cut:
                raise ValueError("journal: the bytes of a cut item are missing")
            self._hash_back(target, length - cut, sha)
            sha.update(carry[:cut])
            entry.buffer, entry.position, entry.carry = index, length, carry[:cut]
            payload -= length
            if payload == 0:
                return

    @staticmethod
    def _hash_back(target: Destination, length: int, sha: Any) -> None:
        done = 0
        while done < length:
            want = min(READ_BLOCK, length - done)
            block = os.pread(target.fd, want, target.offset + done)
            if len(block) != want:
                raise ValueError("the output is shorter than the journal says")
            if target.crc is not None:
                target.crc.value = zlib.crc32(block, target.crc.value)
            if target.swap is not None:
                block = np.frombuffer(block, target.swap).byteswap().tobytes()
            sha.update(block)
            done += want


def _check_pair(index: int, described: Described, container_type: str) -> None:
    if container_type != "dict":
        return
    raw = described.raw
    if not (isinstance(raw, list) and len(raw) == 2 and type(raw[0]) in (str, int)):
        raise ProtocolError(f"entry {index}: not a (str or int key, value) pair")


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _record(line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise ValueError(f"journal: unreadable line {line[:80]!r}")
    return record


def _int(record: dict[str, Any], key: str) -> int:
    value = record.get(key)
    if type(value) is not int or value < 0:
        raise ValueError(f"journal: {key} {value!r}")
    return value
