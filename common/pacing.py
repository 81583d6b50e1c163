"""When may a transfer publish its next chunk, under a rate limit: a token bucket, no I/O.

A :class:`TokenBucket` is asked before each publication (:meth:`~TokenBucket.wait`) and told
what went (:meth:`~TokenBucket.spend`); the clock is an argument, so the pacing is tested over
simulated time. The driver waits the way it waits for anything else: by letting its connection
work (heartbeats, replies) for that long, never by sleeping.

The bucket starts empty, a publication waits until a chunk's worth is in it, and it holds at
most :data:`BURST_CHUNKS` chunks: from the start of a transfer to any moment, no more than
``rate`` bytes a second went out (plus what one round of publications took beyond its turn: a
broadcast chunk and the resends that came due with it), and after a pause (a full window) at
most two chunks go at once. The second chunk of room is what keeps the rate up when the wait
ends late (a poll's timeout rounds up to the millisecond): tokens that came in meanwhile are
kept, not lost to a full bucket.
"""

from __future__ import annotations

import math

BURST_CHUNKS = 2
"""Chunks' worth of bytes the bucket holds at most (see the module's docstring)."""


class TokenBucket:
    """Bytes may go out at ``rate`` a second, a chunk at a time, in bursts of at most
    :data:`BURST_CHUNKS` chunks.

    Args:
        rate: bytes per second (more than 0).
        chunk: bytes that must be in the bucket before a publication (the chunk size).
        now: the clock (seconds, monotonic) when the transfer starts: the bucket is empty then.

    Raises:
        ValueError: ``rate`` is not a positive finite number, or ``chunk`` is less than 1.
    """

    def __init__(self, rate: float, chunk: int, now: float) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"a rate limit must be a positive number of bytes per second: {rate}")
        if chunk < 1:
            raise ValueError(f"a chunk must be at least 1 byte: {chunk}")
        self.rate = float(rate)
        self.chunk = chunk
        self.burst = BURST_CHUNKS * chunk
        self._tokens = 0.0  # bytes that may go now; below 0 after a round that took more
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:  # a clock that stood still (or an earlier `now`) adds nothing
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def wait(self, now: float) -> float:
        """Seconds until the next publication may go (0: now)."""
        self._refill(now)
        missing = self.chunk - self._tokens
        # Within a byte is there: rounding would otherwise ask for waits too short to move a
        # clock (and the caller would ask again and again).
        return missing / self.rate if missing >= 1 else 0.0

    def spend(self, size: int, now: float) -> None:
        """``size`` bytes were published at ``now`` (the bucket may go below empty: the next
        publication waits for that too)."""
        self._refill(now)
        self._tokens -= size


def pacer(rate: float | None, chunk: int, now: float) -> TokenBucket | None:
    """A :class:`TokenBucket` for a transfer limited to ``rate`` bytes a second, or ``None``
    for no limit (``rate`` None or 0): then nothing is asked and nothing waits.

    Raises:
        ValueError: ``rate`` is negative or not finite, or ``chunk`` is less than 1.
    """
    if rate is None or rate == 0:
        return None
    return TokenBucket(rate, chunk, now)
