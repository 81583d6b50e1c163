"""The sending half of a stream, driven over the broker: a thin driver of :class:`SendSession`.

The policy (windows, resends, timeouts, verdicts) lives in
:class:`~objstream.common.send_session.SendSession`, which does no I/O. This module only moves
bytes: a :class:`StreamSender` holds one connection (its thread's) and its reply queue; each
:meth:`StreamSender.send` runs one :class:`_Transfer`, which reads the pieces the session asks for
(:class:`~objstream.producer.pieces.PieceReader`), publishes them, and feeds the session the
replies and the clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum

from objstream.common import checksum
from objstream.common.amqp import Channel, Connection, Delivery, dead_letter, reestablish
from objstream.common.errors import (
    ConnectionLost,
    ObjectTooLarge,
    ObjstreamError,
    ProtocolError,
    SendFailed,
    TransferFailed,
)
from objstream.common.protocol import (
    Abort,
    Chunk,
    End,
    Inline,
    Message,
    Offer,
    Properties,
    envelope,
    new_stream_id,
    parse,
)
from objstream.common.send_session import (
    Action,
    DeclareDataQueue,
    DeleteDataQueue,
    Pacing,
    PublishAbort,
    PublishChunk,
    PublishEnd,
    PublishOffer,
    ReleaseBefore,
    ReportProgress,
    SendSession,
    SourceFacts,
    TargetFinished,
    fits_inline,
)
from objstream.common.settings import Settings
from objstream.common.streaming import ObjectStreamer, Piece, ProgressHook
from objstream.common.topology import Topology
from objstream.producer.pieces import PieceReader, SharedDigest

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.05  # seconds between looks at the reply queue while publishing


@dataclass(frozen=True)
class TargetResult:
    """How the stream to one target ended."""

    site: str
    stream_id: str
    ok: bool
    size: int
    sha256: str
    stored_as: str | None = None
    error: TransferFailed | None = None


@dataclass(frozen=True)
class Answering:
    """A send that answers a retrieval request (exactly one target)."""

    stream_id: str
    """The stream id promised in the reply."""
    offer_to: str
    """The requester's private queue: the offer goes there instead of the site's inbox."""


@dataclass(frozen=True)
class Resume:
    """The receiver kept the first ``from_chunk`` chunks (hashing to ``prefix_sha256``)."""

    from_chunk: int
    prefix_sha256: str


class ReplyQueue(StrEnum):
    """Where receivers' replies come back to."""

    PRIVATE = "private"  # exclusive and server-named: dies with the connection
    NAMED = "named"  # outlives a connection (expires when unused): for reconnecting senders


class StreamSender:
    """Sends sources to target sites over one connection.

    Args:
        connection: the broker connection (used from this thread only).
        settings: timeouts, window, chunk size...
        site: this site's name.
        cancel: set: stop every stream (receivers are told to drop them).
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
        progress: ProgressHook | None = None,
        reconnect: Callable[[], Connection] | None = None,
        replies: ReplyQueue = ReplyQueue.PRIVATE,
    ) -> None:
        if reconnect is not None and replies is not ReplyQueue.NAMED:
            raise ValueError("a reconnecting sender needs a named reply queue")
        self.settings = settings
        self.site = site
        self.topology = Topology.from_settings(settings)
        self.cancel = cancel
        self.progress = progress
        self._reconnect = reconnect
        self._replies_mode = replies
        self._connection = connection
        self._declared_inboxes: set[str] = set()
        # Replies as they arrive (parsed), for the transfer in progress to take.
        self.replies: deque[tuple[Message, Delivery]] = deque()
        self.reply_queue = (
            f"{self.topology.namespace}.reply.{new_stream_id()}"
            if replies is ReplyQueue.NAMED
            else ""
        )
        self._open_channel()

    # -- the connection ---------------------------------------------------------------------------

    def _open_channel(self) -> None:
        self._channel: Channel = self._connection.channel()
        self.topology.declare_base(self._channel)
        if self._replies_mode is ReplyQueue.PRIVATE:
            self.reply_queue = self.topology.declare_reply_queue(self._channel)
        else:
            ttl_ms = int((2 * self.settings.timeout + 60) * 1000)
            self._channel.declare_queue(self.reply_queue, durable=True,
                                        arguments={"x-expires": ttl_ms})  # fmt: skip
        self._declared_inboxes.clear()
        self._channel.consume(self.reply_queue, self._on_reply, auto_ack=True)

    @property
    def connection(self) -> Connection:
        """The connection in use (a new one after a reconnect)."""
        return self._connection

    def close(self) -> None:
        """Remove a named reply queue and close the connection. Never raises."""
        try:
            if self._replies_mode is ReplyQueue.NAMED and self._channel.is_open:
                self._channel.delete_queue(self.reply_queue)
        except ObjstreamError:
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

        def setup() -> None:
            self._connection = reconnect()
            self._open_channel()

        reestablish(self.settings, within, setup)

    def _on_reply(self, delivery: Delivery) -> None:
        try:
            message = parse(delivery.props.type, delivery.props.headers)
        except ProtocolError as e:
            dead_letter(delivery.channel, self.topology, delivery, str(e))
            return
        self.replies.append((message, delivery))

    # -- what the transfers publish ---------------------------------------------------------------

    def publish(
        self, routing_key: str, body: bytes, props: Properties, exchange: str | None = None
    ) -> None:
        self._channel.publish(
            self.topology.exchange if exchange is None else exchange, routing_key, body, props
        )

    def declare_inbox(self, site: str) -> None:
        if site not in self._declared_inboxes:
            self.topology.declare_inbox(self._channel, site)
            self._declared_inboxes.add(site)

    def declare_data_queue(self, stream_id: str) -> None:
        self.topology.declare_data_queue(self._channel, stream_id)

    def delete_data_queue(self, stream_id: str) -> None:
        self._channel.delete_queue(self.topology.data_queue(stream_id))

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        dead_letter(self._channel, self.topology, delivery, reason)

    # -- sending ----------------------------------------------------------------------------------

    def send(
        self,
        source: ObjectStreamer,
        targets: Sequence[str],
        *,
        timeout: float | None = None,
        window: int | None = None,
        chunk_size: int | None = None,
        answering: Answering | None = None,
        resume: Resume | None = None,
    ) -> list[TargetResult]:
        """Stream ``source`` to every target; return when each has a verdict.

        ``answering`` serves a retrieval (one target): the offer goes to the requester's
        private queue under the promised stream id. With ``resume`` only what the receiver
        lacks is sent, if its kept prefix still hashes the same (otherwise the whole).

        Raises:
            SendFailed: at least one target failed (every outcome is in ``results``).
            ObjectTooLarge: the source exceeds ``max_object_size``.
            BrokerUnreachable: the broker connection was lost (and not regained).
            BrokerRefused: the broker refused an operation (its reply code and words).
        """
        if not targets:
            raise ValueError("no target sites given")
        if len(set(targets)) != len(targets):
            raise ValueError(f"target sites repeat: {list(targets)}")
        if (answering or resume) and len(targets) != 1:
            raise ValueError("a send that answers a request or resumes has exactly one target")
        source.prepare(int(self.settings.chunk_size) if chunk_size is None else chunk_size)
        if source.size is not None and source.size > self.settings.max_object_size:
            raise ObjectTooLarge(source.name, source.size, int(self.settings.max_object_size))
        if not self._channel.is_open:  # the broker closed it over an earlier send's operation
            self._open_channel()
        reader = PieceReader(source)
        start = 0 if resume is None else self._resume_point(reader, resume)
        ids = [(t, answering.stream_id if answering else new_stream_id()) for t in targets]
        pacing = Pacing(
            window or self.settings.window,
            timeout or self.settings.timeout,
            self.settings.resend_after,
        )
        offer_to = answering.offer_to if answering else None
        return _Transfer(self, reader, ids, start=start, offer_to=offer_to, pacing=pacing).run()

    def _resume_point(self, reader: PieceReader, resume: Resume) -> int:
        """Where a resumed stream starts: ``resume.from_chunk`` if the receiver's prefix is
        still the source's, else 0.

        The prefix (maybe GiBs) is hashed on a worker thread while this thread keeps the
        connection alive (heartbeats): a slow disk must not cost the connection.
        """
        if not resume.from_chunk:
            return 0
        with ThreadPoolExecutor(1, thread_name_prefix="objstream-prefix") as pool:
            future = pool.submit(check_prefix, reader, resume.from_chunk, resume.prefix_sha256)
            while not future.done():
                self.process_events(0.1)
            return future.result()


def check_prefix(reader: PieceReader, resume_from: int, expected: str) -> int:
    """``resume_from`` if the source's first ``resume_from`` chunks hash to ``expected`` (the
    reader's digest then holds them, as the end's SHA-256 covers the whole), else 0."""
    source = reader.streamer
    if not source.random_access or reader.count is None or resume_from > reader.count:
        log.info("%s %r cannot resume from chunk %d; sending it whole", source.kind,
                 source.name, resume_from)  # fmt: skip
        return 0
    try:
        for seq in range(resume_from):
            reader.get(seq)  # feeds the digest, one chunk at a time
    except (OSError, ObjstreamError) as e:
        log.info("%s %r: cannot read the kept prefix (%s); sending it whole", source.kind,
                 source.name, e)  # fmt: skip
        reader.digest = SharedDigest()
        return 0
    if not reader.digest.prefix_matches(expected):
        log.info("%s %r changed since the requester's first %d chunks; sending it whole",
                 source.kind, source.name, resume_from)  # fmt: skip
        reader.digest = SharedDigest()
        return 0
    log.info("%s %r resumes from chunk %d of %d", source.kind, source.name, resume_from,
             reader.count)  # fmt: skip
    return resume_from


class _Transfer:
    """One call of :meth:`StreamSender.send`: a session, the pieces, and what came of them."""

    def __init__(
        self,
        sender: StreamSender,
        reader: PieceReader,
        targets: list[tuple[str, str]],
        *,
        start: int,
        offer_to: str | None,
        pacing: Pacing,
    ) -> None:
        self.sender = sender
        self.reader = reader
        self.offer_to = offer_to
        self.timeout = pacing.timeout
        source = reader.streamer
        facts = SourceFacts(
            source.kind, source.name, source.chunk_size, source.size, source.chunk_count,
            source.random_access, source.info() or None,
        )  # fmt: skip
        self.inline_body = b""
        inline = self._inline(facts, start)
        self.session = SendSession.create(
            facts, targets, sender=sender.site, pacing=pacing, start=start, inline=inline,
            now=time.monotonic(),
        )  # fmt: skip

    def _inline(self, facts: SourceFacts, start: int) -> Inline | None:
        """The object itself, if it rides inside the offer (one message, no data queue)."""
        if not fits_inline(facts, start):
            return None
        piece = self.reader.get(0) if facts.chunk_count else Piece(b"")
        assert piece is not None
        self.inline_body = piece.data
        return Inline(
            crc32=checksum.crc32(piece.data),
            sha256=self.reader.digest.hexdigest(),
            meta=dict(piece.meta) if piece.meta else None,
        )

    def run(self) -> list[TargetResult]:
        sender, session, source = self.sender, self.session, self.reader.streamer
        sender.replies.clear()  # replies to earlier sends, if any, are stale
        self._do(session.start_actions())
        log.info("streaming %s %r (%s bytes, %s chunks) to %s", source.kind, source.name,
                 source.size, source.chunk_count,
                 ", ".join(t.site for t in session.targets))  # fmt: skip
        while not session.finished:
            try:
                self._turn()
            except ConnectionLost as e:
                sender.recover(e, self.timeout)
                active = [t for t in session.targets if t.active]
                self._do(session.reconnected(time.monotonic()))
                log.info("reconnected to %s; %d stream(s) go on",
                         sender.settings.masked_url, len(active))  # fmt: skip
        return self._results()

    def _results(self) -> list[TargetResult]:
        reader = self.reader
        complete = reader.count is not None and reader.digest.hashed == reader.count
        sha256 = reader.digest.hexdigest() if complete else ""
        results = [
            TargetResult(
                t.site, t.stream_id, t.error is None, reader.size, sha256, t.stored_as, t.error
            )
            for t in self.session.targets
        ]
        failures = [r.error for r in results if r.error is not None]
        if failures:
            raise SendFailed(failures, list(results))
        return results

    def _turn(self) -> None:
        """One round: take replies, check silences, publish what the windows allow."""
        sender, session = self.sender, self.session
        if sender.cancel is not None and sender.cancel.is_set():
            self._do(session.cancel(f"site {sender.site} is shutting down"))
            return
        self._take_replies()
        self._do(session.tick(time.monotonic()))
        began = time.monotonic()
        more = False
        while not session.finished:
            actions = session.next_publications()
            if not actions:
                break
            self._do(actions)
            # Slow reads must not keep replies waiting: a receiver that gave up (or asked for a
            # resend) is heard within POLL_INTERVAL, not one window.
            if time.monotonic() - began > POLL_INTERVAL:
                more = True
                break
        sender.process_events(0 if more else POLL_INTERVAL)

    def _take_replies(self) -> None:
        replies = self.sender.replies
        while replies:
            message, delivery = replies.popleft()
            try:
                actions = self.session.receive(message, time.monotonic())
            except ProtocolError as e:
                self.sender.dead_letter(delivery, str(e))
                continue
            self._do(actions)

    # -- actions ----------------------------------------------------------------------------------

    def _do(self, actions: list[Action]) -> None:
        sender = self.sender
        for action in actions:
            match action:
                case PublishChunk(seq=seq, stream_id=stream_id):
                    self._publish_chunk(stream_id, seq)
                case DeclareDataQueue(stream_id=stream_id):
                    sender.declare_data_queue(stream_id)
                case PublishOffer():
                    self._publish_offer(action.offer, action.expiration_ms)
                case PublishEnd(stream_id=stream_id):
                    self._publish_end(stream_id)
                case PublishAbort(stream_id=stream_id, reason=reason):
                    abort = Abort(stream_id=stream_id, reason=reason[:2000])
                    sender.publish(sender.topology.data_key(stream_id), b"", envelope(abort))
                case DeleteDataQueue(stream_id=stream_id):
                    sender.delete_data_queue(stream_id)
                case ReleaseBefore(seq=seq):
                    self.reader.release_before(seq)
                case ReportProgress():
                    self._report(action)
                case TargetFinished():
                    pass  # the session's table holds the outcome; logged there

    def _publish_offer(self, offer: Offer, expiration_ms: int) -> None:
        sender = self.sender
        body = self.inline_body if offer.inline is not None else b""
        # An offer nobody took within the timeout is void: the sender has given up by then.
        props = envelope(offer, reply_to=sender.reply_queue, expiration_s=expiration_ms / 1000)
        if self.offer_to:
            sender.publish(self.offer_to, body, props, exchange="")
        else:
            sender.declare_inbox(offer.target)
            sender.publish(sender.topology.inbox_key(offer.target), body, props)

    def _publish_chunk(self, stream_id: str, seq: int) -> None:
        piece = self.reader.get(seq)
        if piece is None:  # an iterator ran out: now the number of pieces is known
            assert self.reader.count is not None
            self.session.source_ended(self.reader.count)
            return
        header = Chunk(
            stream_id=stream_id,
            seq=seq,
            crc32=checksum.crc32(piece.data),
            meta=dict(piece.meta) if piece.meta else None,
        )
        persistent = self.sender.settings.persistent_chunks
        props = envelope(header, persistent=persistent, message_id=f"{stream_id}:{seq}")
        self.sender.publish(self.sender.topology.data_key(stream_id), piece.data, props)

    def _publish_end(self, stream_id: str) -> None:
        reader = self.reader
        assert reader.count is not None
        assert reader.digest.hashed == reader.count
        end = End(
            stream_id=stream_id,
            chunk_count=reader.count,
            size=reader.size,
            sha256=reader.digest.hexdigest(),
        )
        self.sender.publish(self.sender.topology.data_key(stream_id), b"", envelope(end))

    def _report(self, report: ReportProgress) -> None:
        hook = self.sender.progress
        if hook is None:
            return
        streamer = self.reader.streamer
        total = streamer.size
        stored = report.stored * streamer.chunk_size
        if report.complete or (total is not None and stored > total):
            stored = self.reader.size if total is None else total
        hook(report.site, report.stream_id, stored, total)
