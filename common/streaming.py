"""The two halves every kind of object is streamed with, as in NVIDIA FLARE's ObjectStreamer.

An :class:`ObjectStreamer` (the producing half) cuts an object into pieces, each some bytes and
an optional small ``meta`` mapping. An :class:`ObjectAssembler` (the consuming half) takes the
pieces in order and returns the result. Files and containers are built on these two; a new kind
(records from a generator, a database table row by row...) is one subclass of each, registered
under a kind name, and gets the transport, window, verification and resends for free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

MetaValue = str | int | float | bool

ProgressHook = Callable[[str, str, int, "int | None"], None]
"""Called as ``hook(peer_site, stream_id, bytes_stored, total_bytes_or_None)`` as a stream
advances (for progress bars); it must be quick and must not raise."""


@dataclass(frozen=True)
class StreamOutcome:
    """How a stream ended with one peer, as an outcome hook hears it (for metrics...)."""

    site: str
    """The peer: the sender of a received stream, the requester of a served one."""
    stream_id: str
    """The stream's id (a refused request's id, for a request refused before any stream)."""
    code: str | None = None
    """None if the peer stored and verified the object; otherwise why not: a
    :class:`~objstream.common.errors.FailureCode`, or ``error`` for an error without one."""
    refused: bool = False
    """Refused before any data moved (an offer, or a retrieval request)."""

    @property
    def outcome(self) -> str:
        """``ok``, ``refused`` or ``failed``."""
        if self.code is None:
            return "ok"
        return "refused" if self.refused else "failed"


OutcomeHook = Callable[[StreamOutcome], None]
"""Called once as each stream ends with a peer (or a request is refused); it may be called
from another thread than the one that made the object, must be quick and must not raise."""


@dataclass(frozen=True)
class Piece:
    """One chunk's worth of an object: at most ``chunk_size`` bytes, and what they are."""

    data: bytes
    meta: Mapping[str, MetaValue] | None = None


class ObjectStreamer(ABC):
    """The producing half: the pieces of one object, in order.

    Subclasses set :attr:`kind` and :attr:`name`, and implement :meth:`pieces`. If they know the
    object's total ``size`` and ``chunk_count`` up front they set them in :meth:`prepare` (the
    receiver then checks them as the stream goes); if they can produce any piece by number they
    set :attr:`random_access` and implement :meth:`piece`, which lets the sender resend without
    keeping a copy. Otherwise the sender keeps the last ``window`` pieces to resend from.
    """

    kind: ClassVar[str]
    random_access: ClassVar[bool] = False

    name: str
    size: int | None = None
    chunk_count: int | None = None

    def prepare(self, chunk_size: int) -> None:
        """Called once before streaming, with the chunk size pieces must not exceed."""
        self.chunk_size = chunk_size

    def info(self) -> dict[str, MetaValue]:
        """A small, flat description sent with the offer (at most 16 entries)."""
        return {}

    @abstractmethod
    def pieces(self) -> Iterator[Piece]:
        """The pieces, in order; each ``data`` at most ``chunk_size`` bytes."""

    def piece(self, seq: int) -> Piece:
        """Piece number ``seq`` (only for ``random_access`` streamers)."""
        raise NotImplementedError

    def check_unchanged(self) -> None:  # noqa: B027 - optional hook
        """Raise if the object changed since the streamer started reading it (a file written
        to meanwhile): called before the end, whose SHA-256 would otherwise vouch for a mix of
        old and new bytes that never existed together."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the streamer holds (files...)."""


class ObjectAssembler(ABC):
    """The consuming half: takes the pieces of one object in order and returns the result.

    ``take`` is called for each piece in sequence (``offset`` is the byte position of its data
    in the whole); ``finish`` once every piece arrived and the whole was verified (size and
    SHA-256); ``discard`` if the stream failed, to drop anything partial.

    A ``resumable`` assembler keeps what it took on disk: ``suspend`` leaves it there for a
    receiver that takes the stream over after this one stopped or died.
    """

    resumable: ClassVar[bool] = False
    takes_inline: ClassVar[bool] = False
    """``take`` only writes to a file (a ``pwrite`` into the page cache) and may run on the
    connection's thread; otherwise (decoding, user code) it runs on a thread of its own."""

    def inline(self, size: int, meta: Mapping[str, Any] | None) -> bool:
        """Whether taking the next piece (``size`` bytes, ``meta``) may run on the connection's
        thread: it only copies bytes (into a file, or into a buffer allocated already) and
        runs no user code. A piece taken elsewhere holds the stream's next pieces in memory
        until it is taken, so what is quick should say so. By default: :attr:`takes_inline`."""
        return self.takes_inline

    @abstractmethod
    def take(self, offset: int, data: bytes, meta: Mapping[str, Any] | None) -> None:
        """Take the next piece."""

    @abstractmethod
    def finish(self) -> Any:
        """Return the object (or a path to it)."""

    def discard(self) -> None:  # noqa: B027 - optional hook
        """Drop whatever was assembled so far."""

    def suspend(self) -> None:
        """Close, keeping what was taken for a successor (``resumable`` assemblers only)."""
        raise NotImplementedError
