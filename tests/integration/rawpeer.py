"""A peer written with raw pika and the documented protocol, to send what objstream never would.

It plays a hostile or broken peer in tests: corrupt chunks, wrong digests, aborts, garbage. It
goes around objstream's AMQP adapter on purpose: the envelope, names, keys and declarations
below follow protocol v2 as documented (one topic exchange ``NS``; the target declares its own
data queue; answers come through the exchange to the peer's reply queue with keys naming their
publisher; ``user_id`` on every message), so these tests also check that the document suffices.
Only names are taken from objstream (:class:`Topology`), never its declarations.
"""

from __future__ import annotations

import hashlib
import time
import uuid
import zlib
from collections import deque
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
Reply = tuple[str, dict[str, Any]]  # (type, headers) of an answer


def properties(
    message: _Message,
    *,
    persistent: bool = True,
    message_id: str | None = None,
    reply_to: str | None = None,
    user_id: str | None = None,
) -> pika.BasicProperties:
    """The documented envelope of ``message``: type, headers, ids, delivery mode, user."""
    return pika.BasicProperties(
        type=TYPES[type(message)].value,
        headers=to_headers(message),
        message_id=message_id or message.ident,
        correlation_id=message.ident,
        reply_to=reply_to,
        content_type=CONTENT_TYPE,
        delivery_mode=2 if persistent else 1,
        user_id=user_id,
    )


def login_user(settings: Settings) -> str:
    """The broker user the settings' URL logs in as: the ``user_id`` of what it publishes."""
    return str(pika.URLParameters(settings.url).credentials.username)


def declare_base(channel: Channel, topology: Topology, site: str) -> None:
    """The topic exchange, and ``site``'s own dead-letter exchange and queue, as documented."""
    channel.exchange_declare(topology.exchange, exchange_type="topic", durable=True)
    dead = topology.dead(site)
    channel.exchange_declare(dead, exchange_type="fanout", durable=True)
    arguments = {
        "x-max-length": DEAD_MAX_LENGTH,
        "x-max-length-bytes": DEAD_MAX_BYTES,
        "x-overflow": "drop-head",
    }
    channel.queue_declare(dead, durable=True, arguments=arguments)
    channel.queue_bind(dead, dead)


def declare_bound(channel: Channel, topology: Topology, queue: str, *keys: str) -> str:
    """A durable queue ``NS.KIND.SITE`` bound to the exchange with ``keys`` (an inbox, a
    service queue), whose rejected messages the broker dead-letters to the site's own
    ``NS.dead.SITE``, as documented."""
    site = queue[len(topology.namespace) + 1 :].split(".", 1)[1]
    arguments = {"x-dead-letter-exchange": topology.dead(site)}
    channel.queue_declare(queue, durable=True, arguments=arguments)
    for key in keys:
        channel.queue_bind(queue, topology.exchange, routing_key=key)
    return queue


def declare_reply_queue(
    channel: Channel, namespace: str, site: str, *peers: str
) -> tuple[str, str]:
    """An exclusive reply queue ``NS.reply.SITE.QID`` bound ``reply:SITE:QID:PEER`` for each
    peer; returns ``(queue, reply_to)`` with ``reply_to`` = ``reply:SITE:QID``."""
    qid = uuid.uuid4().hex
    queue = f"{namespace}.reply.{site}.{qid}"
    reply_to = f"reply:{site}:{qid}"
    channel.queue_declare(queue, exclusive=True, auto_delete=True)
    for peer in peers:
        channel.queue_bind(queue, namespace, routing_key=f"{reply_to}:{peer}")
    return queue, reply_to


class RawPeer:
    """A sending site ``sender`` with one stream toward ``target``."""

    def __init__(self, settings: Settings, target: str, sender: str = "raw") -> None:
        self.topology = Topology.from_settings(settings)
        self.namespace = settings.namespace
        self.target = target
        self.sender = sender
        self.user = login_user(settings)
        self.stream_id = new_stream_id()
        self.connection = pika.BlockingConnection(pika.URLParameters(settings.url))
        self.channel = self.connection.channel()
        declare_base(self.channel, self.topology, sender)
        self.reply, self.reply_to = declare_reply_queue(
            self.channel, self.namespace, sender, target
        )
        # The target's inbox, so that an offer waits for a receiver that starts later.
        declare_bound(self.channel, self.topology, f"{self.namespace}.site.{target}",
                      f"offer:{target}")  # fmt: skip
        self._answers: deque[Reply] = deque()  # read while waiting for the first contact
        self.waits_for_contact = True
        """:meth:`offer` waits for the first answer (set False to offer and go on)."""

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
        """Offer the stream and (with :attr:`waits_for_contact`) wait for the first answer
        (the receiver's first progress, or its refusal) as a sender must before it publishes
        data: until then the target's data queue may not exist."""
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
            sender=self.sender,
            target=self.target,
            info=info,
            resume_from=resume_from,
        )
        self.publish_inbox(b"", properties(offer, reply_to=self.reply_to, user_id=self.user))
        if self.waits_for_contact:
            self.first_contact()

    def first_contact(self, timeout: float = 30) -> Reply:
        """Wait for a receiver's first answer (kept for :meth:`replies` too)."""
        answer = self._fetch(timeout)
        if answer is None:
            raise AssertionError(f"no first contact within {timeout} s")
        self._answers.append(answer)
        return answer

    def chunk(
        self, seq: int, body: bytes, crc32: int | None = None, meta: dict[str, Any] | None = None
    ) -> None:
        header = Chunk(
            stream_id=self.stream_id,
            seq=seq,
            crc32=zlib.crc32(body) if crc32 is None else crc32,
            meta=meta,
        )
        self.publish_data(body, properties(header, persistent=False, user_id=self.user))

    def end(self, count: int, size: int, sha256: str) -> None:
        end = End(stream_id=self.stream_id, chunk_count=count, size=size, sha256=sha256)
        self.publish_data(b"", properties(end, user_id=self.user))

    def abort(self, reason: str) -> None:
        abort = Abort(stream_id=self.stream_id, reason=reason)
        self.publish_data(b"", properties(abort, user_id=self.user), unicast=True)

    def stream(self, name: str, chunks: list[bytes], sha256: str | None = None) -> None:
        """Offer, every chunk in order, and the end."""
        size = sum(len(c) for c in chunks)
        self.offer(name, size, max((len(c) for c in chunks), default=1))
        for seq, body in enumerate(chunks):
            self.chunk(seq, body)
        self.end(len(chunks), size, sha256 or hashlib.sha256(b"".join(chunks)).hexdigest())

    def publish_inbox(self, body: bytes, props: Any) -> None:
        self.channel.basic_publish(self.namespace, f"offer:{self.target}", body, props)

    def publish_data(self, body: bytes, props: Any, *, unicast: bool = False) -> None:
        """To every target of the stream (``data:ID:SENDER``), or to ours only (unicast,
        ``data:ID:SENDER:TARGET``)."""
        key = f"data:{self.stream_id}:{self.sender}"
        if unicast:
            key += f":{self.target}"
        self.channel.basic_publish(self.namespace, key, body, props)

    @property
    def data_queue(self) -> str:
        """The target's data queue of this stream (the target declares it)."""
        return f"{self.namespace}.data.{self.target}.{self.stream_id}"

    def _next_answer(self, timeout: float) -> Reply | None:
        if self._answers:
            return self._answers.popleft()
        return self._fetch(timeout)

    def _fetch(self, timeout: float) -> Reply | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, props, _ = self.channel.basic_get(self.reply, auto_ack=True)
            if method is not None:
                return props.type, dict(props.headers)
            self.connection.process_data_events(time_limit=0.05)
        return None

    def replies(self, until: str = "done", timeout: float = 30) -> list[Reply]:
        """Reply messages (type, headers) received until one of type ``until``."""
        got: list[Reply] = []
        deadline = time.monotonic() + timeout
        while (answer := self._next_answer(max(0.0, deadline - time.monotonic()))) is not None:
            got.append(answer)
            if answer[0] == until:
                return got
        raise AssertionError(f"no {until} reply within {timeout} s; got {got}")

    def verdict(self, timeout: float = 30) -> dict[str, Any]:
        return self.replies("done", timeout)[-1][1]

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()
