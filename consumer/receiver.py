"""``Receiver``: the receiving side of a site. Takes offers from the site's inbox and streams in.

One receiver holds one connection and works in the thread that calls :meth:`Receiver.receive`.
It is built from parts: a :class:`~objstream.consumer.stream_table.StreamTable` drives one
:class:`~objstream.common.receive_session.ReceiveSession` per stream on a channel of its own
(prefetch: the receiver's ``receive_window``, never more), a
:class:`~objstream.consumer.takeover.ResumeStore` holds state files and kept prefixes, and the
inbox (here) turns offers into streams. Chunks are judged by the session and written by the
stream's assembler; the receiver only moves bytes and messages between them and the broker.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Self

from objstream.common.amqp import Delivery, connect, dead_letter, reestablish
from objstream.common.errors import (
    BrokerRefused,
    ConfigError,
    ConnectionLost,
    ErrorCode,
    ProtocolError,
    TransferFailed,
)
from objstream.common.protocol import CONTAINER_KIND, FILE_KIND, Offer, parse
from objstream.common.reassembly import Reassembler
from objstream.common.settings import NAME_PATTERN, Settings
from objstream.common.streaming import ObjectAssembler, ProgressHook
from objstream.common.topology import Topology
from objstream.consumer.container_assembler import ContainerAssembler, OnEntry
from objstream.consumer.container_spool import ContainerSpool
from objstream.consumer.file_sink import FileAssembler
from objstream.consumer.resume import Resumable, StreamState
from objstream.consumer.stream_table import Save, StreamTable
from objstream.consumer.streams import Received, Stream
from objstream.consumer.takeover import Reopened, ResumeStore, continues, keeps_prefix

AssemblerFactory = Callable[[Offer], ObjectAssembler]

log = logging.getLogger(__name__)

CLEANUP_INTERVAL = 60.0  # seconds between looks for abandoned partial files


class Refusal(Exception):
    """An offer this receiver does not take: the sender gets ``code`` and ``detail``."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class Receiver:
    """Receives the objects streamed to ``site`` into the directory ``dest``.

    Use :meth:`receive` (or iterate) to get each object as it completes::

        with Receiver("site-1", "/data/in", settings) as receiver:
            item = receiver.receive(timeout=60)

    A stream that fails raises :class:`TransferFailed` from :meth:`receive`; the receiver itself
    goes on and can be asked for the next object.

    Files go to ``dest``; containers come back in :attr:`Received.value`, or entry by entry to
    ``on_entry`` (then they are not kept). With ``spool_containers`` a container goes to
    ``dest`` first and is decoded once complete, so that it survives this process like a file
    does (at the cost of its size on disk while in transit; see
    :mod:`objstream.consumer.container_spool`). ``assemblers`` adds custom kinds: a mapping from a
    kind name to a factory that takes the :class:`Offer` and returns an
    :class:`~objstream.common.streaming.ObjectAssembler`. ``save`` runs on each object once it is
    verified and before the sender is told it arrived (see
    :data:`~objstream.consumer.stream_table.Save`): a save that fails fails the transfer.
    """

    def __init__(
        self,
        site: str,
        dest: str | Path,
        settings: Settings | None = None,
        *,
        on_entry: OnEntry | None = None,
        assemblers: Mapping[str, AssemblerFactory] | None = None,
        progress: ProgressHook | None = None,
        spool_containers: bool = False,
        save: Save | None = None,
    ) -> None:
        if not re.match(NAME_PATTERN, site):
            raise ConfigError(f"invalid site name {site!r} (letters, digits, '_', '.', '-')")
        self.settings = settings or Settings()
        self.site = site
        self.dest = Path(dest)
        self.dest.mkdir(parents=True, exist_ok=True)
        if not self.dest.is_dir():
            raise ConfigError(f"destination {self.dest} is not a directory")
        self.topology = Topology.from_settings(self.settings)
        self._on_entry = on_entry
        self._spool_containers = spool_containers
        self._assemblers: dict[str, AssemblerFactory] = {
            FILE_KIND: lambda offer: FileAssembler(self.dest, offer),
            CONTAINER_KIND: self._container_assembler,
            **(assemblers or {}),
        }
        self._table = StreamTable(site, self.settings, self.topology, progress=progress,
                                  save=save)  # fmt: skip
        self._store = ResumeStore(self.dest, self.settings, on_entry=on_entry,
                                  spool_containers=spool_containers)  # fmt: skip
        self._next_cleanup = time.monotonic() + CLEANUP_INTERVAL
        self.reconnects = 0
        """How often the connection was lost and re-established."""
        # Hashing what a dead receiver left can take long: done before connecting, so that no
        # heartbeat waits for it.
        left_over = self._store.left_over() if self._listens else []
        try:
            self._connect()
        except BaseException:
            for item in left_over:
                item.state.release()
                item.assembler.suspend()
            raise
        try:
            self._take_over(left_over)
            self._resume_inbox()
        except BaseException:
            self._connection.close()
            raise

    _listens = True  # a Retriever takes no offers from the inbox and no streams over

    def _connect(self) -> None:
        self._connection = connect(self.settings, f"objstream consumer {self.site}")
        try:
            self._control = self._connection.channel()
            self.topology.declare_base(self._control)
            self._table.bind(self._connection, self._control)
            self._open_queues()
        except BaseException:
            self._connection.close()
            raise

    def _open_queues(self) -> None:
        """Declare and open what this receiver consumes besides data queues (its inbox)."""
        self._inbox_tag: str | None = None
        self._inbox = self.topology.declare_inbox(self._control, self.site)
        self._inbox_channel = self._connection.channel()
        # One offer at a time, acked once accepted: the limit on streams is exact.
        self._inbox_channel.qos(1)

    # -- public API -------------------------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Received | None:
        """Wait for the next object to complete; ``None`` if none did within ``timeout`` s.

        Raises:
            TransferFailed: the next stream to end failed (the partial file is gone).
            BrokerUnreachable: the broker connection was lost.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        outcomes = self._table.outcomes
        while not outcomes:
            wait = 0.2
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return None
            self._events(wait)
        outcome = outcomes.popleft()
        if isinstance(outcome, TransferFailed):
            raise outcome
        return outcome

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Receiver:
        return self

    def __next__(self) -> Received:
        item = self.receive()
        assert item is not None  # no timeout: receive() only returns with an object
        return item

    @property
    def active_streams(self) -> int:
        return len(self._table)

    def close(self, checkpoint: bool = True) -> None:
        """Stop and disconnect.

        With ``checkpoint`` (the default), file streams (and spooled containers) in progress
        are left for the next receiver of this site and directory: what was written is acked
        and recorded, and that receiver takes over from there (the sender waits, up to its
        timeout). Other streams fail and their senders are told.
        """
        try:
            self._table.settle()
            if self._connection.is_open:
                for stream in list(self._table.streams.values()):
                    if stream.closing:
                        continue
                    if checkpoint:
                        self._table.suspend(stream)
                    else:
                        reason = f"receiver of site {self.site} shut down"
                        self._table.fail(stream, ErrorCode.ABORTED, reason)
                self._table.tick()
                self._connection.close()
        except (ConnectionLost, BrokerRefused):
            log.debug("connection already gone while closing", exc_info=True)
        finally:
            for stream in self._table.streams.values():
                stream.assembler.discard()

    # -- the connection ---------------------------------------------------------------------------

    def _events(self, time_limit: float) -> None:
        """Process broker events for up to ``time_limit`` s, reconnecting if the connection
        was lost."""
        try:
            self._connection.process_events(time_limit)
            self._housekeeping()
        except ConnectionLost as e:
            self._recover(e)

    def _recover(self, error: BaseException) -> None:
        """Reconnect after a lost connection (broker restart...) and go on with every stream."""
        log.warning("connection to the broker lost (%s); reconnecting", error)
        reestablish(self.settings, self.settings.timeout, self._connect)
        self.reconnects += 1
        self._table.reconnected()
        self._resume_inbox()
        log.info("reconnected to %s; %d stream(s) go on", self.settings.masked_url,
                 len(self._table))  # fmt: skip

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now > self._next_cleanup:
            self._next_cleanup = now + CLEANUP_INTERVAL
            self._store.cleanup()
        self._table.tick()
        self._resume_inbox()

    # -- taking streams over ----------------------------------------------------------------------

    def _take_over(self, left_over: list[Reopened]) -> None:
        """Go on with the streams a dead receiver of this directory left."""
        for item in left_over:
            offer = item.offer
            stream = self._stream(item, self.settings.timeout)
            try:
                self._table.consume(stream)
            except BrokerRefused:
                if offer.kind == FILE_KIND:
                    # Its sender gave up on it, or it failed for want of a sender: what is
                    # verified stays, for a retrieval of the same file from that site to resume.
                    log.info("stream %s (%r from %s) has no data queue any more; its %d bytes "
                             "are kept", offer.stream_id, offer.name, offer.sender,
                             item.resumed_bytes)  # fmt: skip
                    stream.leave_on_disk()
                else:
                    log.info("stream %s (%r from %s) has no data queue any more; dropped",
                             offer.stream_id, offer.name, offer.sender)  # fmt: skip
                    self._store.drop(stream.assembler, stream.state)
                continue
            log.info("resuming %s %r from %s at chunk %d of %s", offer.kind, offer.name,
                     offer.sender, item.reassembler.stored, offer.chunk_count)  # fmt: skip
            self._table.start(stream)  # tells the sender where to go on from

    def _stream(self, item: Reopened, timeout: float) -> Stream:
        session = self._table.session(item.reassembler, timeout=timeout, checkpoints=True,
                                      keeps_prefix=keeps_prefix(item.assembler))  # fmt: skip
        return Stream(item.offer, item.reply_to, session, item.assembler, state=item.state,
                      resumed_bytes=item.resumed_bytes)  # fmt: skip

    # -- inbox ------------------------------------------------------------------------------------

    def _resume_inbox(self) -> None:
        if not self._listens:
            return
        if self._inbox_tag is None and len(self._table) < self.settings.max_streams:
            self._inbox_tag = self._inbox_channel.consume(self._inbox, self._on_offer)

    def _pause_inbox(self) -> None:
        if self._inbox_tag is not None:
            self._inbox_channel.cancel(self._inbox_tag)
            self._inbox_tag = None

    def _on_offer(self, delivery: Delivery) -> None:
        if len(self._table) >= self.settings.max_streams:
            delivery.channel.nack(delivery.tag, requeue=True)  # wait for a free slot
            self._pause_inbox()
            return
        try:
            self._take_offer(delivery)
        finally:
            delivery.channel.ack(delivery.tag)
        if len(self._table) >= self.settings.max_streams:
            self._pause_inbox()

    def _parse_offer(self, delivery: Delivery) -> Offer:
        props, body = delivery.props, delivery.body
        offer = parse(props.type, props.headers)
        if not isinstance(offer, Offer):
            raise ProtocolError(f"unexpected {props.type} message where offers arrive")
        if offer.target != self.site:
            raise ProtocolError(f"offer for site {offer.target!r} on the inbox of {self.site!r}")
        if not props.reply_to:
            raise ProtocolError("offer without reply_to")
        if body and offer.inline is None:
            raise ProtocolError(f"offer with a {len(body)}-byte body (must be empty)")
        return offer

    def _take_offer(
        self,
        delivery: Delivery,
        *,
        timeout: float | None = None,
        requested: str | None = None,
        kept: Resumable | None = None,
    ) -> None:
        """An offer: refuse it, or start its stream. A retrieval passes its own ``timeout``,
        the name it asked for and the kept prefix the stream may continue."""
        try:
            offer = self._parse_offer(delivery)
        except ProtocolError as e:
            dead_letter(self._control, self.topology, delivery, str(e))
            return
        reply_to = delivery.props.reply_to
        assert reply_to is not None
        if self._table.known(offer.stream_id):
            log.debug("duplicate offer for stream %s ignored", offer.stream_id)
            return
        try:
            stream = self._open_stream(offer, reply_to, kept, timeout, requested)
        except Refusal as e:
            if kept is not None and kept.state.locked:
                kept.state.release()  # not taken up: there for the next attempt
            self._table.refuse(offer, reply_to, e.code, e.detail)
            return
        if offer.inline is not None:
            self._table.take_inline(stream, delivery.body)
            return
        try:
            self._table.consume(stream)
        except BrokerRefused as e:
            self._store.drop(stream.assembler, stream.state)
            self._table.refuse(offer, reply_to, ErrorCode.PROTOCOL, f"data queue gone: {e}")
            return
        log.info("receiving %s %r (%d bytes) from %s as stream %s", offer.kind, offer.name,
                 offer.size, offer.sender, offer.stream_id)  # fmt: skip
        self._table.start(stream)  # first contact: the sender may resend from here on

    def _open_stream(
        self,
        offer: Offer,
        reply_to: str,
        kept: Resumable | None,
        timeout: float | None,
        requested: str | None,
    ) -> Stream:
        """The stream for an accepted offer (its assembler, reassembler and state file).

        Raises:
            Refusal: the offer is not taken.
        """
        self._check_offer(offer)
        if kept is not None and not offer.resume_from:
            log.info("%s %r comes whole (it changed at %s); dropping the %d bytes kept",
                     offer.kind, offer.name, offer.sender, kept.stored_bytes)  # fmt: skip
            kept.discard()
            kept = None
        if offer.resume_from and (kept is None or not continues(kept, offer)):
            raise Refusal(ErrorCode.PROTOCOL, f"the offer resumes from chunk {offer.resume_from}, "
                          "but no partial file to match is kept here")  # fmt: skip
        timeout = self.settings.timeout if timeout is None else timeout
        try:
            if kept is not None:
                return self._stream(self._store.adopt(offer, reply_to, kept), timeout)
            assembler = self._assemblers[offer.kind](offer)
        except ProtocolError as e:
            raise Refusal(ErrorCode.PROTOCOL, str(e)) from e
        except OSError as e:
            detail = f"cannot store {offer.size} bytes in {self.dest}: {e.strerror or e}"
            raise Refusal(ErrorCode.IO, detail) from e
        reassembler = Reassembler(offer)
        reassembler.accept()
        state = None
        if assembler.resumable and offer.inline is None:
            try:  # what a receiver started after a crash needs to take over
                state = StreamState.create(self.dest, offer, reply_to, requested)
            except OSError as e:
                assembler.discard()
                raise Refusal(ErrorCode.IO, f"state file: {e}") from e
        session = self._table.session(reassembler, timeout=timeout, checkpoints=state is not None,
                                      keeps_prefix=keeps_prefix(assembler))  # fmt: skip
        return Stream(offer, reply_to, session, assembler, state=state)

    def _check_offer(self, offer: Offer) -> None:
        """Refuse what this site does not take (too large, of an unknown kind)."""
        if offer.size is not None and offer.size > self.settings.max_object_size:
            raise Refusal(ErrorCode.TOO_LARGE, f"{offer.size} bytes exceed site {self.site}'s "
                          f"limit of {int(self.settings.max_object_size)} bytes")  # fmt: skip
        if offer.kind not in self._assemblers:
            detail = f"site {self.site} does not receive objects of kind {offer.kind!r}"
            raise Refusal(ErrorCode.REFUSED, detail)

    def _container_assembler(self, offer: Offer) -> ObjectAssembler:
        if self._spool_containers and offer.inline is None:
            return ContainerSpool(self.dest, offer, self._on_entry)
        return ContainerAssembler(offer, self._on_entry)
