"""What the receiving side keeps per stream, and the record it hands out for each object."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from objstream.common.amqp import Channel
from objstream.common.protocol import Offer
from objstream.common.reassembly import Reassembler
from objstream.common.receive_actions import Action
from objstream.common.receive_session import ReceiveSession
from objstream.common.streaming import ObjectAssembler
from objstream.consumer.held import Held
from objstream.consumer.resume import StreamState


@dataclass(frozen=True)
class Received:
    """An object that arrived and was verified."""

    stream_id: str
    kind: str
    """``file``, ``container`` or a custom kind."""
    name: str
    """The name the sender gave it."""
    size: int
    sha256: str
    sender: str
    path: Path | None = None
    """Files: where it is stored (the sanitized base name, maybe with a ``-N`` suffix)."""
    value: Any = None
    """Containers: the dict, list or set (``None`` when entries went to ``on_entry``);
    custom kinds: what their assembler returned."""
    info: Mapping[str, Any] = field(default_factory=dict)
    """The sender's description of the object (containers: ``container``, ``entries``)."""
    resumed_bytes: int = 0
    """Bytes that were already here from an earlier attempt (a resumed stream)."""
    sender_user: str | None = None
    """The broker user who sent it (the offer's ``user_id``, which RabbitMQ validated): who
    pushed it, or the serving site's user for a retrieval. ``sender`` is the site name the
    sender claims; this is the identity the broker vouches for."""
    reused_bytes: int = 0
    """Bytes copied from what this site held already, not received (a delta transfer)."""

    @property
    def container_type(self) -> str | None:
        """``dict``, ``list`` or ``set`` for containers."""
        value = self.info.get("container")
        return value if isinstance(value, str) else None

    @property
    def entry_count(self) -> int | None:
        value = self.info.get("entries")
        return value if isinstance(value, int) else None


@dataclass(frozen=True)
class Stored:
    """What an assembler that stores its object returns: where it is, and a value to hand out
    beside it (a container's arrays mapped from the stored file, or None)."""

    path: Path
    value: Any = None


Save = Callable[[Received], Received]
"""Runs as part of the commit, before the verdict: puts a received object where its user finds
it (a container into a ``.npz``...) and returns the record to hand out. If it raises, the
transfer fails with code ``io`` at the sender too."""


@dataclass
class Stream:
    """One stream being received: its session, its assembler, its channel and its state file."""

    offer: Offer
    reply_to: str
    session: ReceiveSession
    assembler: ObjectAssembler
    user_id: str | None = None
    """The broker user the offer came from: the stream's data must come from it too."""
    channel: Channel | None = None
    consumer_tag: str = ""
    closing: bool = False
    state: StreamState | None = None  # files: what a successor needs after a crash
    resumed_bytes: int = 0  # bytes kept from an earlier attempt
    taken_over: bool = False  # left by an earlier receiver of the directory
    held: Held | None = None  # a delta: what this site holds of the object, and where
    received: Received | None = None  # set once committed, handed out with the verdict
    pending: deque[tuple[int, Action]] = field(default_factory=deque)
    """Actions still to do, in order, each with the :attr:`generation` it was decided in."""
    taking: bool = False  # a take is in flight: the rest waits for it
    generation: int = 0  # +1 with each new channel: older delivery tags mean nothing

    def discard(self) -> None:
        """Drop the partial object and its state file."""
        self.assembler.discard()
        if self.state is not None:
            self.state.remove()

    @property
    def reassembler(self) -> Reassembler:
        return self.session.reassembler

    def leave_on_disk(self, ended: bool = False) -> None:
        """Record what is stored, close the assembler keeping its file, and let the state go:
        the stream is on disk for whoever takes it over next or, ``ended`` (its sender went
        away), for a retrieval of the same object to resume."""
        assert self.state is not None
        assert self.assembler.resumable
        self.state.save(self.reassembler.stored, self.reassembler.stored_bytes, ended=ended)
        self.assembler.suspend()
        self.state.release()
        self.state = None
