"""The connection's thread never blocks on user or disk work (heartbeat 2 s: a connection whose
thread stops answering for about 4 s is closed by the broker).

- a slow ``on_entry`` (10 s) runs on a take thread, receiver and retriever alike;
- a slow save at ``close()`` (10 s) finishes while the connection is still served;
- with ``connection_thread=True`` the connection is served by a thread of its own, so a caller
  that does not call ``receive()`` for 10 s costs nothing.

Each checks that the connection survived (no reconnect) and that the transfer completed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from objstream.common.settings import KiB, Settings
from objstream.consumer import Receiver, Retriever
from objstream.consumer.container_assembler import ContainerEntry
from objstream.consumer.streams import Received
from objstream.producer import ContainerRetriever, ContainerStreamer
from tests.integration.conftest import Declared, StartServer

SLOW = 10.0


def _beating(settings: Settings) -> Settings:
    return settings.model_copy(update={"heartbeat": 2, "timeout": 40})


def _model() -> dict[str, Any]:
    return {"w": np.arange(64 * 1024, dtype=np.float32), "b": np.ones(3, dtype=np.int64)}


def _push_in_background(settings: Settings, results: list[object]) -> threading.Thread:
    def push() -> None:
        try:
            with ContainerStreamer("server", settings) as streamer:
                results.extend(streamer.stream_container("site-1", _model(), "model",
                                                         chunk_size=64 * KiB))  # fmt: skip
        except BaseException as e:
            results.append(e)

    thread = threading.Thread(target=push, daemon=True)
    thread.start()
    return thread


def test_a_slow_on_entry_does_not_starve_the_receivers_heartbeat(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    beating = _beating(settings)
    entries: list[ContainerEntry] = []

    def slow(entry: ContainerEntry) -> None:
        if not entries:
            time.sleep(SLOW)  # a user's slow consumer of the first entry
        entries.append(entry)

    results: list[object] = []
    with Receiver("site-1", tmp_path / "in", beating, on_entry=slow) as receiver:
        pusher = _push_in_background(beating, results)
        item = receiver.receive(timeout=60)
        assert isinstance(item, Received)
        assert receiver.reconnects == 0
    pusher.join(30)
    assert [getattr(r, "ok", r) for r in results] == [True]
    assert sorted(e.key for e in entries) == ["b", "w"]
    assert np.array_equal(next(e.value for e in entries if e.key == "w"), _model()["w"])


def test_a_slow_on_entry_does_not_starve_the_retrievers_heartbeat(
    tmp_path: Path, settings: Settings, start_server: StartServer, declared: Declared
) -> None:
    beating = _beating(settings)
    start_server(beating, lambda s: ContainerRetriever(s).add_container("model", _model()))
    entries: list[ContainerEntry] = []

    def slow(entry: ContainerEntry) -> None:
        if not entries:
            time.sleep(SLOW)
        entries.append(entry)

    with Retriever("site-1", tmp_path / "in", beating, on_entry=slow) as retriever:
        assert retriever.retrieve_container("server", "model", timeout=40) is None
        assert retriever.reconnects == 0
    assert sorted(e.key for e in entries) == ["b", "w"]


def test_a_slow_save_at_close_is_served_to_the_end(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """The receiver is closed while a save of 10 s runs: close() keeps the connection served,
    the save finishes, and the sender hears the object arrived."""
    declared.sites.add("site-1")
    beating = _beating(settings)
    saving = threading.Event()

    def slow_save(item: Received) -> Received:
        saving.set()
        time.sleep(SLOW)
        return item

    results: list[object] = []
    receiver = Receiver("site-1", tmp_path / "in", beating, save=slow_save)
    pusher = _push_in_background(beating, results)
    deadline = time.monotonic() + 30
    while not saving.is_set() and time.monotonic() < deadline:
        receiver.receive(timeout=0.2)
    assert saving.is_set()
    receiver.close()
    assert receiver.reconnects == 0
    pusher.join(30)
    assert [getattr(r, "ok", r) for r in results] == [True]


def test_a_connection_thread_serves_the_connection_while_the_caller_does_not(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    beating = _beating(settings)
    results: list[object] = []
    with Receiver("site-1", tmp_path / "in", beating, connection_thread=True) as receiver:
        pusher = _push_in_background(beating, results)
        pusher.join(30)  # the whole transfer, while this thread calls nothing of the receiver
        time.sleep(SLOW)  # and then some: heartbeats go on
        item = receiver.receive(timeout=5)
        assert isinstance(item, Received)
        assert receiver.reconnects == 0
    assert [getattr(r, "ok", r) for r in results] == [True]
    assert item.value is not None
    assert np.array_equal(item.value["w"], _model()["w"])


def test_a_retriever_on_a_connection_thread(
    tmp_path: Path, settings: Settings, start_server: StartServer
) -> None:
    start_server(settings, lambda s: ContainerRetriever(s).add_container("model", _model()))
    with Retriever("site-1", tmp_path / "in", settings, connection_thread=True) as retriever:
        value = retriever.retrieve_container("server", "model", timeout=30)
    assert np.array_equal(value["w"], _model()["w"])


@pytest.mark.parametrize("thread", [False, True])
def test_a_receiver_closes_cleanly_with_or_without_a_connection_thread(
    tmp_path: Path, settings: Settings, declared: Declared, thread: bool
) -> None:
    declared.sites.add("site-1")
    receiver = Receiver("site-1", tmp_path / "in", settings, connection_thread=thread)
    assert receiver.receive(timeout=0.5) is None
    receiver.close()
    receiver.close()  # twice is fine
