"""The engine a :class:`~objstream.consumer.receiver.Receiver` and a
:class:`~objstream.consumer.retriever.Retriever` share: one connection, the streams, the
resume store, and what turns an accepted offer into a stream.

It is composed, not inherited: the receiver adds an
:class:`~objstream.consumer.inbox.Inbox` (offers from the site's inbox), the retriever a
:class:`~objstream.consumer.requests.RequestTracker` (requests, replies, early offers). Both are
:class:`Part` objects: told when the connection is (re)opened and ticked between event batches.
Whether an offer is taken is the :class:`~objstream.common.admission.Admission`'s to decide;
the core carries the decision out.

The connection is served either by the caller's thread, in :meth:`ConsumerCore.events` (the
default: the caller calls ``receive()`` often enough for heartbeats), or by a thread of its own
(``connection_thread=True``, dramatiq's way), so heartbeats never depend on the caller: then
every call into the core from the caller goes through :meth:`ConsumerCore.call`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar, Unpack

from objstream.common.admission import (
    Accept,
    Admission,
    Asked,
    Decision,
    Hold,
    Ignore,
    Refuse,
    Reject,
    Withdraw,
)
from objstream.common.amqp import Channel, Connection, Delivery, connect, reestablish
from objstream.common.errors import BrokerRefused, ConnectionLost
from objstream.common.identity import Identities
from objstream.common.protocol import CONTAINER_KIND, FILE_KIND, PIPE_KIND, Offer
from objstream.common.reassembly import Reassembler
from objstream.common.settings import Settings, check_site
from objstream.common.streaming import ObjectAssembler
from objstream.common.topology import Topology
from objstream.consumer.connection_thread import ConnectionThread
from objstream.consumer.container_assembler import ContainerAssembler
from objstream.consumer.container_sink import ContainerSink
from objstream.consumer.container_spool import ContainerSpool
from objstream.consumer.destination import check_destination
from objstream.consumer.file_sink import FileAssembler, pipe_assembler
from objstream.consumer.held import HeldIndex
from objstream.consumer.options import AssemblerFactory, ReceiverOptions, store_options
from objstream.consumer.resume import Resumable, StreamState
from objstream.consumer.stream_table import StreamTable
from objstream.consumer.streams import Stream
from objstream.consumer.takeover import LeftOver, Reopened, ResumeStore, keeps_prefix

log = logging.getLogger(__name__)

T = TypeVar("T")

CLEANUP_INTERVAL = 60.0  # seconds between looks for abandoned partial files
NEW_CONTROL_AFTER = 5.0  # seconds after a reconnect before answers go on a new channel


class Part(Protocol):
    """What a receiver or a retriever adds to the core."""

    def opened(self) -> None:
        """The connection is (re)opened: declare and consume what this part needs."""

    def tick(self) -> None:
        """Between event batches, on the connection's thread."""


class ConsumerCore:
    """One connection of a consuming site, its streams and its destination directory."""

    def __init__(
        self,
        site: str,
        dest: str | Path,
        settings: Settings | None = None,
        **options: Unpack[ReceiverOptions],
    ) -> None:
        check_site(site)
        on_entry = options.get("on_entry")
        spool_containers = options.get("spool_containers", False)
        as_torch = options.get("as_torch", False)
        self._store = store_options(options)
        self.settings = settings or Settings()
        if options.get("accept_from") is not None:
            accepted = tuple(options.get("accept_from") or ())
            self.settings = self.settings.model_copy(update={"accept_from": accepted})
        self.site = site
        self.dest = Path(dest)
        check_destination(self.dest)
        self.topology = Topology.from_settings(self.settings)
        self._on_entry = on_entry
        self._spool_containers = spool_containers
        if as_torch:  # refused now, not at the first entry
            from objstream.common.torch_bridge import torch_module

            torch_module()
        self._as_torch = as_torch
        self._assemblers: dict[str, AssemblerFactory] = {
            FILE_KIND: lambda offer: FileAssembler(self.dest, offer),
            PIPE_KIND: pipe_assembler(self.dest, int(self.settings.max_object_size)),
            CONTAINER_KIND: self._container_assembler,
            **(options.get("assemblers") or {}),
        }
        self.admission = Admission(
            site,
            frozenset(self._assemblers),
            int(self.settings.max_object_size),
            self.settings.accept_from,
            Identities.from_settings(self.settings),
        )
        self.table = StreamTable(
            site,
            self.settings,
            self.topology,
            progress=options.get("progress"),
            save=options.get("save"),
            held=HeldIndex(self.dest) if self.settings.delta else None,
        )
        self.store = ResumeStore(
            self.dest,
            self.settings,
            on_entry=on_entry,
            spool_containers=spool_containers,
            store=self._store,
            as_torch=as_torch,
        )
        self.parts: list[Part] = []
        self._next_cleanup = time.monotonic() + CLEANUP_INTERVAL
        self._new_control_at: float | None = None  # see _recover
        self._thread: ConnectionThread | None = (
            ConnectionThread(f"objstream-{site}") if options.get("connection_thread") else None
        )
        self.reconnects = 0
        """How often the connection was lost and re-established."""

    def start(self, parts: list[Part], left_over: LeftOver | None = None) -> None:
        """Connect, open the parts and go on with ``left_over`` streams (hashed before: no
        heartbeat waits for it). With a connection thread, all of it happens there."""
        if self._thread is not None:
            self._thread.start(lambda: self._start(parts, left_over), self._serve)
            return
        self._start(parts, left_over)

    def _start(self, parts: list[Part], left_over: LeftOver | None) -> None:
        self.parts = parts
        left_over = left_over or LeftOver([], [])
        try:
            self._connect()
        except BaseException:
            for item in left_over.streams:
                item.state.release()
                item.assembler.suspend()
            raise
        try:
            self._remove_ended_queues(left_over.ended)
            self._take_over(left_over.streams)
            for part in parts:
                part.tick()
        except BaseException:
            self.connection.close()
            raise

    def _connect(self) -> None:
        self.connection: Connection = connect(self.settings, f"objstream consumer {self.site}")
        try:
            self.topology.declare_base(self.connection, self.site)
            self.control: Channel = self.connection.channel()
            self.table.bind(self.connection, self.control)
            for part in self.parts:
                part.opened()
        except BaseException:
            self.connection.close()
            raise

    def close(self, checkpoint: bool) -> None:
        """Stop and disconnect; with ``checkpoint`` streams kept on disk are left for the next
        receiver of the directory, the others fail and their senders are told."""
        if self._thread is not None:
            self._thread.stop(lambda: self._close(checkpoint))
            return
        self._close(checkpoint)

    def _close(self, checkpoint: bool) -> None:
        reason = f"receiver of site {self.site} shut down"
        try:
            if self.connection.is_open:
                self.table.close(checkpoint, reason)
                self.connection.close()
        except (ConnectionLost, BrokerRefused):
            log.debug("connection already gone while closing", exc_info=True)
        finally:
            # A stream still open here lost its connection (a Ctrl-C inside pika): kept on disk.
            self.table.abandon(None if checkpoint else reason)
            self.table.shut_down()

    # -- the connection ---------------------------------------------------------------------------

    def events(self, time_limit: float) -> None:
        """Let the connection work for up to ``time_limit`` s (reconnecting if it was lost);
        with a connection thread, just wait that long for it to do something."""
        if self._thread is not None:
            self._thread.wait(time_limit)
            return
        self._serve(time_limit)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` where the connection lives (this thread, or the connection thread) and
        return its result, or raise what it raised."""
        if self._thread is None:
            return fn()
        return self._thread.call(fn)

    def _serve(self, time_limit: float) -> None:
        try:
            self.connection.process_events(time_limit)
            self._housekeeping()
        except ConnectionLost as e:
            self._recover(e)

    def _recover(self, error: BaseException) -> None:
        """Reconnect after a lost connection (broker restart...) and go on with every stream."""
        log.warning("connection to the broker lost (%s); reconnecting", error)

        def again() -> None:
            self.connection.close()  # what is left of an attempt that failed, if anything
            self._connect()
            # Inside the retry: on a cluster, consuming a quorum queue whose leader's node just
            # died can crash the channel and close the connection (RabbitMQ 3.10).
            self.table.reconnected()

        reestablish(self.settings, self.settings.timeout, again)
        # On a cluster, a channel opened while a quorum queue (a sender's reply queue) elected
        # its new leader could route nothing more to it (RabbitMQ 3.10.8): progress and
        # verdicts go on a new channel once the election is surely over.
        self._new_control_at = time.monotonic() + NEW_CONTROL_AFTER
        self.reconnects += 1
        for part in self.parts:
            part.tick()
        log.info("reconnected to %s; %d stream(s) go on", self.connection.url, len(self.table))

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now > self._next_cleanup:
            self._next_cleanup = now + CLEANUP_INTERVAL
            self.store.cleanup()
        if self._new_control_at is not None and now > self._new_control_at:
            self._new_control_at = None
            old, self.control = self.control, self.connection.channel()
            self.table.bind(self.connection, self.control)
            old.close()
        self.table.tick()
        for part in self.parts:
            part.tick()

    # -- taking streams over ----------------------------------------------------------------------

    def _take_over(self, left_over: list[Reopened]) -> None:
        """Go on with the streams a dead receiver of this directory left."""
        for item in left_over:
            offer = item.offer
            refusal = self.admission.take_over(offer, item.user_id, pushed=item.pushed)
            if refusal is not None:
                log.warning("not resuming stream %s: %s", offer.stream_id, refusal)
                self.store.drop(item.assembler, item.state)
                continue
            stream = self._stream(item, self.settings.timeout)
            stream.taken_over = True
            try:
                # The queue the dead receiver declared: if it is gone, so is the sender.
                self.table.consume(stream, declare=False)
            except BrokerRefused:
                self._queue_gone(stream, item)
                continue
            log.info(
                "resuming %s %r from %s at chunk %d of %s",
                offer.kind,
                offer.name,
                offer.sender,
                item.reassembler.stored,
                offer.chunk_count,
            )
            self.table.start(stream)  # tells the sender where to go on from

    def _remove_ended_queues(self, ended: list[Offer]) -> None:
        """Delete the data queues of streams that had ended when their receiver died (while
        its verdict lingered): nothing comes for them any more, and nothing would take what
        did. A queue somebody still consumes (a live receiver's linger) is left alone."""
        channel = self.connection.channel()
        try:
            for offer in ended:
                name = self.topology.data_queue(self.site, offer.stream_id)
                try:
                    channel.delete_queue(name, if_unused=True)
                except BrokerRefused as e:
                    log.debug("not deleting %s: %s", name, e)
                    channel.close()
                    channel = self.connection.channel()
        finally:
            channel.close()

    def _queue_gone(self, stream: Stream, item: Reopened) -> None:
        """A stream left on disk whose data queue is gone: so is its sender."""
        offer = stream.offer
        if keeps_prefix(stream.assembler):
            # What is verified stays, for a retrieval of the same file from that site to resume.
            log.info(
                "stream %s (%r from %s) has no data queue any more; its %d bytes are kept",
                offer.stream_id,
                offer.name,
                offer.sender,
                item.resumed_bytes,
            )
            stream.leave_on_disk(ended=True)
            return
        log.info(
            "stream %s (%r from %s) has no data queue any more; dropped",
            offer.stream_id,
            offer.name,
            offer.sender,
        )
        self.store.drop(stream.assembler, stream.state)

    def _stream(self, item: Reopened, timeout: float) -> Stream:
        session = self.table.session(
            item.reassembler,
            user=item.user_id,
            timeout=timeout,
            checkpoints=True,
            keeps_prefix=keeps_prefix(item.assembler),
        )
        return Stream(
            item.offer,
            item.reply_to,
            session,
            item.assembler,
            item.user_id,
            state=item.state,
            resumed_bytes=item.resumed_bytes,
        )

    # -- offers -----------------------------------------------------------------------------------

    def carry_out(
        self,
        decision: Decision,
        delivery: Delivery,
        *,
        timeout: float | None = None,
        requested: str | None = None,
        kept: Resumable | None = None,
    ) -> bool:
        """Carry out the admission's ``decision`` on an offer: start its stream, refuse it,
        dead-letter or ignore it (a :class:`Hold` is the caller's). Returns whether a stream
        started. A retrieval passes its own ``timeout``, the name it asked for and the kept
        prefix the stream may continue."""
        if isinstance(decision, Reject):
            delivery.reject(decision.reason)
        elif isinstance(decision, Ignore):
            log.debug("%s: ignored", decision.reason)
            delivery.ack()
        elif isinstance(decision, Refuse):
            if kept is not None and kept.state.locked:
                kept.state.release()  # not taken up: there for the next attempt
            self.table.refuse(decision)
            delivery.ack()
        elif isinstance(decision, Accept):
            started = self._open(
                decision, delivery, timeout=timeout, requested=requested, kept=kept
            )
            delivery.ack()
            return started
        else:
            raise AssertionError(f"{type(decision).__name__} is the caller's")
        return False

    def withdraw(self, withdraw: Withdraw) -> None:
        """The sender of a stream that started here gave up before it heard from us (its
        ``abort`` came by the inbox): the stream ends ``aborted``, if ``withdraw`` comes from
        the broker user its offer came from; anything else is ignored."""
        stream = self.table.streams.get(withdraw.stream_id)
        if (
            stream is None
            or stream.closing
            or not self.admission.withdraws(withdraw, stream.user_id)
        ):
            log.debug("abort of stream %s by %s: not ours", withdraw.stream_id, withdraw.user)
            return
        self.table.interrupt(stream, f"sender gave up: {withdraw.reason}")

    def _open(
        self,
        accept: Accept,
        delivery: Delivery,
        *,
        timeout: float | None,
        requested: str | None,
        kept: Resumable | None,
    ) -> bool:
        offer = accept.offer
        if kept is not None and accept.drop_kept:
            log.info(
                "%s %r comes whole (it changed at %s); dropping the %d bytes kept",
                offer.kind,
                offer.name,
                offer.sender,
                kept.stored_bytes,
            )
            kept.discard()
            kept = None
        if kept is None and offer.inline is None and not self.store.clear(offer.stream_id):
            log.info("stream %s is already taken over by another receiver", offer.stream_id)
            return False  # a duplicate delivery of its offer
        try:
            stream = self._new_stream(accept, timeout=timeout, requested=requested, kept=kept)
        except Exception as e:
            if kept is not None and kept.state.locked:
                kept.state.release()
            self.table.refuse(self.admission.storage_failed(offer, accept.reply_to, accept.user, e))
            return False
        if offer.inline is not None:
            self.table.take_inline(stream, delivery.body)
            return True
        try:
            self.table.consume(stream)
        except BrokerRefused as e:
            self.store.drop(stream.assembler, stream.state)
            self.table.refuse(self.admission.storage_failed(offer, accept.reply_to, accept.user, e))
            return False
        # The data queue is declared and bound: the first progress tells the sender to go on.
        log.info(
            "receiving %s %r (%s bytes) from %s (user %s) as stream %s",
            offer.kind,
            offer.name,
            offer.size,
            offer.sender,
            accept.user,
            offer.stream_id,
        )
        self.table.start(stream, delivery.props.headers)  # first contact: the sender goes on
        return True

    def _new_stream(
        self,
        accept: Accept,
        *,
        timeout: float | None,
        requested: str | None,
        kept: Resumable | None,
    ) -> Stream:
        """The stream of an accepted offer (its assembler, reassembler and state file).

        Raises:
            OSError, ProtocolError, Exception: it cannot be set up here (the partial file, the
                state file, an assembler that refuses the offer).
        """
        offer, reply_to, user = accept.offer, accept.reply_to, accept.user
        timeout = self.settings.timeout if timeout is None else timeout
        if kept is not None:
            return self._stream(self.store.adopt(offer, reply_to, kept, user), timeout)
        assembler = self._assemblers[offer.kind](offer)
        reassembler = Reassembler(offer)
        reassembler.accept()
        state = None
        if assembler.resumable and offer.inline is None:
            try:  # what a receiver started after a crash needs to take over
                state = StreamState.create(self.dest, offer, reply_to, requested, user)
            except OSError:
                assembler.discard()
                raise
        session = self.table.session(
            reassembler,
            user=user,
            timeout=timeout,
            checkpoints=state is not None,
            keeps_prefix=keeps_prefix(assembler),
        )
        return Stream(offer, reply_to, session, assembler, user, state=state)

    def asked(self, owner: str, kept: Resumable | None) -> Asked:
        """What a retrieval from ``owner`` may continue: the facts of the kept prefix."""
        return Asked(owner, None if kept is None else kept.facts())

    def _container_assembler(self, offer: Offer) -> ObjectAssembler:
        if self._store is not None:
            return ContainerSink(self.dest, offer, self._store.name, as_memmap=self._store.memmap)
        if self._spool_containers and offer.inline is None:
            return ContainerSpool(self.dest, offer, self._on_entry, as_torch=self._as_torch)
        return ContainerAssembler(offer, self._on_entry, as_torch=self._as_torch)


__all__ = ["ConsumerCore", "Hold", "Part"]
