"""The receive session's vocabulary: its terms, its timings, the actions it returns, and how a
failure of the driver's own work (a write, a commit) is classified. Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objstream.common.compression import Encoding
from objstream.common.delta import Manifest
from objstream.common.errors import FailureCode, ObjectTooLarge, ObjstreamError, SaveError
from objstream.common.protocol import Done

FLUSH_INTERVAL = 0.05  # seconds: acks (to the broker) never wait longer than this
PROGRESS_INTERVAL = 0.25  # seconds: progress (to the sender) between quarter windows, at most
COMMIT_HEARTBEAT = 1.0  # seconds: progress while committing, so the sender knows we are alive
RECONSUME_AFTER = 5.0  # seconds of silence after a reconnect before consuming the queue again
VERDICT_AGAIN_EVERY = 1.0  # seconds: a verdict the sender missed goes again at most this often
LINGER = 15.0
"""Seconds a data queue is still consumed after the verdict: a resend there means the sender
missed the verdict, which goes again. At most :data:`MAX_LINGERING` streams linger (a channel
each): beyond, the oldest is retired at once (:func:`crowded_out`)."""
MAX_LINGERING = 64
RETIRE_AFTER = 2.0
"""Seconds between unbinding the data queue of a stream that ended and deleting it. A publish
the broker routed to a quorum queue while it was being deleted (with one of its nodes down)
crashed the publisher's channel on RabbitMQ 3.10; unbound first, the queue gets none."""
# Failures after which a file's verified prefix is kept (the sender went away, not bad data).
KEEP_PREFIX_ON = frozenset({FailureCode.TIMEOUT, FailureCode.ABORTED})


@dataclass(frozen=True)
class Terms:
    """How one stream is received.

    Args:
        timeout: seconds without a message after which the stream fails.
        window: the receiver's prefetch for the stream; progress goes out every quarter of it.
        checkpoints: the stream has a state file (files, spooled containers).
        keeps_prefix: a timed-out or aborted stream keeps its verified prefix (files).
        contact_timeout: seconds the sender has, after the offer was taken, to send anything
            (None: ``timeout``); a slot an offer took is let go soon if nothing follows.
        delta: ask the sender for its manifest (a delta transfer).
    """

    timeout: float
    window: int
    checkpoints: bool = False
    keeps_prefix: bool = False
    contact_timeout: float | None = None
    delta: bool = False  # ask for the manifest (the offer allows it, this receiver holds some)


def classify(
    error: BaseException, doing: str, io_errors: tuple[type[BaseException], ...] = (OSError,)
) -> tuple[FailureCode, str]:
    """The verdict on a stream whose driver failed ``doing`` something (storing a chunk,
    committing, saving): ``io`` for the file system (and whatever ``io_errors`` names: a save
    that cannot write its format), ``protocol`` for content that does not follow the protocol
    (a container whose entries do not add up), ``refused`` for what the receiving side will
    not take (a container it cannot store as asked) and for its own code (an ``on_entry``
    callback, a custom assembler)."""
    if isinstance(error, SaveError):
        return FailureCode.REFUSED, str(error)
    if isinstance(error, io_errors):
        strerror = error.strerror if isinstance(error, OSError) else None
        return FailureCode.IO, f"{doing}: {strerror or error}"
    if isinstance(error, ObjectTooLarge):  # a stream of unknown size grew past the limit
        return FailureCode.TOO_LARGE, str(error)
    if isinstance(error, ObjstreamError):
        return FailureCode.PROTOCOL, str(error)
    return FailureCode.REFUSED, f"the receiving side failed: {error!r}"


# -- actions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """Hand the chunk's body to the assembler: content bytes from ``offset`` on."""

    seq: int
    offset: int
    body: bytes
    meta: Any = None


@dataclass(frozen=True)
class Checkpoint:
    """Record ``stored`` chunks (``stored_bytes`` bytes) in the state file, before the ack."""

    stored: int
    stored_bytes: int


@dataclass(frozen=True)
class Ack:
    """Ack every delivery up to ``tag`` on the stream's channel."""

    tag: int
    multiple: bool = True


@dataclass(frozen=True)
class SendProgress:
    """Tell the sender how far the stream got (and where to resend from, if set)."""

    stored: int
    stored_bytes: int
    resend_from: int | None = None
    encoding: Encoding | None = None  # the chunk encoding this receiver decodes (offered)
    delta: bool = False  # send the manifest: this receiver holds pieces of the sender's
    holds: str | None = None  # the answer to the manifest (Holds, encoded)


@dataclass(frozen=True)
class DeadLetter:
    """Dead-letter the delivery ``tag`` that was just fed in, with ``reason``."""

    tag: int
    reason: str


@dataclass(frozen=True)
class Commit:
    """Every chunk is stored and verified: finish the object (assembler, save), then report
    :meth:`ReceiveSession.committed` or :meth:`ReceiveSession.commit_failed`."""


@dataclass(frozen=True)
class Discard:
    """Drop the partial object and its state file."""


@dataclass(frozen=True)
class LeaveOnDisk:
    """Keep the verified prefix (``stored`` chunks, ``stored_bytes`` bytes): record it in the
    state file, close the assembler keeping its file and release the state's lock.

    ``ended``: the stream is over (its sender went away) and the prefix waits for a retrieval
    of the same object; otherwise it is suspended, for the next receiver to take over."""

    stored: int
    stored_bytes: int
    ended: bool = False


@dataclass(frozen=True)
class RemoveCheckpoint:
    """The object is committed: its state file goes."""


@dataclass(frozen=True)
class SendVerdict:
    """Publish the verdict to the sender's reply queue."""

    done: Done


@dataclass(frozen=True)
class Finished:
    """The stream is over for this receiver: close its channel, hand the outcome out."""

    ok: bool
    code: FailureCode | None = None
    detail: str = ""
    value: Any = None
    path: Path | None = None


@dataclass(frozen=True)
class Retire:
    """The stream ended :data:`LINGER` s ago (or too many linger): unbind its data queue from the
    stream's keys, so a late resend is unroutable, and close its channel."""


@dataclass(frozen=True)
class DeleteQueue:
    """Delete the data queue unbound :data:`RETIRE_AFTER` s ago (the target does: least
    privilege does not let the sender); the stream is gone here."""


@dataclass(frozen=True)
class Reconsume:
    """Consume the data queue again, on a new channel: a consume after a reconnect brought
    nothing (on a cluster it may have reached a quorum queue between two leaders). What the
    old channel held unacked is redelivered."""


@dataclass(frozen=True)
class FindHeld:
    """Find which chunks of ``manifest`` this receiver holds already (what it stored from the
    same sender), then report :meth:`ReceiveSession.holds_found`."""

    manifest: Manifest


@dataclass(frozen=True)
class FillHeld:
    """Copy chunks ``start .. stop-1`` from what this receiver holds, each checked against its
    digest in the manifest: :meth:`ReceiveSession.held` each (one that cannot be read or does
    not match: :meth:`ReceiveSession.held_lost`, and stop); then
    :meth:`ReceiveSession.retake` with ``retake`` (the chunk that came after them), or
    :meth:`ReceiveSession.filled`."""

    start: int
    stop: int
    retake: tuple[int, Any, bytes] | None = None


Action = (
    Write
    | FindHeld
    | FillHeld
    | Checkpoint
    | Ack
    | SendProgress
    | DeadLetter
    | Commit
    | Discard
    | LeaveOnDisk
    | RemoveCheckpoint
    | SendVerdict
    | Finished
    | Reconsume
    | Retire
    | DeleteQueue
)
