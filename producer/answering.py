"""Sends that answer retrieval requests: the promised stream, a resumed one, shared uploads.

Shared uploads: requesters of one object join a send in progress, across threads.

The serving worker's main thread takes requests; the send runs on a worker thread with its own
connection. :class:`Joiners` hands requesters over: the main thread :meth:`Joiners.join`\\ s them
while the send is pending or running, the send :meth:`Joiners.take`\\ s them at each turn, and it
ends only through :meth:`Joiners.close_if_idle`, so no requester is ever left between the two.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Resume:
    """The receiver kept the first ``from_chunk`` chunks (hashing to ``prefix_sha256``)."""

    from_chunk: int
    prefix_sha256: str


class Joiners:
    """The targets of one shared send, and those waiting to join it.

    Args:
        first: the site the send was started for.
    """

    def __init__(self, first: str) -> None:
        self._lock = threading.Lock()
        self._sites = {first}
        self._waiting: list[tuple[str, str]] = []
        self._closed = False

    def join(self, site: str, reply_to: str) -> bool:
        """Add ``site`` (its offer goes to ``reply_to``); False if the send is over or ``site``
        is in it already (serve it on its own)."""
        with self._lock:
            if self._closed or site in self._sites:
                return False
            self._sites.add(site)
            self._waiting.append((site, reply_to))
            return True

    def take(self) -> list[tuple[str, str]]:
        """The sites that joined since the last call (the send adds them)."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
            return waiting

    def close_if_idle(self) -> bool:
        """End the send if nobody waits to join (True); nobody can join after that."""
        with self._lock:
            if self._waiting:
                return False
            self._closed = True
            return True

    def close(self) -> None:
        """Nobody joins any more (the send failed or is stopping)."""
        with self._lock:
            self._closed = True


@dataclass(frozen=True)
class Answering:
    """A send that answers a retrieval request: the offer goes to the requester's reply queue
    (its ``reply_to``) instead of its inbox, under the stream id promised in the reply."""

    stream_id: str
    offer_to: str
    joiners: Joiners | None = None
    """More requesters of the same object, joining while the stream runs (shared uploads)."""
    contact_timeout: float | None = None
    """A requester that has not taken the offer after this many seconds fails: a serving slot
    is not held for one that never comes."""
