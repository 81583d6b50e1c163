"""Taking streams over: a receiver's half of resuming, as a part it holds (not a mixin).

Three cases, all resting on the state file next to the partial file
(:mod:`objstream.consumer.resume`): a receiver that stops checkpoints its streams for a successor
(:meth:`~objstream.consumer.stream_table.StreamTable.suspend`); a receiver that starts takes over
what a dead one left (:meth:`ResumeStore.left_over`); and a file stream whose sender went away
keeps its verified prefix, marked ended, which no receiver takes over and a retrieval of the
same file later continues (:meth:`ResumeStore.kept`, :meth:`ResumeStore.adopt`).

Everything here that reads a whole prefix back (to hash it) runs before the receiver connects,
or on a worker thread: never on the connection's thread, whose heartbeats must go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objstream.common.errors import ObjstreamError
from objstream.common.protocol import CONTAINER_KIND, FILE_KIND, Offer
from objstream.common.reassembly import Reassembler
from objstream.common.settings import Settings
from objstream.common.streaming import ObjectAssembler
from objstream.consumer.container_assembler import OnEntry
from objstream.consumer.container_sink import ContainerSink, StoreOptions
from objstream.consumer.container_spool import ContainerSpool
from objstream.consumer.file_sink import FileAssembler
from objstream.consumer.resume import (
    Resumable,
    StreamState,
    adopt,
    clear_stream,
    find_kept,
    find_resumable,
    remove_abandoned,
)

log = logging.getLogger(__name__)


@dataclass
class Reopened:
    """A stream on disk, ready to go on: what a :class:`~objstream.consumer.streams.Stream` is
    built from."""

    offer: Offer
    reply_to: str
    reassembler: Reassembler
    assembler: ObjectAssembler
    state: StreamState
    resumed_bytes: int
    user_id: str | None = None
    pushed: bool = False
    """A push left by a dead receiver (not a retrieval): ``accept_from`` still applies."""


@dataclass
class LeftOver:
    """What a dead receiver of the directory left: streams to take over, and the streams that
    had ended (their sender went away; their prefixes wait for a retrieval), whose data queues
    may have outlived that receiver."""

    streams: list[Reopened]
    ended: list[Offer]


class ResumeStore:
    """The state files, partial files and kept prefixes of one destination directory."""

    def __init__(
        self,
        dest: Path,
        settings: Settings,
        *,
        on_entry: OnEntry | None = None,
        spool_containers: bool = False,
        store: StoreOptions | None = None,
        as_torch: bool = False,
    ) -> None:
        self.dest = dest
        self.settings = settings
        self._on_entry = on_entry
        self._spool_containers = spool_containers
        self._store = store
        self._as_torch = as_torch

    def cleanup(self) -> None:
        """Remove what was abandoned longer ago than the stream TTL (its data queue is gone)."""
        remove_abandoned(self.dest, self.settings.stream_ttl)

    def left_over(self) -> LeftOver:
        """The streams a receiver of this directory left when it died, hashed and reopened
        (locked by this process), and those that had ended. Slow on big prefixes: call it
        before connecting."""
        self.cleanup()
        found: list[Reopened] = []
        live, ended = find_resumable(self.dest)
        for item in live:
            offer = item.offer
            if offer.kind == CONTAINER_KIND and not (self._spool_containers or self._store):
                item.state.release()  # for a receiver that keeps containers on disk
                continue
            stores = offer.kind == CONTAINER_KIND and self._store is not None
            try:
                # A stored container's prefix is hashed as its journal is replayed.
                sha = None if stores else item.prefix_sha256()
                assembler = self._reopen(item)
                if isinstance(assembler, ContainerSink):
                    sha = assembler.prefix_sha256()
            except (OSError, ValueError, ObjstreamError) as e:
                log.warning("cannot resume stream %s: %s", offer.stream_id, e)
                item.discard()
                continue
            reassembler = Reassembler.resumed(offer, item.stored, item.stored_bytes, sha)
            found.append(
                Reopened(
                    offer,
                    item.reply_to,
                    reassembler,
                    assembler,
                    item.state,
                    item.stored_bytes,
                    item.user_id,
                    item.pushed,
                )
            )
        return LeftOver(found, [item.offer for item in ended])

    def _reopen(self, item: Resumable) -> ObjectAssembler:
        if item.offer.kind == FILE_KIND:
            return FileAssembler(self.dest, item.offer, reopen=True)
        if self._store is not None:
            return ContainerSink(
                self.dest,
                item.offer,
                as_memmap=self._store.memmap,
                reopen=True,
                stored=item.stored,
                stored_bytes=item.stored_bytes,
            )
        return ContainerSpool(
            self.dest,
            item.offer,
            self._on_entry,
            reopen=True,
            stored=item.stored,
            stored_bytes=item.stored_bytes,
            as_torch=self._as_torch,
        )

    def clear(self, stream_id: str) -> bool:
        """Remove what a dead receiver left of stream ``stream_id`` before it is set up again;
        False if a live receiver of the directory holds it (see :func:`clear_stream`)."""
        return clear_stream(self.dest, stream_id)

    def kept(self, from_site: str, name: str) -> Resumable | None:
        """The kept prefix of file ``name`` from ``from_site``, hashed, if there is one. Slow on
        big prefixes: call it off the connection's thread."""
        item = find_kept(self.dest, from_site, name)
        if item is None:
            return None
        try:
            item.prefix_sha256()
        except OSError as e:
            log.warning("cannot resume %r from %s: %s", name, item.partial, e)
            item.discard()
            return None
        return item

    def adopt(
        self, offer: Offer, reply_to: str, kept: Resumable, user_id: str | None = None
    ) -> Reopened:
        """A resumed retrieval: the kept prefix (hashed already) becomes the start of stream
        ``offer`` (from broker user ``user_id``)."""
        state = adopt(kept, self.dest, offer, reply_to, user_id)
        try:
            assembler = FileAssembler(self.dest, offer, reopen=True)
        except OSError:
            state.remove()
            raise
        log.info(
            "resuming %r from %s at chunk %d of %s (%d bytes kept)",
            offer.name,
            offer.sender,
            kept.stored,
            offer.chunk_count,
            kept.stored_bytes,
        )
        sha = kept.prefix_sha256()
        reassembler = Reassembler.resumed(offer, kept.stored, kept.stored_bytes, sha)
        return Reopened(offer, reply_to, reassembler, assembler, state, kept.stored_bytes, user_id)

    @staticmethod
    def drop(assembler: ObjectAssembler, state: StreamState | None) -> None:
        assembler.discard()
        if state is not None:
            state.remove()


def keeps_prefix(assembler: Any) -> bool:
    """A timed-out or aborted stream into this assembler keeps its verified prefix (files)."""
    return isinstance(assembler, FileAssembler) and assembler.resumable  # not a pipe
