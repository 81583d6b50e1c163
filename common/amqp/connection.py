"""Channels, deliveries and connections: the half of the adapter a connected process uses.

Every consumer callback runs under a guard (:meth:`Channel.consume`): a delivery whose headers
the adapter refused to decode, or whose handler raised, is rejected without requeueing (the
broker dead-letters it to the queue's dead-letter exchange) and logged with the reason, and the
connection goes on. Only a lost connection gets out of the guard (the workers reconnect). So no
message, whatever its sender, can stop a worker.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Self

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from objstream.common.errors import BrokerRefused, ConnectionLost, ObjstreamError
from objstream.common.federation import arrival_link
from objstream.common.protocol import Envelope, Properties
from objstream.common.redeliveries import RedeliveryJournal, fingerprint

log = logging.getLogger(__name__)

REJECTED_HEADERS = "objstream_rejected_headers"
"""Attribute the bounded header decoding (:mod:`objstream.common.amqp.connect`) sets on pika's
properties whose header table it refused, with the reason."""


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
    except (ValueError, AttributeError) as e:
        # After a node died, pika fails in its own ways on a connection it has closed: its
        # timer ("Timeout closed before call", seen in a cluster test), its poller. The
        # connection's state tells: lost, so the caller reconnects; otherwise a bug, raised.
        if is_open():
            raise
        raise ConnectionLost(url, f"{type(e).__name__}: {e}") from e


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


@dataclass
class Delivery:
    """One message handed to a consumer callback.

    Settle it once: :meth:`ack` when handled, :meth:`reject` when it cannot be (the broker
    dead-letters it). A consumer with automatic acks gets deliveries that are settled already.
    """

    props: Properties
    body: bytes
    tag: int
    """The delivery tag, for :meth:`Channel.ack` on :attr:`channel` (and only there)."""
    redelivered: bool
    channel: Channel
    routing_key: str = ""
    """The key it was published with: a reply's key names its publisher (``reply:S:QID:PEER``),
    which the broker's topic permissions vouch for."""
    rejected_headers: str | None = None
    """Why its header table was not decoded (too deep, too big, malformed); None if it was."""
    settled: bool = False

    @property
    def envelope(self) -> Envelope:
        """What came with it besides its header fields, by which the sessions judge where it
        came from (the federation link it crossed, if any, included)."""
        props = self.props
        return Envelope(
            self.routing_key,
            props.user_id,
            props.reply_to,
            len(self.body),
            via=arrival_link(props.headers),
        )

    def ack(self) -> None:
        """Ack it (once)."""
        if not self.settled:
            self.settled = True
            self.channel.ack(self.tag)

    def reject(self, reason: str) -> None:
        """Reject it without requeueing: the broker dead-letters it to the queue's dead-letter
        exchange (``NS.dead``); ``reason`` goes to the log, with who sent it."""
        props = self.props
        log.warning(
            "dead-lettering %s message %s (user %s, key %s): %s",
            props.type or "untyped",
            props.message_id,
            props.user_id,
            self.routing_key,
            reason,
        )
        if not self.settled:
            self.settled = True
            self.channel.reject(self.tag)


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

    def consume(
        self,
        queue: str,
        on_message: OnMessage,
        *,
        auto_ack: bool = False,
        redeliveries: RedeliveryJournal | None = None,
    ) -> str:
        """Start consuming ``queue``; returns the consumer tag.

        ``on_message`` runs under a guard: a delivery whose headers were refused is rejected
        before it is called, and one it raises on (anything but a lost connection) is
        rejected with the error as the reason, unless it was settled already. With
        ``redeliveries`` (a classic inbox or service queue), a message redelivered that often
        without its handling ever ending is rejected too.
        """

        def callback(_: Any, method: Any, props: Any, body: bytes) -> None:
            delivery = Delivery(
                _from_pika(props),
                body,
                method.delivery_tag,
                bool(method.redelivered),
                self,
                routing_key=_str(method.routing_key) or "",
                rejected_headers=getattr(props, REJECTED_HEADERS, None),
                settled=auto_ack,
            )
            if redeliveries is None or not delivery.redelivered:
                guarded(on_message, delivery)
                return
            limited(redeliveries, on_message, delivery)

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

    def reject(self, tag: int) -> None:
        """Reject delivery ``tag`` without requeueing: the broker dead-letters it."""
        with self._op("rejecting"):
            self._impl.basic_reject(tag, requeue=False)

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

    def queue_counts(self, name: str) -> tuple[int, int]:
        """``(messages, consumers)`` of queue ``name`` now (a passive declare, as
        :meth:`consumer_count`)."""
        with self._op(f"checking queue {name}"):
            result = self._impl.queue_declare(name, passive=True)
        return int(result.method.message_count), int(result.method.consumer_count)

    def delete_queue(self, name: str, *, if_unused: bool = False, if_empty: bool = False) -> None:
        """Delete queue ``name`` (a missing one is no error); ``if_unused``: only if nobody
        consumes it, ``if_empty``: only if it holds no message (otherwise BrokerRefused 406,
        which closes the channel). The broker checks and deletes in one step. Quorum queues
        take neither flag: RabbitMQ closes the whole connection (540 NOT_IMPLEMENTED)."""
        with self._op(f"deleting queue {name}"):
            self._impl.queue_delete(name, if_unused=if_unused, if_empty=if_empty)

    def delete_exchange(self, name: str, *, if_unused: bool = False) -> None:
        """Delete exchange ``name``; ``if_unused``: only if nothing is bound to it (otherwise
        BrokerRefused 406, which closes the channel)."""
        with self._op(f"deleting exchange {name}"):
            self._impl.exchange_delete(name, if_unused=if_unused)

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


def limited(journal: RedeliveryJournal, on_message: OnMessage, delivery: Delivery) -> None:
    """:func:`guarded`, for a redelivered message counted in ``journal``."""
    props = delivery.props
    key = fingerprint(
        delivery.routing_key,
        props.message_id,
        props.correlation_id,
        props.type,
        props.user_id,
        delivery.body,
    )
    if not journal.handle(key):
        with contextlib.suppress(ObjstreamError):
            delivery.reject(f"delivered {journal.limit + 1} times without its handling ending")
        return
    guarded(on_message, delivery)  # a process that dies in it leaves the count
    journal.handled(key)


def guarded(on_message: OnMessage, delivery: Delivery) -> None:
    """Hand ``delivery`` to ``on_message`` so that it fails alone: refused headers and errors
    of the handler reject it (see :meth:`Channel.consume`); a lost connection goes on up."""
    if delivery.rejected_headers is not None:
        with contextlib.suppress(ObjstreamError):
            delivery.reject(f"undecodable headers: {delivery.rejected_headers}")
        return
    try:
        on_message(delivery)
    except ConnectionLost:
        raise
    except Exception as e:
        log.exception("handling a %s message failed", delivery.props.type or "untyped")
        with contextlib.suppress(ObjstreamError):  # its channel may be gone with the error
            delivery.reject(f"handling it failed: {type(e).__name__}: {e}"[:1000])
