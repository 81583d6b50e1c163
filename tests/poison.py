"""Poison messages: legal AMQP that objstream must survive, built byte by byte.

pika's encoder refuses (or overflows the stack on) what a hostile peer can still publish with
another client: a header table nested 2,000 levels deep, a field of an unknown type. These
helpers encode such tables by hand and give them to pika as properties that encode to exactly
those bytes.
"""

from __future__ import annotations

import struct
from typing import Any

import pika

FLAG_CONTENT_TYPE = 1 << 15
FLAG_CONTENT_ENCODING = 1 << 14
FLAG_HEADERS = 1 << 13


def nested_table(depth: int) -> bytes:
    """A header table ``{"a": {"a": ... {}}}`` nested ``depth`` levels (about 7 bytes each)."""
    table = struct.pack(">I", 0)
    for _ in range(depth - 1):
        content = b"\x01a" + b"F" + table
        table = struct.pack(">I", len(content)) + content
    return table


def table_of(raw_entries: bytes) -> bytes:
    """A header table whose entries are ``raw_entries`` (encoded by the caller)."""
    return struct.pack(">I", len(raw_entries)) + raw_entries


def entry(key: str, kind: bytes, value: bytes) -> bytes:
    """One table entry: short-string key, type octet, the value's bytes."""
    name = key.encode()
    return bytes([len(name)]) + name + kind + value


class RawHeaders(pika.BasicProperties):  # type: ignore[misc]
    """Properties that encode with ``table`` as their header table, whatever it holds."""

    def __init__(self, table: bytes, **properties: Any) -> None:
        super().__init__(**properties)
        self._table = table

    def encode(self) -> list[bytes]:
        plain = b"".join(super().encode())  # without headers: we splice ours in
        flags = struct.unpack_from(">H", plain)[0] | FLAG_HEADERS
        offset = 2
        for flag in (FLAG_CONTENT_TYPE, FLAG_CONTENT_ENCODING):
            if flags & flag:
                offset += 1 + plain[offset]
        return [struct.pack(">H", flags) + plain[2:offset] + self._table + plain[offset:]]
