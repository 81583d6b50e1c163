"""Carrying out a stream's delta actions (:class:`FindHeld`, :class:`FillHeld`): finding what
the destination holds of a sender's manifest, and copying those chunks into the stream.

Finding runs on the disk thread (it may hash an earlier version the first time); copying runs
on the connection's thread, in the stream's order: the copied chunks' writes go before the
stream's next actions, as received chunks' do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from objstream.common.delta import Holds
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
        """Copy the chunks, then the stream goes on (these actions go first)."""
        session, held, index = stream.session, stream.held, self.index
        manifest = session.delta.manifest
        follow: list[Action] = []
        lost = False
        for seq in range(action.start, action.stop):
            where = held.where.get(seq) if held is not None else None
            body = None
            if held is not None and where is not None and index is not None and manifest:
                body = index.read(held, where, manifest.digest(seq), stream.offer.chunk_size)
            if body is None:
                follow += session.held_lost(seq)
                lost = True
                break
            follow += session.held(seq, body)
            if held is not None:
                held.reused += len(body)
        if not lost:
            follow += session.filled(action.retake)
        stream.pending.extendleft((stream.generation, a) for a in reversed(follow))
