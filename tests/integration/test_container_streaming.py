"""Containers streamed end to end: dicts, lists and sets, big entries chunked, no pickle."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pika
import pytest

from objstream.common.codec import EncodeError, FileRange, encode
from objstream.common.errors import FailureCode, SendFailed, TransferFailed
from objstream.common.settings import KiB, Settings
from objstream.common.streaming import ObjectAssembler, ObjectStreamer, Piece
from objstream.common.topology import Topology
from objstream.consumer.container_assembler import ContainerEntry
from objstream.consumer.streams import Received
from objstream.producer import ContainerStreamer, Streamer, TargetResult
from tests.conftest import as_received, stored_names
from tests.integration.conftest import (
    Declared,
    MakeRawPeer,
    StartReceiver,
    count_published_chunks,
)
from tests.integration.rawpeer import RawPeer, declare_bound
from tests.integration.test_codec_helpers import same


def _send(
    settings: Settings,
    targets: str | list[str],
    container: dict[Any, Any] | list[Any] | set[Any],
    name: str = "model",
    **options: Any,
) -> list[TargetResult]:
    with ContainerStreamer("server", settings) as streamer:
        return streamer.stream_container(targets, container, name, **options)


def test_dict_of_arrays_with_entries_larger_than_a_chunk(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    rng = np.random.default_rng(1)
    model = {
        "layer-0": rng.standard_normal((256, 300), dtype=np.float32),  # 300 KiB: 5 chunks
        "layer-1": np.asfortranarray(rng.integers(0, 9, (50, 70)).astype(">i8")),
        "bias": rng.standard_normal(7).astype(np.float16),
        "strided": np.arange(1000, dtype="<u4")[::3],
        "meta": {"epoch": 3, "lr": 1e-3, "tags": ("a", "b"), "ok": None},
        7: b"\x00" * 200_000,
        "ünïcode": "✓",
        "empty": np.zeros((0, 4)),
    }
    receiver = start_receiver("site-1", tmp_path / "in")

    [result] = _send(settings, "site-1", model, chunk_size=64 * KiB, window=4)

    [received] = receiver.wait_for(1)
    assert isinstance(received, Received)
    assert result.ok
    assert received.kind == "container"
    assert received.name == "model"
    assert received.container_type == "dict"
    assert received.entry_count == len(model)
    assert list(received.value) == list(model)  # order kept
    for key, value in model.items():
        assert same(value, received.value[key]), key
    assert received.sha256 == result.sha256
    assert list((tmp_path / "in").iterdir()) == []  # containers never touch the disk


@pytest.mark.parametrize(
    "container",
    [[], {}, set(), [1, "two", [3.0], None], {1, "two", (3, 4), b"five"}, [np.arange(5)] * 3],
    ids=["empty-list", "empty-dict", "empty-set", "list", "set", "list-of-arrays"],
)
def test_lists_sets_and_empty_containers(
    tmp_path: Path,
    settings: Settings,
    start_receiver: StartReceiver,
    container: dict[Any, Any] | list[Any] | set[Any],
) -> None:
    receiver = start_receiver("site-1", tmp_path / "in")
    [result] = _send(settings, "site-1", container, "c", chunk_size=KiB)
    [received] = receiver.wait_for(1)
    assert result.ok
    assert as_received(received).container_type == type(container).__name__
    assert same(container, as_received(received).value)


def test_on_entry_gets_each_entry_in_order_and_nothing_is_kept(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    from tests.integration.conftest import BackgroundReceiver

    entries: list[ContainerEntry] = []
    model = {f"layer-{i}": np.full((100, 100), i, dtype=np.float64) for i in range(5)}
    start_receiver("ignored", tmp_path / "x")  # keeps the fixture's cleanup in play
    receiver = BackgroundReceiver("site-2", tmp_path / "in", settings, on_entry=entries.append)
    try:
        _send(settings, "site-2", model, chunk_size=16 * KiB)
        [received] = receiver.wait_for(1)
    finally:
        receiver.stop()
    assert as_received(received).value is None
    assert [e.key for e in entries] == list(model)
    assert [e.index for e in entries] == list(range(5))
    assert all(np.array_equal(e.value, model[e.key]) for e in entries)
    assert {e.name for e in entries} == {"model"}


def test_two_targets(tmp_path: Path, settings: Settings, start_receiver: StartReceiver) -> None:
    model = {"w": np.arange(100_000, dtype=np.int32)}
    r1 = start_receiver("site-1", tmp_path / "a")
    r2 = start_receiver("site-2", tmp_path / "b")
    results = _send(settings, ["site-1", "site-2"], model, chunk_size=32 * KiB)
    assert all(r.ok for r in results)
    for receiver in (r1, r2):
        assert np.array_equal(as_received(receiver.wait_for(1)[0]).value["w"], model["w"])


@pytest.mark.parametrize(
    ("container", "words"),
    [
        ({"w": np.array([object()])}, "key 'w'"),
        ({"f": lambda: 1}, "function"),
        ({(1, 2): 3}, "dict keys must be str or int"),
        ([1, 2, object()], "index 2"),
        ("not a container", "not a dict, list or set"),
    ],
)
def test_unencodable_values_are_refused_before_anything_is_sent(
    settings: Settings, declared: Declared, container: Any, words: str
) -> None:
    declared.sites.add("site-1")
    with pytest.raises(EncodeError, match=words):
        _send(settings, "site-1", container)
    connection = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        channel = connection.channel()
        topo = Topology.from_settings(settings)
        inbox = declare_bound(channel, topo, topo.inbox("site-1"), topo.offer_key("site-1"))
        assert channel.queue_declare(inbox, passive=True).method.message_count == 0
    finally:
        connection.close()


def _entry_chunks(values: list[bytes]) -> list[tuple[bytes, dict[str, Any]]]:
    """Container chunks by hand: one chunk per entry."""
    out = []
    for i, value in enumerate(values):
        enc = encode([f"k{i}", value])
        body = enc.structure + b"".join(
            b.read(0, b.nbytes) if isinstance(b, FileRange) else bytes(b) for b in enc.buffers
        )
        out.append((body, {"entry": i, "head": len(enc.structure), "size": len(body)}))
    return out


def _send_raw_container(
    peer: RawPeer,
    chunks: list[tuple[bytes, dict[str, Any]]],
    entries: int,
    sha256: str | None = None,
) -> None:
    size = sum(len(b) for b, _ in chunks)
    peer.offer(
        "raw",
        size,
        1 << 20,
        kind="container",
        chunk_count=len(chunks),
        info={"container": "dict", "entries": entries},
    )
    for seq, (body, meta) in enumerate(chunks):
        peer.chunk(seq, body, meta=meta)
    whole = b"".join(b for b, _ in chunks)
    peer.end(len(chunks), size, sha256 or hashlib.sha256(whole).hexdigest())


def test_entry_count_mismatch_fails_the_stream(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer
) -> None:
    receiver = start_receiver("site-1", tmp_path / "in")
    peer = raw_peer("site-1")
    first, (second, meta) = _entry_chunks([b"a", b"b"])
    # Three chunks, so three entries could fit: the second entry comes in two parts.
    parts = [first, (second[:3], meta), (second[3:], {"entry": 1, "part": 1})]
    _send_raw_container(peer, parts, entries=3)
    [failed] = receiver.wait_for(1)
    assert isinstance(failed, TransferFailed)
    assert failed.code == FailureCode.PROTOCOL
    assert "2 complete entries != announced 3" in failed.detail
    assert peer.verdict()["ok"] is False


def test_more_entries_than_chunks_is_refused_at_the_offer(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer
) -> None:
    receiver = start_receiver("site-1", tmp_path / "in")
    peer = raw_peer("site-1")
    _send_raw_container(peer, _entry_chunks([b"a", b"b"]), entries=3)
    [failed] = receiver.wait_for(1)
    assert isinstance(failed, TransferFailed)
    assert failed.code == FailureCode.PROTOCOL
    assert "3 entries cannot fit in 2 chunks" in failed.detail


def test_digest_mismatch_fails_the_container(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer
) -> None:
    receiver = start_receiver("site-1", tmp_path / "in")
    peer = raw_peer("site-1")
    _send_raw_container(peer, _entry_chunks([b"a"]), entries=1, sha256="1" * 64)
    [failed] = receiver.wait_for(1)
    assert isinstance(failed, TransferFailed)
    assert failed.code == FailureCode.CHECKSUM


def test_entry_whose_header_claims_more_bytes_than_it_carries(
    tmp_path: Path, start_receiver: StartReceiver, raw_peer: MakeRawPeer
) -> None:
    receiver = start_receiver("site-1", tmp_path / "in")
    peer = raw_peer("site-1")
    enc = encode(["k", np.zeros(1000, dtype=np.float64)])  # claims 8000 payload bytes
    body = enc.structure + b"\x00" * 16  # carries 16
    meta = {"entry": 0, "head": len(enc.structure), "size": len(body)}
    _send_raw_container(peer, [(body, meta)], entries=1)
    [failed] = receiver.wait_for(1)
    assert isinstance(failed, TransferFailed)
    assert failed.code == FailureCode.PROTOCOL
    assert "8000" in failed.detail


# -- a custom kind, built on the same two halves ------------------------------------------------


class RecordsStreamer(ObjectStreamer):
    """Streams records from a generator: no random access, size unknown until the end."""

    kind = "records"

    def __init__(self, name: str, records: Iterator[bytes]) -> None:
        self.name = name
        self.records = records

    def pieces(self) -> Iterator[Piece]:
        for number, record in enumerate(self.records):
            yield Piece(record, {"record": number})


class RecordsAssembler(ObjectAssembler):
    def __init__(self) -> None:
        self.records: list[bytes] = []

    def take(self, offset: int, data: bytes, meta: Mapping[str, Any] | None) -> None:
        assert meta is not None
        assert meta["record"] == len(self.records)
        self.records.append(data)

    def finish(self) -> list[bytes]:
        return self.records


def test_a_custom_kind_streams_end_to_end(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    from tests.integration.conftest import BackgroundReceiver

    declared.sites.add("site-1")
    records = [f"record {i}".encode() * (i + 1) for i in range(300)]
    receiver = BackgroundReceiver(
        "site-1", tmp_path / "in", settings, assemblers={"records": lambda o: RecordsAssembler()}
    )
    try:
        with Streamer("server", settings) as streamer:
            [result] = streamer.stream_object(
                "site-1", RecordsStreamer("log", iter(records)), chunk_size=4 * KiB, window=8
            )
        [received] = receiver.wait_for(1)
    finally:
        receiver.stop()
    assert result.ok
    assert result.size == sum(map(len, records))
    assert as_received(received).kind == "records"
    assert as_received(received).value == records


def test_a_kind_the_receiver_does_not_know_is_refused(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    from objstream.common.errors import SendFailed

    start_receiver("site-1", tmp_path / "in")
    with Streamer("server", settings) as streamer, pytest.raises(SendFailed) as caught:
        streamer.stream_object("site-1", RecordsStreamer("log", iter([b"x"])))
    [failure] = caught.value.failures
    assert failure.code == FailureCode.REFUSED
    assert "kind 'records'" in failure.detail


def test_a_receiver_that_stores_containers_hands_out_the_file_and_memory_maps(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    rng = np.random.default_rng(3)
    model: dict[str, Any] = {
        "embed": rng.standard_normal((512, 300), dtype=np.float32),  # 600 KiB: 10 chunks
        "big_endian": np.arange(10_000, dtype=">i4"),
        "step": 7,
    }
    dest = tmp_path / "in"
    receiver = start_receiver("site-1", dest, store_containers=True, as_memmap=True)

    [result] = _send(settings, "site-1", model, chunk_size=64 * KiB, window=4)

    [received] = receiver.wait_for(1)
    assert isinstance(received, Received)
    assert result.ok
    assert result.stored_as == "model.npz"
    assert received.path == (dest / "model.npz").resolve()
    assert list(received.value) == list(model)
    for key, value in model.items():
        mapped = received.value[key]
        assert isinstance(mapped, np.memmap), key
        assert mapped.dtype == np.asarray(value).dtype, key
        assert np.array_equal(mapped, value), key
    with np.load(received.path, allow_pickle=False) as saved:
        assert all(np.array_equal(saved[k], v) for k, v in model.items())
    assert stored_names(dest) == ["model.npz"]


def test_a_container_that_cannot_be_stored_is_refused_before_a_chunk_moves(
    tmp_path: Path,
    settings: Settings,
    start_receiver: StartReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ml_dtypes

    receiver = start_receiver("site-1", tmp_path / "in", store_containers=True)
    model = {"w": np.zeros(1 << 20, ml_dtypes.bfloat16)}  # 2 MiB: 32 chunks of 64 KiB
    published = count_published_chunks(monkeypatch)
    with pytest.raises(SendFailed) as raised:
        _send(settings, "site-1", model, chunk_size=64 * KiB)
    [failure] = raised.value.failures
    assert failure.code == FailureCode.REFUSED
    assert "bfloat16 cannot be saved as .npz" in failure.detail
    assert "name it .safetensors" in failure.detail
    [outcome] = receiver.wait_for(1)
    assert isinstance(outcome, TransferFailed)
    assert published == []
    assert list((tmp_path / "in").iterdir()) == []
