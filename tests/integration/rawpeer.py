"""A peer written with raw pika and the documented protocol, to send what objstream never would.

It plays a hostile or broken peer in tests: corrupt chunks, wrong digests, aborts, garbage. It
goes around objstream's AMQP adapter on purpose: the envelope and the declarations below follow
docs/protocol.md ("Names", "Messages"), so these tests also check that the document suffices.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from typing import Any

import pika

from objstream.common.protocol import (
    CONTENT_TYPE,
    TYPES,
    Abort,
    Chunk,
    End,
    Offer,
    new_stream_id,
    to_headers,
)
from objstream.common.protocol import Message as _Message
from objstream.common.settings import Settings
from objstream.common.topology import DEAD_MAX_BYTES, DEAD_MAX_LENGTH, Topology

Channel = Any  # pika's BlockingChannel


def properties(
    message: _Message,
    *,
    persistent: bool = True,
    message_id: str | None = None,
    reply_to: str | None = None,
) -> pika.BasicProperties:
    """The documented envelope of ``message``: type, headers, ids, delivery mode."""
    return pika.BasicProperties(
        type=TYPES[type(message)].value,
        headers=to_headers(message),
        message_id=message_id or message.ident,
        correlation_id=message.ident,
        reply_to=reply_to,
        content_type=CONTENT_TYPE,
        delivery_mode=2 if persistent else 1,
    )


def declare_base(channel: Channel, topology: Topology) -> None:
    """The exchange and the dead-letter exchange and queue, as documented."""
    channel.exchange_declare(topology.exchange, exchange_type="direct", durable=True)
    channel.exchange_declare(topology.dead, exchange_type="fanout", durable=True)
    arguments = {"x-max-length": DEAD_MAX_LENGTH, "x-max-length-bytes": DEAD_MAX_BYTES,
                 "x-overflow": "drop-head"}  # fmt: skip
    channel.queue_declare(topology.dead, durable=True, arguments=arguments)
    channel.queue_bind(topology.dead, topology.dead)


def declare_bound(channel: Channel, topology: Topology, queue: str, key: str, **args: Any) -> str:
    """A durable queue bound to the exchange with ``key`` (inbox, service or data queue)."""
    channel.queue_declare(queue, durable=True, arguments=args or None)
    channel.queue_bind(queue, topology.exchange, routing_key=key)
    return queue


def declare_reply_queue(channel: Channel) -> str:
    """A private reply queue (exclusive, server-named)."""
    return str(channel.queue_declare("", exclusive=True, auto_delete=True).method.queue)


class RawPeer:
    def __init__(self, settings: Settings, target: str) -> None:
        self.topology = Topology.from_settings(settings)
        self.target = target
        self.stream_id = new_stream_id()
        self.connection = pika.BlockingConnection(pika.URLParameters(settings.url))
        self.channel = self.connection.channel()
        topo = self.topology
        declare_base(self.channel, topo)
        self.reply = declare_reply_queue(self.channel)
        declare_bound(self.channel, topo, topo.inbox(target), topo.inbox_key(target))
        sid = self.stream_id
        expires = {"x-expires": topo.stream_ttl_ms}
        declare_bound(self.channel, topo, topo.data_queue(sid), topo.data_key(sid), **expires)

    def offer(
        self,
        name: str,
        size: int | None,
        chunk_size: int,
        window: int = 8,
        *,
        kind: str = "file",
        chunk_count: int | None = None,
        info: dict[str, Any] | None = None,
        resume_from: int = 0,
    ) -> None:
        if chunk_count is None and size is not None:
            chunk_count = -(-size // chunk_size)
        offer = Offer(
            stream_id=self.stream_id,
            kind=kind,
            name=name,
            size=size,
            chunk_size=chunk_size,
            chunk_count=chunk_count,
            window=window,
            sender="raw",
            target=self.target,
            info=info,
            resume_from=resume_from,
        )
        self.publish_inbox(b"", properties(offer, reply_to=self.reply))

    def chunk(
        self, seq: int, body: bytes, crc32: int | None = None, meta: dict[str, Any] | None = None
    ) -> None:
        header = Chunk(
            stream_id=self.stream_id,
            seq=seq,
            crc32=zlib.crc32(body) if crc32 is None else crc32,
            meta=meta,
        )
        self.publish_data(body, properties(header))

    def end(self, count: int, size: int, sha256: str) -> None:
        end = End(stream_id=self.stream_id, chunk_count=count, size=size, sha256=sha256)
        self.publish_data(b"", properties(end))

    def abort(self, reason: str) -> None:
        self.publish_data(b"", properties(Abort(stream_id=self.stream_id, reason=reason)))

    def stream(self, name: str, chunks: list[bytes], sha256: str | None = None) -> None:
        """Offer, every chunk in order, and the end."""
        size = sum(len(c) for c in chunks)
        self.offer(name, size, max((len(c) for c in chunks), default=1))
        for seq, body in enumerate(chunks):
            self.chunk(seq, body)
        self.end(len(chunks), size, sha256 or hashlib.sha256(b"".join(chunks)).hexdigest())

    def publish_inbox(self, body: bytes, props: Any) -> None:
        self.channel.basic_publish(
            self.topology.exchange, self.topology.inbox_key(self.target), body, props
        )

    def publish_data(self, body: bytes, props: Any) -> None:
        self.channel.basic_publish(
            self.topology.exchange, self.topology.data_key(self.stream_id), body, props
        )

    def replies(self, until: str = "done", timeout: float = 30) -> list[tuple[str, dict[str, Any]]]:
        """Reply messages (type, headers) received until one of type ``until``."""
        got: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, props, _ = self.channel.basic_get(self.reply, auto_ack=True)
            if method is None:
                self.connection.process_data_events(time_limit=0.05)
                continue
            got.append((props.type, dict(props.headers)))
            if props.type == until:
                return got
        raise AssertionError(f"no {until} reply within {timeout} s; got {got}")

    def verdict(self, timeout: float = 30) -> dict[str, Any]:
        return self.replies("done", timeout)[-1][1]

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()
