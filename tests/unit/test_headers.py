"""The bounds the adapter checks on a delivery's header table before pika decodes it (no broker).

pika's decoder is recursive and unbounded: a legal table nested 2,000 levels deep raised
RecursionError in the frame decoder and stopped the connection. The checks walk the raw bytes
without recursion past their own bound, and the other properties still decode without the
table.
"""

from __future__ import annotations

import sys

import pika
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objstream.common.headers import (
    MAX_DEPTH,
    MAX_FIELDS,
    HeadersRejected,
    check_properties,
    without_headers,
)
from tests.poison import RawHeaders, entry, nested_table, table_of


def _encoded(props: pika.BasicProperties) -> bytes:
    return b"".join(props.encode())


def _decoded(encoded: bytes) -> pika.BasicProperties:
    return pika.BasicProperties().decode(encoded)


def test_objstream_s_own_headers_pass() -> None:
    headers = {"objstream": 2, "stream_id": "a" * 32, "inline": {"meta": {"entry": 0}}}
    x_death = [{"count": 1, "reason": "rejected", "routing-keys": ["offer:s"]}]
    props = pika.BasicProperties(type="offer", headers={**headers, "x-death": x_death})
    check_properties(_encoded(props))


def test_a_table_nested_2000_deep_is_rejected_without_recursing() -> None:
    props = RawHeaders(nested_table(2000), type="offer", user_id="site-2", message_id="m")
    encoded = _encoded(props)
    limit = sys.getrecursionlimit()
    assert 2000 > limit  # pika's recursive decoder would overflow on it
    with pytest.raises(HeadersRejected, match=f"deeper than {MAX_DEPTH}"):
        check_properties(encoded)
    rest = _decoded(without_headers(encoded))
    assert (rest.type, rest.user_id, rest.message_id, rest.headers) == (
        "offer",
        "site-2",
        "m",
        None,
    )


def test_nesting_up_to_the_bound_passes_and_one_more_does_not() -> None:
    check_properties(_encoded(RawHeaders(nested_table(MAX_DEPTH))))
    with pytest.raises(HeadersRejected):
        check_properties(_encoded(RawHeaders(nested_table(MAX_DEPTH + 1))))


def test_a_field_of_an_unknown_type_is_rejected() -> None:
    table = table_of(entry("objstream", b"I", b"\x00\x00\x00\x02") + entry("x", b"Z", b"junk"))
    with pytest.raises(HeadersRejected, match="unknown AMQP type"):
        check_properties(_encoded(RawHeaders(table, type="chunk")))


def test_a_table_that_overruns_its_length_is_rejected() -> None:
    table = table_of(entry("a", b"S", b"\x00\x00\x10\x00" + b"short"))
    with pytest.raises(HeadersRejected):
        check_properties(_encoded(RawHeaders(table)))


def test_too_many_values_are_rejected() -> None:
    many = b"".join(entry(f"k{i}", b"t", b"\x01") for i in range(MAX_FIELDS + 1))
    with pytest.raises(HeadersRejected, match="more than"):
        check_properties(_encoded(RawHeaders(table_of(many))))


def test_an_array_nested_beyond_the_bound_is_rejected() -> None:
    import struct

    value = b"V"
    for _ in range(MAX_DEPTH + 1):
        value = b"A" + struct.pack(">I", len(value)) + value
    table = table_of(entry("a", value[:1], value[1:]))
    with pytest.raises(HeadersRejected, match="deeper"):
        check_properties(_encoded(RawHeaders(table)))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_either_pass_or_are_rejected_never_crash(junk: bytes) -> None:
    encoded = _encoded(RawHeaders(table_of(junk), type="chunk", user_id="u"))
    try:
        check_properties(encoded)
    except HeadersRejected:
        rest = _decoded(without_headers(encoded))
        assert rest.user_id == "u"
    else:
        _decoded(encoded)  # what the bounds let through, pika decodes without a crash
