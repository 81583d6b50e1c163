"""The pure reassembler: boundaries, duplicates, gaps, corruption, verdicts; no broker, no disk."""

from __future__ import annotations

import hashlib
import zlib

import pytest

from objstream.common.errors import FailureCode, ProtocolError
from objstream.common.protocol import End, Offer, new_stream_id
from objstream.common.reassembly import TRANSITIONS, ChunkOutcome, ChunkVerdict, Reassembler, State


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _setup(data: bytes, chunk_size: int) -> tuple[Reassembler, list[bytes], End]:
    chunks = _split(data, chunk_size)
    sid = new_stream_id()
    offer = Offer(
        stream_id=sid,
        kind="file",
        name="x",
        size=len(data),
        chunk_size=chunk_size,
        chunk_count=len(chunks),
        window=4,
        sender="a",
        target="b",
    )
    end = End(
        stream_id=sid,
        chunk_count=len(chunks),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    r = Reassembler(offer)
    r.accept()
    return r, chunks, end


class Disk:
    """Where WRITE verdicts go, to check what would end up in the file."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def feed(self, r: Reassembler, seq: int, body: bytes, crc: int | None = None) -> ChunkOutcome:
        outcome = r.chunk(seq, zlib.crc32(body) if crc is None else crc, body)
        if outcome.verdict is ChunkVerdict.WRITE:
            self.data[outcome.offset : outcome.offset + len(body)] = body
        return outcome


@pytest.mark.parametrize("size", [0, 1, 5, 10, 11, 49])
def test_in_order_delivery_with_tiny_chunks(size: int) -> None:
    data = bytes(range(size))
    r, chunks, end = _setup(data, 5)
    disk = Disk(size)
    for seq, body in enumerate(chunks):
        assert disk.feed(r, seq, body).verdict is ChunkVerdict.WRITE
    r.record_end(end)
    assert r.complete
    assert r.verify() is None
    r.mark_done()
    assert r.state is State.DONE
    assert bytes(disk.data) == data


def test_end_before_the_last_chunk_waits() -> None:
    r, chunks, end = _setup(b"abcdefgh", 4)
    disk = Disk(8)
    disk.feed(r, 0, chunks[0])
    r.record_end(end)
    assert not r.complete
    disk.feed(r, 1, chunks[1])
    assert r.complete


def test_duplicate_is_dropped_and_changes_nothing() -> None:
    r, chunks, _ = _setup(b"abcdefgh", 4)
    disk = Disk(8)
    disk.feed(r, 0, chunks[0])
    assert disk.feed(r, 0, b"XXXX").verdict is ChunkVerdict.DUPLICATE
    assert r.stored == 1
    assert bytes(disk.data[:4]) == b"abcd"


def test_chunk_ahead_of_a_gap_is_dropped_and_one_resend_asked_per_gap() -> None:
    r, chunks, _ = _setup(b"aaaabbbbccccdddd", 4)
    disk = Disk(16)
    disk.feed(r, 0, chunks[0])
    first = disk.feed(r, 2, chunks[2])
    second = disk.feed(r, 3, chunks[3])
    assert first.verdict is second.verdict is ChunkVerdict.AHEAD
    assert first.resend_from == 1
    assert second.resend_from is None
    assert r.stored == 1  # nothing assembled out of order
    for seq in (1, 2, 3):
        assert disk.feed(r, seq, chunks[seq]).verdict is ChunkVerdict.WRITE
    assert bytes(disk.data) == b"aaaabbbbccccdddd"


def test_corrupt_chunk_is_refused_with_observed_and_expected_crc() -> None:
    r, _chunks, _ = _setup(b"abcdefgh", 4)
    outcome = r.chunk(0, zlib.crc32(b"abcd"), b"abcX")
    assert outcome.verdict is ChunkVerdict.CORRUPT
    assert outcome.resend_from == 0
    assert f"crc32 {zlib.crc32(b'abcX'):#010x} != {zlib.crc32(b'abcd'):#010x}" in outcome.detail
    assert r.stored == 0


def test_wrong_digest_fails_the_stream() -> None:
    r, chunks, end = _setup(b"abcdefgh", 4)
    disk = Disk(8)
    for seq, body in enumerate(chunks):
        disk.feed(r, seq, body)
    r.record_end(end.model_copy(update={"sha256": "0" * 64}))
    failure = r.verify()
    assert failure is not None
    assert failure.code is FailureCode.CHECKSUM
    assert r.state is State.FAILED


@pytest.mark.parametrize(
    ("seq", "body", "words"),
    [
        (2, b"ab", "beyond the announced 2 chunks"),
        (0, b"abc", "3 bytes != expected 4"),
        (1, b"efghi", "5 bytes != expected 4"),
    ],
)
def test_impossible_chunks_are_protocol_errors(seq: int, body: bytes, words: str) -> None:
    r, _, _ = _setup(b"abcdefgh", 4)
    with pytest.raises(ProtocolError, match=words):
        r.chunk(seq, zlib.crc32(body), body)


def test_end_contradicting_the_offer_is_a_protocol_error() -> None:
    r, _, end = _setup(b"abcdefgh", 4)
    with pytest.raises(ProtocolError, match="!= offered"):
        r.record_end(end.model_copy(update={"size": 9}))
    r.record_end(end)
    r.record_end(end)  # the same end again is fine
    with pytest.raises(ProtocolError, match="differs"):
        r.record_end(end.model_copy(update={"sha256": "1" * 64}))


def test_illegal_events_say_which_and_in_what_state() -> None:
    r, chunks, end = _setup(b"abcd", 4)
    r.chunk(0, zlib.crc32(chunks[0]), chunks[0])
    r.record_end(end)
    assert r.verify() is None
    r.mark_done()
    with pytest.raises(ProtocolError, match="can't handle chunk in state done"):
        r.chunk(0, 0, b"abcd")
    fresh, _, _ = _setup(b"abcd", 4)
    fresh2 = Reassembler(fresh.offer)
    with pytest.raises(ProtocolError, match="can't handle chunk in state offered"):
        fresh2.chunk(0, 0, b"abcd")


def test_transition_table_has_terminal_states() -> None:
    assert not any(state in (State.DONE, State.FAILED) for state, _ in TRANSITIONS)
