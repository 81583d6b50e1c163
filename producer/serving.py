"""Serving retrievals: a site answers requests for named files and containers.

The owner registers what it serves (``ContainerRetriever(server).add_container("model", model)``,
``FileRetriever(server, source_dir=...)``) and runs :meth:`RetrievalServer.serve`. Requests come
on the site's service queue ``{ns}.serve.{site}``; each is validated before any data moves and
answered at once with a ``reply``: accepted (stream id, size, entries) or refused with a typed
reason. An accepted request is then streamed exactly like a push stream (same window, checks and
verdict) on a worker thread with its own connection, so many requesters are served at once; the
offer goes to the requester's reply queue (key ``reply:R:QID:OWNER``), so no other receiver of its
site can take it.

Shared uploads: requests for the same object (kind and name) that arrive while a stream of it is
pending or in progress join that stream as one more target (:class:`~objstream.producer.answering.
Joiners`): one broadcast, one stream id (the reply says it), a late joiner served from the start
by unicast until it catches up. Resumed requests, and requests from a site already in that
stream, are served on their own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objstream.common.amqp import (
    Closing,
    Delivery,
    connect,
    dead_letter,
    reestablish,
)
from objstream.common.codec import EncodeError
from objstream.common.errors import (
    BrokerUnreachable,
    ConfigError,
    ConnectionLost,
    FailureCode,
    ObjstreamError,
    ProtocolError,
    SendFailed,
)
from objstream.common.protocol import Abort, Reply, Request, envelope, new_stream_id, parse
from objstream.common.settings import Settings, check_object_name, check_site
from objstream.common.streaming import ObjectStreamer
from objstream.common.tls import broker_user
from objstream.common.topology import Topology
from objstream.producer.answering import Answering, Joiners, Resume
from objstream.producer.container_source import ContainerSource
from objstream.producer.sender import ReplyQueue, StreamSender
from objstream.producer.sources import FileSource

log = logging.getLogger(__name__)

MIN_RESUME_CHUNK = 4096  # bytes: the smallest chunk size a resumed retrieval may ask for


class _Refuse(Exception):
    def __init__(self, code: FailureCode, detail: str) -> None:
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class _Served:
    value: Any
    allow: frozenset[str] | None


def _allow(users: Iterable[str] | None) -> frozenset[str] | None:
    return None if users is None else frozenset(users)


class RetrievalServer(Closing):
    """The serving worker of ``site``: answers retrieval requests until stopped."""

    def __init__(self, site: str, settings: Settings | None = None) -> None:
        check_site(site)
        self.site = site
        self.settings = settings or Settings()
        self.topology = Topology.from_settings(self.settings)
        self.user = broker_user(self.settings)
        self._containers: dict[str, _Served] = {}
        self._source_dir: _Served | None = None
        # Streams run on a pool of worker threads, each with its own connection, kept warm
        # between requests (a new connection per request cost more than the whole transfer of
        # a small object).
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._workers: set[threading.Thread] = set()
        self._idle = 0
        self._busy = 0  # requests accepted and not finished
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.accepted = 0
        self.refused = 0
        self.joined = 0  # accepted requests that joined a stream of the same object
        self._shared: dict[tuple[str, str], _Job] = {}  # streams others may join, by object
        self._senders: set[StreamSender] = set()  # the workers'
        self._published = 0  # bytes the ended workers published
        self._open()

    # -- what is served ---------------------------------------------------------------------------

    def add_container(self, name: str, container: Any, allow: Iterable[str] | None = None) -> None:
        """Serve ``container`` (dict, list or set) under ``name``.

        ``allow``: broker user names that may retrieve it (``None``: any authenticated user).

        The container is encoded now, once, and served as it is now: requests share that
        encoding (no request waits for it); to serve changes, add it again.

        Raises:
            EncodeError: the container holds a value the codec cannot carry (checked now, not
                when somebody asks).
        """
        source = ContainerSource(container, check_object_name(name))
        source.prepare(int(self.settings.chunk_size))
        self._containers[name] = _Served(source, _allow(allow))

    def set_source_dir(
        self, source_dir: str | os.PathLike[str], allow: Iterable[str] | None = None
    ) -> None:
        """Serve the files under ``source_dir`` (names resolved inside it, nowhere else)."""
        root = Path(source_dir).resolve()
        if not root.is_dir():
            raise ConfigError(f"source dir {source_dir} is not a directory")
        self._source_dir = _Served(root, _allow(allow))

    # -- serving ----------------------------------------------------------------------------------

    def serve(self, stop: Callable[[], bool] = lambda: False, poll: float = 0.2) -> None:
        """Answer requests until ``stop()`` is true; then stop the streams in progress.

        A lost connection (broker restart...) is re-established, retrying for up to the
        ``timeout`` setting; streams in progress reconnect on their own.

        Raises:
            BrokerUnreachable: the broker stayed away longer than that.
        """
        log.info("site %s serving retrievals on %s", self.site, self._queue)
        tag = self._channel.consume(self._queue, self._on_request)
        while not stop():
            try:
                self._connection.process_events(poll)
            except ConnectionLost as e:
                log.warning("connection to the broker lost (%s); reconnecting", e)

                def again() -> None:
                    nonlocal tag
                    self._open()
                    # Inside the retry: on a cluster, consuming a quorum queue whose leader's
                    # node just died can crash the channel (and close the connection).
                    tag = self._channel.consume(self._queue, self._on_request)

                reestablish(self.settings, self.settings.timeout, again)
                log.info("site %s serving again on %s", self.site, self._queue)
        if self._channel.is_open:
            self._channel.cancel(tag)

    def _open(self) -> None:
        self._connection = connect(self.settings, f"objstream server {self.site}")
        try:
            self.topology.declare_base(self._connection)
            self._channel = self._connection.channel()
            self._queue = self.topology.declare_service_queue(self._channel, self.site)
            self._channel.qos(16)
        except BaseException:
            self._connection.close()
            raise

    @property
    def bytes_published(self) -> int:
        """Message bodies the serving workers published (offers, chunks), all streams."""
        with self._lock:
            return self._published + sum(s.bytes_published for s in self._senders)

    @property
    def active(self) -> int:
        """Streams being served (or about to be) right now."""
        with self._lock:
            return self._busy

    def close(self, wait: float = 30.0) -> None:
        """Stop the streams in progress (their requesters are told) and disconnect."""
        self._stopping.set()
        for _ in list(self._workers):
            self._jobs.put(None)
        for worker in list(self._workers):
            worker.join(wait)
        self._connection.close()

    # -- one request ------------------------------------------------------------------------------

    def _on_request(self, delivery: Delivery) -> None:
        try:
            self._handle(delivery)
        finally:
            delivery.channel.ack(delivery.tag)

    def _handle(self, delivery: Delivery) -> None:
        props = delivery.props
        try:
            request = self._valid_request(delivery)
        except ProtocolError as e:
            dead_letter(self._channel, self.topology, delivery, str(e))
            return
        reply_to = props.reply_to
        assert reply_to is not None
        try:
            source = self._source_for(request, props.user_id)
            job = self._join(request, reply_to, source)
            if job is None:
                self._check_busy(source)
        except _Refuse as refusal:
            self.refused += 1
            log.info(
                "refused %s %r to %s (user %s): %s %s",
                request.kind,
                request.name,
                request.requester,
                props.user_id,
                refusal.code,
                refusal.detail,
            )
            self._reply(
                reply_to,
                Reply(
                    request_id=request.request_id,
                    ok=False,
                    code=refusal.code,
                    detail=refusal.detail,
                ),
            )
            return
        self.accepted += 1
        if job is not None:
            self._reply(reply_to, self._accepted(request, job))
            return
        joiners = None if request.resume_from else Joiners(request.requester)
        job = _Job(source, request, reply_to, new_stream_id(), joiners)
        if joiners is not None:
            with self._lock:
                self._shared[request.kind, request.name] = job
        self._reply(reply_to, self._accepted(request, job))
        self._start(job)

    def _valid_request(self, delivery: Delivery) -> Request:
        """The request a delivery carries, checked: its reply_to names its requester (so an
        answer reaches only that site's reply queue), and it says which broker user sent it.

        Raises:
            ProtocolError: it does not.
        """
        props = delivery.props
        request = parse(props.type, props.headers)
        if not isinstance(request, Request):
            raise ProtocolError(f"unexpected {props.type} message on a service queue")
        named = Topology.parse_reply_to(props.reply_to or "")
        if named is None:
            raise ProtocolError(f"request with an invalid reply_to {props.reply_to!r}")
        if named[0] != request.requester:
            raise ProtocolError(
                f"request from {request.requester!r} with the reply_to of site {named[0]!r}"
            )
        if not props.user_id:
            raise ProtocolError("request without user_id")
        return request

    def _join(self, request: Request, reply_to: str, source: ObjectStreamer) -> _Job | None:
        """The stream of the same object that ``request`` joined (its own ``source`` is then
        closed), or None: it is served on its own."""
        with self._lock:
            job = self._shared.get((request.kind, request.name))
        if request.resume_from or job is None or job.joiners is None:
            return None
        if not job.joiners.join(request.requester, reply_to):
            return None  # that stream is over (or the site is in it already)
        source.close()
        self.joined += 1
        log.info(
            "%s %r to %s joins stream %s",
            request.kind,
            request.name,
            request.requester,
            job.stream_id,
        )
        return job

    @staticmethod
    def _accepted(request: Request, job: _Job) -> Reply:
        source = job.source
        entries = len(source.container) if isinstance(source, ContainerSource) else None
        return Reply(
            request_id=request.request_id,
            ok=True,
            stream_id=job.stream_id,
            size=source.size,
            entries=entries,
        )

    def _start(self, job: _Job) -> None:
        """Queue ``job`` for a worker (starting one if none is idle)."""
        with self._lock:
            self._busy += 1
            start_worker = self._idle == 0 and len(self._workers) < self.settings.max_streams
            if start_worker:
                worker = threading.Thread(
                    target=self._work, name=f"serve-{self.site}-{len(self._workers)}", daemon=True
                )
                self._workers.add(worker)
        self._jobs.put(job)
        if start_worker:
            worker.start()

    def _check_busy(self, source: ObjectStreamer) -> None:
        with self._lock:
            busy = self._busy >= self.settings.max_streams
        if busy:
            source.close()
            raise _Refuse(
                FailureCode.BUSY,
                f"{self.settings.max_streams} streams in progress; try again later",
            )

    def _source_for(self, request: Request, user: str | None) -> ObjectStreamer:
        """The validated source for ``request``, or a refusal."""
        if request.resume_from and request.kind != "file":
            raise _Refuse(FailureCode.UNSUPPORTED, "only files resume; ask for the container whole")
        if request.resume_from and (request.chunk_size or 0) < MIN_RESUME_CHUNK:
            # The requester picks the chunk size of a resumed stream; not one that costs a
            # message per few bytes.
            raise _Refuse(
                FailureCode.UNSUPPORTED,
                f"resuming in chunks of {request.chunk_size} bytes (at least {MIN_RESUME_CHUNK})",
            )
        if request.kind == "container":
            served = self._containers.get(request.name)
            if served is None:
                raise _Refuse(
                    FailureCode.NOT_FOUND, f"no container {request.name!r} at {self.site}"
                )
            self._check_user(served, user)
            prepared: ContainerSource = served.value
            source: ObjectStreamer = prepared.reuse()  # encoded when added, not here
        else:
            source = self._file_source(request.name, user)
        if source.size is not None and source.size > self.settings.max_object_size:
            source.close()
            raise _Refuse(
                FailureCode.TOO_LARGE,
                f"{source.size} bytes exceed the limit of {int(self.settings.max_object_size)}",
            )
        return source

    def _file_source(self, name: str, user: str | None) -> FileSource:
        served = self._source_dir
        if served is None:
            raise _Refuse(FailureCode.NOT_FOUND, f"site {self.site} serves no files")
        self._check_user(served, user)
        root: Path = served.value
        if "\x00" in name or os.path.isabs(name):
            raise _Refuse(FailureCode.OUTSIDE_SOURCE_DIR, f"{name!r} is not a relative name")
        path = (root / name).resolve()  # follows symlinks: a link out of the dir is refused
        if path == root or not path.is_relative_to(root):
            raise _Refuse(FailureCode.OUTSIDE_SOURCE_DIR, f"{name!r} is outside the source dir")
        if not path.is_file():
            raise _Refuse(FailureCode.NOT_FOUND, f"no file {name!r} at {self.site}")
        try:
            return FileSource(path)
        except OSError as e:
            raise _Refuse(FailureCode.NOT_FOUND, f"cannot read {name!r}: {e.strerror}") from None

    @staticmethod
    def _check_user(served: _Served, user: str | None) -> None:
        if served.allow is not None and user not in served.allow:
            raise _Refuse(FailureCode.FORBIDDEN, f"user {user!r} may not retrieve it")

    def _reply(self, reply_to: str, reply: Reply) -> None:
        key = self.topology.reply_key(reply_to, self.site)
        props = envelope(reply, persistent=False, user_id=self.user)
        self._channel.publish(self.topology.exchange, key, b"", props)

    def _work(self) -> None:
        """A pool worker: one connection, many streams, one at a time."""
        name = f"objstream server {self.site} worker"
        try:
            connection = connect(self.settings, name)
            # A stream in progress survives a lost connection (the sender reconnects); an idle
            # worker whose connection is lost just ends, and the next request starts another.
            sender = StreamSender(
                connection,
                self.settings,
                self.site,
                cancel=self._stopping,
                reconnect=lambda: connect(self.settings, name),
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
                    break
                if not self._serve_one(sender, job):
                    break  # the connection is gone; a new worker takes the next request
        except ObjstreamError as e:
            log.info("site %s: an idle serving worker lost its connection (%s)", self.site, e)
        finally:
            with self._lock:
                self._workers.discard(threading.current_thread())
                self._senders.discard(sender)
                self._published += sender.bytes_published
            sender.close()

    def _drain_one(self) -> None:
        """A worker could not start: fail the request it was started for."""
        try:
            job = self._jobs.get_nowait()
        except queue.Empty:
            return
        if job is not None:
            self._finished(job)

    def _serve_one(self, sender: StreamSender, job: _Job) -> bool:
        request = job.request
        try:
            sender.send(
                job.source,
                [request.requester],
                # A resumed retrieval keeps the requester's chunk size: its kept chunks count in it.
                chunk_size=request.chunk_size if request.resume_from else None,
                answering=Answering(job.stream_id, job.reply_to),
                resume=(
                    Resume(request.resume_from, request.prefix_sha256)
                    if request.resume_from and request.prefix_sha256
                    else None
                ),
                joiners=job.joiners,
            )
            log.info(
                "served %s %r to %s (stream %s)",
                request.kind,
                request.name,
                request.requester,
                job.stream_id,
            )
            return True
        except SendFailed as e:
            log.warning("serving %r to %s failed: %s", request.name, request.requester, e)
            return True
        except BrokerUnreachable as e:
            log.warning("serving %r to %s failed: %s", request.name, request.requester, e)
            return False
        except (ObjstreamError, EncodeError, OSError) as e:
            log.warning("serving %r to %s failed: %s", request.name, request.requester, e)
            return True
        finally:
            self._finished(job, sender)

    def _finished(self, job: _Job, sender: StreamSender | None = None) -> None:
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
            self._busy -= 1
            key = (job.request.kind, job.request.name)
            if self._shared.get(key) is job:
                del self._shared[key]


@dataclass(frozen=True)
class _Job:
    source: ObjectStreamer
    request: Request
    reply_to: str
    stream_id: str
    joiners: Joiners | None


class ContainerRetriever:
    """Registers containers with a server, as in NVIDIA FLARE::

    ContainerRetriever(server).add_container("model", model_dict)
    """

    def __init__(self, server: RetrievalServer) -> None:
        self.server = server

    def add_container(self, name: str, container: Any, allow: Iterable[str] | None = None) -> None:
        self.server.add_container(name, container, allow)


class FileRetriever:
    """Serves the files of ``source_dir`` through a server."""

    def __init__(
        self,
        server: RetrievalServer,
        source_dir: str | os.PathLike[str],
        allow: Iterable[str] | None = None,
    ) -> None:
        self.server = server
        server.set_source_dir(source_dir, allow)
