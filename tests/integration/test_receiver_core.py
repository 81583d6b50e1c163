"""The receiver's own guarantees: the verdict only after the object is saved, and the receiver
(not the sender) bounds what it buffers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from objstream.common import amqp
from objstream.common.errors import FailureCode, SendFailed
from objstream.common.settings import KiB, Settings
from objstream.consumer.streams import Received
from objstream.producer import ContainerStreamer, FileStreamer
from tests.integration.conftest import BackgroundReceiver, BackgroundServer, Declared


def _model() -> dict[str, np.ndarray[Any, Any]]:
    return {f"w{i}": np.arange(2000, dtype=np.float32) * i for i in range(3)}


def test_the_container_is_saved_before_the_sender_hears_ok(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    dest = tmp_path / "in"
    dest.mkdir()
    receiver = BackgroundReceiver("site-1", dest, settings, store_containers=True)
    try:
        with ContainerStreamer("server", settings) as streamer:
            [result] = streamer.stream_container("site-1", _model(), "model", chunk_size=4 * KiB)
        # Done(ok) came after the save: the file is there the moment the sender returns.
        assert result.ok
        assert result.stored_as == "model.npz"
        assert (dest / "model.npz").is_file()
        with np.load(dest / "model.npz") as saved:
            assert sorted(saved.files) == ["w0", "w1", "w2"]
        [received] = receiver.wait_for(1)
        assert isinstance(received, Received)
        assert received.path == (dest / "model.npz").resolve()
    finally:
        receiver.stop()


def test_a_failed_save_is_a_failed_transfer_at_the_sender(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")

    def unwritable(item: Received) -> Received:
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "model.npz"))

    receiver = BackgroundReceiver("site-1", tmp_path / "in", settings, save=unwritable)
    try:
        with (
            ContainerStreamer("server", settings) as streamer,
            pytest.raises(SendFailed) as raised,
        ):
            streamer.stream_container("site-1", _model(), "model", chunk_size=4 * KiB)
        [failure] = raised.value.failures
        assert failure.code == FailureCode.IO
        assert "Permission denied" in failure.detail
        [outcome] = receiver.wait_for(1)
        assert not isinstance(outcome, Received)
        assert outcome.code == FailureCode.IO
    finally:
        receiver.stop()


def test_a_save_longer_than_the_senders_timeout_neither_fails_nor_resends(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    # Saving a multi-GiB checkpoint takes minutes; the receiver tells the sender it is alive
    # (progress every second while committing), so the sender, whose timeout here is 2 s and
    # whose resends start after 1 s of silence, neither fails the target nor resends anything.
    declared.sites.add("site-1")
    src = tmp_path / "f.bin"
    src.write_bytes(bytes(range(256)) * 1024)

    def slow(item: Received) -> Received:
        time.sleep(5)
        return item

    receiver = BackgroundReceiver("site-1", tmp_path / "in", settings, save=slow)
    try:
        quick = settings.model_copy(update={"resend_after": 1.0})
        with FileStreamer("server", quick) as streamer:
            [result] = streamer.stream_file("site-1", src, chunk_size=16 * KiB, timeout=2.0)
            assert streamer.bytes_published == src.stat().st_size  # no chunk sent twice
        assert result.ok
        [received] = receiver.wait_for(1)
        assert isinstance(received, Received)
    finally:
        receiver.stop()


def test_a_receiver_with_accept_from_refuses_a_push_from_another_broker_user(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    # The Python API's accept_from (over the setting): this test's user is guest, and only
    # "server-user" may push. (tests/integration/test_tls.py does it with two real users.)
    declared.sites.add("site-1")
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    receiver = BackgroundReceiver("site-1", tmp_path / "in", settings, accept_from=["server-user"])
    try:
        with FileStreamer("server", settings) as streamer, pytest.raises(SendFailed) as raised:
            streamer.stream_file("site-1", src)
        [failure] = raised.value.failures
        assert failure.code == FailureCode.FORBIDDEN
        assert "server-user" in failure.detail
        assert "'guest'" in failure.detail
        assert not (tmp_path / "in" / "f.bin").exists()
    finally:
        receiver.stop()


def test_the_receiver_caps_the_prefetch_an_offer_asks_for(
    tmp_path: Path, settings: Settings, declared: Declared, monkeypatch: pytest.MonkeyPatch
) -> None:
    declared.sites.add("site-1")
    asked: list[int] = []
    original = amqp.Channel.qos

    def recording(self: amqp.Channel, prefetch: int) -> None:
        asked.append(prefetch)
        original(self, prefetch)

    monkeypatch.setattr(amqp.Channel, "qos", recording)
    capped = settings.model_copy(update={"receive_window": 64})
    src = tmp_path / "src.bin"
    src.write_bytes(np.random.default_rng(0).bytes(300 * KiB))
    receiver = BackgroundReceiver("site-1", tmp_path / "in", capped)
    try:
        greedy = Settings(url=settings.url, namespace=settings.namespace, window=4096,
                          timeout=settings.timeout, resend_after=settings.resend_after)  # fmt: skip
        with FileStreamer("server", greedy) as streamer:
            [result] = streamer.stream_file("site-1", src, chunk_size=KiB)
        assert result.ok
        [received] = receiver.wait_for(1)
        assert isinstance(received, Received)
        assert Path(received.path or "").read_bytes() == src.read_bytes()
    finally:
        receiver.stop()
    # The inbox takes one offer at a time; the data channel gets the receiver's bound.
    assert 64 in asked
    assert max(asked) == 64


def test_a_slow_prefix_hash_does_not_starve_the_heartbeat(
    tmp_path: Path,
    settings: Settings,
    start_server: Callable[..., BackgroundServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hashing a kept prefix takes ~10 s here (throttled reads) with a 2 s heartbeat: it runs
    off the connection's thread, so the connection survives and the retrieval completes."""
    from objstream.consumer import Retriever
    from objstream.consumer.resume import Resumable
    from objstream.producer import FileRetriever
    from tests.conftest import random_file, sha256_of
    from tests.integration.conftest import slow_disk, wait_for_partial
    from tests.integration.test_resume_retrieval import CHUNK, _fetch_in_background

    src = tmp_path / "src"
    src.mkdir()
    digest = random_file(src / "f.bin", 4 * 1024 * KiB)
    small = settings.model_copy(update={"chunk_size": CHUNK})
    slow_disk(monkeypatch, seconds=0.02)
    server = start_server(small, lambda s: FileRetriever(s, source_dir=src))
    out = tmp_path / "out"
    fetcher, failures = _fetch_in_background(settings, out, "f.bin", timeout=10)
    wait_for_partial(out, 10 * CHUNK)
    server.stop()  # aborted: the verified prefix is kept
    fetcher.join(30)
    assert len(failures) == 1
    monkeypatch.undo()

    hashed = Resumable._hash_prefix

    def throttled(self: Resumable) -> Any:
        import time

        time.sleep(10)  # a slow disk: ~10 s for the prefix
        return hashed(self)

    monkeypatch.setattr(Resumable, "_hash_prefix", throttled)
    quick_beat = settings.model_copy(update={"heartbeat": 2})
    start_server(small.model_copy(update={"heartbeat": 2}),
                 lambda s: FileRetriever(s, source_dir=src))  # fmt: skip
    with Retriever("site-1", out, quick_beat) as retriever:
        item = retriever.retrieve("file", "server", "f.bin", timeout=30)
        assert retriever.reconnects == 0  # the connection never dropped
    assert item.resumed_bytes > 0
    assert item.path is not None
    assert sha256_of(item.path) == digest
