"""The sender's half of a delta transfer: the source's manifest, and what each target held.

A target that holds pieces of an earlier version asks for the manifest (docs/protocol.md,
"Delta transfer"); the first ask reads the whole source once, hashing each chunk (and, on the
way, the whole object for the end), and every later ask gets the same manifest.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from objstream.common.delta import Manifest, ManifestBuilder
from objstream.common.send_table import Target
from objstream.producer.pieces import PieceReader

POLL_INTERVAL = 0.05  # seconds between looks at the connection while hashing


class SourceManifest:
    """The manifest of one transfer's source, built on the first ask.

    Args:
        reader: the transfer's reader (hashing through it also feeds the end's digest).
        breathe: lets the connection work (heartbeats, replies) while a big source is hashed.
    """

    def __init__(self, reader: PieceReader, breathe: Callable[[], None]) -> None:
        self.reader = reader
        self.breathe = breathe
        self._manifest: Manifest | None = None
        self._lengths: list[int] = []  # each chunk's length: what a held chunk saves

    def get(self) -> Manifest:
        if self._manifest is None:
            self._manifest = self._build()
        return self._manifest

    def _build(self) -> Manifest:
        builder, reader = ManifestBuilder(), self.reader
        assert reader.count is not None
        began = time.monotonic()
        for seq in range(reader.count):
            piece = reader.get(seq)
            assert piece is not None
            builder.add(piece.data, piece.meta)
            self._lengths.append(len(piece.data))
            if time.monotonic() - began > POLL_INTERVAL:
                self.breathe()
                began = time.monotonic()
        return builder.build()

    def reused(self, target: Target) -> int:
        """Bytes ``target`` held already and was not sent."""
        if target.holds is None or not self._lengths:
            return 0
        return sum(self._lengths[seq] for seq in target.holds)
