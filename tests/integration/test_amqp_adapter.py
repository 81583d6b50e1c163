"""The AMQP adapter against a real broker: properties round-trip, and every pika failure comes
out as one of objstream's errors, with the broker's own words."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest

from objstream.common.amqp import Channel, Connection, Delivery, connect
from objstream.common.errors import (
    AuthenticationRefused,
    BrokerRefused,
    BrokerUnreachable,
    ConnectionLost,
)
from objstream.common.protocol import Chunk, Properties, envelope, parse
from objstream.common.redeliveries import LIMIT, RedeliveryJournal
from objstream.common.settings import Settings
from objstream.common.topology import Topology
from tests import poison
from tests.integration.rawpeer import login_user
from tests.rabbitmq_node import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def connection(settings: Settings, request: pytest.FixtureRequest) -> Iterator[Connection]:
    conn = connect(settings, f"test {request.node.name}")
    yield conn
    conn.close()


def _queue(channel: Channel, **options: object) -> str:
    name = f"objstream-test-adapter-{uuid.uuid4().hex[:10]}"
    channel.declare_queue(name, **options)  # type: ignore[arg-type]
    return name


def _get_one(connection: Connection, channel: Channel, queue: str) -> Delivery:
    got: list[Delivery] = []
    channel.consume(queue, got.append)
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        connection.process_events(0.1)
    assert got, f"nothing arrived on {queue}"
    return got[0]


def test_properties_and_body_round_trip(connection: Connection) -> None:
    channel = connection.channel()
    queue = _queue(channel, auto_delete=True)
    chunk = Chunk(stream_id=uuid.uuid4().hex, seq=3, crc32=123)
    props = envelope(chunk, persistent=False, message_id="m-1", reply_to="r", expiration_s=30)
    channel.publish("", queue, b"\x00payload\xff", props)
    delivery = _get_one(connection, channel, queue)
    assert delivery.body == b"\x00payload\xff"
    assert delivery.props.type == "chunk"
    assert delivery.props.message_id == "m-1"
    assert delivery.props.reply_to == "r"
    assert delivery.props.expiration == "30000"
    assert delivery.props.persistent is False
    assert parse(delivery.props.type, delivery.props.headers) == chunk
    delivery.channel.ack(delivery.tag)


def test_a_queue_type_mismatch_is_precondition_failed_with_the_brokers_words(
    connection: Connection,
) -> None:
    channel = connection.channel()
    name = _queue(channel, durable=True)
    try:
        with pytest.raises(BrokerRefused) as caught:
            channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        error = caught.value
        assert error.reply_code == 406
        assert error.precondition_failed
        assert "inequivalent arg 'x-queue-type'" in error.reply_text
        assert f"declaring queue {name}" in str(error)
        assert "unreachable" not in str(error)
    finally:
        connection.channel().delete_queue(name)


def test_a_missing_queue_is_not_found(connection: Connection) -> None:
    channel = connection.channel()
    with pytest.raises(BrokerRefused) as caught:
        channel.declare_queue("objstream-test-no-such-queue", passive=True)
    assert caught.value.not_found
    assert connection.is_open  # a channel error, not a lost connection
    connection.channel().declare_queue("", exclusive=True)  # the connection still works


def test_a_forged_user_id_is_refused(connection: Connection) -> None:
    channel = connection.channel()
    queue = _queue(channel, auto_delete=True)
    channel.publish("", queue, b"", Properties(user_id="somebody-else"))

    def next_call() -> None:
        connection.process_events(1.0)  # the refusal comes back asynchronously...
        channel.declare_queue(queue, passive=True)  # ...and the next call names it

    with pytest.raises(BrokerRefused) as caught:
        next_call()
    assert caught.value.precondition_failed
    assert "user_id" in caught.value.reply_text


class _Proxy:
    """A TCP relay to the broker whose sockets the test can cut (a network failure); it
    relays at most ``piece`` bytes at a time."""

    def __init__(self, host: str, port: int, piece: int = 65536) -> None:
        self._target = (host, port)
        self._piece = piece
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._server.accept()
                upstream = socket.create_connection(self._target)
                self._sockets += [client, upstream]
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(self._piece):
                b.sendall(data)

    def cut(self) -> None:
        self._server.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _relayed(settings: Settings, piece: int = 65536) -> tuple[_Proxy, Settings]:
    """A relay to the broker, and the settings that connect through it."""
    parsed = urlsplit(settings.url)
    proxy = _Proxy(parsed.hostname or "127.0.0.1", parsed.port or 5672, piece)
    url = parsed._replace(netloc=f"{parsed.username}:{parsed.password}@127.0.0.1:{proxy.port}")
    return proxy, settings.model_copy(update={"url": urlunsplit(url)})


BODY_MAX = 131072 - 8  # what one body frame carries at RabbitMQ's default frame_max


@pytest.mark.parametrize("piece", [65536, 7919], ids=["relayed", "cut-at-odd-places"])
def test_bodies_of_every_awkward_size_arrive_whole_and_in_order(
    settings: Settings, piece: int
) -> None:
    """The adapter's own framing (one buffer per message out, body frames read as views) against
    the broker, through a relay that cuts the byte stream anywhere."""
    sizes = [0, 1, BODY_MAX - 1, BODY_MAX, BODY_MAX + 1, 1 << 20, 3 * (1 << 20) + 7, 5]
    bodies = [os.urandom(size) for size in sizes]
    proxy, relayed = _relayed(settings, piece)
    connection = connect(relayed, "test framing")
    try:
        channel = connection.channel()
        queue = _queue(channel, auto_delete=True)
        for seq, body in enumerate(bodies):
            props = envelope(Chunk(stream_id="5" * 32, seq=seq, crc32=0), persistent=False)
            channel.publish("", queue, body, props)
        got: list[Delivery] = []
        channel.consume(queue, got.append, auto_ack=True)
        deadline = time.monotonic() + 30
        while len(got) < len(bodies) and time.monotonic() < deadline:
            connection.process_events(0.1)
        assert [d.body for d in got] == bodies
        chunks = [parse(d.props.type, d.props.headers) for d in got]
        assert [c.seq for c in chunks if isinstance(c, Chunk)] == list(range(len(sizes)))
    finally:
        connection.close()
        proxy.cut()


def test_a_connection_cut_under_a_consumer_is_connection_lost(settings: Settings) -> None:
    proxy, relayed = _relayed(settings)
    connection = connect(relayed, "test cut")
    try:
        channel = connection.channel()
        channel.declare_queue("", exclusive=True)
        proxy.cut()

        def keep_working() -> None:
            for _ in range(50):
                connection.process_events(0.1)
                channel.declare_queue("", exclusive=True)

        with pytest.raises(ConnectionLost) as caught:
            keep_working()
        assert isinstance(caught.value, BrokerUnreachable)  # what nobody recovers from is exit 3
        assert "connection lost" in str(caught.value)
        assert not connection.is_open
    finally:
        connection.close()


def test_nothing_listening_is_broker_unreachable_naming_the_masked_url() -> None:
    url = f"amqp://guest:s3cret@127.0.0.1:{free_port()}/%2F"
    with pytest.raises(BrokerUnreachable) as caught:
        connect(Settings(url=url, connect_wait=0), "test unreachable")
    assert "127.0.0.1" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_wrong_credentials_are_authentication_refused(settings: Settings) -> None:
    url = settings.url.replace("guest:guest@", "guest:wrong@")
    with pytest.raises(AuthenticationRefused) as caught:
        connect(Settings(url=url, connect_wait=0), "test auth")
    assert "wrong" not in str(caught.value)


def _publish_raw(
    settings: Settings, exchange: str, key: str, *poison: pika.BasicProperties
) -> None:
    """Publish with raw pika what objstream never would (each with an empty body)."""
    raw = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        channel = raw.channel()
        for props in poison:
            channel.basic_publish(exchange, key, b"", props)
    finally:
        raw.close()


def _dead(settings: Settings, topology: Topology, expected: int) -> list[tuple[Any, bytes]]:
    """What the broker dead-lettered to ``NS.dead.site-1``, read with raw pika (pika properties and
    body; waits for ``expected`` messages)."""
    raw = pika.BlockingConnection(pika.URLParameters(settings.url))
    got: list[tuple[Any, bytes]] = []
    try:
        channel = raw.channel()
        deadline = time.monotonic() + 10
        while len(got) < expected and time.monotonic() < deadline:
            method, props, body = channel.basic_get(topology.dead("site-1"), auto_ack=True)
            if method is None:
                time.sleep(0.1)
            else:
                got.append((props, body))
    finally:
        raw.close()
    return got


def test_a_rejected_delivery_is_dead_lettered_by_the_broker_as_it_came(
    connection: Connection, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """No site publishes to the dead-letter exchange: the queue's dead-letter argument has the
    broker move what a consumer rejects there, unchanged: its publisher's user_id and routing
    key stay (the broker vouches for them), with ``x-death``; the reason is logged."""
    topology = Topology.from_settings(settings)
    topology.declare_base(connection, "site-1")
    channel = connection.channel()
    inbox = topology.declare_inbox(channel, "site-1")
    user = login_user(settings)
    props = Properties(type="chunk", message_id="x:1", user_id=user)
    channel.publish(topology.exchange, topology.offer_key("site-1"), b"bad body", props)
    delivery = _get_one(connection, channel, inbox)
    assert delivery.routing_key == "offer:site-1"
    delivery.reject("chunk 1: crc32 0x1 != 0x2")
    [(dead, body)] = _dead(settings, topology, 1)
    assert body == b"bad body"
    assert (dead.message_id, dead.user_id) == ("x:1", user)
    [death] = dead.headers["x-death"]
    assert (death["reason"], death["queue"]) == ("rejected", inbox)
    assert death["routing-keys"] == ["offer:site-1"]
    assert "chunk 1: crc32 0x1 != 0x2" in caplog.text


@pytest.mark.parametrize(
    ("table", "why"),
    [
        (poison.nested_table(2000), "nested deeper"),
        (
            poison.table_of(b"".join(poison.entry(f"k{i}", b"t", b"\x01") for i in range(5000))),
            "more than",
        ),
    ],
    ids=["2000-deep", "5000-values"],
)
def test_a_header_table_pika_cannot_decode_fails_alone(
    connection: Connection,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    table: bytes,
    why: str,
) -> None:
    """A legal message whose header table pika's decoder cannot take (it raised RecursionError
    and stopped the connection, and a restart met it again) is rejected by the adapter, dead-
    lettered by the broker, and the next message is handled on the same connection."""
    topology = Topology.from_settings(settings)
    topology.declare_base(connection, "site-1")
    channel = connection.channel()
    inbox = topology.declare_inbox(channel, "site-1")
    user = login_user(settings)
    _publish_raw(
        settings,
        topology.exchange,
        topology.offer_key("site-1"),
        poison.RawHeaders(table, type="offer", message_id="poison", user_id=user),
        pika.BasicProperties(type="offer", message_id="fine", headers={"objstream": 2}),
    )
    handled: list[Delivery] = []

    def handle(delivery: Delivery) -> None:
        handled.append(delivery)
        delivery.ack()

    channel.consume(inbox, handle)
    deadline = time.monotonic() + 10
    while not handled and time.monotonic() < deadline:
        connection.process_events(0.1)
    assert [d.props.message_id for d in handled] == ["fine"]
    assert connection.is_open
    assert channel.is_open
    [(dead, _)] = _dead(settings, topology, 1)
    assert (dead.message_id, dead.user_id) == ("poison", user)
    assert why in caplog.text


def test_a_handler_that_raises_fails_only_its_delivery(
    connection: Connection, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    topology = Topology.from_settings(settings)
    topology.declare_base(connection, "site-1")
    channel = connection.channel()
    inbox = topology.declare_inbox(channel, "site-1")
    for message_id in ("boom", "fine"):
        props = Properties(type="offer", message_id=message_id)
        channel.publish(topology.exchange, topology.offer_key("site-1"), b"", props)
    handled: list[str] = []

    def handler(delivery: Delivery) -> None:
        if delivery.props.message_id == "boom":
            raise ZeroDivisionError("a bug in the handler")
        handled.append(str(delivery.props.message_id))
        delivery.ack()

    channel.consume(inbox, handler)
    deadline = time.monotonic() + 10
    while not handled and time.monotonic() < deadline:
        connection.process_events(0.1)
    assert handled == ["fine"]
    [(dead, _)] = _dead(settings, topology, 1)
    assert dead.message_id == "boom"
    assert "ZeroDivisionError: a bug in the handler" in caplog.text


def test_several_urls_connect_to_the_first_that_answers(settings: Settings) -> None:
    dead = urlunsplit(urlsplit(settings.url)._replace(netloc=f"guest:nope@127.0.0.1:{free_port()}"))
    both = settings.model_copy(update={"url": f"{dead},{settings.url}"})
    conn = connect(both, "test several urls")
    try:
        assert conn.url == Settings(url=settings.url).masked_url  # the one that answered
        conn.channel().close()
    finally:
        conn.close()
    only_dead = settings.model_copy(update={"url": f"{dead},{dead}"})
    with pytest.raises(BrokerUnreachable) as e:
        connect(only_dead, "test no url answers")
    assert "nope" not in str(e.value)


def test_a_quorum_queue_redelivery_parses_though_the_broker_added_a_header(
    connection: Connection,
) -> None:
    """A quorum queue marks what it delivers again with ``x-delivery-count``: still the same
    protocol message (a receiver once dead-lettered every chunk redelivered after a reconnect)."""
    channel = connection.channel()
    queue = _queue(channel, durable=True, arguments={"x-queue-type": "quorum"})
    try:
        chunk = Chunk(stream_id=uuid.uuid4().hex, seq=5, crc32=99)
        channel.publish("", queue, b"payload", envelope(chunk))
        first = _get_one(connection, channel, queue)
        channel.close()  # not acked: the broker delivers it again
        again_channel = connection.channel()
        again = _get_one(connection, again_channel, queue)
        assert again.props.headers is not None
        assert "x-delivery-count" in again.props.headers
        assert parse(again.props.type, again.props.headers) == chunk
        assert parse(first.props.type, first.props.headers) == chunk
        again_channel.ack(again.tag)
    finally:
        cleanup = connection.channel()
        cleanup.delete_queue(queue)
        cleanup.close()


def test_a_message_that_kills_its_consumer_is_dead_lettered_after_the_limit(
    connection: Connection, settings: Settings, tmp_path: Path
) -> None:
    """Classic queues do not count deliveries: a consumer that dies on a message (here: its
    channel closes with the message unacked, as a killed process's would) gets it again and
    again. With a redelivery journal (a new one each time: a new process), the message is
    rejected once it came back LIMIT times without its handling ever ending."""
    topology = Topology.from_settings(settings)
    topology.declare_base(connection, "site-1")
    setup = connection.channel()
    inbox = topology.declare_inbox(setup, "site-1")
    message = Properties(type="offer", message_id="kill")
    setup.publish(topology.exchange, "offer:site-1", b"", message)
    path = tmp_path / "inbox.redeliveries"

    class Died(BaseException):
        """The process dies in the handler (no exception the guard could catch)."""

    def dies(delivery: Delivery) -> None:
        raise Died

    deaths = 0
    for _ in range(LIMIT + 1):  # the first delivery, then LIMIT redeliveries counted
        channel = connection.channel()
        channel.consume(inbox, dies, redeliveries=RedeliveryJournal(path))
        with pytest.raises(Died):
            connection.process_events(10)
        deaths += 1
        channel.close()  # died with it unacked: the broker delivers it again
    assert deaths == LIMIT + 1
    channel = connection.channel()
    channel.consume(inbox, dies, redeliveries=RedeliveryJournal(path))
    connection.process_events(1.0)  # rejected before the handler runs: nobody dies
    [(dead, _)] = _dead(settings, topology, 1)
    assert dead.message_id == "kill"
