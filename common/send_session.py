"""The sending side of streams, without I/O: feed it replies and clock ticks, get back actions.

Like h11's connection object (and :mod:`objstream.common.reassembly`), a :class:`SendSession`
holds the protocol *policy* of one object sent to N targets and nothing else: it never reads the
source, never touches the broker, files or the clock (``now`` is passed in). The driver
(:mod:`objstream.producer.sender`) performs the actions it returns and feeds it what comes back.

Per target, a row of :attr:`SendSession.targets` holds a cursor (``next_seq``; message number
``chunk_count`` is the end), what the target stored, and a :class:`TargetState` changed only
through :data:`TRANSITIONS`. At most ``window`` chunks go beyond what a target stored (for an
iterator source, beyond what the slowest stored: ``lockstep``). A silent target gets a resend
after ``resend_after`` s, once it made contact; after ``timeout`` s it fails alone, and its
receiver is told to drop the stream (abort), or its queue is deleted if nobody took the offer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import ValidationError

from objstream.common.errors import (
    FailureCode,
    ObjstreamError,
    ProtocolError,
    TimedOut,
    TransferFailed,
)
from objstream.common.protocol import INLINE_MAX, Done, Inline, Message, Offer, Progress
from objstream.common.streaming import MetaValue

log = logging.getLogger(__name__)


class TargetState(StrEnum):
    """Life cycle of the stream to one target."""

    OFFERED = "offered"  # offer out, no word from the target yet (chunks may wait in its queue)
    SENDING = "sending"  # the target reports; chunks (or the end) are still to publish
    ENDED = "ended"  # the target reports; every chunk and the end are out: verdict awaited
    DONE = "done"  # the target stored and verified the object
    FAILED = "failed"  # refused, timed out, aborted


class TargetEvent(StrEnum):
    HEARD = "heard"  # a progress report
    PUBLISHED_ALL = "published_all"  # the end went out
    REWOUND = "rewound"  # resend from what the target stored
    STORED = "stored"  # done, ok
    FAIL = "fail"  # done not ok, timeout, cancel


_S, _E = TargetState, TargetEvent

# The legal transitions; anything else is "can't handle EVENT in state STATE".
TRANSITIONS: dict[tuple[TargetState, TargetEvent], TargetState] = {
    (_S.OFFERED, _E.HEARD): _S.SENDING,
    (_S.OFFERED, _E.PUBLISHED_ALL): _S.OFFERED,  # the end waits in the queue with the chunks
    (_S.OFFERED, _E.REWOUND): _S.OFFERED,  # after a reconnect: transient chunks may be lost
    (_S.OFFERED, _E.STORED): _S.DONE,  # an inline offer's verdict
    (_S.OFFERED, _E.FAIL): _S.FAILED,
    (_S.SENDING, _E.HEARD): _S.SENDING,
    (_S.SENDING, _E.PUBLISHED_ALL): _S.ENDED,
    (_S.SENDING, _E.REWOUND): _S.SENDING,
    (_S.SENDING, _E.STORED): _S.DONE,
    (_S.SENDING, _E.FAIL): _S.FAILED,
    (_S.ENDED, _E.HEARD): _S.ENDED,
    (_S.ENDED, _E.REWOUND): _S.SENDING,
    (_S.ENDED, _E.STORED): _S.DONE,
    (_S.ENDED, _E.FAIL): _S.FAILED,
}
FINISHED = frozenset({TargetState.DONE, TargetState.FAILED})


# -- actions (what the driver must do) ----------------------------------------------------------


@dataclass(frozen=True)
class DeclareDataQueue:
    """Declare (again) the data queue of a stream."""

    stream_id: str


@dataclass(frozen=True)
class PublishOffer:
    """Publish ``offer`` to the target (its inbox, or the requester's queue); an inline offer's
    body is the source's one piece. The offer is void after ``expiration_ms``."""

    site: str
    offer: Offer
    expiration_ms: int


@dataclass(frozen=True)
class PublishChunk:
    """Publish chunk ``seq`` of the source on the stream's data queue."""

    site: str
    stream_id: str
    seq: int


@dataclass(frozen=True)
class PublishEnd:
    """Publish the end (count, size, SHA-256 of the whole) on the stream's data queue."""

    site: str
    stream_id: str


@dataclass(frozen=True)
class PublishAbort:
    """Tell the target's receiver to drop the stream (it deletes the data queue)."""

    site: str
    stream_id: str
    reason: str


@dataclass(frozen=True)
class DeleteDataQueue:
    """Delete the stream's data queue: nobody will read it."""

    stream_id: str


@dataclass(frozen=True)
class ReleaseBefore:
    """Every target stored the pieces before ``seq``: the driver may forget them."""

    seq: int


@dataclass(frozen=True)
class ReportProgress:
    """The target stored ``stored`` chunks (``complete``: the whole object, verified)."""

    site: str
    stream_id: str
    stored: int
    complete: bool = False


@dataclass(frozen=True)
class TargetFinished:
    """The stream to one target ended: ``error`` is None if it stored the object."""

    site: str
    stream_id: str
    error: TransferFailed | None
    stored_as: str | None = None


Action = (
    DeclareDataQueue
    | PublishOffer
    | PublishChunk
    | PublishEnd
    | PublishAbort
    | DeleteDataQueue
    | ReleaseBefore
    | ReportProgress
    | TargetFinished
)


# -- inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFacts:
    """What the session knows of the source (never its bytes)."""

    kind: str
    name: str
    chunk_size: int
    size: int | None
    chunk_count: int | None
    random_access: bool
    info: Mapping[str, MetaValue] | None = None


def fits_inline(facts: SourceFacts, start: int = 0) -> bool:
    """Is the object small enough to ride inside its offer (one message, no data queue)?"""
    return (
        facts.random_access
        and not start
        and facts.chunk_count is not None
        and facts.chunk_count <= 1
        and facts.size is not None
        and facts.size <= INLINE_MAX
    )


@dataclass(frozen=True)
class Pacing:
    """How fast the session goes and how long it waits (from the settings or the call)."""

    window: int  # chunks in flight beyond what a target stored
    timeout: float  # seconds of silence after which a target fails
    resend_after: float  # seconds of silence (after contact) before resending


@dataclass
class Target:
    """One row of the session's table: the stream to one target."""

    site: str
    stream_id: str
    next_seq: int  # next message to publish; message number chunk_count is the end
    stored: int  # contiguous chunks the target reported stored
    quiet_since: float  # last word from the target (or the offer, or a reconnect)
    state: TargetState = TargetState.OFFERED
    last_resend: float = float("-inf")
    stored_as: str | None = None
    error: TransferFailed | None = None

    @property
    def active(self) -> bool:
        return self.state not in FINISHED

    @property
    def heard(self) -> bool:
        """Did the target ever report (so its receiver reads the queue)?"""
        return self.state in (TargetState.SENDING, TargetState.ENDED)

    def fire(self, event: TargetEvent) -> None:
        try:
            self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise ProtocolError(
                f"can't handle {event} in state {self.state} (stream {self.stream_id} "
                f"to {self.site!r})"
            ) from None


@dataclass
class SendSession:
    """One object to N targets: the policy of the sending side, as a table of target rows.

    Args:
        facts: the source's description.
        targets: ``(site, stream_id)`` per target.
        sender: this site's name.
        pacing: window, timeout and resend delay.
        start: first chunk sent (a resumed retrieval skips what the requester has).
        inline: the object rides in the offer (see :func:`fits_inline`); the driver computed it.
    """

    facts: SourceFacts
    targets: list[Target]
    sender: str
    pacing: Pacing
    start: int = 0
    inline: Inline | None = None
    count: int | None = field(init=False)
    _released: int = field(init=False, default=0)
    _by_id: dict[str, Target] = field(init=False, default_factory=dict)

    @classmethod
    def create(
        cls,
        facts: SourceFacts,
        targets: Sequence[tuple[str, str]],
        *,
        sender: str,
        pacing: Pacing,
        start: int = 0,
        inline: Inline | None = None,
        now: float,
    ) -> SendSession:
        """A session whose offers go out at ``now`` (:meth:`start_actions` gives them)."""
        if inline is not None and not fits_inline(facts, start):
            raise ValueError(f"{facts.kind} {facts.name!r} does not fit in an offer")
        rows = [Target(site, stream_id, start, start, now) for site, stream_id in targets]
        return cls(facts, rows, sender, pacing, start, inline)

    def __post_init__(self) -> None:
        self.count = self.facts.chunk_count
        self._released = self.start
        self._by_id = {t.stream_id: t for t in self.targets}
        if len(self._by_id) != len(self.targets):
            raise ValueError("stream ids repeat")

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

    # -- inputs -------------------------------------------------------------------------------

    def start_actions(self) -> list[Action]:
        """The offers (and data queues) of every target.

        Raises:
            ObjstreamError: the source's description makes no valid offer.
        """
        actions: list[Action] = []
        for target in self.targets:
            if self.inline is None:
                actions.append(DeclareDataQueue(target.stream_id))
            else:
                target.next_seq = (self.count or 0) + 1  # the offer was the whole stream
            actions.append(
                PublishOffer(target.site, self._offer(target), int(self.pacing.timeout * 1000))
            )
        return actions

    def _offer(self, target: Target) -> Offer:
        facts = self.facts
        try:
            return Offer(
                stream_id=target.stream_id,
                kind=facts.kind,
                name=facts.name,
                size=facts.size,
                chunk_size=facts.chunk_size,
                chunk_count=facts.chunk_count,
                window=self.pacing.window,
                sender=self.sender,
                target=target.site,
                info=dict(facts.info) if facts.info else None,
                inline=self.inline,
                resume_from=self.start,
            )
        except ValidationError as e:
            raise ObjstreamError(f"cannot offer {facts.kind} {facts.name!r}: {e}") from None

    def source_ended(self, count: int) -> None:
        """The source (an iterator) has ``count`` pieces: the end follows the last one."""
        if self.count is not None and self.count != count:
            raise ProtocolError(f"source said {self.count} pieces, then {count}")
        self.count = count
        for target in self._active():
            target.next_seq = min(target.next_seq, count)

    def receive(self, message: Message, now: float) -> list[Action]:
        """A reply from a target (progress or verdict); late replies are ignored."""
        target = self._by_id.get(message.ident)
        if target is None or not target.active:
            log.debug("ignoring %s for stream %s (not in flight)", type(message).__name__,
                      message.ident)  # fmt: skip
            return []
        if isinstance(message, Progress):
            return self._on_progress(target, message, now)
        if isinstance(message, Done):
            return self._on_done(target, message)
        raise ProtocolError(f"unexpected {type(message).__name__.lower()} on a reply queue")

    def _on_progress(self, target: Target, progress: Progress, now: float) -> list[Action]:
        target.fire(TargetEvent.HEARD)
        target.quiet_since = now
        actions: list[Action] = []
        if progress.stored > target.stored:
            target.stored = progress.stored
            actions.append(ReportProgress(target.site, target.stream_id, target.stored))
        if self.count is not None and target.next_seq > self.count and target.state is _S.SENDING:
            target.fire(TargetEvent.PUBLISHED_ALL)  # it had everything before it spoke
        if progress.resend_from is not None:
            log.info("site %s asks to resend stream %s from chunk %d", target.site,
                     target.stream_id, progress.resend_from)  # fmt: skip
            self._rewind(target, max(progress.resend_from, target.stored))
        return actions

    def _on_done(self, target: Target, done: Done) -> list[Action]:
        target.stored_as = done.stored_as
        if done.ok:
            target.fire(TargetEvent.STORED)
            where = f" as {done.stored_as!r}" if done.stored_as else ""
            log.info("site %s stored stream %s%s", target.site, target.stream_id, where)
            return [
                ReportProgress(target.site, target.stream_id, target.stored, complete=True),
                TargetFinished(target.site, target.stream_id, None, done.stored_as),
            ]
        error = TransferFailed(
            target.site, target.stream_id, done.code or FailureCode.PROTOCOL, done.detail
        )
        target.error = error
        target.fire(TargetEvent.FAIL)
        log.warning("%s", error)
        actions: list[Action] = []
        if self.inline is None:
            # The receiver normally deletes it; make sure a refused stream leaves nothing behind.
            actions.append(DeleteDataQueue(target.stream_id))
        actions.append(TargetFinished(target.site, target.stream_id, error, done.stored_as))
        return actions

    def tick(self, now: float) -> list[Action]:
        """Check every target's silence: resend, or fail it after the timeout."""
        actions: list[Action] = []
        timeout, resend_after = self.pacing.timeout, self.pacing.resend_after
        for target in self._active():
            silent = now - target.quiet_since
            if silent > timeout:
                detail = "" if target.heard else f"site {target.site!r} never took the offer"
                actions += self._fail(target, TimedOut(target.site, target.stream_id,
                                                       timeout, detail))  # fmt: skip
            elif (
                target.heard
                and self.inline is None
                and silent > resend_after
                and now - target.last_resend > resend_after
            ):
                log.info("no progress from %s for %.1f s; resending stream %s from chunk %d",
                         target.site, silent, target.stream_id, target.stored)  # fmt: skip
                self._rewind(target, target.stored)
                target.last_resend = now
        return actions

    def cancel(self, reason: str) -> list[Action]:
        """Stop every stream: receivers are told to drop them."""
        actions: list[Action] = []
        for target in self._active():
            error = TransferFailed(target.site, target.stream_id, FailureCode.ABORTED, reason)
            actions += self._fail(target, error)
        return actions

    def reconnected(self, now: float) -> list[Action]:
        """A new connection: declare the data queues again and resend what may be lost."""
        actions: list[Action] = []
        for target in self._active():
            target.quiet_since = now  # the outage is not the receiver's silence
            if self.inline is not None:
                continue
            actions.append(DeclareDataQueue(target.stream_id))
            # Transient chunks in flight may be gone with the broker: go again from what the
            # receiver reported stored (duplicates are dropped there).
            self._rewind(target, target.stored)
        return actions

    # -- outputs --------------------------------------------------------------------------------

    def next_publications(self) -> list[Action]:
        """At most one chunk (or the end) per target, as the windows allow, oldest first.

        One message per target per call keeps the table exact between calls: a reply fed in
        after any publication takes effect on the very next one.
        """
        active = self._active()
        if not active:
            return []
        floor = min(t.stored for t in active)
        actions: list[Action] = []
        if self.lockstep and floor > self._released:
            self._released = floor
            actions.append(ReleaseBefore(floor))
        for target in active:
            limit = target.stored + self.pacing.window
            if self.lockstep:
                limit = min(limit, floor + self.pacing.window)
            seq = target.next_seq
            if self.count is not None and seq == self.count:
                target.next_seq = seq + 1
                target.fire(TargetEvent.PUBLISHED_ALL)
                actions.append(PublishEnd(target.site, target.stream_id))
            elif seq < limit and (self.count is None or seq < self.count):
                target.next_seq = seq + 1
                actions.append(PublishChunk(target.site, target.stream_id, seq))
        return actions

    # -- helpers --------------------------------------------------------------------------------

    def _rewind(self, target: Target, seq: int) -> None:
        """Resend from chunk ``seq``, and the end after it (a duplicate end is harmless)."""
        if target.next_seq > seq:
            target.next_seq = seq
            target.fire(TargetEvent.REWOUND)

    def _fail(self, target: Target, error: TransferFailed) -> list[Action]:
        log.warning("%s", error)
        actions: list[Action] = []
        if self.inline is not None:
            pass  # no data queue: the offer was the whole stream (and has expired by now)
        elif target.heard:
            # A receiver is on it: tell it to drop the partial object (it deletes the queue).
            actions.append(PublishAbort(target.site, target.stream_id, str(error)))
        else:
            # Nobody took the offer, and it has expired by now: nothing will read the queue.
            actions.append(DeleteDataQueue(target.stream_id))
        target.error = error
        target.fire(TargetEvent.FAIL)
        actions.append(TargetFinished(target.site, target.stream_id, error, target.stored_as))
        return actions
