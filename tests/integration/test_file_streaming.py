"""Files streamed end to end through a real RabbitMQ: producer and receiver on own connections."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from objstream.common.errors import FailureCode, SendFailed, TimedOut, TransferFailed
from objstream.common.settings import KiB, MiB, Settings
from objstream.common.topology import Topology
from objstream.consumer.held import INDEX_NAME
from objstream.consumer.streams import Received
from objstream.producer import FileStreamer, TargetResult
from tests.conftest import as_received, random_file, sha256_of, stored_path
from tests.integration.conftest import DeadReasons, Declared, MakeRawPeer, StartReceiver


def _send(
    settings: Settings, targets: str | list[str], path: Path, **kwargs: Any
) -> list[TargetResult]:
    with FileStreamer("server", settings) as streamer:
        return streamer.stream_file(targets, path, **kwargs)


def _only_files(dest: Path) -> list[Path]:
    return sorted(p for p in dest.iterdir() if p.name != INDEX_NAME)


@pytest.mark.parametrize(
    "size",
    [0, 1, 4 * KiB, 4 * KiB + 1, 10 * 4 * KiB - 1],
    ids=["empty", "one-byte", "exact-chunk", "chunk-plus-one", "many-chunks-minus-one"],
)
def test_boundary_sizes_arrive_identical(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver, declared: Declared, size: int
) -> None:
    src = tmp_path / "src.bin"
    digest = random_file(src, size)
    receiver = start_receiver("site-1", tmp_path / "in")

    [result] = _send(settings, ["site-1"], src, chunk_size=4 * KiB, window=3)

    [received] = receiver.wait_for(1)
    assert isinstance(received, Received)
    assert received.path == (tmp_path / "in" / "src.bin").resolve()
    assert received.size == size
    assert received.sha256 == digest == result.sha256 == sha256_of(stored_path(received))
    assert result.ok
    assert result.stored_as == "src.bin"
    assert _only_files(tmp_path / "in") == [received.path]  # no partial file left behind


def test_64_mib_random_file(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    src = tmp_path / "big.bin"
    digest = random_file(src, 64 * MiB)
    receiver = start_receiver("site-1", tmp_path / "in")

    [result] = _send(settings, ["site-1"], src)

    [received] = receiver.wait_for(1)
    assert result.ok
    assert sha256_of(stored_path(received)) == digest


def test_two_files_to_one_consumer_at_the_same_time(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    srcs = [tmp_path / "a.bin", tmp_path / "b.bin"]
    digests = [random_file(p, 3 * MiB + 7) for p in srcs]
    receiver = start_receiver("site-1", tmp_path / "in")
    results: dict[str, object] = {}

    def send(path: Path) -> None:
        results[path.name] = _send(settings, ["site-1"], path, chunk_size=256 * KiB, window=4)

    threads = [threading.Thread(target=send, args=(p,)) for p in srcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    outcomes = receiver.wait_for(2)
    assert set(results) == {"a.bin", "b.bin"}
    assert {as_received(o).name: sha256_of(stored_path(o)) for o in outcomes} == dict(
        zip(["a.bin", "b.bin"], digests, strict=True)
    )


def test_consumer_that_starts_after_the_producer_began(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    src = tmp_path / "late.bin"
    digest = random_file(src, 2 * MiB)
    declared_sites = []
    outcome: list[object] = []

    def send() -> None:
        try:
            outcome.append(_send(settings, ["site-late"], src, chunk_size=64 * KiB, window=4))
        except Exception as e:
            outcome.append(e)

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(2)  # the offer and the first window of chunks wait in the broker
    assert not outcome, "the producer must wait for the receiver's verdict"
    receiver = start_receiver("site-late", tmp_path / "in")
    declared_sites.append("site-late")
    sender.join(60)

    [received] = receiver.wait_for(1)
    assert isinstance(outcome[0], list)
    assert outcome[0][0].ok
    assert sha256_of(stored_path(received)) == digest


def test_two_targets_each_get_and_confirm_the_whole_file(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    src = tmp_path / "model.bin"
    digest = random_file(src, 5 * MiB + 3)
    r1 = start_receiver("site-1", tmp_path / "in1")
    r2 = start_receiver("site-2", tmp_path / "in2")

    results = _send(settings, ["site-1", "site-2"], src, chunk_size=256 * KiB, window=4)

    assert [r.site for r in results] == ["site-1", "site-2"]
    assert all(r.ok and r.sha256 == digest for r in results)
    assert sha256_of(stored_path(r1.wait_for(1)[0])) == digest
    assert sha256_of(stored_path(r2.wait_for(1)[0])) == digest


@pytest.mark.parametrize(
    ("hostile", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("/etc/shadow", "shadow"),
        ("..", "unnamed"),
        ("a\x00b\nc.bin", "abc.bin"),
        ("..\\..\\win.ini", "win.ini"),
    ],
)
def test_hostile_names_land_inside_dest(
    tmp_path: Path,
    start_receiver: StartReceiver,
    raw_peer: MakeRawPeer,
    hostile: str,
    expected: str,
) -> None:
    """A hand-made sender (raw pika, the documented protocol) offers a hostile name."""
    dest = tmp_path / "in"
    receiver = start_receiver("site-1", dest)
    body = b"owned"
    peer = raw_peer("site-1")
    peer.stream(hostile, [body])

    assert peer.verdict()["ok"] is True
    [received] = receiver.wait_for(1)
    assert isinstance(received, Received)
    assert received.path == (dest / expected).resolve()
    assert stored_path(received).read_bytes() == body
    assert not (tmp_path / "etc").exists()


def test_name_collision_gets_a_suffix_never_overwrites(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    dest = tmp_path / "in"
    dest.mkdir()
    (dest / "data.bin").write_bytes(b"precious")
    src = tmp_path / "data.bin"
    digest = random_file(src, 100 * KiB)
    receiver = start_receiver("site-1", dest)

    [result] = _send(settings, ["site-1"], src)

    [received] = receiver.wait_for(1)
    assert result.stored_as == "data-1.bin"
    assert stored_path(received) == (dest / "data-1.bin").resolve()
    assert (dest / "data.bin").read_bytes() == b"precious"
    assert sha256_of(stored_path(received)) == digest


def test_chunk_corrupted_on_the_way_is_detected_and_resent(
    tmp_path: Path,
    settings: Settings,
    start_receiver: StartReceiver,
    dead_reasons: DeadReasons,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = tmp_path / "c.bin"
    digest = random_file(src, 1 * MiB)
    receiver = start_receiver("site-1", tmp_path / "in")
    flipped: list[int] = []
    original = pika.adapters.blocking_connection.BlockingChannel.basic_publish

    def flip_one(
        self: BlockingChannel,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties | None = None,
        mandatory: bool = False,
    ) -> None:
        if properties is not None and properties.type == "chunk" and not flipped:
            if properties.headers["seq"] == 5:
                flipped.append(5)
                body = bytes([body[0] ^ 0xFF]) + body[1:]  # CRC in the header stays the original
        original(self, exchange, routing_key, body, properties, mandatory)

    monkeypatch.setattr(
        pika.adapters.blocking_connection.BlockingChannel, "basic_publish", flip_one
    )
    [result] = _send(settings, ["site-1"], src, chunk_size=64 * KiB, window=4)

    [received] = receiver.wait_for(1)
    assert flipped == [5]
    assert result.ok
    assert sha256_of(stored_path(received)) == digest
    reasons = dead_reasons()
    assert any("chunk 5" in str(r) and "crc32" in str(r) for r in reasons), reasons


def test_wrong_digest_fails_and_leaves_no_file(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer
) -> None:
    dest = tmp_path / "in"
    receiver = start_receiver("site-1", dest)
    peer = raw_peer("site-1")
    peer.stream("evil.bin", [b"abc", b"def"], sha256="0" * 64)

    [failed] = receiver.wait_for(1)
    assert isinstance(failed, TransferFailed)
    assert failed.code == FailureCode.CHECKSUM
    assert "sha256" in failed.detail
    assert list(dest.iterdir()) == []  # neither final nor partial file
    done = peer.verdict()
    assert done["ok"] is False
    assert done["code"] == "checksum"


def test_object_over_the_receivers_limit_is_refused_fast(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    limited = settings.model_copy(update={"max_object_size": 1000})
    start_receiver("site-1", tmp_path / "in", limited)
    src = tmp_path / "big.bin"
    random_file(src, 2000)

    started = time.monotonic()
    with pytest.raises(SendFailed) as caught:
        _send(settings, ["site-1"], src)

    assert time.monotonic() - started < 5
    [failure] = caught.value.failures
    assert failure.code == FailureCode.TOO_LARGE
    assert failure.site == "site-1"
    assert list((tmp_path / "in").iterdir()) == []


def test_no_receiver_times_out_and_names_the_site(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("nobody")
    src = tmp_path / "x.bin"
    random_file(src, 10)
    quick = settings.model_copy(update={"timeout": 1.5})

    with pytest.raises(SendFailed) as caught:
        _send(quick, ["nobody"], src)

    [failure] = caught.value.failures
    assert isinstance(failure, TimedOut)
    assert "nobody" in str(failure)
    assert "never took the offer" in str(failure)


def test_one_target_missing_does_not_hide_the_other_success(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver, declared: Declared
) -> None:
    declared.sites.add("absent")
    src = tmp_path / "x.bin"
    digest = random_file(src, 300 * KiB)
    receiver = start_receiver("site-1", tmp_path / "in")
    quick = settings.model_copy(update={"timeout": 3})

    with pytest.raises(SendFailed) as caught:
        _send(quick, ["site-1", "absent"], src, chunk_size=64 * KiB)

    ok, missing = caught.value.results
    assert isinstance(ok, TargetResult)
    assert isinstance(missing, TargetResult)
    assert ok.ok
    assert ok.site == "site-1"
    assert not missing.ok
    assert missing.site == "absent"
    assert sha256_of(stored_path(receiver.wait_for(1)[0])) == digest


def test_receiver_with_another_stream_ttl_setting_still_receives(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    """The data queue is the sender's: a receiver configured differently must not redeclare it."""
    src = tmp_path / "x.bin"
    digest = random_file(src, 100 * KiB)
    receiver = start_receiver(
        "site-1", tmp_path / "in", settings.model_copy(update={"stream_ttl": 999})
    )
    [result] = _send(settings, ["site-1"], src)
    assert result.ok
    assert sha256_of(stored_path(receiver.wait_for(1)[0])) == digest


def test_a_transfer_on_quorum_queues(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver, broker_url: str
) -> None:
    """OBJSTREAM_QUEUE_TYPE=quorum: inboxes and data queues replicate (a one-node cluster here)."""
    import pika as _pika

    quorum = settings.model_copy(update={"queue_type": "quorum"})
    src = tmp_path / "q.bin"
    digest = random_file(src, 3 * MiB + 1)
    receiver = start_receiver("site-1", tmp_path / "in", quorum)
    with FileStreamer("server", quorum) as streamer:
        [result] = streamer.stream_file("site-1", src, chunk_size=256 * KiB)
    assert result.ok
    assert sha256_of(stored_path(receiver.wait_for(1)[0])) == digest
    # The inbox really is a quorum queue: redeclaring it as classic (with the same other
    # arguments) is refused.
    topology = Topology.from_settings(settings)
    classic = {"x-dead-letter-exchange": topology.dead("site-1"), "x-delivery-limit": 5}
    connection = _pika.BlockingConnection(_pika.URLParameters(broker_url))
    try:
        with pytest.raises(_pika.exceptions.ChannelClosedByBroker, match="x-queue-type"):
            connection.channel().queue_declare(
                topology.inbox("site-1"), durable=True, arguments=classic
            )
    finally:
        connection.close()


def test_without_declare_peers_a_sender_leaves_the_targets_inbox_alone(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """Regions: a site's inbox is on its own broker, so one declared on the sender's would
    hold offers nobody reads. With ``declare_peers`` false the sender declares none (and the
    offer, unroutable here, finds nobody)."""
    declared.sites.add("elsewhere")
    src = tmp_path / "x.bin"
    random_file(src, 10)
    quick = settings.model_copy(update={"timeout": 1.5, "declare_peers": False})

    with pytest.raises(SendFailed):
        _send(quick, ["elsewhere"], src)

    inbox = Topology.from_settings(settings).inbox("elsewhere")
    connection = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
            connection.channel().queue_declare(inbox, passive=True)
    finally:
        connection.close()
