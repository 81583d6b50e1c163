"""Retrieving: ask another site for a named file or container, and receive it.

A :class:`Retriever` is built like a receiver (on a
:class:`~objstream.consumer.core.ConsumerCore`) but does not listen on its site's inbox: it sends
a request to the owner's service queue and takes the reply, and the stream that follows, on its
own private queue. So a retrieval never competes with ``listen`` workers of the same site, and
several retrievers (one per thread) can run on one site at the same time.

The timeout is progress-based: the retrieval fails after ``timeout`` seconds without a reply or
without data, not after a total deadline; the owner is then told to stop.

A file retrieval that fails because the owner went away (timeout, abort) keeps what it verified;
asking for the same file from the same site again (in the same directory) resumes: the request
says ``resume_from`` with the kept prefix's SHA-256, and the owner sends only the rest (or the
whole file if it changed meanwhile).

A lost connection (broker restart...) is re-established as in a receiver; a request whose
reply or offer had not arrived yet is sent again
(:class:`~objstream.consumer.requests.RequestTracker`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal, Unpack

from objstream.common.errors import FailureCode, Refused, TimedOut, TransferFailed
from objstream.common.offthread import off_thread
from objstream.common.protocol import Reply, Request, new_stream_id
from objstream.common.settings import Settings, check_object_name, check_site
from objstream.consumer.core import ConsumerCore, ConsumerSide
from objstream.consumer.options import RetrieverOptions
from objstream.consumer.requests import Asked, RequestTracker
from objstream.consumer.resume import Resumable
from objstream.consumer.streams import Received

log = logging.getLogger(__name__)

MAX_ASKS = 3  # requests for one retrieval, when reconnects lose the offer


class _OfferLost(Exception):
    """The connection was lost between the reply and the offer: ask again."""


class Retriever(ConsumerSide):
    """Retrieves objects for ``site``; files are stored in ``dest``.

    ::

        with Retriever("site-1", "/data/in", settings) as retriever:
            path = retriever.retrieve_file("server", "big.bin", timeout=60)
            model = retriever.retrieve_container("server", "model", timeout=60)

    ``save`` runs on each retrieved object before the owner is told it arrived, as for a
    :class:`~objstream.consumer.receiver.Receiver`; so does ``as_torch`` (containers come
    back as CPU ``torch.Tensor`` objects, without pickle).
    """

    def __init__(
        self,
        site: str,
        dest: str | Path,
        settings: Settings | None = None,
        **options: Unpack[RetrieverOptions],
    ) -> None:
        core = ConsumerCore(site, dest, settings, **options)
        self._requests = RequestTracker(core)
        core.start([self._requests])
        super().__init__(core)

    def close(self, checkpoint: bool = False) -> None:
        """Stop and disconnect; retrievals in progress fail (a retrieval belongs to its caller,
        so nothing is left behind for another process by default)."""
        self._core.close(checkpoint)

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
        check_site(from_site)  # before its service queue is declared
        check_object_name(name)
        timeout = timeout or self.settings.timeout
        request = Request(request_id=new_stream_id(), kind=kind, name=name, requester=self.site)
        return self._run(request, from_site, timeout)

    def _run(self, request: Request, from_site: str, timeout: float) -> Received:
        kept = None
        if request.kind == "file":  # hashing the prefix may be slow: off the connection's thread
            kept = off_thread(
                lambda: self._core.store.kept(from_site, request.name),
                lambda: self._core.events(0.05),
                "objstream-retriever",
            )
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

    def _ask(
        self,
        request: Request,
        from_site: str,
        timeout: float,
        kept: Resumable | None,
    ) -> Received:
        if kept is not None:
            log.info(
                "asking %s for the rest of %r: %d bytes are kept",
                from_site,
                request.name,
                kept.stored_bytes,
            )
            request = request.model_copy(
                update={
                    "resume_from": kept.stored,
                    "chunk_size": kept.offer.chunk_size,
                    "prefix_sha256": kept.prefix_sha256().copy().hexdigest(),
                }
            )
        asked = Asked(timeout, request.name, kept, from_site)
        self._requests.publish(request, from_site, asked)
        try:
            reply = self._wait_reply(request, from_site, asked)
        finally:
            self._requests.give_up(request.request_id)
        if not reply.ok:
            raise Refused(from_site, request.name, reply.code or FailureCode.PROTOCOL, reply.detail)
        assert reply.stream_id is not None
        sid = reply.stream_id
        try:
            return self._wait_outcome(sid, from_site, timeout)
        finally:
            self._requests.done_with(sid)

    def _wait_reply(self, request: Request, from_site: str, asked: Asked) -> Reply:
        deadline = time.monotonic() + asked.timeout
        reconnects = self.reconnects
        while (reply := self._requests.reply(request.request_id)) is None:
            if self.reconnects != reconnects:  # the request (or its reply) may be lost
                reconnects = self.reconnects
                self._requests.publish(request, from_site, asked)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimedOut(
                    from_site,
                    request.request_id,
                    asked.timeout,
                    f"site {from_site!r} did not answer the request for {request.name!r}",
                )
            self._core.events(min(left, 0.2))
        return reply

    def _wait_outcome(self, sid: str, from_site: str, timeout: float) -> Received:
        deadline = time.monotonic() + timeout  # until the offer arrives; then the stream's own
        reconnects = self.reconnects
        table = self._core.table
        while True:
            for outcome in list(table.outcomes):
                if outcome.stream_id == sid:
                    table.outcomes.remove(outcome)
                    if isinstance(outcome, TransferFailed):
                        if outcome.code == FailureCode.TIMEOUT:
                            raise TimedOut(from_site, sid, timeout, outcome.detail)
                        raise outcome
                    return outcome
            if sid not in table.streams and self._requests.expecting(sid):
                if self.reconnects != reconnects:
                    raise _OfferLost  # it went to the private queue that is gone now
                if time.monotonic() > deadline:
                    raise TimedOut(from_site, sid, timeout, "the accepted stream never started")
            self._core.events(0.2)
