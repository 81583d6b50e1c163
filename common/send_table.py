"""The table under :class:`~objstream.common.send_session.SendSession`: target rows, their
states and legal transitions, the session's inputs (:class:`SourceFacts`, :class:`Pacing`) and
its actions (what the driver must do). Pure: no I/O, no clock."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from objstream.common.delta import Holds
from objstream.common.errors import ObjectTooLarge, ProtocolError, TransferFailed
from objstream.common.protocol import INLINE_MAX, Inline, Offer, Progress
from objstream.common.streaming import MetaValue, ObjectStreamer

log = logging.getLogger(__name__)


class TargetState(StrEnum):
    """Life cycle of the stream to one target."""

    OFFERED = "offered"  # offer out, no word from the target yet: nothing is published for it
    SENDING = "sending"  # the target reports; chunks (or the end) are still to publish
    ENDED = "ended"  # every chunk and the end are out to it: verdict awaited
    DONE = "done"  # the target stored and verified the object
    FAILED = "failed"  # refused, timed out, aborted


class TargetEvent(StrEnum):
    HEARD = "heard"  # a progress report
    PUBLISHED_ALL = "published_all"  # the end went out to it (broadcast or unicast)
    REWOUND = "rewound"  # resend from what the target stored
    STORED = "stored"  # done, ok
    FAIL = "fail"  # done not ok, timeout, cancel


_S, _E = TargetState, TargetEvent

# The legal transitions; anything else is "can't handle EVENT in state STATE".
TRANSITIONS: dict[tuple[TargetState, TargetEvent], TargetState] = {
    (_S.OFFERED, _E.HEARD): _S.SENDING,
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
class PublishOffer:
    """Publish ``offer`` to the target (its inbox, or the requester's reply queue); an inline
    offer's body is the source's one piece. The offer is void after ``expiration_ms``."""

    site: str
    offer: Offer
    expiration_ms: int


@dataclass(frozen=True)
class PublishChunk:
    """Publish chunk ``seq``: to every target (``to`` None, the broadcast key) or to one;
    ``encoded``: it may go compressed (every target it reaches said it decodes that)."""

    seq: int
    to: str | None = None
    encoded: bool = False


@dataclass(frozen=True)
class PublishManifest:
    """Publish the source's manifest to one target, which asked for it (a delta: it holds
    pieces of an earlier version); its answer says which chunks it holds."""

    to: str


@dataclass(frozen=True)
class PublishEnd:
    """Publish the end (count, size, SHA-256 of the whole): broadcast (``to`` None) or to one."""

    to: str | None = None


@dataclass(frozen=True)
class PublishAbort:
    """Tell one target's receiver to drop the stream (it deletes its data queue).

    ``where_offered``: the target has not answered yet, so it may have no data queue: the
    abort goes where its offer went too (its inbox, or the requester's private queue), void
    after ``expiration_ms`` as the offer is."""

    to: str
    reason: str
    where_offered: bool = False
    expiration_ms: int = 0


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


@dataclass(frozen=True)
class NewChannel:
    """Publish on a new channel from now on: ``site`` stayed silent through two resends. On a
    cluster, a channel that opened while a quorum queue elected its leader could route nothing
    more to that queue (RabbitMQ 3.10.8); a new channel finds the new leader."""

    site: str


Action = (
    PublishOffer
    | PublishChunk
    | PublishEnd
    | PublishManifest
    | PublishAbort
    | ReleaseBefore
    | ReportProgress
    | TargetFinished
    | NewChannel
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


def facts_of(source: ObjectStreamer) -> SourceFacts:
    """The facts of a prepared streamer."""
    return SourceFacts(
        source.kind,
        source.name,
        source.chunk_size,
        source.size,
        source.chunk_count,
        source.random_access,
        source.info() or None,
    )


def check_size(facts: SourceFacts, limit: int) -> None:
    """Raise :class:`ObjectTooLarge` if the object is larger than this site sends."""
    if facts.size is not None and facts.size > limit:
        raise ObjectTooLarge(facts.name, facts.size, limit)


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
class Plan:
    """Where a send starts and how its object travels (see :func:`plan`)."""

    start: int = 0
    """The first chunk sent: a resumed retrieval skips the prefix the requester kept."""
    inline: Inline | None = None
    """Set: the object rides inside its offer (its CRC-32 and SHA-256)."""
    compress: bool = False
    """The sender may send compressed chunks: its offer says so, and a target that answers it
    decodes them gets them (docs/protocol.md, "Compressed chunks")."""
    delta: bool = False
    """The sender may send a delta: its offer says so, and a target that holds pieces of the
    object gets only what it lacks (docs/protocol.md, "Delta transfer")."""


@dataclass(frozen=True)
class Pacing:
    """How fast the session goes and how long it waits (from the settings or the call)."""

    window: int  # chunks in flight beyond what a target stored
    timeout: float  # seconds of silence after which a target fails
    resend_after: float  # seconds of silence (after contact) before resending
    contact_timeout: float | None = None
    """Seconds a target may take to make first contact (None: ``timeout``). A served stream
    holds a serving slot: one whose requester never takes the offer lets it go soon."""
    backlog: int = 0
    """Chunks a target's data queue holds ready for it (its receiver sizes the queue from
    ``backlog_windows``). A rider may fall this far behind the broadcast, if that is more than
    the window, before it holds the others back: the broker holds what it has not taken yet."""

    @property
    def first_contact_within(self) -> float:
        return self.timeout if self.contact_timeout is None else self.contact_timeout


@dataclass
class Target:
    """One row of the session's table: the stream to one target."""

    site: str
    next_seq: int  # next unicast message (when not riding); number chunk_count is the end
    stored: int  # contiguous chunks the target reported stored
    quiet_since: float  # last word from the target (or the offer, or a reconnect)
    state: TargetState = TargetState.OFFERED
    riding: bool = False  # gets the broadcast (its own cursor is the session's)
    held_since: float | None = None  # since when it alone holds the broadcast back
    catching_up_since: float | None = None  # off the ride, the broadcast waits for it (a while)
    last_resend: float = float("-inf")
    decodes: bool = False  # said it decodes compressed chunks (the offer said they may come)
    wants_delta: bool = False  # asked for the manifest (the offer said a delta may come)
    holds: Holds | None = None  # its answer: the chunks it holds, never published to it
    stored_as: str | None = None
    error: TransferFailed | None = None

    @property
    def active(self) -> bool:
        return self.state not in FINISHED

    @property
    def awaiting_holds(self) -> bool:
        """It has the manifest and has not said yet what it holds: nothing goes to it."""
        return self.wants_delta and self.holds is None

    def lacks(self, seq: int) -> bool:
        """Does chunk ``seq`` have to reach it (it neither stored nor holds it)?"""
        return seq >= self.stored and (self.holds is None or seq not in self.holds)

    def delta_reply(self, progress: Progress, count: int, stream_id: str) -> bool:
        """Take what a report says of a delta: True if it asks for the manifest (the first
        time). Its answer says which chunks it holds (a bitmap that does not parse: none). A
        resend request for a chunk it said it holds means it lost track of them (a receiver
        that took the stream over): it gets them all again."""
        if progress.delta and not self.wants_delta:
            self.wants_delta = True
            return True
        if progress.holds is not None and self.awaiting_holds:
            try:
                self.holds = Holds.decode(progress.holds, count)
            except ProtocolError as e:
                log.warning("site %s: %s; it gets every chunk", self.site, e)
                self.holds = Holds(count)
            log.info(
                "site %s holds %d of stream %s's %d chunks",
                self.site,
                len(self.holds),
                stream_id,
                count,
            )
        elif progress.resend_from is not None and self.holds is not None:
            self.holds.drop_from(progress.resend_from)
        return False

    @property
    def heard(self) -> bool:
        """Did the target ever report (so its data queue exists and is read)?"""
        return self.state in (TargetState.SENDING, TargetState.ENDED)

    def fire(self, event: TargetEvent) -> None:
        try:
            self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise ProtocolError(
                f"can't handle {event} in state {self.state} (target {self.site!r})"
            ) from None
