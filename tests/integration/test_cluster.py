"""Node loss on a 3-node RabbitMQ cluster with quorum queues: transfers survive the SIGKILL of
the node the sender or a receiver is connected to, and a cluster that lost its majority fails
cleanly, keeping the verified prefix for a retrieval to resume once the nodes are back.

A throwaway cluster of local nodes (tests/rabbitmq_cluster.py), never the shared broker.
Marked ``cluster``; run them alone with ``python -m pytest -m cluster``. With
``OBJSTREAM_KEEP_NODE_LOGS=DIR`` the nodes' logs are copied there at the end.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from objstream.common.errors import TransferFailed
from objstream.common.settings import MiB, Settings
from objstream.consumer import Retriever
from objstream.producer import FileRetriever, FileStreamer
from tests.conftest import final_files, kept_bytes, random_file, sha256_of, stored_path
from tests.integration.conftest import (
    BackgroundReceiver,
    BackgroundServer,
    in_background,
    wait_for_partial,
)
from tests.rabbitmq_cluster import LocalRabbitCluster
from tests.rabbitmq_node import remove_nodes

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.usefixtures("local_nodes"),
]

SENDER_NODE, RECEIVER_NODE, SPARE_NODE = 0, 1, 2
LOST = "connection to the broker lost"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRabbitCluster]:
    nodes = LocalRabbitCluster(3)
    try:
        nodes.start()
        yield nodes
    finally:
        remove_nodes(nodes)


@pytest.fixture
def healthy(cluster: LocalRabbitCluster) -> Iterator[LocalRabbitCluster]:
    """The cluster, whole again after the test (killed nodes restarted)."""
    yield cluster
    dead = [i for i, node in enumerate(cluster.nodes) if node.process is None]
    if dead:
        cluster.restart(*dead)


@pytest.fixture
def on(healthy: LocalRabbitCluster) -> Callable[..., Settings]:
    """Settings on quorum queues of a fresh namespace, connecting to node ``first`` first."""
    namespace = f"objstream-cluster-{uuid.uuid4().hex[:8]}"

    def settings(first: int, **extra: Any) -> Settings:
        options: dict[str, Any] = dict(timeout=60, resend_after=2, connect_wait=30)
        options.update(extra)
        return Settings(url=healthy.url_from(first), namespace=namespace, queue_type="quorum",
                        **options)  # fmt: skip

    return settings


def _succeeded(thread: threading.Thread, outcome: list[object]) -> object:
    thread.join(300)
    assert outcome, "it did not return"
    assert not isinstance(outcome[0], Exception), outcome[0]
    return outcome[0]


def _lost_by(caplog: pytest.LogCaptureFixture) -> set[str]:
    return {r.name for r in caplog.records if LOST in r.getMessage()}


VICTIMS = {"sender's node": SENDER_NODE, "receiver's node": RECEIVER_NODE}


@pytest.mark.parametrize("victim", list(VICTIMS))
def test_a_push_survives_the_death_of_a_node(
    healthy: LocalRabbitCluster,
    on: Callable[..., Settings],
    victim: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    size = 256 * MiB
    src = tmp_path / "big.bin"
    digest = random_file(src, size)
    dest = tmp_path / "in"
    receiver = BackgroundReceiver("site-1", dest, on(RECEIVER_NODE))
    try:
        with FileStreamer("server", on(SENDER_NODE)) as streamer:
            sending, outcome = in_background(lambda: streamer.stream_file("site-1", src))
            wait_for_partial(dest, size // 4)
            healthy.kill(VICTIMS[victim])
            _succeeded(sending, outcome)
        [received] = receiver.wait_for(1, timeout=120)
    finally:
        receiver.stop()
    assert sha256_of(stored_path(received)) == digest
    assert final_files(dest) == [dest / "big.bin"]
    expect = "objstream.producer.sender" if victim == "sender's node" else "objstream.consumer.core"
    assert expect in _lost_by(caplog), caplog.text


@pytest.mark.parametrize("victim", list(VICTIMS))
def test_a_broadcast_to_three_sites_survives_the_death_of_a_node(
    healthy: LocalRabbitCluster,
    on: Callable[..., Settings],
    victim: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """site-1 is on the receiver's node, site-2 and site-3 on the others."""
    caplog.set_level(logging.INFO)
    size = 64 * MiB
    src = tmp_path / "big.bin"
    digest = random_file(src, size)
    sites = {"site-1": RECEIVER_NODE, "site-2": SPARE_NODE, "site-3": SENDER_NODE}
    receivers = {
        site: BackgroundReceiver(site, tmp_path / site, on(node)) for site, node in sites.items()
    }
    try:
        with FileStreamer("server", on(SENDER_NODE)) as streamer:
            sending, outcome = in_background(lambda: streamer.stream_file(list(sites), src))
            wait_for_partial(tmp_path / "site-1", size // 4)
            healthy.kill(VICTIMS[victim])
            _succeeded(sending, outcome)
        for site, receiver in receivers.items():
            [received] = receiver.wait_for(1, timeout=120)
            assert sha256_of(stored_path(received)) == digest, site
            assert final_files(tmp_path / site) == [tmp_path / site / "big.bin"]
    finally:
        for receiver in receivers.values():
            receiver.stop()
    assert _lost_by(caplog), caplog.text


@pytest.mark.parametrize("victim", list(VICTIMS))
def test_a_retrieval_survives_the_death_of_a_node(
    healthy: LocalRabbitCluster,
    on: Callable[..., Settings],
    victim: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The owner (sending) is on the sender's node, the requester on the receiver's."""
    caplog.set_level(logging.INFO)
    size = 128 * MiB
    src = tmp_path / "src"
    src.mkdir()
    digest = random_file(src / "big.bin", size)
    dest = tmp_path / "in"
    server = BackgroundServer("server", on(SENDER_NODE), lambda s: FileRetriever(s, source_dir=src))
    try:
        with Retriever("site-1", dest, on(RECEIVER_NODE)) as retriever:
            fetching, outcome = in_background(
                lambda: retriever.retrieve_file("server", "big.bin", timeout=60)
            )
            wait_for_partial(dest, size // 4)
            healthy.kill(VICTIMS[victim])
            _succeeded(fetching, outcome)
    finally:
        server.stop()
    assert sha256_of(dest / "big.bin") == digest
    assert final_files(dest) == [dest / "big.bin"]
    assert _lost_by(caplog), caplog.text


def test_losing_the_majority_fails_both_sides_cleanly_and_the_prefix_is_resumed(
    healthy: LocalRabbitCluster,
    on: Callable[..., Settings],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two of three nodes killed mid-retrieval: no quorum, no progress. Owner and requester
    (both on the surviving node) each fail after their timeout with one line; the requester
    keeps the verified prefix, and once the nodes are back a new request moves only the rest."""
    caplog.set_level(logging.INFO)
    size = 128 * MiB
    src = tmp_path / "src"
    src.mkdir()
    digest = random_file(src / "big.bin", size)
    dest = tmp_path / "in"
    settings = on(SPARE_NODE, timeout=15)
    server = BackgroundServer("server", settings, lambda s: FileRetriever(s, source_dir=src))
    try:
        with Retriever("site-1", dest, settings) as retriever:
            fetching, outcome = in_background(
                lambda: retriever.retrieve_file("server", "big.bin", timeout=15)
            )
            wait_for_partial(dest, size // 4)
            healthy.kill(SENDER_NODE)
            healthy.kill(RECEIVER_NODE)
            fetching.join(120)
        [error] = outcome
        assert isinstance(error, TransferFailed), error
        assert "\n" not in str(error)
        assert "without progress" in str(error), error
        assert final_files(dest) == []
        [kept] = kept_bytes(dest).values()
        assert 0 < len(kept) < size
        assert kept == (src / "big.bin").read_bytes()[: len(kept)]

        healthy.restart(SENDER_NODE, RECEIVER_NODE)
        with Retriever("site-1", dest, settings) as retriever:
            item = retriever.retrieve("file", "server", "big.bin", timeout=60)
    finally:
        server.stop()
    assert item.path is not None
    assert sha256_of(item.path) == digest
    assert item.resumed_bytes == len(kept)
    assert final_files(dest) == [dest / "big.bin"]
    owner = [r for r in caplog.records if r.name.startswith("objstream.producer")]
    assert any("without progress" in r.getMessage() for r in owner), caplog.text
