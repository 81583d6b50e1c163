"""Serving retrievals: a site answers requests for named files and containers.

The owner registers what it serves (``ContainerRetriever(server).add_container("model", model)``,
``FileRetriever(server, source_dir=...)``) and runs :meth:`RetrievalServer.serve`. Requests come
on the site's service queue ``{ns}.serve.{site}``; each is validated before any data moves and
answered at once with a ``reply``: accepted (stream id, size, entries) or refused with a typed
reason. An accepted request is then streamed exactly like a push stream (same window, checks and
verdict) on its own thread and connection, so many requesters are served at once; the offer goes
to the requester's private queue, so no other receiver of its site can take it.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objstream.common.amqp import Closing, Delivery, connect, dead_letter, reestablish
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
from objstream.common.protocol import Reply, Request, envelope, new_stream_id, parse
from objstream.common.settings import NAME_PATTERN, Settings
from objstream.common.streaming import ObjectStreamer
from objstream.common.topology import Topology
from objstream.producer.container_source import ContainerSource
from objstream.producer.sender import Answering, ReplyQueue, Resume, StreamSender
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
        if not re.match(NAME_PATTERN, site):
            raise ConfigError(f"invalid site name {site!r} (letters, digits, '_', '.', '-')")
        self.site = site
        self.settings = settings or Settings()
        self.topology = Topology.from_settings(self.settings)
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
        source = ContainerSource(container, name)
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
        while not stop():
            tag = self._channel.consume(self._queue, self._on_request)
            try:
                while not stop():
                    self._connection.process_events(poll)
            except ConnectionLost as e:
                log.warning("connection to the broker lost (%s); reconnecting", e)
                reestablish(self.settings, self.settings.timeout, self._open)
                log.info("site %s serving again on %s", self.site, self._queue)
                continue
            if self._channel.is_open:
                self._channel.cancel(tag)

    def _open(self) -> None:
        self._connection = connect(self.settings, f"objstream server {self.site}")
        try:
            self._channel = self._connection.channel()
            self.topology.declare_base(self._channel)
            self._queue = self.topology.declare_service_queue(self._channel, self.site)
            self._channel.qos(16)
        except BaseException:
            self._connection.close()
            raise

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
            request = parse(props.type, props.headers)
            if not isinstance(request, Request):
                raise ProtocolError(f"unexpected {props.type} message on a service queue")
            if not isinstance(props.reply_to, str) or not props.reply_to:
                raise ProtocolError("request without reply_to")
        except ProtocolError as e:
            dead_letter(self._channel, self.topology, delivery, str(e))
            return
        user = props.user_id
        try:
            source = self._source_for(request, user)
        except _Refuse as refusal:
            self.refused += 1
            log.info(
                "refused %s %r to %s (user %s): %s %s",
                request.kind,
                request.name,
                request.requester,
                user,
                refusal.code,
                refusal.detail,
            )
            self._reply(
                props.reply_to,
                Reply(
                    request_id=request.request_id,
                    ok=False,
                    code=refusal.code,
                    detail=refusal.detail,
                ),
            )
            return
        stream_id = new_stream_id()
        self.accepted += 1
        entries = len(source.container) if isinstance(source, ContainerSource) else None
        self._reply(
            props.reply_to,
            Reply(
                request_id=request.request_id,
                ok=True,
                stream_id=stream_id,
                size=source.size,
                entries=entries,
            ),
        )
        with self._lock:
            self._busy += 1
            start_worker = self._idle == 0 and len(self._workers) < self.settings.max_streams
            if start_worker:
                worker = threading.Thread(
                    target=self._work, name=f"serve-{self.site}-{len(self._workers)}", daemon=True
                )
                self._workers.add(worker)
        self._jobs.put(_Job(source, request, props.reply_to, stream_id))
        if start_worker:
            worker.start()

    def _source_for(self, request: Request, user: str | None) -> ObjectStreamer:
        """The validated source for ``request``, or a refusal."""
        with self._lock:
            busy = self._busy >= self.settings.max_streams
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
        if busy:
            source.close()
            raise _Refuse(
                FailureCode.BUSY,
                f"{self.settings.max_streams} streams in progress; try again later",
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
        self._channel.publish("", reply_to, b"", envelope(reply, persistent=False))

    def _work(self) -> None:
        """A pool worker: one connection, many streams, one at a time."""
        name = f"objstream server {self.site} worker"
        try:
            connection = connect(self.settings, name)
            # A stream in progress survives a lost connection (the sender reconnects); an idle
            # worker whose connection is lost just ends, and the next request starts another.
            sender = StreamSender(connection, self.settings, self.site, cancel=self._stopping,
                                  reconnect=lambda: connect(self.settings, name),
                                  replies=ReplyQueue.NAMED)  # fmt: skip
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
            sender.close()

    def _drain_one(self) -> None:
        """A worker could not start: fail the request it was started for."""
        try:
            job = self._jobs.get_nowait()
        except queue.Empty:
            return
        if job is not None:
            job.source.close()
            with self._lock:
                self._busy -= 1

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
            )
            log.info("served %s %r to %s (stream %s)", request.kind, request.name,
                     request.requester, job.stream_id)  # fmt: skip
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
            job.source.close()
            with self._lock:
                self._busy -= 1


@dataclass(frozen=True)
class _Job:
    source: ObjectStreamer
    request: Request
    reply_to: str
    stream_id: str


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
