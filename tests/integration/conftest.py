"""Integration fixtures: a real RabbitMQ, a fresh namespace per test, cleanup of what it declared.

The broker is chosen once per session, in this order:
1. ``OBJSTREAM_TEST_URL`` if set (CI sets it to the local broker);
2. a throwaway broker from testcontainers when a Docker engine answers (image pinned below, the
   same tag as ``compose.yaml``);
3. a throwaway local node from the ``rabbitmq-server`` binary on free ports (stopped at the end);
4. a broker that answers at :data:`FALLBACK_URL` (RabbitMQ's defaults on this machine);
5. otherwise the integration tests skip with a one-line reason, unless
   ``OBJSTREAM_REQUIRE_BROKER=1``, where that is an error.

``OBJSTREAM_TEST_BROKER=container`` insists on 2 (CI's testcontainers run: no Docker engine is
then an error, not a quiet fall-back to a local node).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from objstream.common.errors import TransferFailed
from objstream.common.settings import Settings
from objstream.common.topology import Topology
from objstream.consumer.receiver import Receiver
from objstream.consumer.streams import Received
from objstream.producer import RetrievalServer
from tests.integration.rawpeer import RawPeer
from tests.rabbitmq_node import LocalRabbitNode, require_local_nodes, skip_or_fail

RABBITMQ_IMAGE = "rabbitmq:3.10.8-management"
FALLBACK_URL = "amqp://guest:guest@localhost:5672/%2F"


def _docker_answers() -> bool:
    try:
        import docker  # testcontainers depends on it

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


# The types of the factory fixtures, for the tests' annotations.
DeadLetters = Callable[..., list[tuple[dict[str, object], bytes]]]
"""``dead_letters``: drain the dead-letter queue."""
MakeRawPeer = Callable[[str], RawPeer]
"""``raw_peer``: a hand-driven protocol peer toward a target site."""


class StartReceiver(Protocol):
    """``start_receiver``: a :class:`BackgroundReceiver` for ``site`` writing into ``dest``
    (``options``: the receiver's)."""

    def __call__(
        self, site: str, dest: Path, custom: Settings | None = None, **options: Any
    ) -> BackgroundReceiver: ...


class StartServer(Protocol):
    """``start_server``: a :class:`BackgroundServer` set up by ``setup``."""

    def __call__(
        self, settings: Settings, setup: Callable[[RetrievalServer], object], site: str = "server"
    ) -> BackgroundServer: ...


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    yield from choose_broker()


def choose_broker() -> Iterator[str]:
    """Yield the session's broker URL, chosen as the module's docstring says."""
    url = os.environ.get("OBJSTREAM_TEST_URL")
    if url:
        yield url
        return
    if _docker_answers():
        yield from _container_broker()
        return
    if os.environ.get("OBJSTREAM_TEST_BROKER") == "container":
        pytest.fail("OBJSTREAM_TEST_BROKER=container but no Docker engine answers (DOCKER_HOST?)")
    if LocalRabbitNode.available():
        node = LocalRabbitNode()
        try:
            node.start()
        except RuntimeError as e:
            _no_broker(f"a throwaway local RabbitMQ node failed to start: {e}")
        try:
            yield node.url
        finally:
            node.cleanup()
        return
    if _amqp_answers(FALLBACK_URL):
        yield FALLBACK_URL
        return
    _no_broker(
        "no OBJSTREAM_TEST_URL, no Docker engine, no rabbitmq-server binary, and nothing answers"
        f" at {FALLBACK_URL}"
    )


def _container_broker() -> Iterator[str]:
    """A throwaway broker of the pinned image, through testcontainers (removed at the end)."""
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer
    except ImportError:  # testcontainers before 4.9
        from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer(RABBITMQ_IMAGE) as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(container.port)
        yield f"amqp://guest:guest@{host}:{port}/%2F"


def _amqp_answers(url: str) -> bool:
    """Whether a broker at ``url`` takes a connection (not just a TCP port that is open)."""
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = params.blocked_connection_timeout = 3
    try:
        pika.BlockingConnection(params).close()
        return True
    except Exception:
        return False


def _no_broker(reason: str) -> NoReturn:
    skip_or_fail(f"integration tests need RabbitMQ: {reason}")


@pytest.fixture(scope="session")
def local_nodes() -> None:
    """For tests that start throwaway nodes of their own (tests/rabbitmq_node.py): they skip
    without the ``rabbitmq-server`` binary, or fail under ``OBJSTREAM_REQUIRE_BROKER=1``.

    Session-scoped, so that it is checked before a module-scoped fixture starts a node.
    """
    require_local_nodes()


@dataclass
class Declared:
    """What a test declared on the broker, deleted when it ends."""

    topology: Topology
    sites: set[str] = field(default_factory=set)
    streams: set[str] = field(default_factory=set)


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    return f"objstream-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(broker_url: str, namespace: str) -> Settings:
    # Short timeouts keep failing tests fast; short TTLs make leftovers vanish by themselves.
    return Settings(url=broker_url, namespace=namespace, timeout=20, resend_after=2, stream_ttl=120)


@pytest.fixture
def declared(settings: Settings, request: pytest.FixtureRequest) -> Iterator[Declared]:
    """Register sites/streams here; they, the exchanges and the dead queue go at teardown."""
    record = Declared(Topology.from_settings(settings))
    yield record
    params = pika.URLParameters(settings.url)
    params.client_properties = {"connection_name": f"cleanup {request.node.name}"}
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        topo = record.topology
        for site in record.sites:
            channel.queue_delete(topo.inbox(site))
            channel.queue_delete(topo.service_queue(site))
        for sid in record.streams:
            for site in record.sites:  # v2: a data queue per target (it deletes its own)
                channel.queue_delete(topo.data_queue(site, sid))
        for site in {*record.sites, *USUAL_SITES}:  # each site declares its own dead letters
            channel.queue_delete(topo.dead(site))
            channel.exchange_delete(topo.dead(site))
        channel.exchange_delete(topo.exchange)
    finally:
        connection.close()


USUAL_SITES = ("server", "site-1", "site-2", "site-3", "raw")
"""The sites tests use: their dead letters go at teardown even if a test did not register them."""


@pytest.fixture
def dead_letters(settings: Settings) -> DeadLetters:
    """Drain ``{ns}.dead.SITE`` (default ``site-1``): what the broker dead-lettered for the
    site's consumers, each message's headers (``x-death`` among them) and body."""

    def drain(site: str = "site-1") -> list[tuple[dict[str, object], bytes]]:
        connection = pika.BlockingConnection(pika.URLParameters(settings.url))
        found: list[tuple[dict[str, object], bytes]] = []
        try:
            channel = connection.channel()
            while True:
                method, props, body = channel.basic_get(
                    Topology.from_settings(settings).dead(site), auto_ack=True
                )
                if method is None:
                    return found
                found.append((dict(props.headers or {}), body))
        finally:
            connection.close()

    return drain


DeadReasons = Callable[[], list[str]]
"""``dead_reasons``: the reasons objstream logged for what it dead-lettered."""
_DEAD_LINE = re.compile(r"dead-lettering .*?\): (.*)", re.DOTALL)


@pytest.fixture
def dead_reasons(caplog: pytest.LogCaptureFixture) -> DeadReasons:
    """The reason of every message dead-lettered so far, as the rejecting side logged it (the
    broker dead-letters a rejected message as it is, with ``x-death``; the reason is logged)."""
    caplog.set_level(logging.WARNING, logger="objstream")

    def reasons() -> list[str]:
        found = (_DEAD_LINE.match(r.getMessage()) for r in caplog.records)
        return [m.group(1) for m in found if m is not None]

    return reasons


class BackgroundReceiver:
    """A :class:`Receiver` in its own thread (with its own connection), collecting outcomes."""

    def __init__(self, site: str, dest: Path, settings: Settings, **options: Any) -> None:
        self.outcomes: list[Received | TransferFailed] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run,
            args=(site, dest, settings, options),
            name=f"receiver-{site}",
            daemon=True,
        )
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("receiver did not start")
        if self._error:
            raise self._error

    def _run(self, site: str, dest: Path, settings: Settings, options: dict[str, Any]) -> None:
        try:
            with Receiver(site, dest, settings, **options) as receiver:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        item = receiver.receive(timeout=0.2)
                    except TransferFailed as e:
                        self.outcomes.append(e)
                        continue
                    if item is not None:
                        self.outcomes.append(item)
        except BaseException as e:
            self._error = e
            self._ready.set()

    def wait_for(self, count: int, timeout: float = 60) -> list[Received | TransferFailed]:
        with contextlib.suppress(TimeoutError):
            _wait(lambda: len(self.outcomes) >= count or self._error is not None, timeout)
        if self._error:
            raise self._error
        assert len(self.outcomes) >= count, f"only {len(self.outcomes)} of {count} outcomes"
        return list(self.outcomes)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _wait(condition: Callable[[], bool], timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


@pytest.fixture
def start_receiver(settings: Settings, declared: Declared) -> Iterator[StartReceiver]:
    started: list[BackgroundReceiver] = []

    def start(
        site: str, dest: Path, custom: Settings | None = None, **options: Any
    ) -> BackgroundReceiver:
        declared.sites.add(site)
        receiver = BackgroundReceiver(site, dest, custom or settings, **options)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def raw_peer(settings: Settings, declared: Declared) -> Iterator[MakeRawPeer]:
    """Make hand-driven protocol peers toward a target site; closed at teardown."""
    peers: list[RawPeer] = []

    def make(target: str) -> RawPeer:
        declared.sites.add(target)
        peer = RawPeer(settings, target)
        declared.streams.add(peer.stream_id)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()


def count_published_chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sequence numbers of the chunk messages this process publishes from now on."""
    published: list[int] = []
    channel_class = pika.adapters.blocking_connection.BlockingChannel
    original = channel_class.basic_publish

    def counting(
        self: BlockingChannel,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties | None = None,
        mandatory: bool = False,
    ) -> None:
        if properties is not None and properties.type == "chunk":
            published.append(properties.headers["seq"])
        original(self, exchange, routing_key, body, properties, mandatory)

    monkeypatch.setattr(channel_class, "basic_publish", counting)
    return published


class BackgroundServer:
    """A :class:`RetrievalServer` serving in its own thread, with its own connection."""

    def __init__(
        self, site: str, settings: Settings, setup: Callable[[RetrievalServer], object]
    ) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.server: RetrievalServer | None = None
        self._thread = threading.Thread(target=self._run, args=(site, settings, setup), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "server did not start"

    def _run(
        self, site: str, settings: Settings, setup: Callable[[RetrievalServer], object]
    ) -> None:
        with RetrievalServer(site, settings) as server:
            setup(server)
            self.server = server
            self._ready.set()
            server.serve(stop=self._stop.is_set)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def slow_disk(monkeypatch: pytest.MonkeyPatch, seconds: float, from_seq: int = 0) -> None:
    """The owner's reads of chunk ``from_seq`` on take ``seconds`` each."""
    from objstream.producer.sources import FileSource

    read = FileSource.read_chunk

    def slow_read(self: FileSource, seq: int) -> bytes:
        if seq >= from_seq:
            time.sleep(seconds)
        return read(self, seq)

    monkeypatch.setattr(FileSource, "read_chunk", slow_read)


@pytest.fixture
def start_server(declared: Declared) -> Iterator[StartServer]:
    servers: list[BackgroundServer] = []

    def start(
        settings: Settings, setup: Callable[[RetrievalServer], object], site: str = "server"
    ) -> BackgroundServer:
        declared.sites.add(site)
        server = BackgroundServer(site, settings, setup)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def in_background(work: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``work`` on a thread of its own; its result, or what it raised, goes to the list."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(work())
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def apply_site(node: LocalRabbitNode, site: str, password: str, namespace: str) -> None:
    """Make ``site``'s broker user on ``node`` (named like the site, with ``password``) with
    exactly what ``objstream admin permissions --apply`` gives it under ``namespace``."""
    from objstream.common.cli import EXIT_OK, main

    os.environ["OBJSTREAM_ADMIN_PASSWORD"] = password
    try:
        argv = ["admin", "permissions", "--site", site, "--user", site, "--apply"]
        code = main([*argv, "--node", node.nodename, "--url", node.url, "--namespace", namespace])
    finally:
        del os.environ["OBJSTREAM_ADMIN_PASSWORD"]
    assert code == EXIT_OK


def wait_for_partial(
    dest: Path,
    at_least: int,
    process: subprocess.Popen[str] | None = None,
    timeout: float = 60,
) -> None:
    """Wait until a partial file in ``dest`` holds ``at_least`` bytes (a stream is that far).

    ``process``: a subprocess doing the transfer; if it ends first, fail with its stderr.
    """
    deadline = time.monotonic() + timeout
    while True:
        partials = list(dest.glob(".objstream-*.part")) if dest.exists() else []
        with contextlib.suppress(FileNotFoundError):  # committed (renamed) meanwhile
            if partials and partials[0].stat().st_size >= at_least:
                return
        if process is not None and process.poll() is not None:
            stderr = process.stderr.read() if process.stderr else ""
            raise AssertionError(f"the process ended first: {stderr}")
        assert time.monotonic() < deadline, "the transfer never got going"
        time.sleep(0.01)
