"""What a send publishes next, without I/O: the broadcast and the unicast cursors.

The half of :class:`~objstream.common.send_session.SendSession` that decides publications. One
broadcast cursor serves every *rider*: chunk ``n`` goes out once (the broker copies it to every
target's queue) while every rider's window allows (``n < stored + window``). A target off the
ride (it made contact late, asked for a resend, or held the others back for ``resend_after`` s)
gets unicast chunks from its own ``next_seq`` until it reaches the broadcast cursor, and rides
again. An iterator source (``lockstep``) keeps every target within one window of the slowest,
and releases pieces only once every target stored them.

The broadcast goes at the pace of its fastest rider (``n < stored + window`` for the one that
stored most), as long as no rider falls more than its *lag* behind (``Pacing.backlog``, what
its data queue holds, when that is more than the window): a slower rider's chunks wait for it
in its queue on the broker instead of holding the others or being uploaded again. Beyond its
lag a rider that still takes chunks sets the pace (uploading its part again would cost the
sender and the slow link twice); one that takes nothing for ``resend_after`` s leaves the ride.

The session feeds it what happened (contact, resend requests, silences) through its targets'
rows; :meth:`Schedule.next_publications` returns at most one broadcast message and one unicast
message per target each call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from objstream.common.send_table import (
    Action,
    Pacing,
    PublishChunk,
    PublishEnd,
    ReleaseBefore,
    Target,
    TargetEvent,
    TargetState,
)

log = logging.getLogger(__name__)

_S = TargetState


@dataclass
class Schedule:
    """The publication cursors of one stream.

    Args:
        stream_id: for the logs.
        targets: the session's table (shared: the session changes the rows, this reads them).
        pacing: window and resend delay.
        lockstep: the source cannot go back (an iterator).
        inline: the object rides in its offer: nothing is ever published after it.
        created: when the offers went out (the broadcast waits ``resend_after`` from there).
        count: the number of chunks, once known.
        start: the first chunk (a resumed retrieval skips what the requester kept).
    """

    stream_id: str
    targets: list[Target]
    pacing: Pacing
    lockstep: bool
    inline: bool
    created: float
    count: int | None
    start: int
    cursor: int = field(init=False)  # next broadcast message (chunk_count: the end)
    started: bool = field(init=False, default=False)  # the broadcast began
    _released: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.cursor = self._released = self.start

    def _active(self) -> list[Target]:
        return [t for t in self.targets if t.active]

    def _riders(self) -> list[Target]:
        return [t for t in self.targets if t.riding and t.active]

    @property
    def _broadcast_over(self) -> bool:
        """The end went out by broadcast: unicast goes on to the end on its own."""
        return self.count is not None and self.cursor > self.count

    def source_ended(self, count: int) -> None:
        """The source (an iterator) has ``count`` pieces: the end follows the last one."""
        self.count = count
        self.cursor = min(self.cursor, count)
        for target in self._active():
            target.next_seq = min(target.next_seq, count)

    def rewind_riders(self) -> None:
        """After a reconnect: the broadcast goes again from what the slowest rider stored."""
        riders = self._riders()
        if riders:
            floor = min(t.stored for t in riders)
            if self.cursor > floor:
                self.cursor = floor
                for rider in riders:
                    if rider.state is _S.ENDED:
                        rider.fire(TargetEvent.REWOUND)

    def tick(self, now: float) -> None:
        """Start the broadcast when its wait is over, and take a rider that holds the others
        back off it; let a target catching up go at its own pace after a while."""
        self.maybe_start(now)
        self._check_hold_back(now)
        self._check_catching_up(now)

    def next_publications(self) -> list[Action]:
        """At most one broadcast message and one unicast message per target off the ride, as
        the windows allow.

        One message each per call keeps the table exact between calls: a reply fed in after any
        publication takes effect on the very next one.
        """
        active = self._active()
        if not active or not self.started:
            return []
        actions: list[Action] = []
        floor = min(t.stored for t in active)
        if self.lockstep and floor > self._released:
            self._released = floor
            actions.append(ReleaseBefore(floor))
        for target in active:
            if target.heard and not target.riding:
                actions += self._unicast(target, floor)
        if not any(t.catching_up_since is not None for t in active):
            actions += self._broadcast(floor)  # else it waits: the unicast must reach it
        return actions

    def _limit(self, stored: int, floor: int) -> int:
        """The first chunk beyond the window of a target that stored ``stored``."""
        limit = stored + self.pacing.window
        return min(limit, floor + self.pacing.window) if self.lockstep else limit

    @property
    def _lag(self) -> int:
        """How far a rider may be behind the broadcast: its window, or what its data queue
        holds if that is more (an iterator keeps what it read: one window, always)."""
        window = self.pacing.window
        return window if self.lockstep else max(window, self.pacing.backlog)

    def _broadcast_limit(self, riders: list[Target], floor: int) -> int:
        """The first chunk the broadcast may not publish yet: beyond the window of the rider
        that stored most, or beyond the lag of the one that stored least."""
        least = min(r.stored for r in riders)
        if self.lockstep:
            return self._limit(least, floor)
        most = max(r.stored for r in riders)
        return min(most + self.pacing.window, least + self._lag)

    def _broadcast(self, floor: int) -> list[Action]:
        riders = self._riders()
        if not riders or self._broadcast_over:
            return []
        seq = self.cursor = self._skip_held(self.cursor, riders)
        if seq == self.count:
            self.cursor += 1
            for rider in riders:
                rider.fire(TargetEvent.PUBLISHED_ALL)
            return [PublishEnd()]
        if seq < self._broadcast_limit(riders, floor):
            self.cursor += 1
            return [PublishChunk(seq, encoded=all(t.decodes for t in self._active()))]
        return []

    def _skip_held(self, seq: int, targets: list[Target]) -> int:
        """The first chunk from ``seq`` on that one of ``targets`` lacks (a delta: the others
        hold it already, see :attr:`Target.holds`)."""
        if self.count is None or all(t.holds is None for t in targets):
            return seq
        while seq < self.count and not any(t.lacks(seq) for t in targets):
            seq += 1
        return seq

    def _unicast(self, target: Target, floor: int) -> list[Action]:
        if target.awaiting_holds:
            return []  # nothing before it said what it holds
        seq = target.next_seq = self._skip_held(target.next_seq, [target])
        if not self._broadcast_over:
            room = self.cursor < target.stored + self.pacing.window
            if seq >= self.cursor and room and target.state is _S.SENDING:
                target.riding = True  # caught up: the broadcast carries it from here
                target.held_since = target.catching_up_since = None
                log.info(
                    "site %s rides stream %s's broadcast from chunk %d",
                    target.site,
                    self.stream_id,
                    self.cursor,
                )
                return []
            bound = self.cursor  # never ahead of the broadcast: it joins there
        else:
            bound = self.count if self.count is not None else seq
        if seq == self.count and self._broadcast_over:
            target.next_seq = seq + 1
            target.fire(TargetEvent.PUBLISHED_ALL)
            return [PublishEnd(target.site)]
        if seq < min(bound, self._limit(target.stored, floor)):
            target.next_seq = seq + 1
            return [PublishChunk(seq, target.site, target.decodes)]
        return []

    # -- helpers --------------------------------------------------------------------------------

    def maybe_start(self, now: float) -> None:
        """Start the broadcast once every target made contact, or ``resend_after`` s after the
        offers: a silent target never holds the others longer."""
        if self.started or self.inline:
            return
        # An iterator source starts too: the targets that made contact get a window, and the
        # pieces stay kept from the silent target's position until it makes contact or fails.
        # A delta: what a target holds decides what the broadcast skips, so it waits for the
        # answers of the targets that asked, as long as each reports (finding what it holds
        # may take a while); one silent for resend_after s gets unicast once it answers.
        resend_after = self.pacing.resend_after
        if any(t.awaiting_holds and now - t.quiet_since <= resend_after for t in self._active()):
            return
        waiting = any(t.state is _S.OFFERED for t in self._active())
        if waiting and now - self.created <= resend_after:
            return
        self.started = True
        riders = [t for t in self._active() if t.heard and not t.awaiting_holds]
        for rider in riders:
            rider.riding = True
        log.info(
            "stream %s: broadcast starts at chunk %d to %s",
            self.stream_id,
            self.cursor,
            ", ".join(t.site for t in riders) or "nobody yet",
        )

    def _check_hold_back(self, now: float) -> None:
        """A rider at its lag alone stops the broadcast while other riders could take more:
        after ``resend_after`` s of that without taking a chunk it leaves the ride (unicast
        serves it at its own pace). A rider that takes chunks restarts the clock: it is slow,
        not stuck, and the broker already holds its lag of the object for it."""
        riders = self._riders()
        window = self.pacing.window
        if self.lockstep or (self.count is not None and self.cursor >= self.count):
            blocking: list[Target] = []  # an iterator holds everyone; the end is never held
        else:
            blocking = [r for r in riders if self.cursor >= r.stored + self._lag]
        if not any(self.cursor < r.stored + window for r in riders):
            blocking = []  # every window is full: the sender is ahead, nobody is held back
        for rider in riders:
            if not any(rider is b for b in blocking):
                rider.held_since = None
            elif rider.held_since is None:
                rider.held_since = now
            elif now - rider.held_since > self.pacing.resend_after:
                log.info(
                    "site %s holds stream %s's broadcast back for %.1f s: it leaves the ride",
                    rider.site,
                    self.stream_id,
                    now - rider.held_since,
                )
                self.leave_ride(rider, self.cursor)
                rider.last_resend = now

    def _check_catching_up(self, now: float) -> None:
        """The broadcast waits for a target catching up by unicast, ``resend_after`` s at most:
        then it goes on, and the target goes on by unicast at its own pace."""
        for target in self._active():
            since = target.catching_up_since
            if since is not None and now - since > self.pacing.resend_after:
                log.info(
                    "site %s still catching up with stream %s's broadcast after %.1f s: "
                    "the broadcast goes on",
                    target.site,
                    self.stream_id,
                    now - since,
                )
                target.catching_up_since = None

    def leave_ride(self, target: Target, seq: int) -> None:
        """Off the broadcast: unicast from ``seq`` on."""
        target.riding = False
        target.held_since = None
        target.next_seq = min(seq, self.cursor)
        if target.state is _S.ENDED:
            target.fire(TargetEvent.REWOUND)

    def rewind(self, target: Target, seq: int) -> None:
        """Resend from chunk ``seq``, and the end after it (a duplicate end is harmless)."""
        if target.next_seq > seq:
            target.next_seq = seq
            target.fire(TargetEvent.REWOUND)
