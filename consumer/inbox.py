"""The site's inbox: where offers for a site arrive, each admitted, held for a slot, or refused.

The inbox is consumed with a prefetch of the offers that may wait for a slot
(:attr:`Slots.hold_capacity`, shared fairly between broker users, see
:mod:`objstream.common.slots`): an offer whose user has a free slot starts at once; one whose
user holds its share waits here, unacked, until a slot frees or the offer expires (its sender
gave up); beyond its user's share of the waiting room it is refused ``busy``. So a site that
floods this inbox with offers delays another site's push at most by the ``contact_timeout`` its
streams get, and never blocks the other offers behind its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from objstream.common.admission import Accept, Hold, Withdraw
from objstream.common.amqp import Channel, Delivery
from objstream.common.redeliveries import RedeliveryJournal, journal_for
from objstream.consumer.core import ConsumerCore

log = logging.getLogger(__name__)


@dataclass
class _Held:
    delivery: Delivery
    stream_id: str
    holder: str  # whom its slot will count for
    until: float  # the offer's expiration: its sender has given up by then


class Inbox:
    """A :class:`~objstream.consumer.core.Part` of a receiver: consumes the site's inbox and
    hands each offer to the core as the admission decides."""

    def __init__(self, core: ConsumerCore) -> None:
        self._core = core
        self._queue = ""
        self._channel: Channel | None = None
        self._started = False
        self._redeliveries: RedeliveryJournal | None = None
        self._tag: str | None = None  # consuming (None: paused, every slot is taken)
        self._held: list[_Held] = []

    def opened(self) -> None:
        core = self._core
        self._held.clear()  # unacked on the old connection: the broker delivers them again
        self._queue = core.topology.declare_inbox(core.control, core.site)
        if self._redeliveries is None:
            self._redeliveries = journal_for(self._queue, core.topology.queue_type)
        self._channel = core.connection.channel()
        if not self._started:  # at start only: after a reconnect, the count includes our own
            self._started = True
            self._warn_of_others()
        # The offers that may wait for a slot, and the one being looked at.
        self._channel.qos(core.table.slots.hold_capacity + 1)
        self._tag = None
        self.tick()

    def _warn_of_others(self) -> None:
        """Several receivers of one site share its offers (competing workers, by design); a
        forgotten one in another shell silently takes half of them, so say it once."""
        assert self._channel is not None
        others = self._channel.consumer_count(self._queue)
        if others:
            log.warning(
                "the inbox of site %s (%s) already has %d consumer(s): other receivers of this "
                "site take a share of what is sent to it",
                self._core.site,
                self._queue,
                others,
            )

    def tick(self) -> None:
        """Start held offers whose users have a slot now; drop those whose senders gave up;
        take offers again once a slot is free."""
        self._start_held()
        if self._channel is None:
            return
        full = self._core.table.slots.full
        if self._tag is None and not full:
            self._tag = self._channel.consume(
                self._queue, self._on_offer, redeliveries=self._redeliveries
            )
        elif self._tag is not None and full:
            # Every slot is taken: offers wait in the inbox, where another receiver of this
            # site (a competing worker) can take them.
            self._channel.cancel(self._tag)
            self._tag = None

    def _start_held(self) -> None:
        now = time.monotonic()
        for held in list(self._held):
            if now > held.until:
                log.info(
                    "offer %s expired while it waited for a slot", held.delivery.props.message_id
                )
                self._unhold(held)
                held.delivery.ack()
            elif self._admit(held.delivery, waiting=True):
                self._unhold(held)

    def _unhold(self, held: _Held) -> None:
        self._held.remove(held)
        self._core.table.slots.unhold(held.holder)

    def _on_offer(self, delivery: Delivery) -> None:
        self._admit(delivery, waiting=False)
        if self._tag is not None and self._core.table.slots.full and self._channel is not None:
            self._channel.cancel(self._tag)
            self._tag = None

    def _admit(self, delivery: Delivery, *, waiting: bool) -> bool:
        """Decide on ``delivery`` and carry the decision out; False if it (still) waits."""
        core, props = self._core, delivery.props
        envelope = delivery.envelope
        table = core.table
        decision = core.admission.push(
            props.type,
            props.headers,
            envelope,
            known=table.known,
            slots=table.slots,
            waiting=waiting,
        )
        if isinstance(decision, Hold):
            if not waiting:
                log.info(
                    "offer of stream %s waits for a slot (user %s holds its share)",
                    decision.offer.stream_id,
                    decision.holder,
                )
                table.slots.hold(decision.holder)
                until = time.monotonic() + _expiry(props.expiration)
                self._held.append(_Held(delivery, decision.offer.stream_id, decision.holder, until))
            return False
        if isinstance(decision, Withdraw):
            self._withdraw(decision)
            delivery.ack()
            return True
        if isinstance(decision, Accept):
            table.slots.take(decision.offer.stream_id, decision.holder)
        if not core.carry_out(decision, delivery) and isinstance(decision, Accept):
            table.slots.release(decision.offer.stream_id)
        return True

    def _withdraw(self, withdraw: Withdraw) -> None:
        """A sender gave up before it heard from us: its offer, if it still waits here, goes;
        its stream, if it started, ends ``aborted``. Only from the user the offer came from."""
        for held in self._held:
            if held.stream_id == withdraw.stream_id:
                if self._core.admission.withdraws(withdraw, held.delivery.props.user_id):
                    log.info("offer of stream %s withdrawn by its sender", withdraw.stream_id)
                    self._unhold(held)
                    held.delivery.ack()
                return
        self._core.withdraw(withdraw)


def _expiry(expiration: str | None, default: float = 60.0) -> float:
    """Seconds an offer stays valid, from its ``expiration`` (milliseconds, as text)."""
    try:
        return max(0.0, int(expiration or "") / 1000)
    except ValueError:
        return default
