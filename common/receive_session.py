"""The receiving side of one stream, without I/O: messages and clock ticks in, actions out.

In the style of h11's connection object. A :class:`ReceiveSession` wraps the stream's
:class:`~objstream.common.reassembly.Reassembler` (which judges each chunk and holds the state
table, :data:`~objstream.common.reassembly.TRANSITIONS`) and adds the policy the receiver's driver
used to carry in its pika callbacks: when to checkpoint, ack and report progress, when to ask for a
resend, when the stream has timed out, when to commit, which verdict to send, and whether a failed
stream keeps its verified prefix.

The driver parses each delivery, feeds it in with its delivery tag and carries out the returned
actions *in order*. If carrying one out fails (a write, a commit), the driver drops the rest of
that list and reports the failure (:meth:`ReceiveSession.write_failed`,
:meth:`ReceiveSession.commit_failed`), which returns the actions of the failure. Time only enters
through the ``now`` arguments: the session never reads a clock, a file or the network.

While the stream is committing (state ``verifying``: every chunk stored and verified, the driver
finishing the object, maybe on another thread) late messages are only acked and the stream does
not time out; :meth:`ReceiveSession.committed` sends ``Done(ok=True)``, so the verdict goes out
only after the object is where the user finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objstream.common.errors import FailureCode, ProtocolError
from objstream.common.protocol import Abort, Chunk, Done, End, Inline
from objstream.common.reassembly import ChunkVerdict, Failure, Reassembler, State

FLUSH_INTERVAL = 0.05  # seconds: acks (to the broker) never wait longer than this
PROGRESS_INTERVAL = 0.25  # seconds: progress (to the sender) between quarter windows, at most
COMMIT_HEARTBEAT = 1.0  # seconds: progress while committing, so the sender knows we are alive
RECONSUME_AFTER = 5.0  # seconds of silence after a reconnect before consuming the queue again
VERDICT_AGAIN_EVERY = 1.0  # seconds: a verdict the sender missed goes again at most this often
# Failures after which a file's verified prefix is kept (the sender went away, not bad data).
KEEP_PREFIX_ON = frozenset({FailureCode.TIMEOUT, FailureCode.ABORTED})


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
    state file, close the assembler keeping its file and release the state's lock."""

    stored: int
    stored_bytes: int


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
class Reconsume:
    """Consume the data queue again, on a new channel: a consume after a reconnect brought
    nothing (on a cluster it may have reached a quorum queue between two leaders). What the
    old channel held unacked is redelivered."""


Action = (
    Write
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
)


class ReceiveSession:
    """The receiving state of one stream, driven by messages and ticks.

    Args:
        reassembler: the stream's reassembler, accepted (or resumed).
        site: this receiving site (it signs progress and verdicts).
        now: the clock at the start.
        timeout: seconds without a message after which the stream fails.
        window: the receiver's prefetch for this stream; progress goes out every quarter of it.
        checkpoints: the stream has a state file (files, spooled containers).
        keeps_prefix: a timed-out or aborted stream keeps its verified prefix (files).

    Acks go out every quarter window and after :attr:`flush_interval` at the latest; progress
    every quarter window and after :attr:`progress_interval` at the latest: longer, since every
    progress is a message the sender handles, per target, and a broadcast to many slow targets
    must not cost the sender one reply per target per flush.
    """

    flush_interval: float = FLUSH_INTERVAL
    progress_interval: float = PROGRESS_INTERVAL
    commit_heartbeat: float = COMMIT_HEARTBEAT
    reconsume_after: float = RECONSUME_AFTER

    def __init__(
        self,
        reassembler: Reassembler,
        site: str,
        *,
        now: float,
        timeout: float,
        window: int,
        checkpoints: bool = False,
        keeps_prefix: bool = False,
    ) -> None:
        self.reassembler = reassembler
        self.offer = reassembler.offer
        self.site = site
        self.timeout = timeout
        self.report_every = max(1, window // 4)
        self.checkpoints = checkpoints
        self.keeps_prefix = keeps_prefix
        self.last_activity = now
        self.last_flush = now
        self.last_report = now
        self.reconnected_at: float | None = None  # silent since a reconnect (None: data came)
        self.unacked_tag = 0  # highest delivery tag not yet acked (0: none)
        self.reported = reassembler.stored
        self.verdict: Done | None = None  # once sent: again if a resend shows it was missed
        self.verdict_at = 0.0

    @property
    def state(self) -> State:
        return self.reassembler.state

    @property
    def finished(self) -> bool:
        return self.reassembler.finished

    @property
    def stored(self) -> int:
        return self.reassembler.stored

    @property
    def stored_bytes(self) -> int:
        return self.reassembler.stored_bytes

    # -- events -----------------------------------------------------------------------------------

    def start(self) -> list[Action]:
        """First contact (a new stream, or one taken over): the sender goes on from here."""
        return [self._progress()]

    def reconnected(self, now: float) -> list[Action]:
        """The connection was re-established: old delivery tags mean nothing, and chunks in
        flight may be gone with the broker, so ask for them from the first missing one."""
        self.unacked_tag = 0
        self.last_activity = now
        if self.finished or self.state is State.VERIFYING:
            return []
        self.reconnected_at = now
        return [self._progress(resend_from=self.stored)]

    def receive(self, tag: int, message: Any, body: bytes, now: float) -> list[Action]:
        """A parsed message from the stream's data queue, delivered with ``tag``."""
        if not self._arrived(tag, now):
            return self._after_verdict(now)
        try:
            if message.ident != self.offer.stream_id:
                raise ProtocolError(
                    f"message for stream {message.ident} on the data queue of "
                    f"{self.offer.stream_id}"
                )
            if isinstance(message, Chunk):
                return self._chunk(tag, message, body)
            if isinstance(message, End):
                self.reassembler.record_end(message)
            elif isinstance(message, Abort):
                return self.fail(FailureCode.ABORTED, f"sender gave up: {message.reason}")
            else:
                raise ProtocolError(f"unexpected {type(message).__name__} message on a data queue")
        except ProtocolError as e:
            return [DeadLetter(tag, str(e)), *self._after_message()]
        return self._after_message()

    def malformed(self, tag: int, reason: str, now: float) -> list[Action]:
        """A delivery that does not parse: it is dead-lettered (and acked with the rest)."""
        if not self._arrived(tag, now):
            return []
        return [DeadLetter(tag, reason)]

    def inline(self, inline: Inline, body: bytes) -> list[Action]:
        """A small object that came whole inside its offer: store, verify, commit at once."""
        offer = self.offer
        assert offer.chunk_count is not None
        assert offer.size is not None
        actions: list[Action] = []
        try:
            if offer.chunk_count:
                outcome = self.reassembler.chunk(0, inline.crc32, body)
                if outcome.verdict is not ChunkVerdict.WRITE:  # corrupt: nothing to resend from
                    return self.fail(FailureCode.CHECKSUM, outcome.detail)
                actions.append(Write(0, outcome.offset, body, inline.meta))
            elif body:
                raise ProtocolError("inline offer of 0 chunks with a body")
            end = End(
                stream_id=offer.stream_id,
                chunk_count=offer.chunk_count,
                size=offer.size,
                sha256=inline.sha256,
            )
            self.reassembler.record_end(end)
        except ProtocolError as e:
            return self.fail(FailureCode.PROTOCOL, str(e))
        return actions + self._verify(flush=False)  # one message, no data queue: no ack

    def tick(self, now: float) -> list[Action]:
        """Time passed: fail a silent stream, flush acks and progress that waited too long."""
        if self.finished:
            return []
        if self.state is State.VERIFYING:
            # Committing (a save can take minutes): no timeout here, the driver reports back;
            # the sender hears every commit_heartbeat that this target is alive and has it all,
            # or it would resend after its resend_after and fail us after its timeout.
            if now - self.last_report < self.commit_heartbeat:
                return []
            self.last_report = now
            return [self._progress()]
        if now - self.last_activity > self.timeout:
            return self.fail(
                FailureCode.TIMEOUT, f"no data from {self.offer.sender} for {self.timeout:g} s"
            )
        if self.reconnected_at is not None and now - self.reconnected_at > self.reconsume_after:
            self.reconnected_at = now  # and again, while nothing comes
            self.unacked_tag = 0  # the old channel's tags mean nothing on the new one
            return [Reconsume()]
        flush_due = self.unacked_tag and now - self.last_flush > self.flush_interval
        report_due = (
            self.stored != self.reported and now - self.last_report >= self.progress_interval
        )
        if flush_due or report_due:
            return self._flush(now, report=report_due)
        return []

    def write_failed(self, code: FailureCode, detail: str) -> list[Action]:
        """A :class:`Write` could not be carried out (disk full, a failing ``on_entry``...)."""
        return self.fail(code, detail)

    def committed(self, value: Any = None, path: Path | None = None) -> list[Action]:
        """The :class:`Commit` succeeded: ``value`` is what the assembler returned, ``path``
        where the object is (a file's final path, a saved container's file)."""
        if path is None and isinstance(value, Path):
            path = value
        self.reassembler.mark_done()
        offer = self.offer
        done = Done(
            stream_id=offer.stream_id,
            site=self.site,
            ok=True,
            stored_as=path.name if path else None,
        )
        actions: list[Action] = [RemoveCheckpoint()] if self.checkpoints else []
        return actions + self._end(done, Finished(ok=True, value=value, path=path))

    def commit_failed(self, code: FailureCode, detail: str) -> list[Action]:
        """The :class:`Commit` failed: the sender is told, nothing is kept."""
        return self.fail(code, detail)

    def suspend(self, now: float) -> list[Action]:
        """This receiver stops: checkpoint, ack and report what is stored, and leave the stream
        on disk for the next receiver of the directory (which takes it over)."""
        if not self.checkpoints or self.state is not State.RECEIVING:
            return self.fail(FailureCode.ABORTED, f"receiver of site {self.site} shut down")
        actions = self._flush(now)
        self.reassembler.suspend()
        return [*actions, LeaveOnDisk(self.stored, self.stored_bytes)]

    def fail(self, code: FailureCode, detail: str) -> list[Action]:
        """Fail the stream: keep a file's verified prefix if the sender went away, else drop
        what arrived; send the failed verdict."""
        if self.finished:
            return []
        self.reassembler.fail(Failure(code, detail))
        return self._failed(code, detail)

    # -- inside -----------------------------------------------------------------------------------

    def _failed(self, code: FailureCode, detail: str) -> list[Action]:
        """The actions of a failure the reassembler has recorded."""
        actions: list[Action]
        if code in KEEP_PREFIX_ON and self.checkpoints and self.keeps_prefix and self.stored:
            detail += (
                f"; the {self.stored_bytes} bytes received are kept: retrieving "
                f"{self.offer.name!r} from {self.offer.sender} resumes there"
            )
            actions = [LeaveOnDisk(self.stored, self.stored_bytes)]
        else:
            actions = [Discard()]
        done = Done(
            stream_id=self.offer.stream_id,
            site=self.site,
            ok=False,
            code=code,
            detail=detail[:2000],
        )
        return actions + self._end(done, Finished(ok=False, code=code, detail=detail))

    def _arrived(self, tag: int, now: float) -> bool:
        """Note a delivery; False if the stream no longer takes messages (acked with the rest)."""
        self.last_activity = now
        self.reconnected_at = None
        self.unacked_tag = max(self.unacked_tag, tag)
        return not self.finished and self.state is not State.VERIFYING

    def _chunk(self, tag: int, chunk: Chunk, body: bytes) -> list[Action]:
        outcome = self.reassembler.chunk(chunk.seq, chunk.crc32, body)
        actions: list[Action] = []
        if outcome.verdict is ChunkVerdict.WRITE:
            actions.append(Write(chunk.seq, outcome.offset, body, chunk.meta))
            return actions + self._after_message()
        if outcome.verdict is ChunkVerdict.DUPLICATE:
            # A resend of what is stored: the sender missed a report. Report again (at the
            # next tick, at most every progress_interval) or it would resend for ever.
            self.reported = -1
        if outcome.verdict is ChunkVerdict.CORRUPT:
            actions.append(DeadLetter(tag, outcome.detail))
        if outcome.resend_from is not None:
            actions.append(self._progress(resend_from=outcome.resend_from))
        return actions

    def _after_message(self) -> list[Action]:
        if self.reassembler.complete:
            return self._verify()
        if self.stored - self.reported >= self.report_every:
            return self._flush(self.last_activity)
        return []

    def _verify(self, *, flush: bool = True) -> list[Action]:
        failure = self.reassembler.verify()
        if failure is not None:
            return self._failed(failure.code, failure.detail)
        # Everything is stored: checkpointed, acked and reported before the commit, so the
        # sender stops resending while it waits for the verdict.
        if not flush:
            return [Commit()]
        return [*self._flush(self.last_activity), Commit()]

    def _flush(self, now: float, *, report: bool = True) -> list[Action]:
        """Checkpoint (before the ack: a crash then only redelivers), ack, report progress
        (if ``report``)."""
        actions: list[Action] = []
        if self.checkpoints:
            actions.append(Checkpoint(self.stored, self.stored_bytes))
        if self.unacked_tag:
            actions.append(Ack(self.unacked_tag))
            self.unacked_tag = 0
        if report and self.stored != self.reported:
            actions.append(self._progress())
            self.last_report = now
        self.last_flush = now
        return actions

    def _progress(self, resend_from: int | None = None) -> SendProgress:
        self.reported = self.stored
        return SendProgress(self.stored, self.stored_bytes, resend_from)

    def _after_verdict(self, now: float) -> list[Action]:
        """A message after the verdict (the driver still consumes the data queue a while): the
        sender resends, so it missed the verdict, which goes again, at most every
        :data:`VERDICT_AGAIN_EVERY` s, with an ack of what came since (fewer than a window, so
        the next resend gets through)."""
        if self.verdict is None or now - self.verdict_at < VERDICT_AGAIN_EVERY:
            return []  # committing, or just said: acked with the rest
        self.verdict_at = now
        ack, self.unacked_tag = Ack(self.unacked_tag), 0
        return [ack, SendVerdict(self.verdict)]

    def _end(self, done: Done, finished: Finished) -> list[Action]:
        actions: list[Action] = []
        if self.unacked_tag:
            actions.append(Ack(self.unacked_tag))
            self.unacked_tag = 0
        self.verdict, self.verdict_at = done, self.last_activity
        return [*actions, SendVerdict(done), finished]
