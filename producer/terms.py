"""What one send is asked for and what it gives back: the terms and results of a
:class:`~objstream.producer.transfer.Transfer`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from objstream.common.compression import NONE
from objstream.common.errors import TransferFailed


@dataclass(frozen=True)
class Quorum:
    """A send that succeeds once ``min_targets`` targets verified (k of N). The others, the
    stragglers, go on after the send returned (:meth:`Transfer.finish`) until they end, each
    reported to ``on_straggler``; with ``cancel_stragglers`` they are told to stop instead."""

    min_targets: int
    cancel_stragglers: bool = False
    on_straggler: Callable[[TargetResult], None] | None = None


@dataclass(frozen=True)
class Wire:
    """What a transfer puts on the wire besides the source's bytes."""

    rate_limit: int | None = None
    """Bytes a second it publishes at most (None or 0: no limit)."""
    compress: str = NONE
    """``auto``, ``zstd`` or ``none`` (:mod:`objstream.common.compression`)."""
    delta: bool = False
    """A target that holds pieces of the object gets only what it lacks."""


@dataclass(frozen=True)
class TargetResult:
    """How the stream to one target ended."""

    site: str
    stream_id: str
    ok: bool
    size: int
    sha256: str
    stored_as: str | None = None
    error: TransferFailed | None = None
    bytes_published: int = 0
    """Content bytes the transfer published by then, for every target, resends included, as
    they travelled (compressed chunks as compressed; headers not counted)."""
    bytes_reused: int = 0
    """Content bytes this target held already and was not sent (a delta)."""
