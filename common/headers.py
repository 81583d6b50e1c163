"""Bounds on the AMQP properties of a delivery, checked on the raw bytes before they are decoded.

pika decodes a message's header table recursively, with no bound: a legal table nested about
2,000 levels deep (some 14 KB, which RabbitMQ routes like any other message) raises
``RecursionError`` inside pika's frame decoder, before any objstream code sees the message, and
stops the connection; since the message is never acked, every restart dies on it again. A site
must not be able to do that to another site. So the adapter (:mod:`objstream.common.amqp`) runs
:func:`check_properties` on the content header's bytes first, and when the headers table breaks
a bound it decodes the other properties without it (:func:`without_headers`): the delivery
still reaches objstream, which rejects it (the broker dead-letters it) with the reason, and the
worker goes on.

Pure: bytes in, offsets and errors out; it walks the structure without building values.
"""

from __future__ import annotations

import struct

from objstream.common.errors import ProtocolError

MAX_DEPTH = 16
"""Nesting of tables and arrays a header table may have; objstream's own go 3 deep (an offer's
``inline.meta``) and the broker's ``x-death`` 3 deep."""
MAX_FIELDS = 4096
"""Values (at any depth) a header table may hold."""
MAX_TABLE_BYTES = 128 * 1024
"""Bytes a header table may take (RabbitMQ's default frame size)."""

# The basic properties' flags (AMQP 0-9-1, class basic): the first three of the properties
# come in this order, each present only if its flag is set.
FLAG_CONTENT_TYPE = 1 << 15
FLAG_CONTENT_ENCODING = 1 << 14
FLAG_HEADERS = 1 << 13

# Field values of a fixed size, by type octet (the AMQP 0-9-1 errata as RabbitMQ reads them).
_FIXED = {
    b"t": 1,
    b"b": 1,
    b"B": 1,
    b"U": 2,
    b"u": 2,
    b"s": 2,
    b"I": 4,
    b"i": 4,
    b"f": 4,
    b"L": 8,
    b"l": 8,
    b"d": 8,
    b"T": 8,
    b"D": 5,
    b"V": 0,
}
_SIZED = (b"S", b"x")  # a 32-bit length, then that many bytes


class HeadersRejected(ProtocolError):
    """A header table that breaks a bound (too deep, too many values, too big, malformed)."""


def _u32(buffer: bytes, offset: int) -> int:
    try:
        return int(struct.unpack_from(">I", buffer, offset)[0])
    except struct.error:
        raise HeadersRejected("header table cut short") from None


class _Walk:
    """One walk over a table: counts the values it passes."""

    def __init__(self, buffer: bytes) -> None:
        self.buffer = buffer
        self.fields = 0

    def table(self, offset: int, depth: int) -> int:
        """Skip the table at ``offset``; returns the offset after it."""
        if depth > MAX_DEPTH:
            raise HeadersRejected(f"header table nested deeper than {MAX_DEPTH} levels")
        size = _u32(self.buffer, offset)
        offset += 4
        end = offset + size
        if end > len(self.buffer):
            raise HeadersRejected("header table cut short")
        while offset < end:
            offset += 1 + self.buffer[offset]  # the key: a short string
            offset = self.value(offset, depth)
        if offset != end:
            raise HeadersRejected("header table overruns its length")
        return end

    def value(self, offset: int, depth: int) -> int:
        """Skip the field value at ``offset``; returns the offset after it."""
        self.fields += 1
        if self.fields > MAX_FIELDS:
            raise HeadersRejected(f"header table with more than {MAX_FIELDS} values")
        kind = self.buffer[offset : offset + 1]
        offset += 1
        if kind in _FIXED:
            return offset + _FIXED[kind]
        if kind in _SIZED:
            return offset + 4 + _u32(self.buffer, offset)
        if kind == b"F":
            return self.table(offset, depth + 1)
        if kind == b"A":
            if depth + 1 > MAX_DEPTH:
                raise HeadersRejected(f"header table nested deeper than {MAX_DEPTH} levels")
            end = offset + 4 + _u32(self.buffer, offset)
            offset += 4
            while offset < end:
                offset = self.value(offset, depth + 1)
            if offset != end:
                raise HeadersRejected("header array overruns its length")
            return end
        raise HeadersRejected(f"header value of unknown AMQP type {kind!r}")


def _headers_offset(encoded: bytes, offset: int) -> tuple[int, int] | None:
    """``(flags, offset of the headers table)`` in encoded basic properties, or None if they
    have no headers table.

    Raises:
        HeadersRejected: the properties are cut short.
    """
    try:
        flags = 0
        word = 0
        while True:  # flag words chain while their lowest bit is set
            partial = int(struct.unpack_from(">H", encoded, offset)[0])
            offset += 2
            flags |= partial << (word * 16)
            word += 1
            if not partial & 1:
                break
        if not flags & FLAG_HEADERS:
            return None
        for flag in (FLAG_CONTENT_TYPE, FLAG_CONTENT_ENCODING):
            if flags & flag:
                offset += 1 + encoded[offset]
        return flags, offset
    except (struct.error, IndexError):
        raise HeadersRejected("message properties cut short") from None


def check_properties(encoded: bytes, offset: int = 0) -> None:
    """Check the header table of encoded basic properties against the bounds.

    Raises:
        HeadersRejected: it breaks one (the text says which).
    """
    found = _headers_offset(encoded, offset)
    if found is None:
        return
    _, start = found
    size = _u32(encoded, start)
    if size > MAX_TABLE_BYTES:
        raise HeadersRejected(f"header table of {size} bytes (at most {MAX_TABLE_BYTES})")
    try:
        _Walk(encoded).table(start, 1)
    except IndexError:
        raise HeadersRejected("header table cut short") from None


def without_headers(encoded: bytes, offset: int = 0) -> bytes:
    """The same encoded properties with the header table (and its flag) taken out, so that the
    others (type, user id, message id...) still decode.

    Raises:
        HeadersRejected: the properties are cut short where the table starts or ends.
    """
    found = _headers_offset(encoded, offset)
    if found is None:
        return encoded[offset:]
    _, start = found
    end = start + 4 + _u32(encoded, start)
    if end > len(encoded):
        raise HeadersRejected("header table cut short")
    first = int(struct.unpack_from(">H", encoded, offset)[0]) & ~FLAG_HEADERS
    return struct.pack(">H", first) + encoded[offset + 2 : start] + encoded[end:]
