"""The streams a receiver (or a retriever) works on: one :class:`ReceiveSession` each, driven
over the stream's own channel.

The table is the thin driver of the sessions: it parses deliveries, feeds them in and carries
out the actions that come back (write, checkpoint, ack, progress, dead-letter, commit, verdict),
and at each tick lets the sessions time out and flush. It decides nothing about the protocol
itself. Its owner (:class:`~objstream.consumer.receiver.Receiver` or
:class:`~objstream.consumer.retriever.Retriever`) adds streams and reads the outcomes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from objstream.common.amqp import Channel, Connection, Delivery, dead_letter
from objstream.common.errors import (
    BrokerRefused,
    FailureCode,
    ObjstreamError,
    ProtocolError,
    SenderGone,
    TransferFailed,
)
from objstream.common.protocol import Done, Offer, Progress, envelope, parse
from objstream.common.reassembly import Reassembler, State
from objstream.common.receive_session import (
    KEEP_PREFIX_ON,
    Ack,
    Action,
    Checkpoint,
    Commit,
    DeadLetter,
    Discard,
    Finished,
    LeaveOnDisk,
    ReceiveSession,
    Reconsume,
    RemoveCheckpoint,
    SendProgress,
    SendVerdict,
    Write,
)
from objstream.common.settings import Settings
from objstream.common.streaming import ProgressHook
from objstream.common.tls import broker_user
from objstream.common.topology import Topology
from objstream.consumer.streams import Received, Stream

log = logging.getLogger(__name__)

RECENT_STREAMS = 4096  # finished stream ids remembered, to drop late duplicates quietly
LINGER = 15.0
"""Seconds a data queue is still consumed after the verdict (a resend there gets the verdict
again), for at most MAX_LINGERING streams (a channel each): beyond, the oldest is retired."""
MAX_LINGERING = 64
RETIRE_AFTER = 2.0
"""Seconds between unbinding the data queue of a stream that ended and deleting it. A publish
the broker routed to a quorum queue while it was being deleted (with one of its nodes down)
crashed the publisher's channel on RabbitMQ 3.10; unbound first, the queue gets none."""

Save = Callable[[Received], Received]
"""Runs as part of the commit, before the verdict: puts a received object where its user finds
it (a container into a ``.npz``...) and returns the record to hand out. If it raises
(``OSError``, :class:`ObjstreamError`) the transfer fails with code ``io`` at the sender too."""


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
    ) -> None:
        self.site = site
        self.settings = settings
        self.topology = topology
        self.streams: dict[str, Stream] = {}
        self.outcomes: deque[Received | TransferFailed] = deque()
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._progress = progress
        self._save = save
        self._user = broker_user(settings)  # every message we publish carries it (v2)
        self._connection: Connection | None = None
        self._control: Channel | None = None
        self._lingering: dict[str, tuple[Stream, float]] = {}  # ended, and until when
        self._retiring: dict[str, float] = {}  # unbound data queues, and when to delete them
        # One disk thread: commits (finish, decode, fsync, save), fsync of a prefix kept or left
        # for a successor, removal of partial files. FIFO, so settle() waits for all of it.
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="objstream-disk")
        self._results: queue.SimpleQueue[tuple[Stream, Received | tuple[FailureCode, str]]] = (
            queue.SimpleQueue()
        )

    def bind(self, connection: Connection, control: Channel) -> None:
        """The (new) connection and the channel progress and verdicts are published on."""
        self._connection = connection
        self._control = control

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
        timeout: float | None = None,
        checkpoints: bool = False,
        keeps_prefix: bool = False,
    ) -> ReceiveSession:
        return ReceiveSession(
            reassembler,
            self.site,
            now=time.monotonic(),
            timeout=self.settings.timeout if timeout is None else timeout,
            window=self.window(reassembler.offer),
            checkpoints=checkpoints,
            keeps_prefix=keeps_prefix,
        )

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
        offer = stream.offer
        queue = self.topology.data_queue(self.site, offer.stream_id)
        try:
            channel.qos(self.window(offer))
            if declare:
                self.topology.declare_data_queue(channel, self.site, offer.stream_id, offer.sender)
            else:
                channel.declare_queue(queue, passive=True)
            stream.consumer_tag = channel.consume(queue, partial(self._on_data, stream))
        except BrokerRefused:
            channel.close()
            raise
        self.streams[offer.stream_id] = stream

    def start(self, stream: Stream) -> None:
        """First contact: the sender may go on (or resend) from what is stored."""
        self.run(stream, stream.session.start())

    def take_inline(self, stream: Stream, body: bytes) -> None:
        """A small object that came whole inside its offer."""
        assert stream.offer.inline is not None
        self.streams[stream.offer.stream_id] = stream
        self.run(stream, stream.session.inline(stream.offer.inline, body))

    def refuse(self, offer: Offer, reply_to: str, code: FailureCode, detail: str) -> None:
        """Answer an offer this receiver does not take with a failed verdict."""
        log.warning("refusing stream %s from %s: %s", offer.stream_id, offer.sender, detail)
        done = Done(stream_id=offer.stream_id, site=self.site, ok=False, code=code, detail=detail)
        self._publish(reply_to, done, persistent=True)
        self.remember(offer.stream_id)
        self.outcomes.append(TransferFailed(offer.sender, offer.stream_id, code, detail))

    def remember(self, stream_id: str) -> None:
        self._recent[stream_id] = None
        while len(self._recent) > RECENT_STREAMS:
            self._recent.popitem(last=False)

    # -- events -----------------------------------------------------------------------------------

    def _on_data(self, stream: Stream, delivery: Delivery) -> None:
        now = time.monotonic()
        tag = delivery.tag
        props = delivery.props
        if props.user_id != stream.user_id:
            # The broker vouches for user_id: this came from someone else than the offer did.
            reason = (
                f"{props.type} from user {props.user_id!r}, the offer came from user "
                f"{stream.user_id!r}"
            )
            self.run(stream, stream.session.malformed(tag, reason, now), delivery)
            return
        try:
            message = parse(props.type, props.headers)
        except ProtocolError as e:
            actions = stream.session.malformed(tag, str(e), now)
        else:
            actions = stream.session.receive(tag, message, delivery.body, now)
        self.run(stream, actions, delivery)

    def tick(self) -> None:
        """Between event batches: time-outs and flushes; close the streams that ended."""
        self.drain()
        now = time.monotonic()
        for sid, stream in list(self.streams.items()):
            if not stream.closing:
                self.run(stream, stream.session.tick(now))
            if stream.closing:
                del self.streams[sid]
                self.remember(sid)
                if stream.channel is not None:  # inline streams have none
                    self._lingering[sid] = (stream, now + LINGER)
        self.retire(now)

    def _retire(self, stream: Stream) -> None:
        """Unbind the data queue of a stream that ended (late resends are then unroutable) and
        close its channel; the queue is deleted :data:`RETIRE_AFTER` s later (by us: least
        privilege does not let the sender)."""
        assert stream.channel is not None
        assert self._connection is not None
        sid = stream.offer.stream_id
        # On the stream's own channel (a new one after a reconnect): a refusal closes only it.
        channel = stream.channel if stream.channel.is_open else self._connection.channel()
        try:
            self.topology.unbind_data_queue(channel, self.site, sid, stream.offer.sender)
        except ObjstreamError as e:
            log.warning("stream %s: could not unbind its data queue (%s)", sid, e)
        channel.close()
        self._retiring[self.topology.data_queue(self.site, sid)] = time.monotonic() + RETIRE_AFTER

    def retire(self, now: float | None = None) -> None:
        """Retire the ended streams whose :data:`LINGER` is over and delete the data queues
        retired :data:`RETIRE_AFTER` ago (``now`` None: all of them, at once)."""
        assert self._control is not None
        for sid, (stream, until) in list(self._lingering.items()):
            if now is None or now >= until or len(self._lingering) > MAX_LINGERING:
                del self._lingering[sid]
                self._retire(stream)
        for name, due in list(self._retiring.items()):
            if now is None or now >= due:
                self._control.delete_queue(name)
                del self._retiring[name]

    def reconnected(self) -> None:
        """After a reconnect: consume each stream again on the new connection, and ask for
        what may have been lost with the broker."""
        now = time.monotonic()
        for stream in list(self.streams.values()):
            if stream.closing or stream.channel is None:
                continue
            actions = stream.session.reconnected(now)
            if self._consume_again(stream):
                self.run(stream, actions)

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
            self.fail(stream, FailureCode.PROTOCOL, "the data queue is gone after a reconnect")
            return False
        return True

    def fail(self, stream: Stream, code: FailureCode, detail: str) -> None:
        self.run(stream, stream.session.fail(code, detail))

    def suspend(self, stream: Stream) -> None:
        """Leave the stream on disk for the next receiver (or fail it if it cannot be left)."""
        self.run(stream, stream.session.suspend(time.monotonic()))
        if stream.session.state is State.SUSPENDED:
            del self.streams[stream.offer.stream_id]
            if stream.channel is not None:
                stream.channel.close()  # nothing unacked is lost: the broker requeues it
            log.info(
                "left stream %s (%r) at chunk %d for the next receiver",
                stream.offer.stream_id,
                stream.offer.name,
                stream.reassembler.stored,
            )

    # -- carrying actions out ---------------------------------------------------------------------

    def run(self, stream: Stream, actions: list[Action], delivery: Delivery | None = None) -> None:
        """Carry ``actions`` out in order; one that fails replaces the rest with the session's
        answer to the failure (as does a commit, with its outcome)."""
        for action in actions:
            follow = self._do(stream, action, delivery)
            if follow is not None:
                self.run(stream, follow, delivery)
                return

    def _do(self, stream: Stream, action: Action, delivery: Delivery | None) -> list[Action] | None:
        if isinstance(action, Write):
            return self._write(stream, action)
        if isinstance(action, Commit):
            return self._commit(stream)
        if isinstance(action, Ack):
            assert stream.channel is not None
            stream.channel.ack(action.tag, multiple=action.multiple)
        elif isinstance(action, SendProgress):
            self._send_progress(stream, action)
        elif isinstance(action, Reconsume):
            self._reconsume(stream)
        elif isinstance(action, DeadLetter):
            assert delivery is not None
            assert self._control is not None
            dead_letter(self._control, self.topology, delivery, action.reason)
        else:
            self._do_state(stream, action)
        return None

    def _do_state(self, stream: Stream, action: Action) -> None:
        """The actions on what is kept: state file, partial object, verdict, outcome."""
        if isinstance(action, Checkpoint):
            if stream.state is not None:
                stream.state.save(action.stored, action.stored_bytes)
        elif isinstance(action, RemoveCheckpoint):
            if stream.state is not None:
                stream.state.remove()
        elif isinstance(action, Discard):
            what = f"discarding stream {stream.offer.stream_id}"
            self._on_disk(what, partial(_discard, stream))
        elif isinstance(action, LeaveOnDisk):
            what = f"keeping stream {stream.offer.stream_id} on disk"
            self._on_disk(what, stream.leave_on_disk)  # syncs the partial file
        elif isinstance(action, SendVerdict):
            self._publish(stream.reply_to, action.done, persistent=True)
        elif isinstance(action, Finished):
            self._finished(stream, action)

    def _write(self, stream: Stream, write: Write) -> list[Action] | None:
        try:
            stream.assembler.take(write.offset, write.body, write.meta)
            return None
        except ProtocolError as e:
            return stream.session.write_failed(FailureCode.PROTOCOL, str(e))
        except OSError as e:
            detail = f"storing chunk {write.seq}: {e.strerror or e}"
            return stream.session.write_failed(FailureCode.IO, detail)
        except Exception as e:  # an on_entry callback or a custom assembler failed
            log.debug("assembler failed", exc_info=True)
            detail = f"the receiving side failed: {e!r}"
            return stream.session.write_failed(FailureCode.REFUSED, detail)

    def _commit(self, stream: Stream) -> list[Action]:
        """Finish the object on the commit thread (decoding a spooled container, fsync, the
        save can take long); :meth:`drain` hands the outcome to the session."""
        self._disk.submit(self._finish_object, stream)
        return []

    def _finish_object(self, stream: Stream) -> None:
        """On the commit thread: finish and save; the session is told on the connection's."""
        result: Received | tuple[FailureCode, str]
        try:
            result = self._finished_object(stream)
        except OSError as e:
            result = (FailureCode.IO, f"committing: {e.strerror or e}")
        except ObjstreamError as e:
            result = (FailureCode.PROTOCOL, str(e))
        except Exception as e:  # an on_entry callback or a custom assembler failed
            log.debug("assembler failed", exc_info=True)
            result = (FailureCode.REFUSED, f"the receiving side failed: {e!r}")
        self._results.put((stream, result))
        try:
            assert self._connection is not None
            self._connection.call_threadsafe(self._drained)  # wakes the event loop
        except ObjstreamError:  # the connection is gone: the next tick drains
            log.debug("cannot wake the connection", exc_info=True)

    def _finished_object(self, stream: Stream) -> Received | tuple[FailureCode, str]:
        offer, session = stream.offer, stream.session
        value = stream.assembler.finish()
        received = Received(
            offer.stream_id,
            offer.kind,
            offer.name,
            session.stored_bytes,
            session.reassembler.sha256,
            offer.sender,
            path=value if isinstance(value, Path) else None,
            value=value,
            info=dict(offer.info or {}),
            resumed_bytes=stream.resumed_bytes,
            sender_user=stream.user_id,
        )
        if self._save is not None:
            try:
                received = self._save(received)
            except (ObjstreamError, OSError) as e:
                return (FailureCode.IO, f"saving: {e}")
        return received

    def drain(self) -> bool:
        """On the connection's thread: hand finished commits to their sessions. Returns whether
        there were any."""
        handled = False
        while True:
            try:
                stream, result = self._results.get_nowait()
            except queue.Empty:
                return handled
            handled = True
            if isinstance(result, tuple):
                self.run(stream, stream.session.commit_failed(*result))
                continue
            stream.received = result
            offer = stream.offer
            if self._progress is not None:
                self._progress(offer.sender, offer.stream_id, result.size, result.size)
            self.run(stream, stream.session.committed(result.value, result.path))

    def _drained(self) -> None:
        self.drain()

    def settle(self) -> None:
        """Wait for the disk work under way, and hand finished commits to their sessions."""
        while True:
            self._disk.submit(lambda: None).result()
            if not self.drain():
                return

    def abandon(self, reason: str | None) -> None:
        """The connection is gone as we close: end open streams on disk alone, as fail (or,
        ``reason`` None, suspend) would: a verified prefix kept; nobody can be told."""
        for stream in [s for s in self.streams.values() if not s.closing]:
            s = stream.session
            ending = s.fail(FailureCode.ABORTED, reason) if reason else s.suspend(time.monotonic())
            for action in ending:
                if not isinstance(action, Ack | SendProgress | SendVerdict):
                    self._do_state(stream, action)

    def shut_down(self) -> None:
        """Finish the disk work still queued and stop the disk thread (when closing)."""
        self._disk.shutdown(wait=True)
        self.drain()

    def _on_disk(self, what: str, work: Callable[[], None]) -> None:
        """Run ``work`` on the disk thread; it concerns a stream that has ended here."""

        def guarded() -> None:
            try:
                work()
            except OSError as e:
                log.warning("%s: %s", what, e)

        self._disk.submit(guarded)

    def _send_progress(self, stream: Stream, action: SendProgress) -> None:
        offer = stream.offer
        progress = Progress(
            stream_id=offer.stream_id,
            site=self.site,
            stored=action.stored,
            resend_from=action.resend_from,
        )
        self._publish(stream.reply_to, progress, persistent=False)
        if self._progress is not None:
            self._progress(offer.sender, offer.stream_id, action.stored_bytes, offer.size)

    def _publish(self, reply_to: str, message: Done | Progress, *, persistent: bool) -> None:
        """An answer to ``reply_to`` (``reply:S:QID``): through the exchange, with the key
        that names this site as its publisher."""
        assert self._control is not None
        props = envelope(message, persistent=persistent, user_id=self._user)
        key = self.topology.reply_key(reply_to, self.site)
        self._control.publish(self.topology.exchange, key, b"", props)

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
        log.warning(
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


def _discard(stream: Stream) -> None:
    stream.assembler.discard()
    if stream.state is not None:
        stream.state.remove()
