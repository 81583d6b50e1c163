"""Regions: a central broker and two regional brokers joined by RabbitMQ's exchange federation,
as ``objstream admin federation`` sets it up, under least privilege on every broker.

The server connects to the central broker, each site to its region's. A broadcast crosses to
each region once (measured on the links between the brokers: each runs through a counting
proxy) and the region's broker makes the copies; verdicts, requests and replies come back the
same way. A regional broker killed mid-transfer and started again: its sites' transfers
complete or fail with one clear line, the other region's are not touched, and nothing wrong is
ever stored.

Throwaway local nodes (tests/rabbitmq_federation.py), never the shared broker. Marked
``federation``; run them alone with ``python -m pytest -m federation``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pika
import pytest

from objstream.common.errors import SendFailed, TransferFailed
from objstream.common.protocol import Done
from objstream.common.settings import MiB, Settings
from objstream.common.urls import without_credentials
from objstream.consumer import Retriever
from objstream.producer import ContainerRetriever, FileStreamer, TargetResult
from tests.conftest import final_files, random_file, sha256_of, stored_path
from tests.integration.conftest import (
    BackgroundReceiver,
    BackgroundServer,
    apply_site,
    in_background,
    wait_for_partial,
)
from tests.integration.rawpeer import properties
from tests.rabbitmq_federation import LocalRegions
from tests.rabbitmq_node import remove_nodes

pytestmark = [pytest.mark.federation, pytest.mark.usefixtures("local_nodes")]

CENTRAL = 0
SITES = {"site-a1": 1, "site-a2": 1, "site-b1": 2, "site-b2": 2}
"""Each site and the node (1, 2: the regions) it connects to."""
LINK_USER = ("objstream-link", "pw-link")
PASSWORD = "pw-%s"
NAMESPACE = f"objstream-fed-{uuid.uuid4().hex[:8]}"
LINK_QUEUE_MAX = 32 * MiB
"""What a broker may hold for a downstream's link (``admin federation --link-queue-max``)."""


@pytest.fixture(scope="module")
def regions() -> Iterator[LocalRegions]:
    nodes = LocalRegions(2, count_links=True, link_user=LINK_USER, link_queue_max=LINK_QUEUE_MAX)
    try:
        nodes.start()
        apply_site(nodes.central, "server", PASSWORD % "server", NAMESPACE)
        for site, node in SITES.items():
            apply_site(nodes.nodes[node], site, PASSWORD % site, NAMESPACE)
        nodes.federate(NAMESPACE)
        nodes.wait_links()
        for site in SITES:
            nodes.wait_binding(CENTRAL, f"offer:{site}")  # propagated from the site's region
        yield nodes
    finally:
        remove_nodes(nodes)


@pytest.fixture
def whole(regions: LocalRegions) -> Iterator[LocalRegions]:
    """The regions, every node running again after the test."""
    yield regions
    for node in regions.nodes:
        if node.process is None:
            node.start()
    regions.wait_links()


def settings_of(regions: LocalRegions, site: str, **extra: object) -> Settings:
    node = regions.nodes[SITES.get(site, CENTRAL)]
    url = f"amqp://{quote(site)}:{quote(PASSWORD % site)}@127.0.0.1:{node.port}/%2F"
    options: dict[str, object] = dict(timeout=60, resend_after=2, connect_wait=60)
    options.update(extra)
    return Settings(url=url, namespace=NAMESPACE, **options)


def _receivers(regions: LocalRegions, tmp_path: Path) -> dict[str, BackgroundReceiver]:
    return {
        site: BackgroundReceiver(site, tmp_path / site, settings_of(regions, site))
        for site in SITES
    }


def test_a_broadcast_crosses_to_each_region_once(
    whole: LocalRegions, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="objstream")
    size = 64 * MiB
    src = tmp_path / "model.bin"
    digest = random_file(src, size)
    receivers = _receivers(whole, tmp_path)
    try:
        for site in SITES:  # each data queue's binding reaches the centre before chunks do
            whole.wait_binding(CENTRAL, f"offer:{site}")
        whole.reset_counts()
        with FileStreamer("server", settings_of(whole, "server")) as streamer:
            results = streamer.stream_file(list(SITES), src)
        crossed = whole.link_bytes()
        into = [crossed[(r, CENTRAL)] / size for r in (1, 2)]
        print(f"into regions: {into} x the object; back: {[crossed[(CENTRAL, r)] for r in (1, 2)]}")
        for site, receiver in receivers.items():
            [received] = receiver.wait_for(1, timeout=60)
            assert sha256_of(stored_path(received)) == digest, site
    finally:
        for receiver in receivers.values():
            receiver.stop()
    assert [r.ok for r in results] == [True] * len(SITES), results
    sender = [r.getMessage() for r in caplog.records if r.name.startswith("objstream.common.send")]
    # one upload, to the central broker
    assert {r.bytes_published for r in results} == {size}, sender
    for region in (1, 2):
        down = crossed[(region, CENTRAL)]  # the central broker's messages, into the region
        assert size <= down <= 1.05 * size, (region, down / size)
        back = crossed[(CENTRAL, region)]  # the region's replies, into the central broker
        assert back < 0.01 * size, (region, back)


def test_sites_of_both_regions_retrieve_one_model(whole: LocalRegions, tmp_path: Path) -> None:
    model = {f"layer{i}": np.full((256, 1024), i, dtype=np.float32) for i in range(8)}
    server = BackgroundServer(
        "server",
        settings_of(whole, "server"),
        lambda s: ContainerRetriever(s).add_container("model", model),
    )
    outcomes: dict[str, object] = {}
    whole.reset_counts()

    def fetch(site: str) -> None:
        try:
            with Retriever(site, tmp_path / site, settings_of(whole, site)) as retriever:
                outcomes[site] = retriever.retrieve_container("server", "model", timeout=60)
        except Exception as e:
            outcomes[site] = e

    try:
        threads = [threading.Thread(target=fetch, args=(site,)) for site in SITES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        server.stop()
    crossed = whole.link_bytes()
    size = sum(array.nbytes for array in model.values())
    print(f"into regions: {[crossed[(r, CENTRAL)] / size for r in (1, 2)]} x the model")
    assert set(outcomes) == set(SITES)
    for region in (1, 2):  # requests that arrive together share one upload (about 1.0 x here)
        assert crossed[(region, CENTRAL)] <= 2.05 * size, region  # never more than a copy a site
    for site, value in outcomes.items():
        assert isinstance(value, dict), (site, value)
        assert sorted(value) == sorted(model)
        for key, array in model.items():
            np.testing.assert_array_equal(value[key], array)


def _link_queue_bytes(regions: LocalRegions) -> int:
    """Bytes ready in the queues the central broker keeps for its downstreams' links."""
    listing = regions.central.ctl("list_queues", "-q", "name", "message_bytes_ready").stdout
    rows = [line.rsplit("\t", 1) for line in listing.splitlines() if "\t" in line]
    return sum(int(size) for name, size in rows if name.startswith(f"federation: {NAMESPACE}"))


def test_a_regional_broker_killed_mid_broadcast(whole: LocalRegions, tmp_path: Path) -> None:
    """Region b's broker dies with its sites a quarter through, and comes back 3 s later.
    Meanwhile the central broker keeps what the broadcast sends region b in the queue of b's
    link, at most ``--link-queue-max`` (the oldest go: b's sites ask for them again)."""
    size = 192 * MiB
    src = tmp_path / "big.bin"
    digest = random_file(src, size)
    receivers = _receivers(whole, tmp_path)
    held = [0]
    try:
        with FileStreamer("server", settings_of(whole, "server")) as streamer:
            sending, outcome = in_background(lambda: streamer.stream_file(list(SITES), src))
            wait_for_partial(tmp_path / "site-b1", size // 4)
            whole.nodes[2].kill()
            down_until = time.monotonic() + 3
            while time.monotonic() < down_until:
                held.append(_link_queue_bytes(whole))
            whole.nodes[2].start()
            sending.join(300)
        print(f"held for region b's link: at most {max(held) / MiB:.1f} MiB")
        assert max(held) <= LINK_QUEUE_MAX + MiB, max(held)
        [results] = outcome
        assert isinstance(results, list), results
        by_site = {r.site: r for r in results}
        print({r.site: r.ok or r.error for r in results})
        for site, receiver in receivers.items():
            [received] = receiver.wait_for(1, timeout=120)
            if SITES[site] == 1:  # region a never noticed
                assert by_site[site].ok, by_site[site]
            if by_site[site].ok:
                assert sha256_of(stored_path(received)) == digest, site
                assert final_files(tmp_path / site) == [tmp_path / site / "big.bin"]
            else:
                assert isinstance(received, TransferFailed), (site, received)
                assert "\n" not in str(received)
                assert "\n" not in str(by_site[site].error)
                assert final_files(tmp_path / site) == []
    finally:
        for receiver in receivers.values():
            receiver.stop()


def _link_into_centre(regions: LocalRegions, region: int) -> str:
    """The link from ``region`` as the central broker names it in ``x-received-from``."""
    [link] = [link for link in regions.links(CENTRAL) if link.name == f"node{region}"]
    return without_credentials(link.uri)


def _wait_for(find: Callable[[], str | None], what: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while (found := find()) is None:
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.25)
    return found


@pytest.mark.parametrize("site_links", [True, False], ids=["site links", "no site links"])
def test_a_regional_broker_cannot_answer_for_another_regions_site(
    whole: LocalRegions, tmp_path: Path, site_links: bool
) -> None:
    """Region b's administrator makes a user named like site-a1 (a site of region a, which
    never runs here) on its own broker, reads the stream id and the server's reply key for
    site-a1 off that broker, and reports site-a1 stored. With OBJSTREAM_SITE_LINKS on the
    server the forgery came by b's link, not a's: it does not count, and site-a1 fails. Without
    it, it counts: federation keeps user_id (trust-user-id), and the server believes it."""
    src = tmp_path / "model.bin"
    random_file(src, 2 * MiB)
    links = {site: _link_into_centre(whole, region) for site, region in SITES.items()}
    region_b = whole.nodes[2]
    assert region_b.ctl("add_user", "site-a1", "forger").returncode in (0, 70)  # 70: exists
    assert region_b.ctl("set_permissions", "site-a1", ".*", ".*", ".*").returncode == 0
    receiver = BackgroundReceiver("site-b1", tmp_path / "site-b1", settings_of(whole, "site-b1"))
    sender = settings_of(whole, "server", timeout=8, site_links=links if site_links else {})
    try:
        with FileStreamer("server", sender) as streamer:
            sending, outcome = in_background(
                lambda: streamer.stream_file(["site-a1", "site-b1"], src)
            )

            def on_b(*args: str) -> list[str]:
                return region_b.ctl(*args).stdout.split()

            def data_queue() -> str | None:
                queues = on_b("list_queues", "-q", "name")
                return next((q for q in queues if q.startswith(prefix)), None)

            def reply_key() -> str | None:
                keys = on_b("list_bindings", "-q", "routing_key")
                mine = [k for k in keys if k.startswith("reply:server:") and k.endswith(":site-a1")]
                return mine[0] if mine else None

            prefix = f"{NAMESPACE}.data.site-b1."
            queue = _wait_for(data_queue, "data queue of site-b1")
            key = _wait_for(reply_key, "reply key of the server for site-a1")
            forged = Done(
                stream_id=queue.removeprefix(prefix), site="site-a1", ok=True, stored_as="x.bin"
            )
            url = f"amqp://site-a1:forger@127.0.0.1:{region_b.port}/%2F"
            connection = pika.BlockingConnection(pika.URLParameters(url))
            try:
                connection.channel().basic_publish(
                    NAMESPACE, key, b"", properties(forged, user_id="site-a1")
                )
            finally:
                connection.close()
            sending.join(60)
    finally:
        receiver.stop()
    [returned] = outcome
    assert isinstance(returned, SendFailed | list), returned
    assert isinstance(returned, SendFailed) == site_links, returned
    listed = returned.results if isinstance(returned, SendFailed) else returned
    results = {r.site: r for r in listed if isinstance(r, TargetResult)}
    assert results["site-b1"].ok
    if site_links:
        assert not results["site-a1"].ok
        assert "never took the offer" in str(results["site-a1"].error)
    else:
        assert results["site-a1"].ok  # the forgery counted
        assert results["site-a1"].stored_as == "x.bin"
