"""Retrieving: ask another site for a named file or container, and receive it.

A :class:`Retriever` is a receiver that does not listen on its site's inbox: it sends a request to
the owner's service queue and takes the reply, and the stream that follows, on its own private
queue. So a retrieval never competes with ``listen`` workers of the same site, and several
retrievers (one per thread) can run on one site at the same time.

The timeout is progress-based: the retrieval fails after ``timeout`` seconds without a reply or
without data, not after a total deadline; the owner is then told to stop.

A file retrieval that fails because the owner went away (timeout, abort) keeps what it verified;
asking for the same file from the same site again (in the same directory) resumes: the request
says ``resume_from`` with the kept prefix's SHA-256, and the owner sends only the rest (or the
whole file if it changed meanwhile).

A lost connection (broker restart...) is re-established as in :class:`Receiver`; a request whose
reply or offer had not arrived yet is sent again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from objstream.common.amqp import Delivery, broker_user, dead_letter
from objstream.common.errors import (
    FailureCode,
    ProtocolError,
    Refused,
    TimedOut,
    TransferFailed,
)
from objstream.common.protocol import Offer, Reply, Request, envelope, new_stream_id, parse
from objstream.common.settings import Settings
from objstream.common.streaming import ProgressHook
from objstream.consumer.container_assembler import OnEntry
from objstream.consumer.receiver import Receiver
from objstream.consumer.resume import Resumable
from objstream.consumer.stream_table import Save
from objstream.consumer.streams import Received

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_ASKS = 3  # requests for one retrieval, when reconnects lose the offer
MAX_EARLY = 16  # offers kept while waiting for the reply that names them


class _OfferLost(Exception):
    """The connection was lost between the reply and the offer: ask again."""


class Retriever(Receiver):
    """Retrieves objects for ``site``; files are stored in ``dest``.

    ::

        with Retriever("site-1", "/data/in", settings) as retriever:
            path = retriever.retrieve_file("server", "big.bin", timeout=60)
            model = retriever.retrieve_container("server", "model", timeout=60)
    """

    def __init__(
        self,
        site: str,
        dest: str | Path,
        settings: Settings | None = None,
        *,
        on_entry: OnEntry | None = None,
        progress: ProgressHook | None = None,
        save: Save | None = None,
    ) -> None:
        self._user = broker_user((settings or Settings()).url)
        self._replies: dict[str, Reply] = {}
        # Accepted streams whose offer may come: stream id -> (timeout, name asked for, kept).
        self._expected: dict[str, tuple[float, str, Resumable | None]] = {}
        self._pending: dict[str, float] = {}  # request id -> timeout, while awaiting the reply
        self._asking: dict[str, tuple[str, Resumable | None]] = {}  # id -> name, kept
        self._early: dict[str, Delivery] = {}  # offers that came before their reply
        super().__init__(site, dest, settings, on_entry=on_entry, progress=progress, save=save)

    _listens = False

    def _open_queues(self) -> None:
        # A private, exclusive queue for replies and offers: it dies with the connection, so
        # after a reconnect a request still unanswered (or an offer not yet here) is asked again.
        self._private = self.topology.declare_reply_queue(self._control)
        self._control.consume(self._private, self._on_private, auto_ack=True)
        self._owners: set[str] = set()

    def close(self, checkpoint: bool = False) -> None:
        """Stop and disconnect; retrievals in progress fail (a retrieval belongs to its caller,
        so nothing is left behind for another process by default)."""
        super().close(checkpoint=checkpoint)

    def retrieve_file(self, from_site: str, file_name: str, timeout: float | None = None) -> Path:
        """Fetch ``file_name`` from ``from_site``'s source dir; returns where it is stored.

        Raises:
            Refused: the owner said no (``code``: not_found, forbidden, outside_source_dir...).
            TimedOut: no reply, or no data, for ``timeout`` seconds.
            TransferFailed: the stream failed (checksum...).
        """
        received = self._retrieve("file", from_site, file_name, timeout)
        assert received.path is not None
        return received.path

    def retrieve_container(self, from_site: str, name: str, timeout: float | None = None) -> Any:
        """Fetch the container registered as ``name`` at ``from_site``; returns it.

        With ``on_entry``, entries go to the callback as they complete and ``None`` is returned.
        Raises as :meth:`retrieve_file`.
        """
        return self._retrieve("container", from_site, name, timeout).value

    def retrieve(
        self,
        kind: Literal["file", "container"],
        from_site: str,
        name: str,
        timeout: float | None = None,
    ) -> Received:
        """The general form: returns the :class:`Received` record (path, value, size, sha256)."""
        return self._retrieve(kind, from_site, name, timeout)

    def _retrieve(
        self, kind: Literal["file", "container"], from_site: str, name: str, timeout: float | None
    ) -> Received:
        timeout = timeout or self.settings.timeout
        request = Request(request_id=new_stream_id(), kind=kind, name=name, requester=self.site)
        return self._run(request, from_site, timeout)

    def _run(self, request: Request, from_site: str, timeout: float) -> Received:
        kept = None
        if request.kind == "file":  # hashing the prefix may be slow: off the connection's thread
            kept = self._off_thread(lambda: self._store.kept(from_site, request.name))
        try:
            for _ in range(MAX_ASKS - 1):
                try:
                    return self._ask(request, from_site, timeout, kept)
                except _OfferLost:
                    log.info("asking %s for %r again after a reconnect", from_site, request.name)
                    request = request.model_copy(update={"request_id": new_stream_id()})
            return self._ask(request, from_site, timeout, kept)
        finally:
            if kept is not None and kept.state.locked:
                kept.state.release()  # not taken up: still there for the next attempt

    def _off_thread(self, work: Callable[[], T]) -> T:
        """Run ``work`` on a worker thread while this thread keeps the connection served."""
        with ThreadPoolExecutor(1, thread_name_prefix="objstream-retriever") as pool:
            future = pool.submit(work)
            while not future.done():
                self._events(0.05)
            return future.result()

    def _ask(
        self,
        request: Request,
        from_site: str,
        timeout: float,
        kept: Resumable | None,
    ) -> Received:
        if kept is not None:
            log.info("asking %s for the rest of %r: %d bytes are kept", from_site, request.name,
                     kept.stored_bytes)  # fmt: skip
            request = request.model_copy(update={
                "resume_from": kept.stored,
                "chunk_size": kept.offer.chunk_size,
                "prefix_sha256": kept.prefix_sha256().copy().hexdigest(),
            })  # fmt: skip
        self._publish(request, from_site, timeout)
        self._pending[request.request_id] = timeout
        self._asking[request.request_id] = (request.name, kept)
        try:
            reply = self._wait_reply(request, from_site, timeout)
        finally:
            self._pending.pop(request.request_id, None)
            self._asking.pop(request.request_id, None)
            if not self._pending:
                self._drop_early()
        if not reply.ok:
            raise Refused(from_site, request.name, reply.code or FailureCode.PROTOCOL, reply.detail)
        assert reply.stream_id is not None
        sid = reply.stream_id
        try:
            return self._wait_outcome(sid, from_site, timeout)
        finally:
            self._expected.pop(sid, None)

    def _publish(self, request: Request, from_site: str, timeout: float) -> None:
        if from_site not in self._owners:
            # So the request waits for a server that starts a little later (until it expires).
            self.topology.declare_service_queue(self._control, from_site)
            self._owners.add(from_site)
        # A request nobody answers within the timeout is void: the requester has given up.
        # RabbitMQ checks user_id against the connection's user.
        props = envelope(request, persistent=False, reply_to=self._private,
                         expiration_s=timeout, user_id=self._user)  # fmt: skip
        self._control.publish(
            self.topology.exchange, self.topology.service_key(from_site), b"", props
        )

    def _wait_reply(self, request: Request, from_site: str, timeout: float) -> Reply:
        deadline = time.monotonic() + timeout
        reconnects = self.reconnects
        while request.request_id not in self._replies:
            if self.reconnects != reconnects:  # the request (or its reply) may be lost
                reconnects = self.reconnects
                self._publish(request, from_site, timeout)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimedOut(
                    from_site,
                    request.request_id,
                    timeout,
                    f"site {from_site!r} did not answer the request for {request.name!r}",
                )
            self._events(min(left, 0.2))
        return self._replies.pop(request.request_id)

    def _wait_outcome(self, sid: str, from_site: str, timeout: float) -> Received:
        deadline = time.monotonic() + timeout  # until the offer arrives; then the stream's own
        reconnects = self.reconnects
        while True:
            outcomes = self._table.outcomes
            for outcome in list(outcomes):
                if outcome.stream_id == sid:
                    outcomes.remove(outcome)
                    if isinstance(outcome, TransferFailed):
                        if outcome.code == FailureCode.TIMEOUT:
                            raise TimedOut(from_site, sid, timeout, outcome.detail)
                        raise outcome
                    return outcome
            if sid not in self._table.streams and sid in self._expected:
                if self.reconnects != reconnects:
                    raise _OfferLost  # it went to the private queue that is gone now
                if time.monotonic() > deadline:
                    raise TimedOut(from_site, sid, timeout, "the accepted stream never started")
            self._events(0.2)

    def _drop_early(self) -> None:
        """Offers kept for a reply that never came are not for us."""
        for delivery in self._early.values():
            reason = "offer on the private queue of a retriever for no request of its"
            dead_letter(self._control, self.topology, delivery, reason)
        self._early.clear()

    def _on_private(self, delivery: Delivery) -> None:
        props = delivery.props
        try:
            message = parse(props.type, props.headers)
        except ProtocolError as e:
            dead_letter(self._control, self.topology, delivery, str(e))
            return
        if isinstance(message, Reply):
            timeout = self._pending.get(message.request_id)
            if timeout is None:
                return  # the answer to a request we gave up on
            self._replies[message.request_id] = message
            if message.ok and message.stream_id:
                # Expect the offer now: it may come in the same batch of events as this reply.
                name, kept = self._asking[message.request_id]
                self._expected[message.stream_id] = (timeout, name, kept)
                early = self._early.pop(message.stream_id, None)
                if early is not None:
                    self._take_expected(message.stream_id, early)
        elif isinstance(message, Offer) and message.stream_id in self._expected:
            self._take_expected(message.stream_id, delivery)
        elif isinstance(message, Offer) and self._pending and len(self._early) < MAX_EARLY:
            # The owner replies on one connection and streams on another, so its offer can
            # overtake its reply: keep it until the reply says whether it is ours.
            self._early[message.stream_id] = delivery
        else:
            dead_letter(
                self._control,
                self.topology,
                delivery,
                f"unexpected {props.type} on the private queue of a retriever",
            )

    def _take_expected(self, stream_id: str, delivery: Delivery) -> None:
        timeout, name, kept = self._expected[stream_id]
        self._take_offer(delivery, timeout=timeout, requested=name, kept=kept)
