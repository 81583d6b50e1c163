"""Carrying out a stream's delta actions (:class:`FindHeld`, :class:`FillHeld`): finding what
the destination holds of a sender's manifest, and copying those chunks into the stream.

Finding runs on the disk thread (it may hash an earlier version the first time); copying runs
on the connection's thread, in the stream's order: the copied chunks' writes go before the
stream's next actions, as received chunks' do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from objstream.common.delta import Holds
from objstream.common.errors import ObjstreamError
from objstream.common.receive_actions import Action, FillHeld, FindHeld
from objstream.consumer.held import Held, HeldIndex
from objstream.consumer.offload import Offload
from objstream.consumer.streams import Stream

log = logging.getLogger(__name__)


class HeldChunks:
    """The delta actions of every stream of one receiver.

    Args:
        index: the destination's index (None: this receiver holds nothing, asks for nothing).
        offload: the disk thread.
        run: queues actions behind a stream's others (:meth:`StreamActions.run`).
    """

    def __init__(
        self,
        index: HeldIndex | None,
        offload: Offload,
        run: Callable[[Stream, Sequence[Action]], None],
    ) -> None:
        self.index = index
        self.offload = offload
        self.run = run
        self.wake: Callable[[Callable[[], None]], None] | None = None
        """Runs a callable on the connection's thread at its next look at the connection (set
        with the connection: :meth:`Connection.call_threadsafe`)."""

    def do(self, stream: Stream, action: FindHeld | FillHeld) -> None:
        if isinstance(action, FindHeld):
            self._find(stream, action)
        else:
            self._fill(stream, action)

    def record(self, stream: Stream, path: Path | None, sha256: str) -> None:
        """A stream committed (on the disk thread): index what it stored."""
        if self.index is not None and path is not None:
            self.index.record(path, stream.offer, stream.user_id, sha256)

    def _find(self, stream: Stream, action: FindHeld) -> None:
        index, manifest, user = self.index, action.manifest, stream.user_id
        if index is None or user is None:
            self.run(stream, stream.session.holds_found(Holds(manifest.chunk_count)))
            return
        work = partial(index.find, manifest, stream.offer, user)
        self.offload.on_disk(work, partial(self._found, stream, manifest.chunk_count))

    def _found(self, stream: Stream, count: int, held: Any, error: BaseException | None) -> None:
        if error is not None or not isinstance(held, Held):
            log.warning("stream %s: cannot look for held chunks: %s", stream.offer.stream_id, error)
            held = Held(Holds(count))
        stream.held = held
        log.info(
            "stream %s: %d of %d chunks held already",
            stream.offer.stream_id,
            len(held.holds),
            count,
        )
        self.run(stream, stream.session.holds_found(held.holds))

    def _fill(self, stream: Stream, action: FillHeld) -> None:
        """Copy chunk ``action.start``, then the rest of the run the same way (one chunk's
        bytes in memory at a time: each Write goes before the next copy), then the stream goes
        on. These actions go before the stream's others."""
        session, held, seq = stream.session, stream.held, action.start
        body = self._copy(stream, seq)
        if held is None or body is None:
            follow = session.held_lost(seq)
        else:
            follow = session.held(seq, body)
            held.reused += len(body)
            if seq + 1 < action.stop:
                follow.append(FillHeld(seq + 1, action.stop, action.retake))
            else:
                follow += session.filled(action.retake)
                self._go_on(stream)
        stream.pending.extendleft((stream.generation, a) for a in reversed(follow))

    def _copy(self, stream: Stream, seq: int) -> bytes | None:
        """Held chunk ``seq`` as it is where this receiver holds it, if it still matches the
        manifest's digest (None: it does not, or nothing is known of it)."""
        held, manifest, index = stream.held, stream.session.delta.manifest, self.index
        where = held.where.get(seq) if held is not None else None
        if held is None or where is None or manifest is None or index is None:
            return None
        return index.read(held, where, manifest.digest(seq), stream.offer.chunk_size)

    def _go_on(self, stream: Stream) -> None:
        """A burst of copies is done: the next goes once the connection has had its turn (not
        at the next tick, a fraction of a second later)."""
        holds = stream.session.delta.holds
        if self.wake is None or holds is None:
            return

        def again() -> None:
            if not stream.closing and stream.session.stored in holds:
                self.run(stream, stream.session.tick(time.monotonic()))

        if stream.session.stored in holds:  # (counted already; written next)
            try:
                self.wake(again)
            except ObjstreamError:  # the connection is gone: the next tick copies on
                log.debug("cannot schedule the next copies", exc_info=True)
