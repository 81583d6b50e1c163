"""The one AMQP adapter: every broker call of objstream goes through here, and only here is pika.

Like dramatiq's ``brokers/rabbitmq.py``: the rest of objstream sees :class:`Connection`,
:class:`Channel`, :class:`~objstream.common.protocol.Properties` and :class:`Delivery`, and
objstream's own errors. pika's exceptions are translated where they happen:

- :class:`~objstream.common.errors.ConnectionLost`: the connection went away (broker restart,
  node death, closed by an operator, a close noticed on the next call). Workers reconnect.
- :class:`~objstream.common.errors.BrokerRefused`: the broker closed a channel over an
  operation (PRECONDITION_FAILED, ACCESS_REFUSED, NOT_FOUND...), with its own words.
- :class:`~objstream.common.errors.BrokerUnreachable` /
  :class:`~objstream.common.errors.AuthenticationRefused` when connecting.

One connection per thread (pika is not thread-safe); the one call another thread may make is
:meth:`Connection.call_threadsafe`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Self

import pika
import pika.credentials
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import (
    AMQPConnectorException,
    AMQPConnectorStackTimeout,
)

from objstream.common.buffers import tune_malloc
from objstream.common.errors import (
    AuthenticationRefused,
    BrokerRefused,
    BrokerUnreachable,
    ConfigError,
    ConnectionLost,
    ObjstreamError,
)
from objstream.common.protocol import REASON_HEADER, Properties
from objstream.common.settings import Settings, mask_url, split_urls
from objstream.common.tls import (
    broker_user,
    client_context,
    closed_in_handshake,
    external_login,
    tls_failure,
)
from objstream.common.topology import Topology

log = logging.getLogger(__name__)

# pika reads its socket 4 KiB at a time and appends each read to a bytes buffer, which copies the
# partial frame again on every read: about 16 copies of every byte of a 128 KiB body frame. Reads
# of 256 KiB cut that to one or two: for a 1 GiB file the receiver's CPU fell from 5.1-5.8 s to
# 3.8 s and throughput rose from 168-184 to 220 MiB/s on this machine (2 cores, loopback).
# This is a class attribute of pika's transport; pika is pinned to 1.3/1.4, and if the
# attribute goes away we simply do without.
PIKA_RECV_BYTES = 256 * 1024


def _tune_pika_reads() -> None:
    try:
        from pika.adapters.utils.io_services_utils import _AsyncTransportBase
    except ImportError:  # pragma: no cover - a pika without this internal
        return
    if getattr(_AsyncTransportBase, "_MAX_RECV_BYTES", None) is not None:
        _AsyncTransportBase._MAX_RECV_BYTES = PIKA_RECV_BYTES
        # Bytes consumed per event-loop turn before pika lets other events run.
        _AsyncTransportBase._MAX_CONSUME_BYTES = 4 * PIKA_RECV_BYTES


# -- errors ---------------------------------------------------------------------------------------


def describe(error: BaseException) -> str:
    """The innermost cause pika wraps (e.g. "Connection refused"), for a useful one-liner."""
    inner: object = error
    for _ in range(5):
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror
        nested = getattr(inner, "exception", None) or (
            inner.args[0] if isinstance(inner, BaseException) and inner.args else None
        )
        if nested is None or nested is inner:
            break
        inner = nested
    return str(inner) or type(error).__name__


@contextlib.contextmanager
def _translated(
    url: str,
    is_open: Callable[[], bool],
    operation: str,
    closed_by: Callable[[], object] = lambda: None,
) -> Iterator[None]:
    """Turn pika's exceptions raised inside into objstream's (see the module's docstring).

    ``closed_by`` gives the reason an earlier, asynchronous close of the channel recorded (a
    publish the broker refused closes the channel after the fact, and the next call only says
    "channel is closed").
    """
    try:
        yield
    except pika.exceptions.ChannelClosedByBroker as e:
        if not is_open():
            raise ConnectionLost(url, f"{e.reply_code} {e.reply_text}") from e
        raise BrokerRefused(e.reply_code, str(e.reply_text), operation) from e
    except pika.exceptions.ChannelWrongStateError as e:
        reason = closed_by()
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and is_open():
            raise BrokerRefused(reason.reply_code, str(reason.reply_text), operation) from e
        if not is_open():
            raise ConnectionLost(url, describe(e)) from e
        raise BrokerRefused(0, f"channel closed: {describe(e)}", operation) from e
    except pika.exceptions.ConnectionClosedByBroker as e:
        raise ConnectionLost(url, f"closed by the broker: {e.reply_code} {e.reply_text}") from e
    except pika.exceptions.AMQPError as e:
        # A close that arrives while callbacks run surfaces on the next call as a "wrong state"
        # error, not as a connection error: the connection's own state tells.
        if isinstance(e, pika.exceptions.AMQPConnectionError) or not is_open():
            raise ConnectionLost(url, describe(e)) from e
        raise BrokerRefused(0, f"{type(e).__name__}: {describe(e)}", operation) from e


# -- properties and deliveries --------------------------------------------------------------------


def _to_pika(props: Properties) -> pika.BasicProperties:
    mode = pika.DeliveryMode.Persistent if props.persistent else pika.DeliveryMode.Transient
    return pika.BasicProperties(
        type=props.type,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        content_type=props.content_type,
        delivery_mode=mode,
        expiration=props.expiration,
        user_id=props.user_id,
        headers=dict(props.headers) if props.headers is not None else None,
    )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _from_pika(props: Any) -> Properties:
    headers = getattr(props, "headers", None)
    return Properties(
        type=_str(props.type),
        message_id=_str(props.message_id),
        correlation_id=_str(props.correlation_id),
        reply_to=_str(props.reply_to),
        content_type=_str(props.content_type),
        persistent=props.delivery_mode == pika.DeliveryMode.Persistent.value,
        expiration=_str(props.expiration),
        user_id=_str(props.user_id),
        headers=headers if isinstance(headers, Mapping) else None,
    )


@dataclass(frozen=True)
class Delivery:
    """One message handed to a consumer callback."""

    props: Properties
    body: bytes
    tag: int
    """The delivery tag, for :meth:`Channel.ack` on :attr:`channel` (and only there)."""
    redelivered: bool
    channel: Channel


OnMessage = Callable[[Delivery], None]


# -- channels and connections ---------------------------------------------------------------------


class Channel:
    """One AMQP channel. Acks must go to the channel that delivered."""

    def __init__(self, impl: BlockingChannel, connection: Connection) -> None:
        self._impl = impl
        self._connection = connection

    def _op(self, operation: str) -> contextlib.AbstractContextManager[None]:
        return _translated(
            self._connection.url,
            lambda: self._connection.is_open,
            operation,
            lambda: getattr(self._impl, "_closing_reason", None),
        )

    @property
    def is_open(self) -> bool:
        return bool(self._impl.is_open)

    def publish(self, exchange: str, routing_key: str, body: bytes, props: Properties) -> None:
        with self._op(f"publishing to {exchange or '(default)'}/{routing_key}"):
            self._impl.basic_publish(exchange, routing_key, body, _to_pika(props))

    def consume(self, queue: str, on_message: OnMessage, *, auto_ack: bool = False) -> str:
        """Start consuming ``queue``; returns the consumer tag."""

        def callback(_: Any, method: Any, props: Any, body: bytes) -> None:
            delivery = Delivery(
                _from_pika(props), body, method.delivery_tag, bool(method.redelivered), self
            )
            on_message(delivery)

        with self._op(f"consuming {queue}"):
            return str(self._impl.basic_consume(queue, callback, auto_ack=auto_ack))

    def cancel(self, tag: str) -> None:
        with self._op(f"cancelling consumer {tag}"):
            self._impl.basic_cancel(tag)

    def ack(self, tag: int, multiple: bool = False) -> None:
        with self._op("acking"):
            self._impl.basic_ack(tag, multiple=multiple)

    def nack(self, tag: int, requeue: bool = True) -> None:
        with self._op("nacking"):
            self._impl.basic_nack(tag, requeue=requeue)

    def qos(self, prefetch: int) -> None:
        with self._op(f"setting prefetch {prefetch}"):
            self._impl.basic_qos(prefetch_count=prefetch)

    def declare_queue(
        self,
        name: str,
        *,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        passive: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> str:
        """Declare ``name`` (``""``: a server-named queue); returns the queue's name."""
        with self._op(f"declaring queue {name or '(server-named)'}"):
            result = self._impl.queue_declare(
                name,
                passive=passive,
                durable=durable,
                exclusive=exclusive,
                auto_delete=auto_delete,
                arguments=dict(arguments) if arguments else None,
            )
        return str(result.method.queue)

    def consumer_count(self, name: str) -> int:
        """How many consumers queue ``name`` has now: a passive declare, which needs no
        permission (a missing queue is BrokerRefused 404 and closes the channel)."""
        with self._op(f"checking queue {name}"):
            result = self._impl.queue_declare(name, passive=True)
        return int(result.method.consumer_count)

    def delete_queue(self, name: str) -> None:
        with self._op(f"deleting queue {name}"):
            self._impl.queue_delete(name)

    def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        with self._op(f"binding {queue} to {exchange}/{routing_key}"):
            self._impl.queue_bind(queue, exchange, routing_key=routing_key)

    def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        with self._op(f"unbinding {queue} from {exchange}/{routing_key}"):
            self._impl.queue_unbind(queue, exchange, routing_key=routing_key)

    def declare_exchange(
        self, name: str, kind: str, *, durable: bool = True, passive: bool = False
    ) -> None:
        """Declare exchange ``name`` (``passive``: only check that it exists, which needs no
        permission; a missing one is BrokerRefused 404 and closes the channel)."""
        with self._op(f"declaring exchange {name}"):
            self._impl.exchange_declare(name, exchange_type=kind, durable=durable, passive=passive)

    def close(self) -> None:
        """Close the channel; unacked deliveries go back to their queues. Never raises."""
        with contextlib.suppress(pika.exceptions.AMQPError):
            if self._impl.is_open:
                self._impl.close()


class Closing:
    """Base of the objects that hold a connection: ``with X(...) as x:`` closes it at the end."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Connection:
    """One blocking AMQP connection, for the thread that opened it."""

    def __init__(self, impl: pika.BlockingConnection, url: str, name: str) -> None:
        self._impl = impl
        self.url = url
        """The broker URL with the password masked (for messages)."""
        self.name = name

    @property
    def is_open(self) -> bool:
        return bool(self._impl.is_open)

    def channel(self) -> Channel:
        with _translated(self.url, lambda: self.is_open, "opening a channel"):
            return Channel(self._impl.channel(), self)

    def process_events(self, time_limit: float = 0) -> None:
        """Deliver what arrived (running consumer callbacks) for up to ``time_limit`` s."""
        with _translated(self.url, lambda: self.is_open, "processing events"):
            self._impl.process_data_events(time_limit=time_limit)

    def call_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on this connection's thread, at its next :meth:`process_events`."""
        with _translated(self.url, lambda: self.is_open, "scheduling a callback"):
            self._impl.add_callback_threadsafe(fn)

    def close(self) -> None:
        """Close the connection if it is open. Never raises (after a node died, pika can fail
        in its own ways: an AttributeError from its closed poller was seen)."""
        with contextlib.suppress(Exception):
            if self._impl.is_open:
                self._impl.close()


def _tls_options(settings: Settings, params: pika.URLParameters) -> pika.SSLOptions | None:
    """amqps://: verify the broker's certificate and host name (see :func:`client_context`)."""
    context = client_context(settings, tls=params.ssl_options is not None)
    return None if context is None else pika.SSLOptions(context, server_hostname=params.host)


def _credentials(settings: Settings, params: pika.URLParameters) -> Any:
    """EXTERNAL (the broker takes the user from the client certificate) when there is a
    certificate and no password in the URL; otherwise the URL's user and password."""
    if external_login(settings):
        return pika.credentials.ExternalCredentials()
    return params.credentials


def _parameters(settings: Settings, url: str, name: str) -> pika.URLParameters:
    """pika's parameters for one connect attempt to ``url``, bounded by ``connect_timeout``."""
    try:
        params = pika.URLParameters(url)
    except Exception as e:  # pika raises assorted errors for bad URLs
        raise ConfigError(f"invalid broker URL {mask_url(url)}: {e}") from e
    params.ssl_options = _tls_options(settings, params)
    params.credentials = _credentials(settings, params)
    params.heartbeat = settings.heartbeat
    params.client_properties = {"connection_name": name, "product": "objstream"}
    params.connection_attempts = 1
    # The TCP connect, each wait on the socket, and the whole attempt (TCP, TLS, the AMQP
    # handshake): a peer that accepts and says nothing fails in connect_timeout, not never.
    params.socket_timeout = settings.connect_timeout
    params.stack_timeout = settings.connect_timeout
    params.blocked_connection_timeout = max(settings.timeout, 30.0)
    return params


def connect_failure(
    settings: Settings, url: str, params: pika.URLParameters, error: BaseException
) -> BrokerUnreachable:
    """What a failed connect attempt to ``url`` says in one line: the cause (DNS, refused, TLS
    verification, a peer that does not speak AMQP or TLS...) and what to check."""
    url, tls = mask_url(url), params.ssl_options is not None
    if isinstance(error, ssl.SSLError):
        return tls_failure(settings, url, error)
    if isinstance(error, socket.gaierror):
        return BrokerUnreachable(url, f"unknown host {params.host!r}: {describe(error)}")
    if isinstance(error, AMQPConnectorStackTimeout):
        what = "TLS or AMQP" if tls else "AMQP"
        return BrokerUnreachable(
            url,
            f"no {what} handshake within {settings.connect_timeout:g} s",
            f"is that an AMQP{'S' if tls else ''} port of RabbitMQ? "
            "(--url; --connect-timeout bounds each attempt)",
        )
    if isinstance(error, pika.exceptions.IncompatibleProtocolError):
        # pika hands over only the words of the stream error here (its repr), not the error.
        return closed_in_handshake(settings, url, tls, describe(error))
    return BrokerUnreachable(url, describe(error))


def connect(settings: Settings, name: str) -> Connection:
    """Open a connection named ``name`` (shown in the broker's connection list), waiting up to
    ``settings.connect_wait`` s for a broker that is not up yet; each attempt takes at most
    ``settings.connect_timeout`` s per node. With several URLs (a cluster's nodes), to the first
    that answers; a reconnect goes through the list again.

    Raises:
        BrokerUnreachable: nothing answers at the URL, it is no AMQP broker, TLS failed.
        AuthenticationRefused: the broker refused the credentials (or the certificate login).
        ConfigError: the URL is malformed, the TLS files do not load.
    """
    nodes = broker_parameters(settings, name)
    params = next(iter(nodes.values()))  # a failure is worded for the first node
    _tune_pika_reads()
    tune_malloc()
    deadline = time.monotonic() + settings.connect_wait
    delay = 0.5
    while True:
        try:
            impl = pika.BlockingConnection(list(nodes.values()))
        except (
            pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.ProbableAccessDeniedError,
            pika.exceptions.AuthenticationError,  # the broker does not offer the mechanism
        ) as e:
            user = broker_user(settings) if external_login(settings) else None
            raise AuthenticationRefused(settings.masked_url, user) from e
        # pika raises its connection errors, OSErrors (DNS, TLS) and, for a timeout of the
        # whole attempt, a connector error.
        except (pika.exceptions.AMQPConnectionError, OSError, AMQPConnectorException) as e:
            failure = connect_failure(settings, settings.url, params, e)
            left = deadline - time.monotonic()
            if left <= 0 or isinstance(e, ssl.SSLError):  # a certificate will not change
                raise failure from e
            wait = min(delay, left)
            log.warning(
                "broker at %s unreachable (%s); retrying in %.1f s (giving up in %.0f s)",
                settings.masked_url,
                failure.detail,
                wait,
                left,
            )
            time.sleep(wait)
            delay = min(delay * 2, 10.0)
            continue
        url = connected_url(impl, nodes, settings.masked_url)
        log.debug("connected to %s as %r", url, name)
        return Connection(impl, url, name)


def broker_parameters(settings: Settings, name: str = "objstream") -> dict[str, pika.URLParameters]:
    """pika's parameters for each broker URL of ``settings`` (masked URL -> parameters), in the
    order given: a cluster's nodes, tried in turn by one connection attempt.

    Raises:
        ConfigError: a URL is malformed, the TLS files do not load.
    """
    return {mask_url(url): _parameters(settings, url, name) for url in split_urls(settings.url)}


def connected_url(
    impl: pika.BlockingConnection, nodes: Mapping[str, pika.URLParameters], default: str
) -> str:
    """The (masked) URL of the node ``impl`` connected to, of ``nodes``."""
    params = getattr(getattr(impl, "_impl", None), "params", None)
    if params is None:
        return default
    node = (params.host, params.port)  # pika connects with a copy of the parameters
    return next((url for url, p in nodes.items() if (p.host, p.port) == node), default)


def reestablish(settings: Settings, within: float, setup: Callable[[], None]) -> None:
    """Run ``setup`` (reconnect, reopen channels...) until it works or ``within`` s have passed.

    Raises:
        BrokerUnreachable: it still failed at the deadline.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            setup()
            return
        except ObjstreamError as e:
            if time.monotonic() > deadline:
                detail = f"no reconnection within {within:g} s: {e}"
                raise BrokerUnreachable(settings.masked_url, detail) from e
            time.sleep(1.0)


def dead_letter(channel: Channel, topology: Topology, delivery: Delivery, reason: str) -> None:
    """Publish a copy of a bad message to the dead-letter exchange with ``reason`` in a header."""
    props = delivery.props
    headers = dict(props.headers) if props.headers is not None else {}
    headers[REASON_HEADER] = reason[:1000]
    copy = Properties(
        type=props.type,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        headers=headers,
        persistent=True,
    )
    log.warning("dead-lettering message %s: %s", props.message_id, reason)
    channel.publish(topology.dead, "", delivery.body, copy)
