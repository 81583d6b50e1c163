"""The adapter's framing (no broker): one buffer per published message, byte for byte what pika
sends, and body frames read as views of the socket reads, however the reads cut the stream."""

from __future__ import annotations

import itertools

import pika
import pika.exceptions
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pika import frame, spec
from pika.channel import ContentFrameAssembler

from objstream.common.amqp.framing import FrameReader, marshal_message, tune_pika

PUBLISH = spec.Basic.Publish(exchange="objstream.data", routing_key="data:s:1")
DELIVER = spec.Basic.Deliver(consumer_tag="ctag", delivery_tag=7, exchange="x", routing_key="k")
PROPS = pika.BasicProperties(type="chunk", headers={"seq": 3, "crc32": 12345})


def pikas_frames(channel: int, method: object, body: bytes, body_max: int) -> list[bytes]:
    """What pika 1.3/1.4 itself sends for a message: its frames, each marshalled on its own."""
    frames = [
        frame.Method(channel, method).marshal(),
        frame.Header(channel, len(body), PROPS).marshal(),
    ]
    for start in range(0, len(body), body_max):
        frames.append(frame.Body(channel, body[start : start + body_max]).marshal())
    return frames


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=300),
    body_max=st.integers(1, 64),
    channel=st.integers(1, 65535),
)
def test_a_message_is_one_buffer_of_pikas_own_frames(
    body: bytes, body_max: int, channel: int
) -> None:
    wire = marshal_message(channel, PUBLISH, PROPS, body, body_max)
    assert wire == b"".join(pikas_frames(channel, PUBLISH, body, body_max))


def test_a_chunk_at_the_brokers_frame_size() -> None:
    body_max = 131072 - 8  # RabbitMQ's frame_max less a frame's head and end
    for size in (0, 1, body_max - 1, body_max, body_max + 1, 8 * body_max, (1 << 20) + 3):
        body = bytes(range(256)) * (size // 256) + bytes(size % 256)
        wire = marshal_message(1, PUBLISH, PROPS, body, body_max)
        assert wire == b"".join(pikas_frames(1, PUBLISH, body, body_max)), size


def _delivery(channel: int, body: bytes, body_max: int) -> bytes:
    return b"".join(pikas_frames(channel, DELIVER, body, body_max))


def _read(reader: FrameReader, wire: bytes, cuts: list[int]) -> list[object]:
    frames: list[object] = []
    bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        frames.extend(reader.feed(wire[start:end]))
    return frames


def _messages(frames: list[object]) -> list[tuple[int, bytes]]:
    """Deliveries as pika's own content assembler makes them of the frames (channel, body)."""
    assemblers: dict[int, ContentFrameAssembler] = {}
    out = []
    for value in frames:
        if isinstance(value, frame.Heartbeat):
            continue
        assert isinstance(value, frame.Method | frame.Header | frame.Body)
        assembler = assemblers.setdefault(value.channel_number, ContentFrameAssembler())
        done = assembler.process(value)
        if done:
            method, _, body = done
            assert method.method.delivery_tag == DELIVER.delivery_tag
            out.append((value.channel_number, body))
    return out


@settings(max_examples=300, deadline=None)
@given(
    bodies=st.lists(st.tuples(st.integers(1, 3), st.binary(max_size=200)), max_size=5),
    body_max=st.integers(1, 50),
    cuts=st.lists(st.integers(0, 10_000), max_size=40),
)
def test_deliveries_come_out_whole_however_the_reads_cut_them(
    bodies: list[tuple[int, bytes]], body_max: int, cuts: list[int]
) -> None:
    heartbeat = frame.Heartbeat().marshal()
    wire = heartbeat + b"".join(_delivery(ch, body, body_max) + heartbeat for ch, body in bodies)
    frames = _read(FrameReader(), wire, cuts)
    assert _messages(frames) == bodies
    assert sum(isinstance(f, frame.Heartbeat) for f in frames) == len(bodies) + 1


def test_a_body_is_handed_on_as_views_of_the_reads() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    wire = _delivery(1, body, 131064)
    reads = [wire[i : i + 262144] for i in range(0, len(wire), 262144)]
    reader = FrameReader()
    fragments = []
    for read in reads:
        for value in reader.feed(read):
            if isinstance(value, frame.Body):
                assert isinstance(value.fragment, memoryview)
                assert any(value.fragment.obj is r for r in reads)  # not a copy
                fragments.append(value.fragment)
    assert b"".join(fragments) == body
    assert len(fragments) < len(reads) + 9  # one per read a body frame spans


def test_the_reader_goes_on_from_a_frame_pika_began() -> None:
    wire = _delivery(2, b"x" * 100, 30)
    for split in range(len(wire) + 1):
        # Where pika's own reading stopped: any partial frame, a body frame's included.
        started = wire[:split]
        frames_done: list[object] = []
        while started:
            consumed, value = frame.decode_frame(started)
            if not value:
                break
            frames_done.append(value)
            started = started[consumed:]
        reader = FrameReader(started)
        assert _messages(frames_done + list(reader.feed(wire[split:]))) == [(2, b"x" * 100)]


def test_a_frame_whose_processing_raises_loses_none_after_it() -> None:
    """pika's own reading trims a frame off its buffer before processing it: if processing
    raises, the frames after it are still read, on the next read. So here."""
    wire = _delivery(1, b"a" * 90, 40) + _delivery(2, b"b" * 10, 40)
    reader = FrameReader()
    frames: list[object] = []
    reads = [wire[:150], wire[150:]]
    for read in reads:
        for value in reader.feed(read):
            frames.append(value)
            if len(frames) in (1, 4):
                break  # (the caller raised while it processed this frame)
    frames.extend(reader.feed(b""))
    assert _messages(frames) == [(1, b"a" * 90), (2, b"b" * 10)]


@pytest.mark.parametrize("where", ["body", "method"])
def test_a_frame_without_its_end_marker_is_refused(where: str) -> None:
    wire = bytearray(_delivery(1, b"payload", 64))
    method_end = len(frame.Method(1, DELIVER).marshal()) - 1
    wire[len(wire) - 1 if where == "body" else method_end] = 0x00
    with pytest.raises(pika.exceptions.InvalidFrameError):
        list(FrameReader().feed(bytes(wire)))


def test_tuning_pika_is_done_once_and_marked() -> None:
    from pika.adapters.utils.io_services_utils import _AsyncTransportBase
    from pika.connection import Connection

    tune_pika()
    send, read = Connection._send_message, Connection._on_data_available
    tune_pika()
    assert (Connection._send_message, Connection._on_data_available) == (send, read)
    assert getattr(Connection, "objstream_framing", False)
    assert _AsyncTransportBase._MAX_RECV_BYTES == 256 * 1024
