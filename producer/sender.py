"""The sending half of a stream, driven over the broker: a thin driver of :class:`SendSession`.

The policy (the broadcast and its riders, windows, resends, timeouts, verdicts) lives in
:class:`~objstream.common.send_session.SendSession`, which does no I/O. This module only moves
bytes: a :class:`StreamSender` holds one connection (its thread's) and its reply queue
``NS.reply.SITE.QID``; each :meth:`StreamSender.send` runs one :class:`_Transfer`, which reads
the pieces the session asks for (:class:`~objstream.producer.pieces.PieceReader`), publishes them
with the keys of :class:`~objstream.common.topology.Topology` and the broker user as
``user_id``, and feeds the session the replies and the clock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from objstream.common import checksum
from objstream.common.amqp import (
    Channel,
    Connection,
    Delivery,
    reestablish,
)
from objstream.common.errors import (
    ConnectionLost,
    FailureCode,
    ObjstreamError,
    ProtocolError,
    SendFailed,
    TransferFailed,
)
from objstream.common.identity import Identities
from objstream.common.offthread import off_thread
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
from objstream.common.send_session import SendSession
from objstream.common.send_table import (
    Action,
    NewChannel,
    Pacing,
    Plan,
    PublishAbort,
    PublishChunk,
    PublishEnd,
    PublishOffer,
    ReleaseBefore,
    ReportProgress,
    SourceFacts,
    TargetFinished,
    check_size,
    facts_of,
    fits_inline,
)
from objstream.common.settings import Settings, check_site
from objstream.common.streaming import ObjectStreamer, Piece, ProgressHook
from objstream.common.tls import broker_user
from objstream.common.topology import Topology
from objstream.producer.answering import Answering as Answering
from objstream.producer.answering import Joiners
from objstream.producer.answering import Resume as Resume
from objstream.producer.pieces import PieceReader, check_prefix
from objstream.producer.sources import SourceChanged

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


class ReplyQueue(StrEnum):
    """Where receivers' replies come back to."""

    PRIVATE = "private"  # exclusive: dies with the connection
    NAMED = "named"  # durable, expires when unused: outlives a reconnect


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
        self.site = check_site(site)
        self.topology = Topology.from_settings(settings)
        self.user = broker_user(settings)
        self.identities = Identities.from_settings(settings)
        self.cancel = cancel
        self.progress = progress
        self._reconnect = reconnect
        self._replies_mode = replies
        self._connection = connection
        self._declared_inboxes: set[str] = set()
        self._peers: set[str] = set()  # sites bound to the reply queue
        self.bytes_published = 0  # message bodies, every send of this sender
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
        starts later); under least privilege the administrator declared it: skip."""
        if site in self._declared_inboxes:
            return
        self._declared_inboxes.add(site)
        self.topology.declare_if_allowed(
            self._connection, lambda channel: self.topology.declare_inbox(channel, site)
        )

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
        """Stream ``source`` to every target (one stream id, one broadcast); return when each
        has a verdict.

        ``answering`` serves a retrieval (one target): the offer goes to the requester's reply
        queue under the promised stream id, and its ``joiners`` bring more requesters of the
        same object while the stream runs (shared uploads). With ``resume`` only what the
        receiver lacks is sent, if its kept prefix still hashes the same (otherwise the whole).

        Raises:
            SendFailed: at least one target failed (every outcome is in ``results``).
            ObjectTooLarge: the source exceeds ``max_object_size``.
            BrokerUnreachable: the broker connection was lost (and not regained).
            BrokerRefused: the broker refused an operation (its reply code and words).
        """
        if not targets:
            raise ValueError("no target sites given")
        for target in targets:
            check_site(target)  # before anything is declared for it
        if len(set(targets)) != len(targets):
            raise ValueError(f"target sites repeat: {list(targets)}")
        if (answering or resume) and len(targets) != 1:
            raise ValueError("a send that answers a request or resumes has exactly one target")
        source.prepare(int(self.settings.chunk_size) if chunk_size is None else chunk_size)
        check_size(facts_of(source), int(self.settings.max_object_size))
        if not (self._channel.is_open and self._publishing.is_open):  # the broker closed one
            self._open_channel()  # over an earlier send's operation
        reader = PieceReader(source)
        start = 0 if resume is None else self._resume_point(reader, resume)
        settings = self.settings
        pacing = Pacing(
            window or settings.window,
            timeout or settings.timeout,
            settings.resend_after,
            answering.contact_timeout if answering else None,
        )
        routes = {targets[0]: answering.offer_to} if answering else {}
        stream_id = answering.stream_id if answering else new_stream_id()
        transfer = _Transfer(self, reader, stream_id, targets, start=start, pacing=pacing)
        return transfer.run(routes, answering.joiners if answering else None)

    def _resume_point(self, reader: PieceReader, resume: Resume) -> int:
        """Where a resumed stream starts: ``resume.from_chunk`` if the prefix is unchanged."""
        if not resume.from_chunk:
            return 0
        return off_thread(
            lambda: check_prefix(reader, resume.from_chunk, resume.prefix_sha256),
            lambda: self.process_events(0.1),
            "objstream-prefix",
        )


class _Transfer:
    """One call of :meth:`StreamSender.send`: a session, the pieces, and what came of them."""

    def __init__(
        self,
        sender: StreamSender,
        reader: PieceReader,
        stream_id: str,
        targets: Sequence[str],
        *,
        start: int,
        pacing: Pacing,
    ) -> None:
        self.sender = sender
        self.reader = reader
        self.stream_id = stream_id
        self.timeout = pacing.timeout
        self.routes: dict[str, str] = {}  # site -> the reply_to its offer goes to (retrievals)
        facts = facts_of(reader.streamer)
        self.inline_body = b""
        inline = self._inline(facts, start)
        self.session = SendSession.create(
            facts,
            targets,
            stream_id=stream_id,
            sender=sender.site,
            pacing=pacing,
            plan=Plan(start, inline),
            identities=sender.identities,
            now=time.monotonic(),
        )
        self.keys: dict[str | None, str] = {None: sender.topology.data_key(stream_id, sender.site)}

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

    def _key(self, to: str | None) -> str:
        key = self.keys.get(to)
        if key is None:
            key = self.keys[to] = self.sender.topology.data_key(
                self.stream_id, self.sender.site, to
            )
        return key

    def run(self, routes: dict[str, str], joiners: Joiners | None) -> list[TargetResult]:
        sender, session, source = self.sender, self.session, self.reader.streamer
        sender.replies.clear()  # replies to earlier sends, if any, are stale
        self.routes.update(routes)
        self._do(session.start_actions())
        log.info(
            "streaming %s %r (%s bytes, %s chunks) to %s as stream %s",
            source.kind,
            source.name,
            source.size,
            source.chunk_count,
            ", ".join(t.site for t in session.targets),
            self.stream_id,
        )
        while True:
            try:
                if joiners is not None:
                    self._take_joiners(joiners)
                if session.finished and (joiners is None or joiners.close_if_idle()):
                    break
                self._turn()
            except ConnectionLost as e:
                sender.recover(e, self.timeout)
                active = [t for t in session.targets if t.active]
                self._do(session.reconnected(time.monotonic()))
                log.info(
                    "reconnected to %s; %d target(s) go on", sender.connection.url, len(active)
                )
            except KeyboardInterrupt:  # tell every target now, not after its timeout
                with contextlib.suppress(ObjstreamError):  # an unusable connection: it times out
                    self._do(session.cancel(f"site {sender.site} was interrupted"))
                raise
            except (SourceChanged, OSError) as e:
                # What was read is not what is there now (or no longer reads): every target is
                # told at once, none verifies a mix of old and new bytes.
                log.error("%s %r: %s", source.kind, source.name, e)
                code = (
                    FailureCode.SOURCE_CHANGED if isinstance(e, SourceChanged) else FailureCode.IO
                )
                self._do(session.cancel(f"the source failed: {e}", code))
                break
        return self._results()

    def _take_joiners(self, joiners: Joiners) -> None:
        for site, reply_to in joiners.take():
            self.routes[site] = reply_to
            self._do(self.session.add_target(site, time.monotonic()))

    def _results(self) -> list[TargetResult]:
        reader = self.reader
        complete = reader.count is not None and reader.digest.hashed == reader.count
        sha256 = reader.digest.hexdigest() if complete else ""
        results = [
            TargetResult(
                t.site, self.stream_id, t.error is None, reader.size, sha256, t.stored_as, t.error
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
        if session.finished:
            return  # every verdict is in: waiting for more events would only add latency
        sender.process_events(0 if more else POLL_INTERVAL)

    def _take_replies(self) -> None:
        replies = self.sender.replies
        while replies:
            message, delivery = replies.popleft()
            user = delivery.props.user_id
            try:
                now = time.monotonic()
                actions = self.session.receive(message, now, key=delivery.routing_key, user=user)
            except ProtocolError as e:  # forged, or no reply at all
                delivery.reject(str(e))
                continue
            delivery.ack()
            self._do(actions)

    # -- actions ----------------------------------------------------------------------------------

    def _do(self, actions: list[Action]) -> None:
        sender = self.sender
        for action in actions:
            match action:
                case PublishChunk(seq=seq, to=to):
                    self._publish_chunk(seq, to)
                case PublishOffer():
                    self._publish_offer(action.offer, action.expiration_ms)
                case PublishEnd(to=to):
                    self._publish_end(to)
                case PublishAbort(to=to, reason=reason):
                    abort = Abort(stream_id=self.stream_id, reason=reason[:2000])
                    sender.publish(self._key(to), b"", envelope(abort))
                case ReleaseBefore(seq=seq):
                    self.reader.release_before(seq)
                case ReportProgress():
                    self._report(action)
                case TargetFinished():
                    pass  # the session's table holds the outcome; logged there
                case NewChannel(site=site):
                    sender.new_channel(f"nothing from {site} through two resends")

    def _publish_offer(self, offer: Offer, expiration_ms: int) -> None:
        sender = self.sender
        body = self.inline_body if offer.inline is not None else b""
        # An offer nobody took within the timeout is void: the sender has given up by then.
        props = envelope(offer, reply_to=sender.reply_to, expiration_s=expiration_ms / 1000)
        sender.expect_replies_from(offer.target)
        requester = self.routes.get(offer.target)
        if requester is not None:  # a retrieval: to the requester's reply queue
            sender.publish(sender.topology.reply_key(requester, sender.site), body, props)
        else:
            sender.declare_inbox(offer.target)
            sender.publish(sender.topology.offer_key(offer.target), body, props)

    def _publish_chunk(self, seq: int, to: str | None) -> None:
        piece = self.reader.get(seq)
        if piece is None:  # an iterator ran out: now the number of pieces is known
            assert self.reader.count is not None
            self.session.source_ended(self.reader.count)
            return
        header = Chunk(
            stream_id=self.stream_id,
            seq=seq,
            crc32=checksum.crc32(piece.data),
            meta=dict(piece.meta) if piece.meta else None,
        )
        persistent = self.sender.settings.persistent_chunks
        props = envelope(header, persistent=persistent, message_id=f"{self.stream_id}:{seq}")
        self.sender.publish(self._key(to), piece.data, props)

    def _publish_end(self, to: str | None) -> None:
        reader = self.reader
        reader.streamer.check_unchanged()  # the digest must be of what is there
        assert reader.count is not None
        assert reader.digest.hashed == reader.count
        end = End(
            stream_id=self.stream_id,
            chunk_count=reader.count,
            size=reader.size,
            sha256=reader.digest.hexdigest(),
        )
        self.sender.publish(self._key(to), b"", envelope(end))

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
