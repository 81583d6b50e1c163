"""The consuming half for containers: entries rebuilt in place, kept or handed to a callback.

Each entry's bytes are its msgpack structure followed by its payloads (see
``producer/container_source.py``). The structure is collected, parsed with the safe codec, which
preallocates every array and bytes buffer it announces, and the payload bytes that follow are
written straight into those buffers: no second copy. With ``on_entry`` each entry is handed over
as soon as it is complete and not kept, so a container larger than memory can be processed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from objstream.common.decoding import Decoded, decode_structure
from objstream.common.errors import ProtocolError
from objstream.common.protocol import Offer
from objstream.common.streaming import ObjectAssembler

CONTAINER_TYPES = ("dict", "list", "set")
INLINE_STRUCTURE = 1024 * 1024
"""The largest entry structure parsed on the connection's thread (a few ms at most)."""


@dataclass(frozen=True)
class ContainerEntry:
    """One complete entry of a container being received."""

    stream_id: str
    name: str
    """The container's name."""
    container_type: str
    """``dict``, ``list`` or ``set``."""
    index: int
    """Position in the stream (0-based)."""
    key: Any
    """The dict key, the list index, or ``None`` for a set member."""
    value: Any


OnEntry = Callable[[ContainerEntry], None]


def piece_of(
    meta: Mapping[str, Any], current: tuple[int, int] | None, done: int, entries: int, name: str
) -> tuple[int, int] | None:
    """Where the piece with ``meta`` belongs in container ``name`` (``entries`` announced,
    ``done`` complete, ``current`` the entry in progress and the pieces it had).

    Returns:
        ``(head, size)`` for the first piece of entry ``done``; None for the next piece of
        the current entry.

    Raises:
        ProtocolError: it belongs nowhere (out of order, an entry that starts before the last
            one ended, a bad head).
    """
    index = meta.get("entry")
    if "head" not in meta:
        if current is None or index != current[0] or meta.get("part") != current[1]:
            raise ProtocolError(f"unexpected piece {dict(meta)!r} of container {name!r}")
        return None
    if current is not None:
        raise ProtocolError(f"entry {index} starts before entry {current[0]} ends")
    head, size = meta.get("head"), meta.get("size")
    if index != done or done >= entries:
        raise ProtocolError(f"entry {index} out of order (expected {done})")
    if type(head) is not int or type(size) is not int or not 1 <= head <= size:
        raise ProtocolError(f"entry {index}: bad head {head!r} / size {size!r}")
    return head, size


def container_facts(offer: Offer) -> tuple[str, int]:
    """The container type and entry count a container offer announces.

    Raises:
        ProtocolError: it announces none, or more entries than it has chunks.
    """
    info = offer.info or {}
    container_type = info.get("container")
    entries = info.get("entries")
    if container_type not in CONTAINER_TYPES:
        raise ProtocolError(f"container offer with container type {container_type!r}")
    if type(entries) is not int or entries < 0:
        raise ProtocolError(f"container offer with entry count {entries!r}")
    if offer.chunk_count is not None and entries > offer.chunk_count:
        raise ProtocolError(f"{entries} entries cannot fit in {offer.chunk_count} chunks")
    return str(container_type), entries


class _EntryInProgress:
    def __init__(self, index: int, head: int, size: int) -> None:
        self.index = index
        self.head = head
        self.size = size
        self.received = 0
        self.parts = 1
        self.structure = bytearray()
        self.decoded: Decoded | None = None
        self.region = 0  # region being filled
        self.region_offset = 0

    def feed(self, data: memoryview) -> None:
        if self.received + len(data) > self.size:
            raise ProtocolError(
                f"entry {self.index}: {self.received + len(data)} bytes > announced {self.size}"
            )
        self.received += len(data)
        if self.decoded is None:
            need = self.head - len(self.structure)
            self.structure += data[:need]
            data = data[need:]
            if len(self.structure) < self.head:
                return
            payload = self.size - self.head
            self.decoded = decode_structure(bytes(self.structure), max_payload=payload)
            if self.decoded.payload_size != payload:
                raise ProtocolError(
                    f"entry {self.index}: its value announces {self.decoded.payload_size} "
                    f"payload bytes, the entry carries {payload}"
                )
            self.structure = bytearray()
        regions = self.decoded.regions
        while data:
            region = regions[self.region]
            room = region.nbytes - self.region_offset
            if room == 0:
                self.region += 1
                self.region_offset = 0
                continue
            take = min(room, len(data))
            region[self.region_offset : self.region_offset + take] = data[:take]
            self.region_offset += take
            data = data[take:]

    @property
    def complete(self) -> bool:
        return self.decoded is not None and self.received == self.size


class ContainerAssembler(ObjectAssembler):
    """Rebuilds a dict, list or set from its entries (or hands each to ``on_entry``)."""

    def __init__(
        self, offer: Offer, on_entry: OnEntry | None = None, *, as_torch: bool = False
    ) -> None:
        self.container_type, self.entries = container_facts(offer)
        self.stream_id = offer.stream_id
        self.name = offer.name
        self.on_entry = on_entry
        self.as_torch = as_torch
        """Numpy arrays in entries become torch tensors sharing their memory (objstream[torch])."""
        self.done = 0
        self._current: _EntryInProgress | None = None
        self._items: list[Any] = []
        self._dict: dict[Any, Any] = {}

    def inline(self, size: int, meta: Mapping[str, Any] | None) -> bool:
        """A piece is a copy into buffers allocated already, and may be taken on the
        connection's thread, unless it carries a big structure to parse or completes an entry
        that ``on_entry`` (user code) then gets."""
        meta = meta or {}
        if "head" in meta:
            head, total = meta.get("head"), meta.get("size")
            if type(head) is not int or head > INLINE_STRUCTURE:
                return False
            completes = total == size
        else:
            current = self._current
            completes = current is None or current.received + size >= current.size
        return not (completes and self.on_entry is not None)

    def take(self, offset: int, data: bytes, meta: Mapping[str, Any] | None) -> None:
        current = self._current
        where = None if current is None else (current.index, current.parts)
        start = piece_of(meta or {}, where, self.done, self.entries, self.name)
        if start is not None:
            self._current = _EntryInProgress(self.done, *start)
        else:
            assert current is not None
            current.parts += 1
        assert self._current is not None
        self._current.feed(memoryview(data))
        if self._current.complete:
            self._emit(self._current)
            self._current = None

    def _emit(self, entry: _EntryInProgress) -> None:
        assert entry.decoded is not None
        value = entry.decoded.value()
        if self.as_torch:
            from objstream.common.torch_bridge import as_torch

            value = as_torch(value)
        key: Any
        if self.container_type == "dict":
            if not (isinstance(value, list) and len(value) == 2 and type(value[0]) in (str, int)):
                raise ProtocolError(f"entry {entry.index}: not a (str or int key, value) pair")
            key, value = value
        elif self.container_type == "list":
            key = entry.index
        else:
            key = None
        self.done += 1
        if self.on_entry is not None:
            self.on_entry(
                ContainerEntry(
                    self.stream_id, self.name, self.container_type, entry.index, key, value
                )
            )
        elif self.container_type == "dict":
            self._dict[key] = value
        else:
            self._items.append(value)

    def finish(self) -> Any:
        if self._current is not None or self.done != self.entries:
            raise ProtocolError(
                f"container {self.name!r}: {self.done} complete entries != announced {self.entries}"
            )
        if self.on_entry is not None:
            return None
        if self.container_type == "dict":
            return self._dict
        if self.container_type == "set":
            try:
                return set(self._items)
            except TypeError as e:
                raise ProtocolError(
                    f"container {self.name!r}: unhashable set member: {e}"
                ) from None
        return self._items

    def discard(self) -> None:
        self._dict.clear()
        self._items.clear()
        self._current = None
