"""The sending site's connection: a :class:`StreamSender` holds one connection (its thread's)
and its reply queue ``NS.reply.SITE.QID``, and publishes what its sends say.

The policy (the broadcast and its riders, windows, resends, timeouts, verdicts, which replies
count) lives in :class:`~objstream.common.send_session.SendSession`, which does no I/O; each
:meth:`StreamSender.send` runs one :class:`~objstream.producer.transfer.Transfer`, which drives
a session over this sender's connection.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import TypedDict, Unpack

from objstream.common.amqp import (
    Channel,
    Connection,
    Delivery,
    reestablish,
)
from objstream.common.compression import check_mode
from objstream.common.errors import (
    ConfigError,
    ConnectionLost,
    ProtocolError,
)
from objstream.common.identity import Identities
from objstream.common.offthread import off_thread
from objstream.common.protocol import (
    Message,
    Properties,
    new_stream_id,
    parse,
)
from objstream.common.send_table import (
    Pacing,
    check_size,
    facts_of,
)
from objstream.common.settings import Settings, check_site
from objstream.common.streaming import ObjectStreamer, ProgressHook
from objstream.common.tls import broker_user
from objstream.common.topology import Topology
from objstream.producer.answering import Answering as Answering
from objstream.producer.answering import Resume as Resume
from objstream.producer.pieces import PieceReader, check_prefix
from objstream.producer.transfer import TargetResult as TargetResult
from objstream.producer.transfer import Transfer, Wire

log = logging.getLogger(__name__)


class ReplyQueue(StrEnum):
    """Where receivers' replies come back to."""

    PRIVATE = "private"  # exclusive: dies with the connection
    NAMED = "named"  # durable, expires when unused: outlives a reconnect


class SendOptions(TypedDict, total=False):
    """What one send chooses (:meth:`StreamSender.send`, :meth:`StreamSender.prepare`)."""

    timeout: float | None
    """Seconds without progress from a target before it fails (default ``settings.timeout``)."""
    window: int | None
    """Chunks in flight beyond what a target stored (default ``settings.window``)."""
    chunk_size: int | None
    """Bytes per chunk (default ``settings.chunk_size``)."""
    rate_limit: int | None
    """Bytes a second this send publishes at most, whatever the number of targets, resends
    included (default ``settings.rate_limit``)."""
    compress: str | None
    """``auto``, ``zstd`` or ``none``: compressed chunks to the targets that decode them
    (default ``settings.compress``; docs/protocol.md, "Compressed chunks")."""
    answering: Answering | None
    """Serve a retrieval (one target): the offer goes to the requester's reply queue under the
    promised stream id, and its ``joiners`` bring more requesters of the same object while the
    stream runs (shared uploads)."""
    resume: Resume | None
    full: bool | None
    """Send every chunk, even to a target that holds some already (default: not
    ``settings.delta``; docs/protocol.md, "Delta transfer")."""
    """Send only what the receiver lacks, if its kept prefix still hashes the same (otherwise
    the whole)."""


class StreamSender:
    """Sends sources to target sites over one connection.

    Args:
        connection: the broker connection (used from this thread only).
        settings: timeouts, window, chunk size...
        site: this site's name.
        cancel: set: stop every stream (receivers are told to drop them).
        cancel_reason: what receivers are told when ``cancel`` stops a stream, after the
            site's name ("cancelled the send" for a user's interrupt, "is shutting down" for a
            serving site that stops).
        progress: called as targets store chunks.
        reconnect: makes a new connection after a lost one (needs ``replies=NAMED``).
        replies: the kind of reply queue.
    """

    def __init__(
        self,
        connection: Connection,
        settings: Settings,
        site: str,
        *,
        cancel: threading.Event | None = None,
        cancel_reason: str = "cancelled the send",
        progress: ProgressHook | None = None,
        reconnect: Callable[[], Connection] | None = None,
        replies: ReplyQueue = ReplyQueue.PRIVATE,
    ) -> None:
        if reconnect is not None and replies is not ReplyQueue.NAMED:
            raise ValueError("a reconnecting sender needs a named reply queue")
        self.settings = settings
        self.site = check_site(site)
        self.topology = Topology.from_settings(settings)
        self.user = broker_user(settings)
        self.identities = Identities.from_settings(settings)
        self.cancel = cancel
        self.cancel_reason = cancel_reason
        self.progress = progress
        self._reconnect = reconnect
        self._replies_mode = replies
        self._connection = connection
        self._declared_inboxes: set[str] = set()
        self._peers: set[str] = set()  # sites bound to the reply queue
        self.bytes_published = 0  # message bodies, every send of this sender
        self.chunks_resent = 0  # chunks published again to a target they were published to
        self.reconnects = 0  # connections lost and re-established
        self.replies: deque[tuple[Message, Delivery]] = deque()  # parsed, for the transfer
        self.queue_id = new_stream_id()
        self.reply_to = self.topology.reply_to(site, self.queue_id)
        self.reply_queue = self.topology.reply_queue(site, self.queue_id)
        self._open_channel()

    # -- the connection ---------------------------------------------------------------------------

    def _open_channel(self) -> None:
        self.topology.declare_base(self._connection, self.site)
        self._channel: Channel = self._connection.channel()
        named = self._replies_mode is ReplyQueue.NAMED
        ttl_ms = int((2 * self.settings.timeout + 60) * 1000)
        self.topology.declare_reply_queue(
            self._channel, self.site, self.queue_id, exclusive=not named, ttl_ms=ttl_ms
        )
        for peer in self._peers:
            self.topology.bind_reply(self._channel, self.site, self.queue_id, peer)
        self._declared_inboxes.clear()
        self._channel.consume(self.reply_queue, self._on_reply)
        self._publishing = self._channel  # until new_channel()

    def new_channel(self, why: str) -> None:
        """Publish on a new channel (replies stay on theirs: closing it could lose one)."""
        log.info("publishing on a new channel: %s", why)
        old, self._publishing = self._publishing, self._connection.channel()
        if old is not self._channel:
            old.close()

    @property
    def connection(self) -> Connection:  # a new one after a reconnect
        return self._connection

    def close(self) -> None:
        """Remove a named reply queue and close the connection. Never raises."""
        try:
            if self._replies_mode is ReplyQueue.NAMED and self._channel.is_open:
                self._channel.delete_queue(self.reply_queue)
        except Exception:  # gone with a dead node, pika may fail in its own way
            log.debug("reply queue already gone", exc_info=True)
        finally:
            self._connection.close()

    def process_events(self, time_limit: float) -> None:
        """Let the connection work (heartbeats, replies) for up to ``time_limit`` seconds."""
        self._connection.process_events(time_limit)

    def recover(self, error: ConnectionLost, within: float) -> None:
        """Reconnect after a lost connection (or re-raise ``error`` if this sender cannot)."""
        if self._reconnect is None:
            raise error
        log.warning("connection to the broker lost (%s); reconnecting", error)
        reconnect = self._reconnect

        def setup() -> None:  # the reply queue's consume too: it can fail on a cluster
            self._connection.close()  # what is left of an attempt that failed, if anything
            self._connection = reconnect()
            self._open_channel()

        reestablish(self.settings, within, setup)
        self.reconnects += 1

    def _on_reply(self, delivery: Delivery) -> None:
        try:
            message = parse(delivery.props.type, delivery.props.headers)
        except ProtocolError as e:
            delivery.reject(str(e))
            return
        self.replies.append((message, delivery))

    # -- what the transfers publish ---------------------------------------------------------------

    def publish(self, routing_key: str, body: bytes, props: Properties) -> None:
        """Publish to the namespace's exchange, signed with the broker user."""
        self._publishing.publish(
            self.topology.exchange, routing_key, body, props.replace(user_id=self.user)
        )
        self.bytes_published += len(body)

    def expect_replies_from(self, site: str) -> None:
        """Bind ``reply:SELF:QID:SITE`` to the reply queue: ``site``'s answers get in."""
        if site not in self._peers:
            self.topology.bind_reply(self._channel, self.site, self.queue_id, site)
            self._peers.add(site)

    def declare_inbox(self, site: str) -> None:
        """Declare ``site``'s inbox if this user may (an offer then waits for a listener that
        starts later); under least privilege the administrator declared it: skip. Not at
        all with ``declare_peers`` false (regions: the site's inbox is on its own broker)."""
        if site in self._declared_inboxes or not self.settings.declare_peers:
            return
        self._declared_inboxes.add(site)
        self.topology.declare_if_allowed(
            self._connection, lambda channel: self.topology.declare_inbox(channel, site)
        )

    # -- sending ----------------------------------------------------------------------------------

    def send(
        self, source: ObjectStreamer, targets: Sequence[str], **options: Unpack[SendOptions]
    ) -> list[TargetResult]:
        """Stream ``source`` to every target (one stream id, one broadcast); return when each
        has a verdict (:class:`SendOptions` says what ``options`` choose).

        Raises:
            SendFailed: at least one target failed (every outcome is in ``results``).
            ObjectTooLarge: the source exceeds ``max_object_size``.
            BrokerUnreachable: the broker connection was lost (and not regained).
            BrokerRefused: the broker refused an operation (its reply code and words).
        """
        answering = options.get("answering")
        transfer = self.prepare(source, targets, **options)
        return transfer.run(answering.joiners if answering else None)

    def prepare(
        self, source: ObjectStreamer, targets: Sequence[str], **options: Unpack[SendOptions]
    ) -> Transfer:
        """The transfer :meth:`send` runs, checked and ready (nothing published yet): run it
        with a :class:`Quorum` for a k-of-N send. The options are :class:`SendOptions`."""
        answering, resume = options.get("answering"), options.get("resume")
        chunk_size = options.get("chunk_size")
        if not targets:
            raise ValueError("no target sites given")
        for target in targets:
            check_site(target)  # before anything is declared for it
        if len(set(targets)) != len(targets):
            repeated = sorted({t for t in targets if list(targets).count(t) > 1})
            raise ConfigError(f"target sites repeat: {', '.join(repeated)}")
        if (answering or resume) and len(targets) != 1:
            raise ValueError("a send that answers a request or resumes has exactly one target")
        source.prepare(int(self.settings.chunk_size) if chunk_size is None else chunk_size)
        check_size(facts_of(source), int(self.settings.max_object_size))
        if not (self._channel.is_open and self._publishing.is_open):  # the broker closed one
            self._open_channel()  # over an earlier send's operation
        reader = PieceReader(source)
        start = 0 if resume is None else self._resume_point(reader, resume)
        settings = self.settings
        window = options.get("window") or settings.window
        pacing = Pacing(
            window,
            options.get("timeout") or settings.timeout,
            settings.resend_after,
            answering.contact_timeout if answering else None,
            # What a target's data queue holds, if its receiver has this site's settings (one
            # with less gets the rest by resend).
            backlog=int(settings.backlog_windows * window),
        )
        stream_id = answering.stream_id if answering else new_stream_id()
        rate_limit, compress = options.get("rate_limit"), options.get("compress")
        full = options.get("full")
        transfer = Transfer(
            self,
            reader,
            stream_id,
            targets,
            start=start,
            pacing=pacing,
            wire=Wire(
                settings.rate_limit if rate_limit is None else rate_limit,
                settings.compress if compress is None else check_mode(compress),
                settings.delta if full is None else not full,
            ),
        )
        if answering:
            transfer.routes[targets[0]] = answering.offer_to
        return transfer

    def _resume_point(self, reader: PieceReader, resume: Resume) -> int:
        """Where a resumed stream starts: ``resume.from_chunk`` if the prefix is unchanged."""
        if not resume.from_chunk:
            return 0
        return off_thread(
            lambda: check_prefix(reader, resume.from_chunk, resume.prefix_sha256),
            lambda: self.process_events(0.1),
            "objstream-prefix",
        )
