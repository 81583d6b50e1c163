"""The producing half for containers: a dict, list or set, entry by entry, big entries chunked.

Every entry is encoded up front (so a value the codec cannot carry is refused before anything is
sent, naming its key and type) into a small msgpack structure plus views of its array and bytes
payloads, never copies. An entry's bytes are its structure followed by its payloads; they are cut
into chunks of at most ``chunk_size``, and a chunk never spans two entries. Any chunk can be
rebuilt from its number (random access), so resends cost no memory.

Piece meta: the first chunk of entry ``i`` carries ``{"entry": i, "head": len(structure),
"size": entry bytes}``, the others ``{"entry": i, "part": p}``. The first chunk of the first
entry of a ``.safetensors`` file (the container's, or a directory container's shard) also
announces that file's header length, ``safetensors_header``, so that a receiver writing it lays
the tensors out where the safetensors package would.
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from objstream.common.codec import Buffer, Encoded, EncodeError, FileRange, array_facts, encode
from objstream.common.protocol import CONTAINER_KIND, DIRECTORY_LAYOUT, LAYOUT_INFO, MAX_INFO_TEXT
from objstream.common.safetensors_format import HEADER_META, header_lengths
from objstream.common.streaming import MetaValue, ObjectStreamer, Piece
from objstream.producer.container_files import DIRECTORY_MARK, DirectoryContainer

CONTAINER_TYPES = {dict: "dict", list: "list", set: "set"}


@dataclass
class _Entry:
    regions: list[Buffer]
    starts: list[int]  # byte offset of each region within the entry
    head: int
    size: int


def _entry(encoded: Encoded) -> _Entry:
    regions: list[Buffer] = [memoryview(encoded.structure)]
    regions += (b if isinstance(b, FileRange) else b.cast("B") for b in encoded.buffers)
    sizes = [r.nbytes for r in regions]
    starts = [0, *accumulate(sizes)][:-1]
    return _Entry(regions, starts, len(encoded.structure), sum(sizes))


class ContainerSource(ObjectStreamer):
    """A dict (str or int keys), list or set, streamed entry by entry.

    A :class:`~objstream.producer.container_files.DirectoryContainer`, or a container whose
    name ends in ``/``, is offered as a directory of files (``info["layout"]``)."""

    kind = CONTAINER_KIND
    random_access = True

    def __init__(self, container: dict[Any, Any] | list[Any] | set[Any], name: str) -> None:
        directory = isinstance(container, DirectoryContainer)
        container_type = "dict" if directory else CONTAINER_TYPES.get(type(container))
        if container_type is None:
            raise EncodeError(
                f"container {name!r}: a {type(container).__name__} is not a dict, list or set"
            )
        self.container = container
        self.container_type = container_type
        self.name = name
        self.directory = directory or name.endswith(DIRECTORY_MARK)
        self._entries: list[_Entry] | None = None  # encoded once, whatever the chunk size
        self._dtypes: set[str] = set()  # wire dtypes of the entries that are one array
        self._non_arrays = 0  # entries that are not one array
        self._headers: dict[int, int] = {}  # entry -> safetensors header length it announces
        self._first_seq: list[int] = []

    def _encoded_entries(self) -> Iterator[Encoded]:
        container = self.container
        if isinstance(container, dict):
            self._count(container.values())
            for key, value in container.items():
                if type(key) not in (str, int):
                    raise EncodeError(
                        f"container {self.name!r}: key {key!r} is a {type(key).__name__}; "
                        "dict keys must be str or int"
                    )
                yield encode([key, value], where=f"container {self.name!r}, key {key!r}")
        elif isinstance(container, list):
            self._count(container)
            for index, value in enumerate(container):
                yield encode(value, where=f"container {self.name!r}, index {index}")
        else:
            self._count(container)
            for value in container:
                yield encode(value, where=f"container {self.name!r}, member {value!r:.40}")

    def _count(self, values: Iterable[Any]) -> None:
        self._dtypes.clear()
        self._non_arrays = 0
        for value in values:
            facts = array_facts(value)
            if facts is None:
                self._non_arrays += 1
            else:
                self._dtypes.add(facts.dtype)
        self._headers = header_lengths(self.container, self.name, directory=self.directory)

    def prepare(self, chunk_size: int) -> None:
        """Encode the entries (the first time only) and cut them into chunks of ``chunk_size``.

        Raises:
            EncodeError: an entry holds a value the codec cannot carry.
        """
        super().prepare(chunk_size)
        if self._entries is None:
            self._entries = [_entry(e) for e in self._encoded_entries()]
        parts = [max(1, -(-e.size // chunk_size)) for e in self._entries]
        self._first_seq = [0, *accumulate(parts)][:-1]
        self.chunk_count = sum(parts)
        self.size = sum(e.size for e in self._entries)

    def reuse(self) -> ContainerSource:
        """Another source over the same encoding (for serving it again without encoding again).

        The encoded entries are read-only views, so any number of copies may stream at once,
        each with its own chunk size.
        """
        twin = copy.copy(self)
        twin._first_seq = list(self._first_seq)
        return twin

    def info(self) -> dict[str, MetaValue]:
        """The container type and entry count; once prepared, also what a receiver needs to
        tell whether it can store the container as it asked (a ``.npz`` holds no bfloat16):
        the wire dtypes of the entries that are one array, and how many entries are not."""
        info: dict[str, MetaValue] = {
            "container": self.container_type,
            "entries": len(self.container),
        }
        if self.directory:
            info[LAYOUT_INFO] = DIRECTORY_LAYOUT
        if self._entries is not None:
            codes = ",".join(sorted(self._dtypes))
            if len(codes) <= MAX_INFO_TEXT:  # else each entry is checked as it arrives
                info["dtypes"] = codes
            info["non_arrays"] = self._non_arrays
        return info

    def pieces(self) -> Iterator[Piece]:
        for seq in range(self.chunk_count or 0):
            yield self.piece(seq)

    def piece(self, seq: int) -> Piece:
        assert self._entries is not None, "prepare() first"
        index = bisect.bisect_right(self._first_seq, seq) - 1
        entry = self._entries[index]
        part = seq - self._first_seq[index]
        start = part * self.chunk_size
        end = min(start + self.chunk_size, entry.size)
        meta: dict[str, MetaValue] = (
            {"entry": index, "head": entry.head, "size": entry.size}
            if part == 0
            else {"entry": index, "part": part}
        )
        if part == 0 and index in self._headers:
            meta[HEADER_META] = self._headers[index]
        return Piece(_gather(entry, start, end), meta)


def _gather(entry: _Entry, start: int, end: int) -> bytes:
    """Bytes ``start:end`` of an entry, across its regions (one copy, into the result; file
    ranges are read here, so a file's bytes are in memory one chunk at a time)."""
    first = bisect.bisect_right(entry.starts, start) - 1
    pieces: list[bytes | memoryview] = []
    for i in range(max(first, 0), len(entry.regions)):
        region_start = entry.starts[i]
        if region_start >= end:
            break
        region = entry.regions[i]
        lo = max(start - region_start, 0)
        hi = min(end - region_start, region.nbytes)
        if hi > lo:
            pieces.append(region.read(lo, hi) if isinstance(region, FileRange) else region[lo:hi])
    return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)
