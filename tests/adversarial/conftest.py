"""One throwaway RabbitMQ node with a broker user per site, for attacks by one site on another.

Users ``server``, ``site-1`` and ``site-2`` (each speaks for the site of its name) get exactly
what ``objstream admin permissions --apply`` gives them, made as tests/integration/
test_permissions.py makes them. The node is the folder's (package scope): starting it and
applying three sites' permissions takes about 20 s, each test then a few seconds. It is never
the shared broker: its own ports and data, stopped at the end.

Every queue a test may leave messages in (inboxes, service queues, dead letters) is purged
before each test, as the node's administrator (``guest`` on a throwaway node).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from objstream.common.settings import Settings
from objstream.common.topology import Topology
from objstream.consumer.streams import Received
from objstream.producer import FileRetriever, RetrievalServer
from tests.adversarial.hostile import Got
from tests.integration.conftest import BackgroundReceiver, BackgroundServer
from tests.integration.test_permissions import apply_site, site_url
from tests.rabbitmq_node import LocalRabbitNode, require_local_nodes

NAMESPACE = f"adv-{uuid.uuid4().hex[:8]}"
SITES = ("server", "site-1", "site-2")
T = Topology(NAMESPACE, 120_000)

CONTACT_TIMEOUT = 3.0
"""Seconds a stream slot waits for its peer's first contact (the default is 10)."""


def site_settings(node: LocalRabbitNode, site: str, **overrides: Any) -> Settings:
    """``site``'s settings: its own user, short timeouts so that failures come fast."""
    values: dict[str, Any] = {
        "url": site_url(node, site),
        "namespace": NAMESPACE,
        "timeout": 8,
        "resend_after": 1,
        "contact_timeout": CONTACT_TIMEOUT,
        "stream_ttl": 120,
        "chunk_size": 256 * 1024,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture(scope="package")
def node() -> Iterator[LocalRabbitNode]:
    require_local_nodes()
    node = LocalRabbitNode()
    node.start()
    try:
        # A rabbitmqctl run without -n (by a test, or by the code under test) talks to this
        # node, never to the machine's default one.
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RABBITMQ_NODENAME", node.nodename)
            yield node
    finally:
        node.cleanup()


@pytest.fixture(scope="package")
def site_users(node: LocalRabbitNode) -> dict[str, Settings]:
    for site in SITES:
        apply_site(node, site, NAMESPACE)
    return {site: site_settings(node, site) for site in SITES}


@pytest.fixture
def users(site_users: dict[str, Settings], node: LocalRabbitNode) -> dict[str, Settings]:
    """Each site's settings, with what earlier tests left in the sites' queues purged."""
    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        channel = connection.channel()
        for site in SITES:
            for queue in (T.inbox(site), T.service_queue(site), T.dead(site)):
                channel.queue_purge(queue)
    finally:
        connection.close()
    return site_users


# -- workers of the sites, in threads of this process ---------------------------------------------

StartReceiver = Callable[..., BackgroundReceiver]
StartServer = Callable[..., BackgroundServer]


@pytest.fixture
def start_receiver(users: dict[str, Settings]) -> Iterator[StartReceiver]:
    """``start_receiver(site, dest, settings=None, **options)``: a site's listener (a
    :class:`Receiver` in a thread), stopped at the end."""
    started: list[BackgroundReceiver] = []

    def start(
        site: str, dest: Path, settings: Settings | None = None, **options: Any
    ) -> BackgroundReceiver:
        receiver = BackgroundReceiver(site, dest, settings or users[site], **options)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def start_server(users: dict[str, Settings]) -> Iterator[StartServer]:
    """``start_server(source_dir, settings=None)``: the site ``server`` serving the files of
    ``source_dir`` (a :class:`RetrievalServer` in a thread), stopped at the end."""
    started: list[BackgroundServer] = []

    def start(source_dir: Path, settings: Settings | None = None) -> BackgroundServer:
        def setup(server: RetrievalServer) -> None:
            FileRetriever(server, source_dir)

        server = BackgroundServer("server", settings or users["server"], setup)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def served(server: BackgroundServer) -> RetrievalServer:
    assert server.server is not None
    return server.server


# -- what arrived -------------------------------------------------------------------------------


def random_bytes(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def arrived(receiver: BackgroundReceiver, name: str, timeout: float = 20) -> Received:
    """The object called ``name`` once ``receiver`` has it (failures of other streams are
    skipped: an attack may fail a stream of its own)."""
    deadline = time.monotonic() + timeout
    while True:
        for outcome in receiver.outcomes:
            if isinstance(outcome, Received) and outcome.name == name:
                return outcome
        assert time.monotonic() < deadline, f"{name!r} never arrived: {receiver.outcomes}"
        time.sleep(0.05)


def assert_stored(received: Received, data: bytes) -> None:
    """``received`` is a file holding exactly ``data``."""
    assert received.path is not None, received
    assert received.path.read_bytes() == data
    assert received.sha256 == hashlib.sha256(data).hexdigest()


def dead_letters(settings: Settings, site: str, expect: int, timeout: float = 10) -> list[Got]:
    """What the broker dead-lettered for ``site``'s consumers (``NS.dead.SITE``), read with raw
    pika as the site's own user (its settings): waits for ``expect`` messages, then takes what
    else is there. A header table beyond objstream's bounds arrives as ``headers=None`` (the
    process's pika decodes within them once objstream has connected, which the fixtures did)."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.url))
    got: list[Got] = []
    try:
        channel = connection.channel()
        deadline = time.monotonic() + timeout
        while True:
            method, props, body = channel.basic_get(T.dead(site), auto_ack=True)
            if method is not None:
                got.append((props, body))
            elif len(got) >= expect or time.monotonic() > deadline:
                return got
            else:
                time.sleep(0.05)
    finally:
        connection.close()


def dead_by_id(
    settings: Settings,
    site: str,
    ids: set[str],
    timeout: float = 10,
    alive: Callable[[], object] = lambda: None,
) -> dict[str, Any]:
    """The dead letters of ``site`` with these message ids (their pika properties), once all
    of them are there; fails the test, naming those missing, if they do not come. ``alive``
    runs while it waits: it fails the test when the worker that should reject them died."""
    found: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while not ids <= set(found) and time.monotonic() < deadline:
        alive()
        for props, _ in dead_letters(settings, site, expect=0, timeout=0):
            found[props.message_id] = props
        time.sleep(0.1)
    assert set(found) >= ids, f"not dead-lettered for {site}: {sorted(ids - set(found))}"
    return found
