"""pika connections for code not yet moved to the AMQP adapter (:mod:`objstream.common.amqp`).

Issue 11, transitional: this module goes away once the sender and receiver drivers use the
adapter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Self

import pika
import pika.exceptions

from objstream.common import amqp
from objstream.common.errors import BrokerUnreachable, ObjstreamError
from objstream.common.protocol import REASON_HEADER
from objstream.common.settings import Settings
from objstream.common.topology import Topology

log = logging.getLogger(__name__)

# What a lost connection (broker restart, connection closed by the broker) raises in pika.
CONNECTION_LOST = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.StreamLostError,
    pika.exceptions.ConnectionClosed,
)


def connection_lost(error: BaseException, connection: Any) -> bool:
    """Is ``error`` the connection going away (rather than a fault of one channel or call)?

    A close that arrives while callbacks run surfaces on the next call as a "wrong state"
    error, not as one of :data:`CONNECTION_LOST`; the connection's own state tells.
    """
    return isinstance(error, CONNECTION_LOST) or not connection.is_open


class Closing:
    """Base of the objects that hold a connection: ``with X(...) as x:`` closes it at the end."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(settings: Settings, name: str) -> pika.BlockingConnection:
    """A raw pika connection, for code not yet moved to :mod:`objstream.common.amqp`.

    Issue 11, transitional: goes away with its last caller.
    """
    return amqp.connect(settings, name)._impl


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
        except (ObjstreamError, pika.exceptions.AMQPError) as e:
            if time.monotonic() > deadline:
                detail = f"no reconnection within {within:g} s: {e}"
                raise BrokerUnreachable(settings.masked_url, detail) from e
            time.sleep(1.0)


def dead_letter(channel: Any, topology: Topology, props: Any, body: bytes, reason: str) -> None:
    """Publish a copy of a bad message to ``{ns}.dead`` with ``reason`` in a header."""
    headers = dict(props.headers) if isinstance(getattr(props, "headers", None), dict) else {}
    headers[REASON_HEADER] = reason[:1000]
    copy = pika.BasicProperties(
        type=props.type if isinstance(props.type, str) else None,
        message_id=props.message_id if isinstance(props.message_id, str) else None,
        correlation_id=props.correlation_id if isinstance(props.correlation_id, str) else None,
        headers=headers,
        delivery_mode=pika.DeliveryMode.Persistent,
    )
    log.warning("dead-lettering message %s: %s", props.message_id, reason)
    channel.basic_publish(topology.dead, "", body, copy)
