"""Fair shares of a site's stream slots between broker users, without I/O.

A receiver works on at most ``max_streams`` streams at once, and a serving site serves at most
that many; both used to hand them out first come, first served, so one site flooding offers or
requests (that then never send data, or never take the stream) held every slot until its timeout
and everyone else waited. Now no broker user holds more than ``user_share`` of the slots (at
least one), and a slot whose peer has not made first contact within ``contact_timeout`` seconds
is let go by the session that holds it. A site that floods can then delay another site's
transfer by at most that long.

Offers a receiver cannot start yet wait, unacked, in its inbox's prefetch (``hold_capacity``
of them), each user again within its share of that: beyond it, an offer is refused ``busy`` at
once, so a flood never fills the prefetch and blocks the others' offers behind it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum


class Room(StrEnum):
    """What a new offer or request from one user gets."""

    TAKE = "take"  # a slot now
    HOLD = "hold"  # wait for a slot (offers only)
    BUSY = "busy"  # refused: this user holds (and waits for) its share already


@dataclass
class Slots:
    """The slots of one site, by stream, and who holds them.

    Args:
        capacity: streams at once (``max_streams``).
        share: the largest fraction of ``capacity`` (and of ``hold_capacity``) one user may use.
        hold_capacity: offers that may wait for a slot (0: none wait; a serving site).
    """

    capacity: int
    share: float
    hold_capacity: int = 0
    _holders: dict[str, str] = field(default_factory=dict)  # stream id -> user
    _held: Counter[str] = field(default_factory=Counter)  # user -> offers waiting

    def per_user(self, of: int) -> int:
        """A user's share of ``of`` slots: at least one."""
        return max(1, math.floor(of * self.share + 1e-9))

    def used_by(self, user: str) -> int:
        return sum(1 for holder in self._holders.values() if holder == user)

    def __len__(self) -> int:
        return len(self._holders)

    @property
    def full(self) -> bool:
        return len(self._holders) >= self.capacity

    def room(self, user: str, *, waiting: bool = False) -> Room:
        """What an offer or request of ``user`` gets now (``waiting``: it is held already)."""
        if not self.full and self.used_by(user) < self.per_user(self.capacity):
            return Room.TAKE
        held = self._held[user] - (1 if waiting else 0)
        if held < self.per_user(self.hold_capacity) and self.hold_capacity:
            return Room.HOLD
        return Room.BUSY

    def take(self, stream_id: str, user: str) -> None:
        self._holders[stream_id] = user

    def release(self, stream_id: str) -> None:
        self._holders.pop(stream_id, None)

    def hold(self, user: str) -> None:
        """One more offer of ``user`` waits for a slot."""
        self._held[user] += 1

    def unhold(self, user: str) -> None:
        """An offer of ``user`` stopped waiting (taken, refused or expired)."""
        self._held[user] -= 1
        if self._held[user] <= 0:
            del self._held[user]

    def describe(self, user: str) -> str:
        """Why ``user`` gets no slot, for the refusal's detail."""
        share = self.per_user(self.capacity)
        return (
            f"broker user {user!r} holds {self.used_by(user)} of {self.capacity} streams (its "
            f"share: {share}) and has {self._held[user]} waiting; try again later"
        )
