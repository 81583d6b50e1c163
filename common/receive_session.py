"""The receiving side of one stream, without I/O: messages and clock ticks in, actions out.

In the style of h11's connection object. A :class:`ReceiveSession` wraps the stream's
:class:`~objstream.common.reassembly.Reassembler` (which judges each chunk and holds the state
table, :data:`~objstream.common.reassembly.TRANSITIONS`) and adds the policy the receiver's driver
used to carry in its pika callbacks: when to checkpoint, ack and report progress, when to ask for a
resend, when the stream has timed out, when to commit, which verdict to send, and whether a failed
stream keeps its verified prefix.

The driver parses each delivery, feeds it in with its delivery tag and carries out the returned
actions *in order*. If carrying one out fails (a write, a commit), the driver drops the rest and
reports the failure (:meth:`ReceiveSession.write_raised`, :meth:`ReceiveSession.commit_failed`),
which returns the actions of the failure. Time only enters through the ``now`` arguments: the
session never reads a clock, a file or the network.

While the stream is committing (state ``verifying``: every chunk stored and verified, the driver
finishing the object, maybe on another thread) late messages are only acked and the stream does
not time out; :meth:`ReceiveSession.committed` sends ``Done(ok=True)``, so the verdict goes out
only after the object is where the user finds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from objstream.common.delta import Holds
from objstream.common.errors import FailureCode, ProtocolError
from objstream.common.naming import stored_name
from objstream.common.protocol import Abort, Chunk, Done, End, Envelope, Inline, parse
from objstream.common.protocol import Manifest as ManifestMessage
from objstream.common.reassembly import ChunkVerdict, Failure, Reassembler, State
from objstream.common.receive_actions import (
    COMMIT_HEARTBEAT,
    FLUSH_INTERVAL,
    KEEP_PREFIX_ON,
    PROGRESS_INTERVAL,
    RECONSUME_AFTER,
    Ack,
    Action,
    Checkpoint,
    Commit,
    DeadLetter,
    Discard,
    Finished,
    LeaveOnDisk,
    Reconsume,
    RemoveCheckpoint,
    SendProgress,
    SendVerdict,
    Terms,
    Write,
    classify,
)
from objstream.common.receive_delta import DeltaReceive
from objstream.common.receive_end import StreamEnd
from objstream.common.topology import Topology


class ReceiveSession:
    """The receiving state of one stream, driven by messages and ticks.

    Args:
        reassembler: the stream's reassembler, accepted (or resumed).
        site: this receiving site (it signs progress and verdicts).
        terms: timeouts, window, what is kept (:class:`Terms`).
        now: the clock at the start.
        user: the broker user the offer came from: the stream's data must come from it too.

    Acks go out every quarter window and after :attr:`flush_interval` at the latest; progress
    every quarter window and after :attr:`progress_interval` at the latest: longer, since every
    progress is a message the sender handles, per target, and a broadcast to many slow targets
    must not cost the sender one reply per target per flush.

    Once the stream ended, its data queue is still consumed for :data:`LINGER` s (a resend
    there gets the verdict again), then it is unbound (:class:`Retire`) and deleted
    :data:`RETIRE_AFTER` s later (:class:`DeleteQueue`): the session is then :attr:`gone`.
    """

    flush_interval: float = FLUSH_INTERVAL
    progress_interval: float = PROGRESS_INTERVAL
    commit_heartbeat: float = COMMIT_HEARTBEAT
    reconsume_after: float = RECONSUME_AFTER

    def __init__(
        self,
        reassembler: Reassembler,
        site: str,
        terms: Terms,
        *,
        now: float,
        user: str | None = None,
    ) -> None:
        self.reassembler = reassembler
        self.offer = reassembler.offer
        self.site = site
        self.user = user
        self.timeout = terms.timeout
        self.report_every = max(1, terms.window // 4)
        self.checkpoints = terms.checkpoints
        self.keeps_prefix = terms.keeps_prefix
        contact = terms.timeout if terms.contact_timeout is None else terms.contact_timeout
        self.contact_by: float | None = now + min(contact, terms.timeout)  # None: data came
        self.last_activity = now
        self.last_flush = now
        self.last_report = now
        self.reconnected_at: float | None = None  # silent since a reconnect (None: data came)
        self.unacked_tag = 0  # highest delivery tag neither acked nor rejected (0: none)
        self._before = 0  # unacked_tag before the delivery being handled
        self.reported = reassembler.stored
        self.end = StreamEnd()  # the verdict said again, the data queue retired
        self.delta = DeltaReceive(terms.delta, self.offer)
        self._started = now
        self._keys = (
            Topology.data_key(self.offer.stream_id, self.offer.sender),
            Topology.data_key(self.offer.stream_id, self.offer.sender, site),
        )

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

    def delivery(
        self,
        tag: int,
        message_type: str | None,
        headers: Mapping[str, Any] | None,
        body: bytes,
        *,
        envelope: Envelope,
        now: float,
    ) -> list[Action]:
        """A delivery from the stream's data queue (``tag``): what came with it is checked
        (the offer's user published it, with one of the stream's two keys), then it is parsed
        and taken; anything else is dead-lettered and the stream carries on."""
        if envelope.user_id != self.user:
            # The broker vouches for user_id: this came from someone else than the offer did.
            reason = (
                f"{message_type} from user {envelope.user_id!r}, the offer came from user "
                f"{self.user!r}"
            )
            return self.malformed(tag, reason, now)
        if envelope.routing_key not in self._keys:
            return self.malformed(tag, f"{message_type} with key {envelope.routing_key!r}", now)
        try:
            message = parse(message_type, headers)
        except ProtocolError as e:
            return self.malformed(tag, str(e), now)
        return self.receive(tag, message, body, now)

    def receive(self, tag: int, message: Any, body: bytes, now: float) -> list[Action]:
        """A parsed message from the stream's data queue, delivered with ``tag``."""
        if not self._arrived(tag, now):
            return self._after_verdict(now)
        self.contact_by = None  # the sender is there
        try:
            if message.ident != self.offer.stream_id:
                raise ProtocolError(
                    f"message for stream {message.ident} on the data queue of "
                    f"{self.offer.stream_id}"
                )
            if isinstance(message, Chunk):
                return self._chunk(tag, message, body)
            if isinstance(message, ManifestMessage):
                return self.delta.take_manifest(message, body)
            if isinstance(message, End):
                self.reassembler.record_end(message)
            elif isinstance(message, Abort):
                return self.fail(FailureCode.ABORTED, f"sender gave up: {message.reason}")
            else:
                raise ProtocolError(f"unexpected {type(message).__name__} message on a data queue")
        except ProtocolError as e:
            return [self._dead(tag, str(e)), *self._after_message()]
        return self._after_message()

    def malformed(self, tag: int, reason: str, now: float) -> list[Action]:
        """A delivery that does not parse: it is dead-lettered (and acked with the rest)."""
        if not self._arrived(tag, now):
            return []
        return [self._dead(tag, reason)]

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
        """Time passed: fail a silent stream, flush acks and progress that waited too long;
        retire an ended stream's data queue once its linger is over."""
        if self.finished:
            return self.end.tick(now, queue=self._has_queue)
        if self.state is State.VERIFYING:
            # Committing (a save can take minutes): no timeout here, the driver reports back;
            # the sender hears every commit_heartbeat that this target is alive and has it all,
            # or it would resend after its resend_after and fail us after its timeout.
            if now - self.last_report < self.commit_heartbeat:
                return []
            self.last_report = now
            return [self._progress()]
        if self.contact_by is not None and now > self.contact_by:
            return self.fail(
                FailureCode.TIMEOUT,
                f"{self.offer.sender} sent nothing within {self.contact_by - self._started:g} s "
                f"of the offer being taken",
            )
        if now - self.last_activity > self.timeout:
            return self.fail(
                FailureCode.TIMEOUT, f"no data from {self.offer.sender} for {self.timeout:g} s"
            )
        if self.delta.finding and now - self.last_report >= self.commit_heartbeat:
            self.last_report = now  # finding what it holds: alive, and the sender waits
            return [self._progress()]
        if self.reconnected_at is not None and now - self.reconnected_at > self.reconsume_after:
            self.reconnected_at = now  # and again, while nothing comes
            self.unacked_tag = 0  # the old channel's tags mean nothing on the new one
            return [Reconsume()]
        flush_due = self.unacked_tag and now - self.last_flush > self.flush_interval
        report_due = (
            self.stored != self.reported and now - self.last_report >= self.progress_interval
        )
        fill = self.delta.fill(self.stored)  # a long copy goes on, a burst a tick
        flushed = self._flush(now, report=report_due) if flush_due or report_due else []
        return [*flushed, fill] if fill is not None else flushed

    def write_raised(self, seq: int, error: BaseException) -> list[Action]:
        """Storing chunk ``seq`` raised ``error`` (classified by :func:`classify`)."""
        return self.fail(*classify(error, f"storing chunk {seq}"))

    def commit_raised(self, error: BaseException, *, saving: bool = False) -> list[Action]:
        """The :class:`Commit` raised ``error``: finishing the object, or (``saving``) the
        save that puts it where its user finds it, whose failures are all ``io``."""
        if saving:
            return self.fail(*classify(error, "saving", io_errors=(Exception,)))
        return self.fail(*classify(error, "committing"))

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
            stored_as=stored_name(offer.name, offer.info, path) if path else None,
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

    def queue_lost(self) -> list[Action]:
        """Its data queue is gone after a reconnect: nothing can reach this receiver."""
        return self.fail(FailureCode.PROTOCOL, "the data queue is gone after a reconnect")

    def interrupted(self, reason: str) -> list[Action]:
        """The stream is given up from outside its data queue (the retrieving user cancelled,
        or the sender withdrew it through the inbox): it fails ``aborted``, unless every byte
        is in and its commit is under way, which then decides how it ends."""
        if self.state is State.VERIFYING:
            return []
        return self.fail(FailureCode.ABORTED, reason)

    def stopped(self, reason: str) -> list[Action]:
        """This receiver stops and does not leave the stream for a successor: the sender is
        told ``aborted`` (a file keeps its verified prefix)."""
        return self.fail(FailureCode.ABORTED, reason)

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
                f"{self.offer.name!r} from {self.offer.sender} (if it serves it) resumes there"
            )
            actions = [LeaveOnDisk(self.stored, self.stored_bytes, ended=True)]
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
        self._before = self.unacked_tag
        self.unacked_tag = max(self.unacked_tag, tag)
        return not self.finished and self.state is not State.VERIFYING

    def _chunk(self, tag: int, chunk: Chunk, body: bytes) -> list[Action]:
        if (fill := self.delta.before(self.stored, tag, chunk, body)) is not None:
            return [fill]
        outcome = self.reassembler.chunk(chunk.seq, chunk.crc32, body, chunk.encoding)
        actions: list[Action] = []
        if outcome.verdict is ChunkVerdict.WRITE:
            actions.append(Write(chunk.seq, outcome.offset, outcome.piece, chunk.meta))
            return actions + self._after_message()
        if outcome.verdict is ChunkVerdict.DUPLICATE:
            # A resend of what is stored: the sender missed a report. Report again (at the
            # next tick, at most every progress_interval) or it would resend for ever.
            self.reported = -1
        if outcome.verdict is ChunkVerdict.CORRUPT:
            actions.append(self._dead(tag, outcome.detail))
        if outcome.resend_from is not None:
            actions.append(self._progress(resend_from=outcome.resend_from))
        return actions

    def _after_message(self, *, fill_more: bool = True) -> list[Action]:
        if self.reassembler.complete:
            return self._verify()
        fill = self.delta.fill(self.stored) if fill_more else None
        actions: list[Action] = [fill] if fill is not None else []
        if self.stored - self.reported >= self.report_every:
            return [*self._flush(self.last_activity), *actions]
        return actions

    def holds_found(self, holds: Holds) -> list[Action]:
        """What :class:`FindHeld` found: the sender hears it, the copying begins."""
        if self.finished or self.state is State.VERIFYING:
            return []
        self.reported = self.stored
        progress = SendProgress(self.stored, self.stored_bytes, holds=self.delta.found(holds))
        return [progress, *self._after_message()]

    def held(self, seq: int, body: bytes) -> list[Action]:
        """Held chunk ``seq``, copied and checked against the manifest (:class:`FillHeld`)."""
        if self.finished or self.state is State.VERIFYING:
            return []
        outcome = self.reassembler.chunk(seq, None, body)  # checked by its SHA-256
        if outcome.verdict is not ChunkVerdict.WRITE:
            return []  # it came from the sender meanwhile
        return [Write(seq, outcome.offset, outcome.piece, self.delta.meta(seq))]

    def held_lost(self, seq: int) -> list[Action]:
        """Held chunk ``seq`` could not be copied (gone, changed): the sender sends it."""
        self.delta.lost(seq)
        return [] if self.finished else [self._progress(resend_from=seq)]

    def filled(self, retake: tuple[int, Any, bytes] | None = None) -> list[Action]:
        """A :class:`FillHeld` is carried out: take the chunk that waited for it."""
        self.delta.filling = False
        if self.finished or self.state is State.VERIFYING:
            return []
        return self._chunk(*retake) if retake is not None else self._after_message(fill_more=False)

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

    def _dead(self, tag: int, reason: str) -> DeadLetter:
        """Dead-letter the delivery just noted (a later ack must not name its tag)."""
        if self.unacked_tag == tag:
            self.unacked_tag = self._before
        return DeadLetter(tag, reason)

    def _progress(self, resend_from: int | None = None) -> SendProgress:
        self.reported = self.stored
        encoding, asking = self.reassembler.encoding, self.delta.asking
        return SendProgress(self.stored, self.stored_bytes, resend_from, encoding, asking)

    def _after_verdict(self, now: float) -> list[Action]:
        """A message after the verdict: acked at once (a resent window must not fill the
        prefetch: nothing more would come) and the verdict goes again (:meth:`StreamEnd.again`).
        While committing, it is acked with the rest when the verdict goes."""
        if not self.finished:
            return []
        actions: list[Action] = []
        if self.unacked_tag:
            actions.append(Ack(self.unacked_tag))
            self.unacked_tag = 0
        verdict = self.end.again(now)
        return [*actions, SendVerdict(verdict)] if verdict is not None else actions

    @property
    def _has_queue(self) -> bool:
        """An ended stream's data queue is this receiver's to retire (not an inline offer's,
        which has none, nor one a successor reads)."""
        return self.offer.inline is None and self.state is not State.SUSPENDED

    @property
    def gone(self) -> bool:
        """Ended, and its data queue retired and deleted: nothing more to do."""
        return self.end.gone

    def retire(self, now: float) -> list[Action]:
        """Unbind the ended stream's data queue now (its linger cut short)."""
        return self.end.retire(now) if self.finished and self._has_queue else []

    def close_out(self, now: float) -> list[Action]:
        """This receiver stops: what an ended stream still owes its data queue, at once."""
        return self.end.close_out(now, queue=self._has_queue) if self.finished else []

    def _end(self, done: Done, finished: Finished) -> list[Action]:
        actions: list[Action] = []
        if self.unacked_tag:
            actions.append(Ack(self.unacked_tag))
            self.unacked_tag = 0
        self.end.said(done, self.last_activity)
        return [*actions, SendVerdict(done), finished]
