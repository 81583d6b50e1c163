"""The threads that stream what a serving site accepted: a pool, each worker with a connection
of its own (pika connections are not shared between threads), kept warm between requests (a
new connection per request cost more than the whole transfer of a small object).

The serving loop's thread :meth:`SendingPool.submit`\\ s jobs and, between batches of requests,
learns which ended (:meth:`SendingPool.ended`), so that its session frees their slots there.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import dataclass

from objstream.common.amqp import connect
from objstream.common.codec import EncodeError
from objstream.common.errors import BrokerUnreachable, ObjstreamError, SendFailed
from objstream.common.protocol import Abort, Request, envelope
from objstream.common.settings import Settings
from objstream.common.streaming import ObjectStreamer, OutcomeHook, ProgressHook, StreamOutcome
from objstream.producer.answering import Answering, Joiners, Resume
from objstream.producer.sender import ReplyQueue, StreamSender, TargetResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One accepted request to stream: the source, what was asked, and the promised stream."""

    source: ObjectStreamer
    request: Request
    reply_to: str
    stream_id: str
    joiners: Joiners | None


class SendingPool:
    """Up to ``max_streams`` worker threads of one serving site.

    ``progress`` and ``on_outcome`` are called on the workers' threads: as requesters store
    chunks, and once per requester as its stream ends.
    """

    def __init__(
        self,
        site: str,
        settings: Settings,
        stopping: threading.Event,
        *,
        progress: ProgressHook | None = None,
        on_outcome: OutcomeHook | None = None,
    ) -> None:
        self.site = site
        self.settings = settings
        self._stopping = stopping
        self._progress = progress
        self._on_outcome = on_outcome
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._ended: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._workers: set[threading.Thread] = set()
        self._idle = 0
        self._lock = threading.Lock()
        self._senders: set[StreamSender] = set()  # the workers'
        self._published = 0  # bytes the ended workers published
        self._resent = 0  # chunks the ended workers published again
        self._reconnects = 0  # connections the ended workers re-established
        self._running = 0  # jobs submitted and not ended

    @property
    def bytes_published(self) -> int:
        """Message bodies the workers published (offers, chunks), all streams."""
        with self._lock:
            return self._published + sum(s.bytes_published for s in self._senders)

    @property
    def chunks_resent(self) -> int:
        """Chunks the workers published again to a requester (resends), all streams."""
        with self._lock:
            return self._resent + sum(s.chunks_resent for s in self._senders)

    @property
    def reconnects(self) -> int:
        """Connections of the workers lost and re-established mid-stream."""
        with self._lock:
            return self._reconnects + sum(s.reconnects for s in self._senders)

    @property
    def active(self) -> int:
        """Jobs submitted that have not ended."""
        with self._lock:
            return self._running

    def submit(self, job: Job) -> None:
        """Queue ``job`` for a worker (starting one if none is idle)."""
        with self._lock:
            self._running += 1
            start = self._idle == 0 and len(self._workers) < self.settings.max_streams
            if start:
                name = f"serve-{self.site}-{len(self._workers)}"
                worker = threading.Thread(target=self._work, name=name, daemon=True)
                self._workers.add(worker)
        self._jobs.put(job)
        if start:
            worker.start()

    def ended(self) -> list[str]:
        """The stream ids of the jobs that ended since the last call."""
        ended: list[str] = []
        while True:
            try:
                ended.append(self._ended.get_nowait())
            except queue.Empty:
                return ended

    def close(self, wait: float) -> None:
        """Stop the workers (their streams tell their requesters) and wait for them."""
        workers = list(self._workers)
        for _ in workers:
            self._jobs.put(None)
        for worker in workers:
            worker.join(wait)

    # -- a worker ---------------------------------------------------------------------------------

    def _work(self) -> None:
        """One worker: one connection, many streams, one at a time."""
        settings, name = self.settings, f"objstream server {self.site} worker"
        try:
            connection = connect(settings, name)
            # A stream in progress survives a lost connection (the sender reconnects); an idle
            # worker whose connection is lost just ends, and the next request starts another.
            sender = StreamSender(
                connection,
                settings,
                self.site,
                cancel=self._stopping,
                cancel_reason="is shutting down",
                progress=self._progress,
                reconnect=lambda: connect(settings, name),
                replies=ReplyQueue.NAMED,
            )
            with self._lock:
                self._senders.add(sender)
        except ObjstreamError as e:
            log.error("site %s: a serving worker cannot connect: %s", self.site, e)
            self._drain_one()
            with self._lock:
                self._workers.discard(threading.current_thread())
            return
        try:
            self._jobs_of(sender)
        except ObjstreamError as e:
            log.info("site %s: an idle serving worker lost its connection (%s)", self.site, e)
        finally:
            with self._lock:
                self._workers.discard(threading.current_thread())
                self._senders.discard(sender)
                self._published += sender.bytes_published
                self._resent += sender.chunks_resent
                self._reconnects += sender.reconnects
            sender.close()

    def _jobs_of(self, sender: StreamSender) -> None:
        while not self._stopping.is_set():
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=1.0)
            except queue.Empty:
                sender.process_events(0)  # heartbeats while idle
                continue
            finally:
                with self._lock:
                    self._idle -= 1
            if job is None:
                return
            if not self._serve_one(sender, job):
                return  # the connection is gone; a new worker takes the next request

    def _drain_one(self) -> None:
        """A worker could not start: end the job it was started for."""
        try:
            job = self._jobs.get_nowait()
        except queue.Empty:
            return
        if job is not None:
            self._finished(job)

    def _serve_one(self, sender: StreamSender, job: Job) -> bool:
        """Stream ``job``; False if the worker's connection is gone."""
        request = job.request
        results: list[TargetResult] = []
        error: BaseException | None = None
        try:
            answering = Answering(
                job.stream_id,
                job.reply_to,
                job.joiners,
                contact_timeout=self.settings.contact_timeout,
            )
            results = sender.send(
                job.source,
                [request.requester],
                # A resumed retrieval keeps the requester's chunk size: its kept chunks count in it.
                chunk_size=request.chunk_size if request.resume_from else None,
                answering=answering,
                resume=(
                    Resume(request.resume_from, request.prefix_sha256)
                    if request.resume_from and request.prefix_sha256
                    else None
                ),
            )
            log.info(
                "served %s %r to %s (stream %s)",
                request.kind,
                request.name,
                request.requester,
                job.stream_id,
            )
            return True
        except (SendFailed, ObjstreamError, EncodeError, OSError) as e:
            log.warning("serving %r to %s failed: %s", request.name, request.requester, e)
            results = [r for r in getattr(e, "results", []) if isinstance(r, TargetResult)]
            error = e
            return not isinstance(e, BrokerUnreachable)
        finally:
            self._finished(job, sender)
            self._tell_outcomes(job, results, error)

    def _tell_outcomes(
        self, job: Job, results: list[TargetResult], error: BaseException | None
    ) -> None:
        """Every requester's outcome to ``on_outcome`` (the one that asked first, if the send
        failed before it had any)."""
        if self._on_outcome is None:
            return
        outcomes = [
            StreamOutcome(r.site, r.stream_id, None if r.error is None else str(r.error.code))
            for r in results
        ]
        if not outcomes:
            code = getattr(error, "code", None) or "error"
            outcomes = [StreamOutcome(job.request.requester, job.stream_id, str(code))]
        for outcome in outcomes:
            self._on_outcome(outcome)

    def _finished(self, job: Job, sender: StreamSender | None = None) -> None:
        """``job``'s stream is over: nobody joins it any more; those accepted but not taken yet
        (the send failed first) are told at once (``abort`` to their reply queue)."""
        if job.joiners is not None:
            job.joiners.close()
            for site, reply_to in job.joiners.take():
                log.warning("stream %s ended before %s could join", job.stream_id, site)
                abort = Abort(stream_id=job.stream_id, reason="the stream ended before it started")
                with contextlib.suppress(ObjstreamError):  # no connection: they time out
                    if sender is not None:
                        route = sender.topology.reply_key(reply_to, sender.site)
                        sender.publish(route, b"", envelope(abort))
        job.source.close()
        with self._lock:
            self._running -= 1
        self._ended.put(job.stream_id)
