"""The receiver facing broken and hostile peers: it dead-letters, refuses, fails, goes on."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest

from objstream.common.errors import FailureCode, SendFailed, TransferFailed
from objstream.common.settings import KiB, Settings
from objstream.common.topology import Topology
from objstream.consumer.streams import Received
from objstream.producer import FileStreamer
from tests.conftest import final_files, kept_bytes, random_file, sha256_of, stored_path
from tests.integration.conftest import DeadReasons, Declared, MakeRawPeer, StartReceiver
from tests.integration.rawpeer import RawPeer, properties


def test_abort_from_the_sender_fails_the_stream_and_keeps_only_the_verified_prefix(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer
) -> None:
    dest = tmp_path / "in"
    receiver = start_receiver("site-1", dest)
    peer = raw_peer("site-1")
    peer.offer("half.bin", size=8, chunk_size=4)
    peer.chunk(0, b"abcd")
    peer.abort("disk on fire")

    [failed] = receiver.wait_for(1)
    assert isinstance(failed, TransferFailed)
    assert failed.code == FailureCode.ABORTED
    assert "disk on fire" in failed.detail
    assert "4 bytes received are kept" in failed.detail
    assert final_files(dest) == []
    assert list(kept_bytes(dest).values()) == [b"abcd"]


def test_an_offer_to_resume_what_is_not_kept_is_refused(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer
) -> None:
    dest = tmp_path / "in"
    receiver = start_receiver("site-1", dest)
    peer = raw_peer("site-1")
    peer.offer("f.bin", size=8, chunk_size=4, resume_from=1)

    [failed] = receiver.wait_for(1)
    assert isinstance(failed, TransferFailed)
    assert failed.code == FailureCode.PROTOCOL
    assert "no partial file to match is kept here" in failed.detail
    assert peer.verdict()["code"] == "protocol"
    assert list(dest.iterdir()) == []


def test_silent_sender_times_out_on_the_receiver(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver, raw_peer: MakeRawPeer
) -> None:
    dest = tmp_path / "in"
    receiver = start_receiver("site-1", dest, settings.model_copy(update={"timeout": 1.5}))
    peer = raw_peer("site-1")
    peer.offer("stall.bin", size=8, chunk_size=4)
    peer.chunk(0, b"abcd")  # and then nothing

    [failed] = receiver.wait_for(1)
    assert isinstance(failed, TransferFailed)
    assert failed.code == FailureCode.TIMEOUT
    verdict = peer.verdict()
    assert verdict["ok"] is False
    assert verdict["code"] == "timeout"
    assert final_files(dest) == []
    assert list(kept_bytes(dest).values()) == [b"abcd"]


def test_duplicates_and_out_of_order_chunks_are_never_assembled_wrongly(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer
) -> None:
    dest = tmp_path / "in"
    receiver = start_receiver("site-1", dest)
    peer = raw_peer("site-1")
    parts = [b"aaaa", b"bbbb", b"cccc", b"dd"]
    whole = b"".join(parts)
    peer.offer("ooo.bin", size=len(whole), chunk_size=4)
    peer.chunk(0, parts[0])
    peer.chunk(0, parts[0])  # duplicate
    peer.chunk(2, parts[2])  # ahead of the missing chunk 1: dropped, resend asked
    peer.end(4, len(whole), hashlib.sha256(whole).hexdigest())

    replies = peer.replies(until="progress")
    deadline = time.monotonic() + 10
    while not any(h.get("resend_from") == 1 for _, h in replies):
        assert time.monotonic() < deadline, replies
        replies += peer.replies(until="progress")
    # The sender resends from 1, as the protocol asks.
    for seq in (1, 2, 3):
        peer.chunk(seq, parts[seq])

    [received] = receiver.wait_for(1)
    assert isinstance(received, Received)
    assert stored_path(received).read_bytes() == whole


def _offer_properties(peer: RawPeer) -> pika.BasicProperties:
    """The properties of a good 8-byte file offer from ``peer``, to be spoiled."""
    from objstream.common.protocol import Offer

    offer = Offer(
        stream_id=peer.stream_id,
        kind="file",
        name="x",
        size=8,
        chunk_size=4,
        chunk_count=2,
        window=4,
        sender="raw",
        target="site-1",
    )
    return properties(offer, reply_to=peer.reply_to, user_id=peer.user)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: h.pop("objstream"), "missing protocol version"),
        (lambda h: h.update(target="site-2"), "offer for site 'site-2' reached site 'site-1'"),
        (lambda h: h.update(size=-5), "size"),
        (lambda h: h.update(size=2**63 - 1), "size"),
        (lambda h: h.update(evil="x"), "evil"),
        (lambda h: h.update(chunk_count=99), "chunk_count"),
        (lambda h: h.update(stream_id="../../x"), "stream_id"),
    ],
)
def test_malformed_offers_are_dead_lettered_and_the_receiver_goes_on(
    tmp_path: Path,
    settings: Settings,
    start_receiver: StartReceiver,
    raw_peer: MakeRawPeer,
    dead_reasons: DeadReasons,
    mutate: Callable[[dict[str, Any]], object],
    reason: str,
) -> None:
    receiver = start_receiver("site-1", tmp_path / "in")
    peer = raw_peer("site-1")
    props = _offer_properties(peer)
    mutate(props.headers)
    peer.publish_inbox(b"", props)
    peer.publish_inbox(b"", pika.BasicProperties(type="gibberish", headers={"objstream": 2}))
    peer.publish_inbox(b"\x00" * 10, pika.BasicProperties())

    # Still serving: a good file arrives after the garbage.
    src = tmp_path / "good.bin"
    digest = random_file(src, 10 * KiB)
    with FileStreamer("server", settings) as streamer:
        streamer.stream_file("site-1", src)
    [received] = receiver.wait_for(1)
    assert sha256_of(stored_path(received)) == digest

    reasons = dead_reasons()
    assert any(reason in r for r in reasons), reasons
    assert any("unknown message type 'gibberish'" in r for r in reasons), reasons
    assert any("no headers" in r for r in reasons), reasons


@pytest.mark.parametrize("version", [1, 3])
def test_an_offer_in_another_protocol_version_is_refused_with_a_reason_and_the_receiver_goes_on(
    tmp_path: Path,
    settings: Settings,
    start_receiver: StartReceiver,
    raw_peer: MakeRawPeer,
    version: int,
) -> None:
    """An offer that names a reply queue and a stream id can be answered: the sender of another
    version learns why in a ``done`` (``unsupported_version``), and the receiver keeps serving."""
    receiver = start_receiver("site-1", tmp_path / "in")
    peer = raw_peer("site-1")
    props = _offer_properties(peer)
    props.headers["objstream"] = version
    peer.publish_inbox(b"", props)
    verdict = peer.verdict()
    assert verdict["ok"] is False
    assert verdict["code"] == "unsupported_version"
    assert f"protocol version {version}" in verdict["detail"]

    src = tmp_path / "good.bin"
    digest = random_file(src, 10 * KiB)
    with FileStreamer("server", settings) as streamer:
        streamer.stream_file("site-1", src)
    receiver.wait_for(2)
    received = [o for o in receiver.outcomes if isinstance(o, Received)]
    assert [sha256_of(stored_path(r)) for r in received] == [digest]


@pytest.mark.parametrize(
    ("send", "reason"),
    [
        (lambda p: p.chunk(7, b"abcd"), "beyond the announced 2 chunks"),
        (lambda p: p.chunk(0, b"abcdef"), "6 bytes != expected 4"),
        (lambda p: p.end(3, 12, "0" * 64), "!= offered 2 / 8"),
        (
            lambda p: p.publish_data(
                b"",
                pika.BasicProperties(
                    type="chunk",
                    headers={"objstream": 2, "stream_id": p.stream_id},
                    user_id=p.user,
                ),
            ),
            "seq: Field required",
        ),
    ],
)
def test_bad_data_messages_are_dead_lettered_and_the_stream_survives(
    tmp_path: Path,
    start_receiver: StartReceiver,
    raw_peer: MakeRawPeer,
    dead_reasons: DeadReasons,
    send: Callable[[RawPeer], object],
    reason: str,
) -> None:
    receiver = start_receiver("site-1", tmp_path / "in")
    peer = raw_peer("site-1")
    peer.offer("ok.bin", size=8, chunk_size=4)
    send(peer)
    peer.chunk(0, b"abcd")
    peer.chunk(1, b"efgh")
    peer.end(2, 8, hashlib.sha256(b"abcdefgh").hexdigest())

    [received] = receiver.wait_for(1)
    assert isinstance(received, Received)
    assert stored_path(received).read_bytes() == b"abcdefgh"
    reasons = dead_reasons()
    assert any(reason in r for r in reasons), reasons


def test_nothing_but_the_offer_goes_out_before_the_first_contact(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """No receiver at all: the producer publishes the offer and nothing else (protocol v2:
    the target declares its data queue when it takes the offer; until then there is none)."""
    import threading

    declared.sites.add("nobody")
    src = tmp_path / "x.bin"
    random_file(src, 100 * KiB)
    quick = settings.model_copy(update={"timeout": 4})
    topo = Topology.from_settings(settings)
    failures: list[BaseException] = []

    def send() -> None:
        with FileStreamer("server", quick) as streamer:
            try:
                streamer.stream_file("nobody", src, chunk_size=KiB, window=5)
            except SendFailed as e:
                failures.append(e)

    sender = threading.Thread(target=send)
    sender.start()
    connection = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        channel = connection.channel()
        deadline = time.monotonic() + 10
        offer = None
        while offer is None:
            assert time.monotonic() < deadline, "no offer in the inbox"
            time.sleep(0.1)
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                offer = channel.basic_get(topo.inbox("nobody"), auto_ack=True)[1]
            if channel.is_closed:
                channel = connection.channel()
        sid = offer.headers["stream_id"]
        declared.streams.add(sid)
        sender.join(30)
        assert failures, "the send must fail: nobody took the offer"
        # Nobody took the stream: it left no data queue behind.
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
            channel.queue_declare(topo.data_queue("nobody", sid), passive=True)
    finally:
        connection.close()


def _inline_offer(
    peer: RawPeer, body: bytes, *, crc32: int | None = None, sha256: str | None = None
) -> None:
    import zlib

    from objstream.common.protocol import Inline, Offer

    offer = Offer(
        stream_id=peer.stream_id, kind="file", name="small.bin", size=len(body),
        chunk_size=max(len(body), 1), chunk_count=1 if body else 0, window=4, sender="raw",
        target="site-1",
        inline=Inline(crc32=zlib.crc32(body) if crc32 is None else crc32,
                      sha256=sha256 or hashlib.sha256(body).hexdigest()),
    )  # fmt: skip
    peer.publish_inbox(body, properties(offer, reply_to=peer.reply_to, user_id=peer.user))


def test_small_objects_ride_inside_the_offer(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver, declared: Declared
) -> None:
    """No data queue is made for an object that fits in its offer."""
    receiver = start_receiver("site-1", tmp_path / "in")
    src = tmp_path / "small.bin"
    random_file(src, 10 * KiB)
    with FileStreamer("server", settings) as streamer:
        [result] = streamer.stream_file("site-1", src)
    [received] = receiver.wait_for(1)
    assert stored_path(received).read_bytes() == src.read_bytes()
    connection = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        queue = Topology.from_settings(settings).data_queue("site-1", result.stream_id)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
            connection.channel().queue_declare(queue, passive=True)
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("options", "code"),
    [({"crc32": 1}, "checksum"), ({"sha256": "0" * 64}, "checksum")],
    ids=["crc", "sha256"],
)
def test_a_corrupt_inline_object_fails_and_leaves_no_file(
    tmp_path: Path,
    start_receiver: StartReceiver,
    raw_peer: MakeRawPeer,
    options: dict[str, Any],
    code: str,
) -> None:
    dest = tmp_path / "in"
    receiver = start_receiver("site-1", dest)
    peer = raw_peer("site-1")
    _inline_offer(peer, b"tiny payload", **options)
    [failed] = receiver.wait_for(1)
    assert isinstance(failed, TransferFailed)
    assert failed.code == code
    assert peer.verdict()["code"] == code
    assert list(dest.iterdir()) == []


def test_offers_beyond_max_streams_wait_rather_than_fail(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver, raw_peer: MakeRawPeer
) -> None:
    # One sender: it may take every slot (user_share 1; fair shares are tested on their own).
    two = settings.model_copy(update={"max_streams": 2, "user_share": 1.0})
    receiver = start_receiver("site-1", tmp_path / "in", two)
    peers = [raw_peer("site-1") for _ in range(3)]
    for peer in peers:
        peer.waits_for_contact = False  # the third one waits for a free slot
        peer.offer(f"{peer.stream_id}.bin", size=4, chunk_size=4)

    def contacted(peer: RawPeer, timeout: float) -> bool:
        try:
            return bool(peer.replies(until="progress", timeout=timeout))
        except AssertionError:
            return False

    # Three connections publish: the broker may queue the offers in any order. Two are taken...
    taken: list[RawPeer] = []
    waiting: list[RawPeer] = []
    for peer in peers:
        (taken if contacted(peer, 3) else waiting).append(peer)
    assert len(taken) == 2, "two streams in flight"
    [third] = waiting  # ...and the third waits in the inbox, it does not fail
    first = taken[0]
    first.chunk(0, b"abcd")
    first.end(1, 4, hashlib.sha256(b"abcd").hexdigest())
    assert first.verdict()["ok"] is True
    assert contacted(third, 10)  # a slot freed: now it is taken
    assert len(receiver.wait_for(1)) == 1
