"""The engine a :class:`~objstream.consumer.receiver.Receiver` and a
:class:`~objstream.consumer.retriever.Retriever` share: one connection, the streams, the
resume store, and what turns an offer into a stream.

It is composed, not inherited: the receiver adds an
:class:`~objstream.consumer.inbox.Inbox` (offers from the site's inbox), the retriever a
:class:`~objstream.consumer.requests.RequestTracker` (requests, replies, early offers). Both are
:class:`Part` objects: told when the connection is (re)opened and ticked between event batches.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol, Unpack

from objstream.common.amqp import (
    Channel,
    Closing,
    Connection,
    Delivery,
    connect,
    dead_letter,
    reestablish,
)
from objstream.common.errors import (
    BrokerRefused,
    ConfigError,
    ConnectionLost,
    FailureCode,
    ProtocolError,
)
from objstream.common.protocol import CONTAINER_KIND, FILE_KIND, Offer, parse
from objstream.common.reassembly import Reassembler
from objstream.common.settings import Settings, check_site
from objstream.common.streaming import ObjectAssembler
from objstream.common.topology import Topology
from objstream.consumer.container_assembler import ContainerAssembler
from objstream.consumer.container_spool import ContainerSpool
from objstream.consumer.file_sink import FileAssembler
from objstream.consumer.options import AssemblerFactory, ReceiverOptions
from objstream.consumer.resume import Resumable, StreamState
from objstream.consumer.stream_table import StreamTable
from objstream.consumer.streams import Stream
from objstream.consumer.takeover import Reopened, ResumeStore, continues, keeps_prefix

log = logging.getLogger(__name__)

CLEANUP_INTERVAL = 60.0  # seconds between looks for abandoned partial files
NEW_CONTROL_AFTER = 5.0  # seconds after a reconnect before answers go on a new channel


class OfferRefused(Exception):
    """An offer this site does not take: the sender gets ``code`` and ``detail``."""

    def __init__(self, code: FailureCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


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
        self.settings = settings or Settings()
        if options.get("accept_from") is not None:
            accepted = tuple(options.get("accept_from") or ())
            self.settings = self.settings.model_copy(update={"accept_from": accepted})
        self.site = site
        self.dest = Path(dest)
        if self.dest.exists() and not self.dest.is_dir():
            raise ConfigError(f"destination {self.dest} is not a directory")
        self.dest.mkdir(parents=True, exist_ok=True)
        self.topology = Topology.from_settings(self.settings)
        self._on_entry = on_entry
        self._spool_containers = spool_containers
        if as_torch:  # refused now, not at the first entry
            from objstream.common.torch_bridge import torch_module

            torch_module()
        self._as_torch = as_torch
        self._assemblers: dict[str, AssemblerFactory] = {
            FILE_KIND: lambda offer: FileAssembler(self.dest, offer),
            CONTAINER_KIND: self._container_assembler,
            **(options.get("assemblers") or {}),
        }
        self.table = StreamTable(
            site,
            self.settings,
            self.topology,
            progress=options.get("progress"),
            save=options.get("save"),
        )
        self.store = ResumeStore(
            self.dest,
            self.settings,
            on_entry=on_entry,
            spool_containers=spool_containers,
            as_torch=as_torch,
        )
        self.parts: list[Part] = []
        self._next_cleanup = time.monotonic() + CLEANUP_INTERVAL
        self._new_control_at: float | None = None  # see _recover
        self.reconnects = 0
        """How often the connection was lost and re-established."""

    def start(self, parts: list[Part], left_over: list[Reopened] | None = None) -> None:
        """Connect, open the parts and go on with ``left_over`` streams (hashed before: no
        heartbeat waits for it)."""
        self.parts = parts
        try:
            self._connect()
        except BaseException:
            for item in left_over or []:
                item.state.release()
                item.assembler.suspend()
            raise
        try:
            self._take_over(left_over or [])
            for part in parts:
                part.tick()
        except BaseException:
            self.connection.close()
            raise

    def _connect(self) -> None:
        self.connection: Connection = connect(self.settings, f"objstream consumer {self.site}")
        try:
            self.topology.declare_base(self.connection)
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
        try:
            self.table.settle()
            if self.connection.is_open:
                for stream in list(self.table.streams.values()):
                    if stream.closing:
                        continue
                    if checkpoint:
                        self.table.suspend(stream)
                    else:
                        reason = f"receiver of site {self.site} shut down"
                        self.table.fail(stream, FailureCode.ABORTED, reason)
                self.table.tick()
                self.table.settle()
                self.table.retire()
                self.connection.close()
        except (ConnectionLost, BrokerRefused):
            log.debug("connection already gone while closing", exc_info=True)
        finally:
            # A stream still open here lost its connection (a Ctrl-C inside pika): kept on disk.
            self.table.abandon(None if checkpoint else f"receiver of site {self.site} shut down")
            self.table.shut_down()

    # -- the connection ---------------------------------------------------------------------------

    def events(self, time_limit: float) -> None:
        """Process broker events for up to ``time_limit`` s, reconnecting if the connection
        was lost."""
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
            stream = self._stream(item, self.settings.timeout)
            stream.taken_over = True
            try:
                # The queue the dead receiver declared: if it is gone, so is the sender.
                self.table.consume(stream, declare=False)
            except BrokerRefused:
                if offer.kind == FILE_KIND:
                    # Its sender gave up on it, or it failed for want of a sender: what is
                    # verified stays, for a retrieval of the same file from that site to resume.
                    log.info(
                        "stream %s (%r from %s) has no data queue any more; its %d bytes are kept",
                        offer.stream_id,
                        offer.name,
                        offer.sender,
                        item.resumed_bytes,
                    )
                    stream.leave_on_disk()
                else:
                    log.info(
                        "stream %s (%r from %s) has no data queue any more; dropped",
                        offer.stream_id,
                        offer.name,
                        offer.sender,
                    )
                    self.store.drop(stream.assembler, stream.state)
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

    def _stream(self, item: Reopened, timeout: float) -> Stream:
        session = self.table.session(
            item.reassembler,
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

    def _parse_offer(self, delivery: Delivery) -> Offer:
        """The offer a delivery carries, checked for this site.

        Raises:
            ProtocolError: not a valid v2 offer for this site (``UnsupportedVersion`` for
                another protocol version): the delivery is dead-lettered with the reason.
        """
        props, body = delivery.props, delivery.body
        offer = parse(props.type, props.headers)
        if not isinstance(offer, Offer):
            raise ProtocolError(f"unexpected {props.type} message where offers arrive")
        if offer.target != self.site:
            raise ProtocolError(f"offer for site {offer.target!r} reached site {self.site!r}")
        check_answerable(props.reply_to, props.user_id, offer.sender, "offer")
        if body and offer.inline is None:
            raise ProtocolError(f"offer with a {len(body)}-byte body (must be empty)")
        return offer

    def take_offer(
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
            dead_letter(self.control, self.topology, delivery, str(e))
            return
        reply_to = delivery.props.reply_to
        assert reply_to is not None
        if self.table.known(offer.stream_id):
            log.debug("duplicate offer for stream %s ignored", offer.stream_id)
            return
        try:
            stream = self._open_stream(
                offer,
                reply_to,
                user_id=delivery.props.user_id,
                kept=kept,
                timeout=timeout,
                requested=requested,
            )
        except OfferRefused as e:
            if kept is not None and kept.state.locked:
                kept.state.release()  # not taken up: there for the next attempt
            self.table.refuse(offer, reply_to, e.code, e.detail)
            return
        if offer.inline is not None:
            self.table.take_inline(stream, delivery.body)
            return
        try:
            self.table.consume(stream)
        except BrokerRefused as e:
            self.store.drop(stream.assembler, stream.state)
            detail = f"cannot declare the data queue: {e}"
            self.table.refuse(offer, reply_to, FailureCode.REFUSED, detail)
            return
        # The data queue is declared and bound: the first progress tells the sender to go on.
        log.info(
            "receiving %s %r (%d bytes) from %s as stream %s",
            offer.kind,
            offer.name,
            offer.size,
            offer.sender,
            offer.stream_id,
        )
        self.table.start(stream)  # first contact: the sender may resend from here on

    def _open_stream(
        self,
        offer: Offer,
        reply_to: str,
        *,
        user_id: str | None,
        kept: Resumable | None,
        timeout: float | None,
        requested: str | None,
    ) -> Stream:
        """The stream for an accepted offer from broker user ``user_id`` (its assembler,
        reassembler and state file).

        Raises:
            OfferRefused: the offer is not taken.
        """
        if requested is None:  # a push, not the answer to a request of ours
            self._check_sender(offer, user_id)
        self._check_offer(offer)
        if kept is not None and not offer.resume_from:
            log.info(
                "%s %r comes whole (it changed at %s); dropping the %d bytes kept",
                offer.kind,
                offer.name,
                offer.sender,
                kept.stored_bytes,
            )
            kept.discard()
            kept = None
        if offer.resume_from and (kept is None or not continues(kept, offer)):
            detail = (
                f"the offer resumes from chunk {offer.resume_from}, but no partial file "
                "to match is kept here"
            )
            raise OfferRefused(FailureCode.PROTOCOL, detail)
        timeout = self.settings.timeout if timeout is None else timeout
        try:
            if kept is not None:
                return self._stream(self.store.adopt(offer, reply_to, kept, user_id), timeout)
            assembler = self._assemblers[offer.kind](offer)
        except ProtocolError as e:
            raise OfferRefused(FailureCode.PROTOCOL, str(e)) from e
        except OSError as e:
            detail = f"cannot store {offer.size} bytes in {self.dest}: {e.strerror or e}"
            raise OfferRefused(FailureCode.IO, detail) from e
        reassembler = Reassembler(offer)
        reassembler.accept()
        state = None
        if assembler.resumable and offer.inline is None:
            try:  # what a receiver started after a crash needs to take over
                state = StreamState.create(self.dest, offer, reply_to, requested, user_id)
            except OSError as e:
                assembler.discard()
                raise OfferRefused(FailureCode.IO, f"state file: {e}") from e
        session = self.table.session(
            reassembler,
            timeout=timeout,
            checkpoints=state is not None,
            keeps_prefix=keeps_prefix(assembler),
        )
        return Stream(offer, reply_to, session, assembler, user_id, state=state)

    def _check_sender(self, offer: Offer, user_id: str | None) -> None:
        """Refuse a push from a broker user ``settings.accept_from`` does not name (RabbitMQ
        vouches for ``user_id``: it refuses a publish whose user_id is not the sender's)."""
        accepted = self.settings.accept_from
        if accepted and user_id not in accepted:
            detail = (
                f"site {self.site} takes pushes only from broker users "
                f"{', '.join(accepted)}, not from {user_id!r}"
            )
            raise OfferRefused(FailureCode.FORBIDDEN, detail)

    def _check_offer(self, offer: Offer) -> None:
        """Refuse what this site does not take (too large, of an unknown kind)."""
        if offer.size is not None and offer.size > self.settings.max_object_size:
            limit = int(self.settings.max_object_size)
            detail = f"{offer.size} bytes exceed site {self.site}'s limit of {limit} bytes"
            raise OfferRefused(FailureCode.TOO_LARGE, detail)
        if offer.kind not in self._assemblers:
            detail = f"site {self.site} does not receive objects of kind {offer.kind!r}"
            raise OfferRefused(FailureCode.REFUSED, detail)

    def _container_assembler(self, offer: Offer) -> ObjectAssembler:
        if self._spool_containers and offer.inline is None:
            return ContainerSpool(self.dest, offer, self._on_entry, as_torch=self._as_torch)
        return ContainerAssembler(offer, self._on_entry, as_torch=self._as_torch)


def check_answerable(reply_to: str | None, user_id: str | None, peer: str, what: str) -> None:
    """Check the envelope of an offer (or a request) from site ``peer``: a v2 ``reply_to``
    (``reply:SITE:QID``) naming ``peer`` itself, and the publishing broker user.

    Raises:
        ProtocolError: the message cannot be answered as protocol v2 says, or names no user.
    """
    if not reply_to:
        raise ProtocolError(f"{what} without reply_to")
    parsed = Topology.parse_reply_to(reply_to)
    if parsed is None:
        raise ProtocolError(f"{what} with reply_to {reply_to!r}, not reply:SITE:QID")
    if parsed[0] != peer:
        raise ProtocolError(
            f"{what} from site {peer!r} with reply_to {reply_to!r} of site {parsed[0]!r}"
        )
    if not user_id:
        raise ProtocolError(f"{what} without user_id")


class ConsumerSide(Closing):
    """What a :class:`~objstream.consumer.receiver.Receiver` and a
    :class:`~objstream.consumer.retriever.Retriever` show of their core (they add the rest)."""

    def __init__(self, core: ConsumerCore) -> None:
        self._core = core

    @property
    def settings(self) -> Settings:
        return self._core.settings

    @property
    def site(self) -> str:
        return self._core.site

    @property
    def dest(self) -> Path:
        return self._core.dest

    @property
    def topology(self) -> Topology:
        return self._core.topology

    @property
    def reconnects(self) -> int:
        """How often the connection was lost and re-established."""
        return self._core.reconnects

    def close(self, checkpoint: bool = False) -> None:
        """Stop and disconnect; with ``checkpoint``, streams kept on disk are left for the
        next consumer of this site and directory, otherwise they fail."""
        self._core.close(checkpoint)
