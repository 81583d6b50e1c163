"""The end of one stream at its receiver, without I/O: the verdict, said again when a resend
shows the sender missed it, and the retirement of the stream's data queue.

Once a stream ended (either way), its data queue is still consumed for :data:`LINGER` s: a
message arriving there means the sender missed the verdict, which goes again (at most every
:data:`VERDICT_AGAIN_EVERY` s; one owed sooner goes at the first tick after). Then the queue is
unbound from the stream's keys (:class:`Retire`: a late resend is unroutable rather than routed
to a queue being deleted) and deleted :data:`RETIRE_AFTER` s later (:class:`DeleteQueue`). At
most :data:`MAX_LINGERING` ended streams linger (each holds a channel): :func:`crowded_out`
names those to retire early.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from objstream.common.protocol import Done
from objstream.common.receive_actions import (
    LINGER,
    MAX_LINGERING,
    RETIRE_AFTER,
    VERDICT_AGAIN_EVERY,
    Action,
    DeleteQueue,
    Retire,
    SendVerdict,
)


@dataclass
class StreamEnd:
    """What an ended stream still does: say its verdict again, retire its data queue."""

    verdict: Done | None = None
    verdict_at: float = 0.0
    ended_at: float | None = None  # the first tick after the verdict
    retired: bool = False  # the data queue is unbound
    retired_at: float = 0.0
    gone: bool = False  # and deleted: nothing more to do
    owed: bool = False  # a message came since the verdict was last said: say it again

    def said(self, done: Done, now: float) -> None:
        """The verdict went out at ``now``."""
        self.verdict, self.verdict_at = done, now

    def again(self, now: float) -> Done | None:
        """The verdict to say again now (a message came after it: the sender resends, so it
        missed it), at most every :data:`VERDICT_AGAIN_EVERY` s; None: not now (it is then
        owed, and :meth:`tick` says it when it is due)."""
        if self.verdict is None:
            return None  # committing
        if now - self.verdict_at < VERDICT_AGAIN_EVERY:
            self.owed = True  # just said: perhaps lost too (the resend may have crossed it)
            return None
        self.verdict_at, self.owed = now, False
        return self.verdict

    def tick(self, now: float, *, queue: bool) -> list[Action]:
        """Time passed since the end; ``queue``: the stream has a data queue of this
        receiver's (not an inline offer, nor one left for a successor)."""
        if self.gone:
            return []
        if not queue:
            self.gone = True
            return []
        if self.ended_at is None:
            self.ended_at = now
        if self.owed and not self.retired and (verdict := self.again(now)) is not None:
            return [SendVerdict(verdict)]
        if not self.retired and now - self.ended_at >= LINGER:
            return self.retire(now)
        if self.retired and now - self.retired_at >= RETIRE_AFTER:
            self.gone = True
            return [DeleteQueue()]
        return []

    def retire(self, now: float) -> list[Action]:
        """Unbind the data queue now (its linger cut short)."""
        if self.retired or self.gone:
            return []
        self.retired, self.retired_at = True, now
        return [Retire()]

    def close_out(self, now: float, *, queue: bool) -> list[Action]:
        """The receiver stops: what the ended stream still owes its data queue, at once."""
        if self.gone:
            return []
        actions = [*self.retire(now), DeleteQueue()] if queue else []
        self.gone = True
        return actions

    @property
    def lingering(self) -> bool:
        return self.ended_at is not None and not self.retired and not self.gone


def crowded_out(ends: Sequence[StreamEnd]) -> list[StreamEnd]:
    """The ends whose data queues must be retired now though their linger is not over: the
    oldest beyond :data:`MAX_LINGERING`."""
    lingering = sorted((e for e in ends if e.lingering), key=lambda e: e.ended_at or 0.0)
    return lingering[: max(0, len(lingering) - MAX_LINGERING)]
