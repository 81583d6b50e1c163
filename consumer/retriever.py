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
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Unpack

from objstream.common.errors import ConfigError, FailureCode, TimedOut, TransferFailed
from objstream.common.listing import Listing
from objstream.common.offthread import off_thread
from objstream.common.protocol import MAX_KEY_PATTERN, MAX_KEY_PATTERNS
from objstream.common.request_session import Kind, Selection
from objstream.common.settings import MAX_NAME_LENGTH, Settings, check_object_name, check_site
from objstream.consumer.core import ConsumerCore
from objstream.consumer.options import RetrieverOptions
from objstream.consumer.requests import RequestTracker
from objstream.consumer.side import ConsumerSide
from objstream.consumer.streams import Received

log = logging.getLogger(__name__)


def check_keys(keys: Sequence[str]) -> list[str]:
    """Entry patterns a container request can carry (``Request.keys``), as a list.

    Raises:
        ConfigError: none, more than :data:`MAX_KEY_PATTERNS`, an empty or too long one.
    """
    patterns = [keys] if isinstance(keys, str) else list(keys)
    if not patterns:
        raise ConfigError("no entry pattern given (keys)")
    if len(patterns) > MAX_KEY_PATTERNS:
        raise ConfigError(f"{len(patterns)} entry patterns (at most {MAX_KEY_PATTERNS})")
    for pattern in patterns:
        if not 1 <= len(pattern) <= MAX_KEY_PATTERN:
            raise ConfigError(
                f"entry pattern {pattern[:40]!r} of {len(pattern)} characters "
                f"(1 to {MAX_KEY_PATTERN})"
            )
    return patterns


class Retriever(ConsumerSide):
    """Retrieves objects for ``site``; files are stored in ``dest``.

    ::

        with Retriever("site-1", "/data/in", settings) as retriever:
            path = retriever.retrieve_file("server", "big.bin", timeout=60)
            model = retriever.retrieve_container("server", "model", timeout=60)
            for obj in retriever.list("server").objects:  # what "server" serves this site
                print(obj.kind, obj.name, obj.size)

    ``save`` runs on each retrieved object before the owner is told it arrived, as for a
    :class:`~objstream.consumer.receiver.Receiver`; so does ``as_torch`` (containers come
    back as CPU ``torch.Tensor`` objects, without pickle).

    ``cancel``, once set (from a signal handler or another thread), gives the retrieval in
    progress up between two turns of the connection, never inside the broker client: the
    owner is told ``aborted`` at once, a file's verified part is kept for the next attempt,
    and the retrieval raises :class:`~objstream.common.errors.TransferFailed` (``aborted``).
    Set before the owner's stream began, the owner learns it only when its offer finds
    nobody (its ``contact_timeout``).
    """

    def __init__(
        self,
        site: str,
        dest: str | Path,
        settings: Settings | None = None,
        *,
        cancel: threading.Event | None = None,
        **options: Unpack[RetrieverOptions],
    ) -> None:
        self._cancel = cancel
        core = ConsumerCore(site, dest, settings, **options)
        self._requests = RequestTracker(core)
        core.start([self._requests])
        super().__init__(core)

    def close(self, checkpoint: bool = False) -> None:
        """Stop and disconnect; retrievals in progress fail (a retrieval belongs to its caller,
        so nothing is left behind for another process by default)."""
        self._core.close(checkpoint)

    def retrieve_file(
        self,
        from_site: str,
        file_name: str,
        timeout: float | None = None,
        *,
        byte_range: tuple[int, int] | None = None,
    ) -> Path:
        """Fetch ``file_name`` from ``from_site``'s source dir; returns where it is stored.

        With ``byte_range`` (start, end: end exclusive), only those bytes move: the owner reads
        them alone and they are stored as a file of their own, under the file's name (never a
        resume of it, nor resumed). A range not all within the file is refused ``not_found``.

        Raises:
            Refused: the owner said no (``code``: not_found, forbidden, outside_source_dir...).
            TimedOut: no reply, or no data, for ``timeout`` seconds.
            TransferFailed: the stream failed (checksum...).
        """
        received = self.retrieve("file", from_site, file_name, timeout, byte_range=byte_range)
        assert received.path is not None
        return received.path

    def retrieve_container(
        self,
        from_site: str,
        name: str,
        timeout: float | None = None,
        *,
        keys: Sequence[str] | None = None,
    ) -> Any:
        """Fetch the container registered as ``name`` at ``from_site``; returns it.

        With ``keys`` (glob patterns such as ``"layers.0.*"``, matched against a dict's entry
        names, a safetensors' tensor names), only the matching entries move: the owner reads
        and sends them alone, and the container returned holds them alone. None matching is
        refused ``not_found``. With ``on_entry``, entries go to the callback as they complete
        and ``None`` is returned. Raises as :meth:`retrieve_file`.
        """
        return self.retrieve("container", from_site, name, timeout, keys=keys).value

    def retrieve(
        self,
        kind: Kind,
        from_site: str,
        name: str,
        timeout: float | None = None,
        *,
        keys: Sequence[str] | None = None,
        byte_range: tuple[int, int] | None = None,
    ) -> Received:
        """The general form: returns the :class:`Received` record (path, value, size, sha256).
        ``keys``: a container's entries to retrieve (see :meth:`retrieve_container`);
        ``byte_range``: a file's bytes (see :meth:`retrieve_file`)."""
        if keys is not None and kind != "container":
            raise ConfigError("only a container's entries are selected (keys)")
        if byte_range is not None:
            start, end = byte_range
            if kind != "file":
                raise ConfigError("only a file's bytes are selected (byte range)")
            if not 0 <= start < end:
                raise ConfigError(f"byte range {start}:{end}: give 0 <= START < END")
        if keys is None and byte_range is None:
            return self._retrieve(kind, from_site, name, timeout)
        patterns = None if keys is None else check_keys(keys)
        return self._retrieve(kind, from_site, name, timeout, Selection(patterns, byte_range))

    def list(
        self,
        from_site: str,
        kind: Kind | None = None,
        *,
        prefix: str = "",
        timeout: float | None = None,
    ) -> Listing:
        """Ask ``from_site`` what it serves: the files (``kind="file"``), containers
        (``"container"``) or both (None) this site's broker user may retrieve from it, whose
        names begin with ``prefix``, with their sizes (and a container's entries).

        At most :data:`~objstream.common.listing.MAX_LISTED` objects come back; the listing
        says ``truncated`` when more matched (ask again with a narrower ``prefix``).

        Raises:
            ListingFailed: the owner refused (``code``: forbidden...), does not support listing
                (``unsupported``), or sent a listing that is not valid (``protocol``).
            TimedOut: no answer for ``timeout`` seconds.
        """
        check_site(from_site)  # before its service queue is declared
        if len(prefix) > MAX_NAME_LENGTH:
            raise ConfigError(f"prefix of {len(prefix)} characters (at most {MAX_NAME_LENGTH})")
        wait = timeout or self.settings.timeout
        core, requests = self._core, self._requests
        handle = core.call(
            lambda: requests.ask_list(from_site, of=kind, prefix=prefix, timeout=wait)
        )
        try:
            while True:
                listing = core.call(lambda: self._listed(handle))
                if listing is not None:
                    return listing
                if self._cancel is not None and self._cancel.is_set():
                    reason = f"site {self.site} was interrupted"
                    raise TransferFailed(from_site, handle, FailureCode.ABORTED, reason)
                core.events(0.2)
        finally:
            core.call(lambda: requests.finish(handle))

    def _listed(self, handle: str) -> Listing | None:
        """On the connection's thread: the listing if it came, None while it may come.

        Raises:
            ListingFailed, TimedOut: it will not.
        """
        state = self._requests.session.state(handle)
        if state.error is not None:
            raise state.error
        return state.listing

    def _retrieve(
        self,
        kind: Kind,
        from_site: str,
        name: str,
        timeout: float | None,
        selection: Selection | None = None,
    ) -> Received:
        check_site(from_site)  # before its service queue is declared
        check_object_name(name)
        timeout = timeout or self.settings.timeout
        core = self._core
        kept = None
        if kind == "file" and selection is None:  # hashing may be slow: off the connection's thread
            kept = off_thread(
                lambda: core.store.kept(from_site, name),
                lambda: core.events(0.05),
                "objstream-retriever",
            )
        if kept is not None:
            log.info(
                "asking %s for the rest of %r: %d bytes are kept",
                from_site,
                name,
                kept.stored_bytes,
            )
        handle = core.call(
            lambda: self._requests.ask(
                kind, name, from_site, timeout=timeout, kept=kept, selection=selection
            )
        )
        try:
            return self._wait(handle, from_site, timeout)
        finally:
            core.call(lambda: self._requests.finish(handle))
            if kept is not None and kept.state.locked:
                core.call(kept.state.release)  # not taken up: still there for the next attempt

    def _wait(self, handle: str, from_site: str, timeout: float) -> Received:
        """Until the retrieval ``handle`` has an outcome: the object, or an error."""
        while True:
            outcome = self._core.call(lambda: self._outcome(handle, from_site, timeout))
            if outcome is not None:
                return outcome
            if self._cancel is not None and self._cancel.is_set():
                # The stream's outcome is its failure now, once its disk work is done.
                self._core.call(lambda: self._give_up(handle, from_site))
            self._core.events(0.2)

    def _give_up(self, handle: str, from_site: str) -> None:
        """On the connection's thread: the caller cancelled. The stream in progress fails
        ``aborted``, which tells the owner (and keeps a file's verified part).

        Raises:
            TransferFailed: no stream had begun.
        """
        reason = f"site {self.site} was interrupted"
        sid = self._requests.session.state(handle).stream_id
        stream = self._core.table.streams.get(sid) if sid is not None else None
        if stream is None:
            raise TransferFailed(from_site, sid or "", FailureCode.ABORTED, reason)
        if not stream.closing:
            self._core.table.interrupt(stream, reason)

    def _outcome(self, handle: str, from_site: str, timeout: float) -> Received | None:
        """On the connection's thread: the object if it arrived, None while it may come.

        Raises:
            Refused, TimedOut, TransferFailed: it will not.
        """
        retrieval = self._requests.session.state(handle)
        table = self._core.table
        sid = retrieval.stream_id
        for outcome in list(table.outcomes) if sid is not None else []:
            if outcome.stream_id == sid:
                table.outcomes.remove(outcome)
                if isinstance(outcome, TransferFailed):
                    if outcome.code == FailureCode.TIMEOUT:
                        raise TimedOut(from_site, sid, timeout, outcome.detail)
                    raise outcome
                return outcome
        if retrieval.error is not None:
            raise retrieval.error
        return None
