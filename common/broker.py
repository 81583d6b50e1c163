"""Connecting to RabbitMQ, with pika's exceptions translated into objstream's.

One connection per thread (pika is not thread-safe): every worker calls :func:`connect` for itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Self

import pika
import pika.exceptions

from objstream.common.errors import (
    AuthenticationRefused,
    BrokerUnreachable,
    ConfigError,
    ObjstreamError,
)
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


class Closing:
    """Base of the objects that hold a connection: ``with X(...) as x:`` closes it at the end."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(settings: Settings, name: str) -> pika.BlockingConnection:
    """Open a blocking connection named ``name`` (shown in the broker's connection list).

    Raises:
        BrokerUnreachable: nothing answers at the URL, or the connection failed.
        AuthenticationRefused: the broker refused the credentials.
        ConfigError: the URL is malformed.
    """
    try:
        params = pika.URLParameters(settings.url)
    except Exception as e:  # pika raises assorted errors for bad URLs
        raise ConfigError(f"invalid broker URL {settings.masked_url}: {e}") from e
    _tune_pika_reads()
    params.heartbeat = settings.heartbeat
    params.client_properties = {"connection_name": name, "product": "objstream"}
    params.connection_attempts = 1
    params.blocked_connection_timeout = max(settings.timeout, 30.0)
    deadline = time.monotonic() + settings.connect_wait
    delay = 0.5
    while True:
        try:
            connection = pika.BlockingConnection(params)
        except pika.exceptions.ProbableAuthenticationError as e:
            raise AuthenticationRefused(settings.masked_url) from e
        except pika.exceptions.ProbableAccessDeniedError as e:
            raise AuthenticationRefused(settings.masked_url) from e
        except pika.exceptions.AMQPConnectionError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerUnreachable(settings.masked_url, _describe(e)) from e
            wait = min(delay, left)
            log.warning(
                "broker at %s unreachable (%s); retrying in %.1f s (giving up in %.0f s)",
                settings.masked_url, _describe(e), wait, left,
            )  # fmt: skip
            time.sleep(wait)
            delay = min(delay * 2, 10.0)
            continue
        log.debug("connected to %s as %r", settings.masked_url, name)
        return connection


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


def _describe(error: BaseException) -> str:
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
