"""The streams a receiver (or a retriever) works on: one :class:`ReceiveSession` each, read
from the stream's own channel.

The table is where deliveries and clock ticks meet the sessions: it consumes each stream's data
queue, feeds what arrives (and the time) to the stream's session, and hands the actions that
come back to the executor (:class:`~objstream.consumer.actions.StreamActions`). It remembers
the streams that ended lately (a repeated offer is a duplicate), keeps ended streams until
their sessions have retired their data queues, and holds the outcomes for its owner
(:class:`~objstream.consumer.receiver.Receiver` or
:class:`~objstream.consumer.retriever.Retriever`). The policy (what is written, acked,
reported, dead-lettered, when a stream fails or lingers) is the sessions'.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from functools import partial
from typing import Any

from objstream.common.admission import Refuse
from objstream.common.amqp import Channel, Connection, Delivery
from objstream.common.errors import (
    BrokerRefused,
    FailureCode,
    ObjstreamError,
    OfferRefused,
    SenderGone,
    TransferFailed,
)
from objstream.common.federation import route_settle
from objstream.common.protocol import Offer
from objstream.common.reassembly import Reassembler, State
from objstream.common.receive_actions import (
    KEEP_PREFIX_ON,
    Ack,
    Finished,
    SendProgress,
    SendVerdict,
    Terms,
)
from objstream.common.receive_end import crowded_out
from objstream.common.receive_session import ReceiveSession
from objstream.common.settings import Settings
from objstream.common.slots import Slots
from objstream.common.streaming import ProgressHook
from objstream.common.topology import Topology
from objstream.consumer.actions import StreamActions
from objstream.consumer.held import HeldIndex
from objstream.consumer.offload import Offload
from objstream.consumer.streams import Received, Save, Stream

log = logging.getLogger(__name__)

RECENT_STREAMS = 4096  # finished stream ids remembered, to drop late duplicates quietly
INBOX_HOLD = 4
"""Offers that may wait in the inbox's prefetch per stream slot (:mod:`objstream.common.slots`)."""


class StreamTable:
    """Streams in progress, their sessions, and the outcomes of those that ended."""

    def __init__(
        self,
        site: str,
        settings: Settings,
        topology: Topology,
        *,
        progress: ProgressHook | None = None,
        save: Save | None = None,
        held: HeldIndex | None = None,
    ) -> None:
        self.site = site
        self.settings = settings
        self.topology = topology
        self.streams: dict[str, Stream] = {}
        self.outcomes: deque[Received | TransferFailed] = deque()
        self.slots = Slots(
            settings.max_streams,
            settings.user_share,
            hold_capacity=INBOX_HOLD * settings.max_streams,
        )
        """The stream slots of pushes, shared fairly between broker users."""
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._ended: list[Stream] = []  # until their sessions retired their data queues
        self._contact_due: dict[str, float] = {}
        """Streams whose first contact waits (monotonic time it is due): see :meth:`start`."""
        self.offload = Offload(takers=settings.max_streams)
        self.actions = StreamActions(
            site,
            settings,
            topology,
            self.offload,
            progress=progress,
            save=save,
            finished=self._finished,
            reconsume=self._reconsume,
        )
        self.held = self.actions.held_chunks.index = held
        """What the destination holds (delta transfers), if the receiver keeps an index."""
        self._connection: Connection | None = None
        self.redelivered = 0
        """Chunks the broker delivered again (after a lost channel or connection)."""

    def bind(self, connection: Connection, control: Channel) -> None:
        """The (new) connection and the channel progress and verdicts are published on."""
        self._connection = connection
        self.actions.bind(connection, control)
        self.offload.bind(connection)

    def __len__(self) -> int:
        return len(self.streams)

    def known(self, stream_id: str) -> bool:
        """The stream is in progress here, or ended lately (a duplicate offer)."""
        return stream_id in self.streams or stream_id in self._recent

    def window(self, offer: Offer) -> int:
        """The prefetch for a stream: the receiver's own bound, whatever the offer asks for."""
        return min(offer.window, self.settings.receive_window)

    def session(
        self,
        reassembler: Reassembler,
        *,
        user: str | None,
        timeout: float | None = None,
        checkpoints: bool = False,
        keeps_prefix: bool = False,
    ) -> ReceiveSession:
        settings = self.settings
        terms = Terms(
            timeout=settings.timeout if timeout is None else timeout,
            window=self.window(reassembler.offer),
            checkpoints=checkpoints,
            keeps_prefix=keeps_prefix,
            contact_timeout=settings.contact_timeout,
            delta=self.held is not None and self.held.wanted(reassembler.offer, user),
        )
        return ReceiveSession(reassembler, self.site, terms, now=time.monotonic(), user=user)

    # -- adding streams ---------------------------------------------------------------------------

    def consume(self, stream: Stream, *, declare: bool = True) -> None:
        """Start reading the stream's data queue on a channel of its own.

        The target declares its data queue (``NS.data.SITE.ID``) and binds it to the sender's
        keys for the stream (``declare``); a receiver that takes a stream over only looks for
        the queue its predecessor declared (``declare`` False): if it is gone, so is the sender.

        Raises:
            BrokerRefused: the data queue is gone (NOT_FOUND), or the broker refused it.
        """
        assert self._connection is not None
        channel = stream.channel = self._connection.channel()
        stream.generation += 1
        offer = stream.offer
        queue = self.topology.data_queue(self.site, offer.stream_id)
        try:
            channel.qos(self.window(offer))
            if declare:
                backlog = int(self.settings.backlog_windows * offer.window * offer.chunk_size)
                self.topology.declare_data_queue(
                    channel,
                    self.site,
                    offer.stream_id,
                    offer.sender,
                    max(backlog, offer.chunk_size),
                )
            else:
                channel.declare_queue(queue, passive=True)
                # Bound again: a predecessor killed between declaring and binding it left a
                # queue nothing is routed to (the sender's resends were lost, the takeover
                # timed out waiting).
                self.topology.bind_data_queue(channel, self.site, offer.stream_id, offer.sender)
            stream.consumer_tag = channel.consume(queue, partial(self._on_data, stream))
        except BrokerRefused:
            channel.close()
            raise
        self.streams[offer.stream_id] = stream

    def start(self, stream: Stream, offer_headers: Mapping[str, Any] | None = None) -> None:
        """First contact: the sender may go on (or resend) from what is stored.

        If the offer (its ``offer_headers``) crossed a federation link, not before
        ``route_settle`` seconds: the data queue's bindings reach the sender's broker a little
        later, and a chunk published before they do would not come here. The session sends
        nothing before its first contact, so the stream simply waits; :meth:`tick` starts it."""
        settle = route_settle(offer_headers, self.settings.route_settle)
        if settle > 0:
            self._contact_due[stream.offer.stream_id] = time.monotonic() + settle
            return
        self.actions.run(stream, stream.session.start())

    def _start_due(self, now: float) -> None:
        for sid, due in list(self._contact_due.items()):
            stream = self.streams.get(sid)
            if stream is None or stream.closing:
                del self._contact_due[sid]
            elif now >= due:
                del self._contact_due[sid]
                self.actions.run(stream, stream.session.start())

    def take_inline(self, stream: Stream, body: bytes) -> None:
        """A small object that came whole inside its offer."""
        assert stream.offer.inline is not None
        self.streams[stream.offer.stream_id] = stream
        self.actions.run(stream, stream.session.inline(stream.offer.inline, body))

    def refuse(self, refusal: Refuse) -> None:
        """Answer an offer this receiver does not take with a failed verdict."""
        sid, sender = refusal.stream_id, refusal.sender
        # Reported to the caller (an outcome): a warning would say it twice on a command line.
        log.info("refusing stream %s from %s: %s", sid, sender, refusal.detail)
        self.actions.publish_verdict(refusal.reply_to, refusal.verdict(self.site))
        self.remember(sid)
        self.outcomes.append(OfferRefused(sender, sid, refusal.code, refusal.detail))

    def remember(self, stream_id: str) -> None:
        self._recent[stream_id] = None
        while len(self._recent) > RECENT_STREAMS:
            self._recent.popitem(last=False)

    # -- events -----------------------------------------------------------------------------------

    def _on_data(self, stream: Stream, delivery: Delivery) -> None:
        props = delivery.props
        envelope = delivery.envelope
        self.redelivered += delivery.redelivered
        actions = stream.session.delivery(
            delivery.tag,
            props.type,
            props.headers,
            delivery.body,
            envelope=envelope,
            now=time.monotonic(),
        )
        delivery.settled = True  # acked (or rejected) by the session's actions, by tag
        self.actions.run(stream, actions)

    def tick(self) -> None:
        """Between event batches: time-outs and flushes; ended streams linger, then go."""
        self.offload.drain()
        now = time.monotonic()
        if self._contact_due:
            self._start_due(now)
        for sid, stream in list(self.streams.items()):
            if not stream.closing:
                self.actions.run(stream, stream.session.tick(now))
            if stream.closing:
                del self.streams[sid]
                self.slots.release(sid)
                self.remember(sid)
                self._ended.append(stream)
        crowded = {id(end) for end in crowded_out([s.session.end for s in self._ended])}
        for stream in self._ended:
            session = stream.session
            actions = session.retire(now) if id(session.end) in crowded else session.tick(now)
            self.actions.run(stream, actions)
        self._ended = [s for s in self._ended if not s.session.gone]

    def reconnected(self) -> None:
        """After a reconnect: consume each stream again on the new connection, and ask for
        what may have been lost with the broker."""
        now = time.monotonic()
        for stream in list(self.streams.values()):
            if stream.closing or stream.channel is None:
                continue
            actions = stream.session.reconnected(now)
            if self._consume_again(stream):
                self.actions.run(stream, actions)

    def _reconsume(self, stream: Stream) -> None:
        log.warning(
            "stream %s: nothing from its data queue %.0f s after a reconnect; consuming it again",
            stream.offer.stream_id,
            stream.session.reconsume_after,
        )
        if stream.channel is not None:
            with contextlib.suppress(ObjstreamError):
                stream.channel.close()  # what it held unacked is redelivered
        self._consume_again(stream)

    def _consume_again(self, stream: Stream) -> bool:
        """Consume the stream's data queue on a new channel (after a reconnect); False if the
        queue is gone, which fails the stream."""
        try:
            self.consume(stream)
        except BrokerRefused:
            self.actions.run(stream, stream.session.queue_lost())
            return False
        return True

    def fail(self, stream: Stream, code: FailureCode, detail: str) -> None:
        self.actions.run(stream, stream.session.fail(code, detail))

    def interrupt(self, stream: Stream, reason: str) -> None:
        """Give ``stream`` up from outside (see :meth:`ReceiveSession.interrupted`)."""
        self.actions.run(stream, stream.session.interrupted(reason))

    def suspend(self, stream: Stream) -> None:
        """Leave the stream on disk for the next receiver (or fail it if it cannot be left)."""
        self.actions.run(stream, stream.session.suspend(time.monotonic()))
        if stream.session.state is State.SUSPENDED:
            del self.streams[stream.offer.stream_id]
            self.slots.release(stream.offer.stream_id)
            if stream.channel is not None:
                stream.channel.close()  # nothing unacked is lost: the broker requeues it
            log.info(
                "left stream %s (%r) at chunk %d for the next receiver",
                stream.offer.stream_id,
                stream.offer.name,
                stream.reassembler.stored,
            )

    # -- closing ----------------------------------------------------------------------------------

    def close(self, checkpoint: bool, reason: str) -> None:
        """Stop every stream while the connection is open: ``checkpoint`` leaves those kept on
        disk for the next receiver, the others fail (``reason``) and their senders are told;
        disk work finishes with the connection served, and the data queues of ended streams
        are retired at once."""
        assert self._connection is not None
        serve = self._connection.process_events
        self.offload.settle(serve)
        self.tick()
        for stream in list(self.streams.values()):
            if stream.closing:
                continue
            if checkpoint:
                self.suspend(stream)
            else:
                self.actions.run(stream, stream.session.stopped(reason))
        self.offload.settle(serve)
        self.tick()
        now = time.monotonic()
        for stream in self._ended:
            self.actions.run(stream, stream.session.close_out(now))
        self._ended.clear()

    def abandon(self, reason: str | None) -> None:
        """The connection is gone as we close: end open streams on disk alone, as fail (or,
        ``reason`` None, suspend) would: a verified prefix kept; nobody can be told."""
        self.offload.settle_offline()
        for stream in [s for s in self.streams.values() if not s.closing]:
            s = stream.session
            ending = s.stopped(reason) if reason else s.suspend(time.monotonic())
            offline = [a for a in ending if not isinstance(a, Ack | SendProgress | SendVerdict)]
            stream.pending.clear()
            stream.generation += 1  # no tag of the dead channel is acked
            self.actions.run(stream, offline)
        self.offload.settle_offline()

    def shut_down(self) -> None:
        """Finish the disk work still queued and stop the threads (when closing)."""
        self.offload.shut_down()

    # -- outcomes ---------------------------------------------------------------------------------

    def _finished(self, stream: Stream, finished: Finished) -> None:
        stream.closing = True  # the channel is closed outside its own callback
        offer = stream.offer
        if finished.ok:
            assert stream.received is not None
            item = stream.received
            log.info(
                "stored %s %r from %s (%d bytes)%s",
                offer.kind,
                offer.name,
                offer.sender,
                item.size,
                f" as {item.path}" if item.path else "",
            )
            self.outcomes.append(item)
            return
        assert finished.code is not None
        log.info(  # an outcome the caller is given
            "stream %s from %s failed (%s): %s",
            offer.stream_id,
            offer.sender,
            finished.code,
            finished.detail,
        )
        # Taken over from an earlier receiver, and its sender has gone: nothing arrived.
        gone = stream.taken_over and finished.code in KEEP_PREFIX_ON
        failed = SenderGone if gone else TransferFailed
        self.outcomes.append(failed(offer.sender, offer.stream_id, finished.code, finished.detail))
