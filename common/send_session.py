"""The sending side of streams, without I/O: feed it replies and clock ticks, get back actions.

Like h11's connection object (and :mod:`objstream.common.reassembly`), a :class:`SendSession`
holds the protocol *policy* of one object sent to N targets and nothing else: it never reads the
source, never touches the broker, files or the clock (``now`` is passed in). The driver
(:mod:`objstream.producer.sender`) performs the actions it returns and feeds it what comes back.

Protocol v2: ONE stream id for every target, and the broker copies. Nothing is published for a
target before its first contact (its progress report: until then its data queue may not exist).
The session waits for every target's first contact (at most ``resend_after`` s; for an iterator
source, until each made contact or failed), then *broadcasts* chunk ``n`` (``to=None``, every
target's queue gets it) while every *rider*'s window allows (``n < stored + window``). A target
that makes contact later, asks for a resend, or holds the other riders back for more than
``resend_after`` s leaves the ride: it gets *unicast* chunks (``to=site``) from its own position
until it reaches the broadcast cursor, then rides again. The end goes by broadcast to the riders,
by unicast to the others; aborts go by unicast (a target fails alone). Targets can be added while
the stream runs (:meth:`SendSession.add_target`, shared retrieval uploads).

Per target, a row of :attr:`SendSession.targets` holds what the target stored, its unicast cursor
(``next_seq``; message number ``chunk_count`` is the end) and a :class:`TargetState` changed only
through :data:`TRANSITIONS`. A silent target gets a resend after ``resend_after`` s; after
``timeout`` s it fails alone (its receiver is told to drop the stream).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from objstream.common.compression import BLOSC2, ENCODINGS_INFO
from objstream.common.delta import DELTA_DIGEST, DELTA_INFO
from objstream.common.errors import (
    FailureCode,
    ObjstreamError,
    ProtocolError,
    TimedOut,
    TransferFailed,
)
from objstream.common.identity import Identities
from objstream.common.protocol import MAX_INFO_ENTRIES, Done, Inline, Message, Offer, Progress
from objstream.common.send_schedule import Schedule
from objstream.common.send_table import (
    Action,
    NewChannel,
    Pacing,
    Plan,
    PublishAbort,
    PublishManifest,
    PublishOffer,
    ReportProgress,
    SourceFacts,
    Target,
    TargetEvent,
    TargetFinished,
    TargetState,
    fits_inline,
)
from objstream.common.streaming import MetaValue

log = logging.getLogger(__name__)

_S, _E = TargetState, TargetEvent


@dataclass
class SendSession:
    """One object to N targets over one stream id: the policy of the sending side.

    Args:
        facts: the source's description.
        stream_id: the one stream id of every target.
        targets: the table, one row per target site.
        sender: this site's name.
        pacing: window, timeout and resend delay.
        created: when the offers went out (the broadcast waits ``resend_after`` from there).
        plan: where the stream starts and whether it rides in the offer (:class:`Plan`).
        identities: who may answer for which site (see :meth:`receive`).
    """

    facts: SourceFacts
    stream_id: str
    targets: list[Target]
    sender: str
    pacing: Pacing
    created: float
    plan: Plan = field(default_factory=lambda: Plan())
    identities: Identities = field(default_factory=Identities)
    schedule: Schedule = field(init=False)
    _new_channel_at: float = field(init=False, default=float("-inf"))
    _by_site: dict[str, Target] = field(init=False, default_factory=dict)

    @classmethod
    def create(
        cls,
        facts: SourceFacts,
        sites: Sequence[str],
        *,
        stream_id: str,
        sender: str,
        pacing: Pacing,
        plan: Plan | None = None,
        identities: Identities | None = None,
        now: float,
    ) -> SendSession:
        """A session whose offers go out at ``now`` (:meth:`start_actions` gives them)."""
        plan = plan or Plan()
        if plan.inline is not None and not fits_inline(facts, plan.start):
            raise ValueError(f"{facts.kind} {facts.name!r} does not fit in an offer")
        rows = [Target(site, plan.start, plan.start, now) for site in sites]
        return cls(facts, stream_id, rows, sender, pacing, now, plan, identities or Identities())

    @property
    def start(self) -> int:
        """The first chunk sent (a resumed retrieval skips what the requester has)."""
        return self.plan.start

    @property
    def inline(self) -> Inline | None:
        """The object rides in the offer (see :func:`fits_inline`)."""
        return self.plan.inline

    def __post_init__(self) -> None:
        self.schedule = Schedule(
            self.stream_id,
            self.targets,
            self.pacing,
            lockstep=not self.facts.random_access,
            inline=self.inline is not None,
            created=self.created,
            count=self.facts.chunk_count,
            start=self.start,
        )
        self._by_site = {t.site: t for t in self.targets}
        if len(self._by_site) != len(self.targets):
            raise ValueError("target sites repeat")

    # -- queries ------------------------------------------------------------------------------

    @property
    def lockstep(self) -> bool:
        """Hold every target within one window of the slowest (the source cannot go back)."""
        return not self.facts.random_access

    @property
    def finished(self) -> bool:
        return not any(t.active for t in self.targets)

    def _active(self) -> list[Target]:
        return [t for t in self.targets if t.active]

    @property
    def count(self) -> int | None:
        """The number of chunks, once known."""
        return self.schedule.count

    @property
    def cursor(self) -> int:
        """The next broadcast message (``count``: the end)."""
        return self.schedule.cursor

    @property
    def started(self) -> bool:
        """The broadcast began."""
        return self.schedule.started

    @property
    def verified(self) -> int:
        """Targets that stored and verified the object."""
        return sum(t.state is TargetState.DONE for t in self.targets)

    def quorum(self, needed: int) -> bool | None:
        """A send that succeeds once ``needed`` targets verified (k of N): True once they
        have, False once fewer than ``needed`` still can (the others failed), None meanwhile."""
        if self.verified >= needed:
            return True
        if self.verified + len(self._active()) < needed:
            return False
        return None

    def stragglers_cancelled(self, needed: int) -> list[Action]:
        """``needed`` targets verified and the others are not waited for: they are told to
        stop (``--stragglers cancel``)."""
        return self.cancel(
            f"site {self.sender} had the {needed} targets it needed (--stragglers cancel)"
        )

    def quorum_lost(self, needed: int) -> list[Action]:
        """Fewer than ``needed`` targets can still verify: the others are told to stop."""
        failed = len(self.targets) - self.verified - len(self._active())
        return self.cancel(
            f"{failed} of {len(self.targets)} targets failed: fewer than the {needed} required "
            "can still verify"
        )

    # -- inputs -------------------------------------------------------------------------------

    def start_actions(self) -> list[Action]:
        """The offer of every target.

        Raises:
            ObjstreamError: the source's description makes no valid offer.
        """
        return [action for target in self.targets for action in self._offer_to(target)]

    def add_target(self, site: str, now: float) -> list[Action]:
        """One more target, while the stream runs: it gets the offer now, unicast chunks from
        the start once it makes contact, and rides once it reaches the broadcast.

        Raises:
            ValueError: ``site`` is a target already, the session is over, or the source is an
                iterator that already moved on (it cannot go back for a newcomer).
        """
        if site in self._by_site:
            raise ValueError(f"site {site!r} is a target of stream {self.stream_id} already")
        if self.finished:
            raise ValueError(f"stream {self.stream_id} is over")
        if self.lockstep and self.started:
            raise ValueError(f"{self.facts.kind} {self.facts.name!r} cannot go back to the start")
        target = Target(site, self.start, self.start, now)
        self.targets.append(target)
        self._by_site[site] = target
        log.info(
            "site %s joins stream %s (broadcast at chunk %d)", site, self.stream_id, self.cursor
        )
        return self._offer_to(target)

    def _offer_to(self, target: Target) -> list[Action]:
        if self.inline is not None:
            target.next_seq = (self.count or 0) + 1  # the offer is the whole stream
        expiration_ms = int(self.pacing.timeout * 1000)
        return [PublishOffer(target.site, self._offer(target.site), expiration_ms)]

    def _offer(self, site: str) -> Offer:
        facts = self.facts
        try:
            return Offer(
                stream_id=self.stream_id,
                kind=facts.kind,
                name=facts.name,
                size=facts.size,
                chunk_size=facts.chunk_size,
                chunk_count=facts.chunk_count,
                window=self.pacing.window,
                sender=self.sender,
                target=site,
                info=self._info(),
                inline=self.inline,
                resume_from=self.start,
            )
        except ValidationError as e:
            raise ObjstreamError(f"cannot offer {facts.kind} {facts.name!r}: {e}") from None

    def _info(self) -> dict[str, MetaValue] | None:
        """The offer's ``info``: the source's, and the chunk encoding the sender may use (if
        it may, and there is room: an ``info`` holds at most 16 entries)."""
        info = dict(self.facts.info or {})
        if self.plan.compress and self.inline is None and len(info) < MAX_INFO_ENTRIES:
            info[ENCODINGS_INFO] = BLOSC2
        if self.plan.delta and self.inline is None and len(info) < MAX_INFO_ENTRIES:
            info[DELTA_INFO] = DELTA_DIGEST
        return info or None

    def source_ended(self, count: int) -> None:
        """The source (an iterator) has ``count`` pieces: the end follows the last one."""
        if self.count is not None and self.count != count:
            raise ProtocolError(f"source said {self.count} pieces, then {count}")
        self.schedule.source_ended(count)

    def receive(
        self, message: Message, now: float, *, key: str, user: str | None, via: str | None = None
    ) -> list[Action]:
        """A reply from a target (progress or verdict), which came with routing ``key`` from
        broker ``user`` (by federation link ``via``, if it crossed one); late replies and
        replies for other streams are ignored.

        A reply counts for the site it names only if the broker vouches it came from there: its
        key names that site as the publisher (a site's user may publish no other under least
        privilege) and its user speaks for that site (:class:`Identities`). So a co-target of a
        broadcast, or a joiner of a shared upload, cannot report for another target.

        Raises:
            Forged: it claims a site it did not come from (the driver dead-letters it).
            ProtocolError: it is no reply at all.
        """
        if not isinstance(message, Progress | Done):
            raise ProtocolError(f"unexpected {type(message).__name__.lower()} on a reply queue")
        target = self._by_site.get(message.site)
        if message.stream_id != self.stream_id or target is None:
            log.debug(
                "ignoring %s from %s for stream %s (not ours)",
                type(message).__name__,
                message.site,
                message.stream_id,
            )
            return []
        what = f"{type(message).__name__.lower()} for stream {self.stream_id}"
        self.identities.check_answer(what, message.site, key, user, via)
        if not target.active:
            return []  # a verdict or report after the end (repeated, or late)
        if isinstance(message, Progress):
            return self._on_progress(target, message, now)
        return self._on_done(target, message)

    def _on_progress(self, target: Target, progress: Progress, now: float) -> list[Action]:
        first_contact = target.state is _S.OFFERED
        target.fire(TargetEvent.HEARD)
        target.quiet_since = now
        actions: list[Action] = []
        if progress.encoding is not None and self.plan.compress:
            target.decodes = True
        actions += self._delta(target, progress)
        if progress.stored > target.stored:
            target.stored = progress.stored
            actions.append(ReportProgress(target.site, self.stream_id, target.stored))
        if first_contact:
            self._on_contact(target, now)
        elif self.count is not None and target.next_seq > self.count and not target.riding:
            if target.state is _S.SENDING:
                target.fire(TargetEvent.PUBLISHED_ALL)  # (inline) it had everything already
        if progress.resend_from is not None:
            self._on_resend_request(target, max(progress.resend_from, target.stored), now)
        self.schedule.maybe_start(now)
        return actions

    def _delta(self, target: Target, progress: Progress) -> list[Action]:
        """A target that asks for the manifest gets it, once (:meth:`Target.delta_reply`)."""
        if not self.plan.delta or self.count is None:
            return []
        asks = target.delta_reply(progress, self.count, self.stream_id)
        return [PublishManifest(target.site)] if asks else []

    def _on_contact(self, target: Target, now: float) -> None:
        if self.inline is not None:
            return
        target.next_seq = max(target.next_seq, target.stored)
        if self.started:
            # Broadcast chunks beyond its position may be in its queue and make its receiver
            # ask for resends that mean nothing: honour them only after resend_after.
            target.last_resend = now
            target.catching_up_since = now
            log.info(
                "site %s made contact late: unicast from chunk %d up to the broadcast at %d",
                target.site,
                target.next_seq,
                self.cursor,
            )

    def _on_resend_request(self, target: Target, seq: int, now: float) -> None:
        if self.inline is not None:
            return
        if target.riding:
            log.info(
                "site %s asks to resend stream %s from chunk %d: leaves the broadcast",
                target.site,
                self.stream_id,
                seq,
            )
            self.schedule.leave_ride(target, seq)
            target.last_resend = now
            target.catching_up_since = now
        elif now - target.last_resend > self.pacing.resend_after:
            # Off the ride, broadcast chunks ahead of it are expected, and so are requests:
            # one rewind per resend_after (a real loss is also covered by the silence rule).
            self.schedule.rewind(target, seq)
            target.last_resend = now

    def _on_done(self, target: Target, done: Done) -> list[Action]:
        target.stored_as = done.stored_as
        if done.ok:
            target.fire(TargetEvent.STORED)
            where = f" as {done.stored_as!r}" if done.stored_as else ""
            log.info("site %s stored stream %s%s", target.site, self.stream_id, where)
            return [
                ReportProgress(target.site, self.stream_id, target.stored, complete=True),
                TargetFinished(target.site, self.stream_id, None, done.stored_as),
            ]
        error = TransferFailed(
            target.site, self.stream_id, done.code or FailureCode.PROTOCOL, done.detail
        )
        target.error = error
        target.fire(TargetEvent.FAIL)
        log.info("%s", error)  # the caller has it in its results: no warning of our own
        # The receiver deletes its own data queue (the sender has no permission to).
        return [TargetFinished(target.site, self.stream_id, error, done.stored_as)]

    def tick(self, now: float) -> list[Action]:
        """Check every target's silence (resend, or fail it after the timeout), start the
        broadcast when its wait is over, and take a rider that holds the others back off it."""
        actions: list[Action] = []
        timeout, resend_after = self.pacing.timeout, self.pacing.resend_after
        for target in self._active():
            if self._owed_nothing(target):
                target.quiet_since = now  # the sender is the slow one: no silence to count
            silent = now - target.quiet_since
            limit = timeout if target.heard else self.pacing.first_contact_within
            if silent > limit:
                detail = "" if target.heard else f"site {target.site!r} never took the offer"
                error = TimedOut(target.site, self.stream_id, limit, detail)
                actions += self._fail(target, error)
            elif (
                target.heard
                and not target.awaiting_holds
                and self.inline is None
                and silent > resend_after
                and now - target.last_resend > resend_after
            ):
                log.info(
                    "no progress from %s for %.1f s; resending stream %s from chunk %d",
                    target.site,
                    silent,
                    self.stream_id,
                    target.stored,
                )
                if silent > 2 * resend_after and now - self._new_channel_at > 2 * resend_after:
                    self._new_channel_at = now  # resent once already, and still nothing
                    actions.append(NewChannel(target.site))
                if target.riding:
                    self.schedule.leave_ride(target, target.stored)
                else:
                    self.schedule.rewind(target, target.stored)
                target.last_resend = now
        self.schedule.tick(now)
        return actions

    def _owed_nothing(self, target: Target) -> bool:
        """Has the target stored everything published to it, with more to come? Then the wait
        is the sender's (a rate limit, a slow source), not the target's silence."""
        published = self.cursor if target.riding else target.next_seq
        waited_for = target.awaiting_holds  # its answer to the manifest is owed
        return target.state is _S.SENDING and not waited_for and target.stored >= published

    def cancel(self, reason: str, code: FailureCode = FailureCode.ABORTED) -> list[Action]:
        """Stop every stream: receivers that took it are told to drop it (``abort``), and each
        target's outcome is ``code`` (``source_changed`` when the source changed under the
        send)."""
        actions: list[Action] = []
        for target in self._active():
            error = TransferFailed(target.site, self.stream_id, code, reason)
            actions += self._fail(target, error)
        return actions

    def source_failed(self, detail: str, *, changed: bool) -> list[Action]:
        """The source could not be read (``changed``: it changed while it was sent): every
        target is told at once, none verifies what was read (``source_changed``, ``io``)."""
        code = FailureCode.SOURCE_CHANGED if changed else FailureCode.IO
        return self.cancel(f"the source failed: {detail}", code)

    def reconnected(self, now: float) -> list[Action]:
        """A new connection: chunks in flight may be lost with it, so go again from what each
        target reported stored (duplicates are dropped there)."""
        for target in self._active():
            target.quiet_since = now  # the outage is not the receiver's silence
        if self.inline is not None:
            return []
        self.schedule.rewind_riders()
        for target in self._active():
            if not target.riding:
                self.schedule.rewind(target, target.stored)
        return []

    # -- outputs --------------------------------------------------------------------------------

    def next_publications(self) -> list[Action]:
        """At most one broadcast message and one unicast message per target off the ride, as
        the windows allow (:meth:`Schedule.next_publications`)."""
        return self.schedule.next_publications()

    def _fail(self, target: Target, error: TransferFailed) -> list[Action]:
        log.info("%s", error)  # the caller has it in its results
        actions: list[Action] = []
        unheard = not target.heard
        if self.inline is None and not (unheard and isinstance(error, TimedOut)):
            # A receiver is on it: tell it (alone) to drop the partial object; it deletes its
            # queue. One that has not answered yet (and is given up on before its offer
            # expired: a cancel, a changed source) may still have its offer waiting, or have
            # taken it with its first report on the way: it is told where the offer went too,
            # or it would wait for the stream until its timeout.
            expiration_ms = int(self.pacing.timeout * 1000) if unheard else 0
            # The reason alone: the receiver words its own failure around it.
            reason = error.detail or str(error.code)
            actions.append(PublishAbort(target.site, reason, unheard, expiration_ms))
        target.error = error
        target.riding = False
        target.catching_up_since = None
        target.fire(TargetEvent.FAIL)
        actions.append(TargetFinished(target.site, self.stream_id, error, target.stored_as))
        return actions
