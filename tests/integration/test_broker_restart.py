"""The broker dies mid-stream (SIGKILL) and comes back: both sides reconnect and the file
arrives bit-exact. On a throwaway local node, never the shared broker."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from objstream.common.settings import KiB, MiB, Settings
from objstream.consumer import Retriever
from objstream.producer import FileRetriever, FileStreamer
from tests.conftest import random_file, sha256_of, stored_path
from tests.integration.conftest import BackgroundReceiver, BackgroundServer, wait_for_partial
from tests.rabbitmq_node import LocalRabbitNode

pytestmark = pytest.mark.usefixtures("local_nodes")


def _transfer_with(
    interrupt: Callable[[LocalRabbitNode], None],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    expect_lost: set[str],
) -> None:
    caplog.set_level(logging.INFO)
    node = LocalRabbitNode()
    node.start()
    try:
        settings = Settings(url=node.url, namespace="restart", timeout=90, resend_after=2,
                            connect_wait=60)  # fmt: skip
        size = 128 * MiB
        src = tmp_path / "big.bin"
        digest = random_file(src, size)
        dest = tmp_path / "in"
        receiver = BackgroundReceiver("site-1", dest, settings)
        outcome: list[object] = []

        def send() -> None:
            try:
                with FileStreamer("server", settings) as streamer:
                    outcome.append(streamer.stream_file("site-1", src, chunk_size=256 * KiB,
                                                        window=8))  # fmt: skip
            except Exception as e:
                outcome.append(e)

        sender = threading.Thread(target=send)
        sender.start()
        wait_for_partial(dest, size // 4)
        interrupt(node)
        sender.join(180)
        assert outcome, "the sender did not return"
        assert not isinstance(outcome[0], Exception), outcome[0]
        [received] = receiver.wait_for(1, timeout=60)
        assert sha256_of(stored_path(received)) == digest
        receiver.stop()
        lost = [r for r in caplog.records if "connection to the broker lost" in r.getMessage()]
        assert {r.name for r in lost} == expect_lost, caplog.text
        # What was redelivered was taken, not dead-lettered as invalid.
        assert not [r for r in caplog.records if "dead-lettering" in r.getMessage()], caplog.text
    finally:
        node.cleanup()


def _restart(node: LocalRabbitNode) -> None:
    node.kill()
    time.sleep(1)
    node.start()


def _close_consumer_connection(node: LocalRabbitNode) -> None:
    listed = node.ctl("list_connections", "pid", "client_properties").stdout
    pids = [line.split("\t")[0] for line in listed.splitlines() if "objstream consumer" in line]
    assert pids, listed
    for pid in pids:
        node.ctl("close_connection", pid, "closed by the test")


def test_the_broker_killed_and_restarted_mid_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _transfer_with(
        _restart, tmp_path, caplog, {"objstream.producer.sender", "objstream.consumer.core"}
    )


def test_a_connection_closed_by_the_broker_mid_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """rabbitmqctl close_connection on the receiver: it reconnects and finishes the file."""
    _transfer_with(_close_consumer_connection, tmp_path, caplog, {"objstream.consumer.core"})


def test_a_retrieval_survives_the_broker_restarting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Owner and requester both reconnect; the file arrives bit-exact, and the owner goes on
    serving new requests."""
    caplog.set_level(logging.INFO)
    node = LocalRabbitNode()
    node.start()
    server = None
    try:
        settings = Settings(url=node.url, namespace="restart", timeout=90, resend_after=2,
                            connect_wait=60, chunk_size=256 * KiB, window=8)  # fmt: skip
        size = 128 * MiB
        src = tmp_path / "src"
        src.mkdir()
        digest = random_file(src / "big.bin", size)
        (src / "small.txt").write_bytes(b"after the restart\n")
        server = BackgroundServer("server", settings, lambda s: FileRetriever(s, source_dir=src))
        dest = tmp_path / "in"
        outcome: list[object] = []

        def fetch() -> None:
            try:
                with Retriever("site-1", dest, settings) as retriever:
                    outcome.append(retriever.retrieve_file("server", "big.bin", timeout=90))
            except Exception as e:
                outcome.append(e)

        fetcher = threading.Thread(target=fetch)
        fetcher.start()
        wait_for_partial(dest, size // 4)
        _restart(node)
        fetcher.join(180)
        assert outcome, "the retrieval did not return"
        assert not isinstance(outcome[0], Exception), outcome[0]
        assert sha256_of(dest / "big.bin") == digest
        with Retriever("site-1", dest, settings) as retriever:
            path = retriever.retrieve_file("server", "small.txt", timeout=30)
        assert path.read_bytes() == b"after the restart\n"
        lost = {r.name for r in caplog.records if "connection to the broker lost" in r.getMessage()}
        assert {
            "objstream.consumer.core",
            "objstream.producer.sender",
            "objstream.producer.serving",
        } <= lost, caplog.text
        # What `serve --metrics-port` shows as objstream_reconnects_total: the serving
        # connection's and its worker's.
        assert server.server is not None
        assert server.server.reconnects >= 2
    finally:
        if server is not None:
            server.stop()
        node.cleanup()
