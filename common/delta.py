"""Delta transfer, the pure parts: the manifest a sender publishes and the chunks a target holds.

A target that already holds pieces of an object (an earlier version of it, from the same
sender) need not get them again (docs/protocol.md, "Delta transfer"). The sender's offer says
it can send a delta (``info.delta = "sha256"``); a target that holds something of that sender's
says so in its first ``progress`` (``delta``); the sender then publishes a :class:`Manifest` to
it (the SHA-256 of every chunk, and for a container the layout of every entry), and the target
answers which chunks it holds (:class:`Holds`, a bitmap). The sender never publishes a chunk to
a target that holds it; the target copies it from what it stored, checks it against the
manifest's digest, and verifies the whole object's SHA-256 as always.

No I/O here: the sender's driver hashes the source, the receiver's finds what it holds
(:mod:`objstream.consumer.held`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from objstream.common.errors import ProtocolError
from objstream.common.streaming import MetaValue

DELTA_INFO = "delta"
"""The offer's ``info`` key: the sender may send a delta (its value names the digest)."""
DELTA_DIGEST = "sha256"
DIGEST_SIZE = 32
MAX_DELTA_CHUNKS = 262_144
"""Most chunks an object sent as a delta has (its bitmap is then 32 KiB: it fits a header)."""
MIN_DELTA_CHUNK = 4096
"""Smallest chunk size a delta is offered in (smaller ones cost more in digests than they save)."""
ENTRY = struct.Struct(">IQI")
"""A container entry in a manifest: ``head``, ``size``, ``safetensors_header`` (0: none)."""


def offers_delta(*, random_access: bool, chunk_size: int, chunk_count: int | None) -> bool:
    """Can an object of this shape go as a delta? (Its source reads any chunk again, and its
    manifest and bitmap stay small.)"""
    return (
        random_access
        and chunk_size >= MIN_DELTA_CHUNK
        and chunk_count is not None
        and 0 < chunk_count <= MAX_DELTA_CHUNKS
    )


def asks_delta(info: Mapping[str, MetaValue] | None) -> bool:
    """Does an offer's ``info`` say its sender may send a delta?"""
    return info is not None and info.get(DELTA_INFO) == DELTA_DIGEST


@dataclass(frozen=True)
class EntryLayout:
    """Where a container entry is in the stream, and what its first chunk's meta says."""

    first: int  # its first chunk
    parts: int  # its chunks
    head: int
    size: int
    safetensors_header: int = 0

    def meta(self, index: int, seq: int) -> dict[str, MetaValue]:
        """The meta of chunk ``seq`` (one of this entry's), as the sender would send it."""
        if seq > self.first:
            return {"entry": index, "part": seq - self.first}
        meta: dict[str, MetaValue] = {"entry": index, "head": self.head, "size": self.size}
        if self.safetensors_header:
            meta["safetensors_header"] = self.safetensors_header
        return meta


@dataclass(frozen=True)
class Manifest:
    """The SHA-256 of every chunk of an object, and for a container its entries' layout.

    The wire form (the body of a ``manifest`` message): ``chunk_count`` digests of 32 bytes,
    in chunk order, then for a container ``entries`` records of 16 bytes (``>IQI``: head,
    size, safetensors header length or 0), in entry order.
    """

    digests: bytes
    entries: tuple[EntryLayout, ...] = ()

    @property
    def chunk_count(self) -> int:
        return len(self.digests) // DIGEST_SIZE

    def digest(self, seq: int) -> bytes:
        return self.digests[seq * DIGEST_SIZE : (seq + 1) * DIGEST_SIZE]

    def body(self) -> bytes:
        records = (ENTRY.pack(e.head, e.size, e.safetensors_header) for e in self.entries)
        return self.digests + b"".join(records)

    def entry_key(self, index: int) -> bytes:
        """What identifies entry ``index`` whatever its position: the SHA-256 of its chunks'
        digests, its head and size (the same bytes cut the same way)."""
        entry = self.entries[index]
        sha = hashlib.sha256(ENTRY.pack(entry.head, entry.size, 0))
        sha.update(
            self.digests[entry.first * DIGEST_SIZE : (entry.first + entry.parts) * DIGEST_SIZE]
        )
        return sha.digest()

    @classmethod
    def parse(
        cls, body: bytes, *, chunk_count: int, entries: int, chunk_size: int, size: int
    ) -> Manifest:
        """A manifest's body, checked against its headers and the offer.

        Raises:
            ProtocolError: its length, or its entries' chunks and bytes, do not add up.
        """
        digests_end = chunk_count * DIGEST_SIZE
        if len(body) != digests_end + entries * ENTRY.size:
            raise ProtocolError(
                f"manifest of {len(body)} bytes for {chunk_count} chunks and {entries} entries"
            )
        layout: list[EntryLayout] = []
        first = total = 0
        for head, entry_size, header in ENTRY.iter_unpack(body[digests_end:]):
            if head > entry_size:
                raise ProtocolError(
                    f"manifest entry {len(layout)}: head {head} > size {entry_size}"
                )
            parts = max(1, -(-entry_size // chunk_size))
            layout.append(EntryLayout(first, parts, head, entry_size, header))
            first += parts
            total += entry_size
        if entries and (first != chunk_count or total != size):
            raise ProtocolError(
                f"manifest entries cover {first} chunks and {total} bytes, the offer "
                f"{chunk_count} and {size}"
            )
        return cls(bytes(body[:digests_end]), tuple(layout))


class ManifestBuilder:
    """The manifest of a source, fed its pieces in order (the sender's driver reads them)."""

    def __init__(self) -> None:
        self._digests: list[bytes] = []
        self._entries: list[EntryLayout] = []

    def add(self, data: bytes | memoryview, meta: Mapping[str, MetaValue] | None) -> None:
        seq = len(self._digests)
        self._digests.append(hashlib.sha256(data).digest())
        if meta is not None and "head" in meta:  # the first chunk of a container entry
            header = meta.get("safetensors_header", 0)
            self._entries.append(
                EntryLayout(seq, 1, int(meta["head"]), int(meta["size"]), int(header))
            )
        elif self._entries:
            last = self._entries[-1]
            self._entries[-1] = EntryLayout(
                last.first, last.parts + 1, last.head, last.size, last.safetensors_header
            )

    def build(self) -> Manifest:
        return Manifest(b"".join(self._digests), tuple(self._entries))


class Holds:
    """The chunks a target holds already: a bitmap, bit ``seq % 8`` of byte ``seq // 8``.

    On the wire (``progress.holds``): the bitmap in base64 (RFC 4648, with padding), exactly
    ``ceil(chunk_count / 8)`` bytes, the bits past ``chunk_count`` zero.
    """

    def __init__(self, count: int, bits: bytes | bytearray | None = None) -> None:
        self.count = count
        self._bits = bytearray(bits) if bits is not None else bytearray(-(-count // 8))

    @classmethod
    def of(cls, count: int, seqs: Iterable[int]) -> Holds:
        holds = cls(count)
        for seq in seqs:
            holds.add(seq)
        return holds

    def add(self, seq: int) -> None:
        if not 0 <= seq < self.count:
            raise ValueError(f"chunk {seq} of {self.count}")
        self._bits[seq >> 3] |= 1 << (seq & 7)

    def drop_from(self, seq: int) -> None:
        """Hold nothing from chunk ``seq`` on."""
        for held in [s for s in self if s >= seq]:
            self._bits[held >> 3] &= ~(1 << (held & 7)) & 0xFF

    def __contains__(self, seq: object) -> bool:
        if not isinstance(seq, int) or not 0 <= seq < self.count:
            return False
        return bool(self._bits[seq >> 3] >> (seq & 7) & 1)

    def __iter__(self) -> Iterator[int]:
        for index, byte in enumerate(self._bits):
            while byte:
                low = byte & -byte
                yield index * 8 + low.bit_length() - 1
                byte ^= low

    def __len__(self) -> int:
        return sum(b.bit_count() for b in self._bits)

    def encode(self) -> str:
        return base64.b64encode(bytes(self._bits)).decode("ascii")

    @classmethod
    def decode(cls, text: str, count: int) -> Holds:
        """A ``holds`` field for an object of ``count`` chunks.

        Raises:
            ProtocolError: not base64, the wrong length, or bits past the last chunk.
        """
        try:
            bits = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ProtocolError("holds is not base64") from None
        if len(bits) != -(-count // 8):
            raise ProtocolError(f"holds has {len(bits)} bytes for {count} chunks")
        if count % 8 and bits[-1] >> (count % 8):
            raise ProtocolError(f"holds names chunks past the last of {count}")
        return cls(count, bits)

    def run_from(self, seq: int, limit: int) -> int:
        """The end of the run of held chunks that starts at ``seq`` (at most ``limit``)."""
        end = seq
        while end < limit and end in self:
            end += 1
        return end
