"""Serving retrievals: a site answers requests for named files and containers.

The owner registers what it serves (``ContainerRetriever(server).add_container("model", model)``,
``FileRetriever(server, source_dir=...)``) and runs :meth:`RetrievalServer.serve`. Requests come
on the site's service queue ``{ns}.serve.{site}``; each is judged by the site's
:class:`~objstream.common.serve_session.ServeSession` before any data moves and answered at once
with a ``reply``: accepted (stream id, size, entries) or refused with a typed reason. An
accepted request is then streamed exactly like a push stream (same window, checks and verdict)
by a pool of worker threads (:mod:`.workers`), each with its own connection, so many
requesters are served at once; the offer goes to the requester's reply queue (key
``reply:R:QID:OWNER``), so no other receiver of its site can take it.

Shared uploads: requests for the same object that arrive while a stream of it is pending or in
progress join that stream as one more target (:class:`~objstream.producer.answering.Joiners`):
one broadcast, one stream id (the reply says it), a late joiner served from the start by
unicast until it catches up.

This module is the driver: the catalog looks objects up (:mod:`.catalog`), the pool streams
them, and every decision (validation, refusal codes, fair shares, joining) is the session's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from objstream.common.amqp import Closing, Delivery, connect, reestablish
from objstream.common.errors import ConnectionLost
from objstream.common.federation import route_settle
from objstream.common.identity import Identities
from objstream.common.protocol import Reply, envelope
from objstream.common.redeliveries import journal_for
from objstream.common.serve_session import (
    Action,
    Catalogue,
    Join,
    LookUp,
    Reject,
    SendReply,
    ServeSession,
    Start,
)
from objstream.common.settings import Settings, check_site
from objstream.common.slots import Slots
from objstream.common.streaming import ObjectStreamer, OutcomeHook, ProgressHook, StreamOutcome
from objstream.common.tls import broker_user
from objstream.common.topology import Topology
from objstream.producer.answering import Joiners
from objstream.producer.catalog import Catalog
from objstream.producer.workers import Job, SendingPool

log = logging.getLogger(__name__)


class RetrievalServer(Closing):
    """The serving worker of ``site``: answers retrieval requests until stopped.

    ``progress`` is called as requesters store chunks, ``on_outcome`` once per requester as its
    stream ends and once per request refused; both from the serving threads (several at once),
    so they must be thread-safe, quick, and must not raise.
    """

    def __init__(
        self,
        site: str,
        settings: Settings | None = None,
        *,
        progress: ProgressHook | None = None,
        on_outcome: OutcomeHook | None = None,
    ) -> None:
        check_site(site)
        self.site = site
        self.settings = settings or Settings()
        self.topology = Topology.from_settings(self.settings)
        self.user = broker_user(self.settings)
        self.catalog = Catalog(site, int(self.settings.chunk_size))
        self.session = ServeSession(
            site,
            Slots(self.settings.max_streams, self.settings.user_share),
            int(self.settings.max_object_size),
            Identities.from_settings(self.settings),
        )
        self._stopping = threading.Event()
        self._on_outcome = on_outcome
        self._reconnects = 0
        self._pool = SendingPool(
            site, self.settings, self._stopping, progress=progress, on_outcome=on_outcome
        )
        self._jobs: dict[str, Job] = {}  # streams in progress, by stream id
        self._settling: deque[tuple[float, Delivery]] = deque()
        """Requests that crossed a federation link, held (unacked) until the time given: the
        requester's reply-queue binding follows its request to this broker a little later,
        and a reply or offer published before it arrives would be lost."""
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
        self.catalog.add_container(name, container, allow)

    def set_source_dir(
        self, source_dir: str | os.PathLike[str], allow: Iterable[str] | None = None
    ) -> None:
        """Serve the files under ``source_dir`` (names resolved inside it, nowhere else)."""
        self.catalog.set_source_dir(source_dir, allow)

    @property
    def accepted(self) -> int:
        return self.session.accepted

    @property
    def refused(self) -> int:
        return self.session.refused

    @property
    def listings(self) -> int:
        """List requests answered."""
        return self.session.listings

    @property
    def joined(self) -> int:
        """Accepted requests that joined a stream of the same object."""
        return self.session.joined

    # -- serving ----------------------------------------------------------------------------------

    def serve(self, stop: Callable[[], bool] = lambda: False, poll: float = 0.2) -> None:
        """Answer requests until ``stop()`` is true; then stop the streams in progress.

        A lost connection (broker restart...) is re-established, retrying for up to the
        ``timeout`` setting; streams in progress reconnect on their own.

        Raises:
            BrokerUnreachable: the broker stayed away longer than that.
        """
        log.info("site %s serving retrievals on %s", self.site, self._queue)
        tag = self._consume()
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
                    tag = self._consume()

                self._settling.clear()  # the broker gives them to the new channel again
                reestablish(self.settings, self.settings.timeout, again)
                self._reconnects += 1
                log.info("site %s serving again on %s", self.site, self._queue)
            self._reap()
            self._answer_settled()
        if self._channel.is_open:
            self._channel.cancel(tag)

    def _consume(self) -> str:
        return self._channel.consume(self._queue, self._on_request, redeliveries=self._redeliveries)

    def _open(self) -> None:
        self._connection = connect(self.settings, f"objstream server {self.site}")
        try:
            self.topology.declare_base(self._connection, self.site)
            self._channel = self._connection.channel()
            self._queue = self.topology.declare_service_queue(self._channel, self.site)
            self._redeliveries = journal_for(self._queue, self.topology.queue_type)
            self._channel.qos(16)
        except BaseException:
            self._connection.close()
            raise

    @property
    def bytes_published(self) -> int:
        """Message bodies the serving workers published (offers, chunks), all streams."""
        return self._pool.bytes_published

    @property
    def chunks_resent(self) -> int:
        """Chunks published again to a requester (resends), all streams."""
        return self._pool.chunks_resent

    @property
    def reconnects(self) -> int:
        """Broker connections lost and re-established (the serving one's and its workers')."""
        return self._reconnects + self._pool.reconnects

    @property
    def active(self) -> int:
        """Streams being served (or about to be) right now."""
        return self._pool.active

    def close(self, wait: float = 30.0) -> None:
        """Stop the streams in progress (their requesters are told) and disconnect."""
        self._stopping.set()
        self._pool.close(wait)
        self._connection.close()

    def _reap(self) -> None:
        """The streams that ended free their slots (on this thread: the session's)."""
        for stream_id in self._pool.ended():
            self._jobs.pop(stream_id, None)
            self.session.ended(stream_id)

    # -- one request ------------------------------------------------------------------------------

    def _on_request(self, delivery: Delivery) -> None:
        settle = route_settle(delivery.props.headers, self.settings.route_settle)
        if settle > 0:
            self._settling.append((time.monotonic() + settle, delivery))
            return
        self._answer(delivery)

    def _answer_settled(self) -> None:
        now = time.monotonic()
        while self._settling and self._settling[0][0] <= now:
            _, delivery = self._settling.popleft()
            self._answer(delivery)

    def _answer(self, delivery: Delivery) -> None:
        self._reap()
        props = delivery.props
        env = delivery.envelope
        self._run(self.session.request(props.type, props.headers, env), delivery)
        delivery.ack()

    def _run(self, actions: list[Action], delivery: Delivery) -> None:
        for action in actions:
            if isinstance(action, Reject):
                delivery.reject(action.reason)
            elif isinstance(action, SendReply):
                self._reply(action.reply_to, action.reply, action.body)
            elif isinstance(action, LookUp):
                self._look_up(action, delivery)
            elif isinstance(action, Catalogue):
                request = action.request
                shelves = self.catalog.listing(request.of, request.name)
                self._run(self.session.catalogued(action, shelves), delivery)
                log.info(
                    "listed what site %s serves to %s (user %s)",
                    self.site,
                    request.requester,
                    action.user,
                )

    def _look_up(self, lookup: LookUp, delivery: Delivery) -> None:
        request = lookup.request
        found, source = self.catalog.look_up(request)
        actions = self.session.looked_up(lookup, found)
        for action in actions:
            if isinstance(action, Join) and not self._join(action):
                actions += self.session.join_failed(action)
        started = False
        for action in actions:
            if isinstance(action, Start) and source is not None:
                self._start(action, source)
                started = True
            elif isinstance(action, SendReply):
                self._reply(action.reply_to, action.reply)
            elif isinstance(action, Join):
                pass  # carried out above
            else:
                self._run([action], delivery)
        if not started and source is not None:
            source.close()
        if actions and isinstance(actions[-1], SendReply) and not actions[-1].reply.ok:
            reply = actions[-1].reply
            log.info(
                "refused %s %r to %s (user %s): %s %s",
                request.kind,
                request.name,
                request.requester,
                lookup.user,
                reply.code,
                reply.detail,
            )

    def _join(self, join: Join) -> bool:
        """Add the requester to the shared stream (and reply); False if it is over already."""
        job = self._jobs.get(join.stream_id)
        request, reply_to = join.lookup.request, join.lookup.reply_to
        if job is None or job.joiners is None or not job.joiners.join(request.requester, reply_to):
            return False
        log.info(
            "%s %r to %s joins stream %s",
            request.kind,
            request.name,
            request.requester,
            join.stream_id,
        )
        self._reply(reply_to, join.reply)
        return True

    def _start(self, start: Start, source: ObjectStreamer) -> None:
        joiners = Joiners(start.request.requester) if start.shared else None
        job = Job(source, start.request, start.reply_to, start.stream_id, joiners)
        self._jobs[start.stream_id] = job
        self._pool.submit(job)

    def _reply(self, reply_to: str, reply: Reply, body: bytes = b"") -> None:
        key = self.topology.reply_key(reply_to, self.site)
        props = envelope(reply, persistent=False, user_id=self.user)
        self._channel.publish(self.topology.exchange, key, body, props)
        if not reply.ok and self._on_outcome is not None:  # a refusal: no stream follows
            requester = reply_to.split(":")[1]  # reply:SITE:QID, checked by the session
            code = str(reply.code or "error")
            self._on_outcome(StreamOutcome(requester, reply.request_id, code, refused=True))


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
