"""Work that must not run on a connection's thread, and its results, which must.

pika answers heartbeats and delivers messages only while its thread is in the event loop, so a
receiver never decodes a container, runs an ``on_entry`` callback, commits or saves an object
there. :class:`Offload` runs such work on threads of its own and hands each result back to a
callback on the connection's thread (woken by :meth:`Connection.call_threadsafe`, the one call
pika allows from another thread):

- the **disk** thread (one, first in first out): commits (fsync and link, decoding a spooled
  container, the save), discarding partial objects, keeping prefixes; :meth:`Offload.settle`
  waits for all of it while the connection is served;
- the **take** threads: an assembler's :meth:`~objstream.common.streaming.ObjectAssembler.take`
  where it decodes or calls user code (a container built in memory, a custom kind). The driver
  keeps at most one take of a stream in flight, so a stream's pieces are taken in order.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from objstream.common.amqp import Connection
from objstream.common.errors import ObjstreamError

log = logging.getLogger(__name__)

Then = Callable[[Any, BaseException | None], None]
"""Runs on the connection's thread with the work's result, or the exception it raised."""


class Offload:
    """The disk thread and the take threads of one receiver, and their results."""

    def __init__(self, takers: int) -> None:
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="objstream-disk")
        self._takes = ThreadPoolExecutor(max(1, takers), thread_name_prefix="objstream-take")
        self._results: queue.SimpleQueue[tuple[Then, Any, BaseException | None]] = (
            queue.SimpleQueue()
        )
        self._pending = 0  # submitted and not drained yet (connection's thread only)
        self._connection: Connection | None = None

    def bind(self, connection: Connection) -> None:
        """The (new) connection whose thread gets the results."""
        self._connection = connection

    @property
    def busy(self) -> bool:
        """Work submitted whose result was not handed back yet."""
        return self._pending > 0

    def on_disk(self, work: Callable[[], Any], then: Then) -> None:
        """Run ``work`` on the disk thread; ``then`` gets its outcome."""
        self._submit(self._disk, work, then)

    def take(self, work: Callable[[], Any], then: Then) -> None:
        """Run ``work`` on a take thread; ``then`` gets its outcome."""
        self._submit(self._takes, work, then)

    def _submit(self, pool: ThreadPoolExecutor, work: Callable[[], Any], then: Then) -> None:
        self._pending += 1

        def job() -> None:
            try:
                result, error = work(), None
            except Exception as e:
                result, error = None, e
            self._results.put((then, result, error))
            connection = self._connection
            try:
                if connection is not None:
                    connection.call_threadsafe(self._drained)  # wakes the event loop
            except ObjstreamError:  # the connection is gone: the next tick drains
                log.debug("cannot wake the connection", exc_info=True)

        pool.submit(job)

    def _drained(self) -> None:
        self.drain()

    def drain(self) -> bool:
        """On the connection's thread: hand finished work to its callbacks. Returns whether
        there was any."""
        handled = False
        while True:
            try:
                then, result, error = self._results.get_nowait()
            except queue.Empty:
                return handled
            handled = True
            self._pending -= 1
            then(result, error)

    def settle(self, serve: Callable[[float], None]) -> None:
        """Wait until all submitted work is handed back (and what it led to, too), calling
        ``serve`` (which serves the connection a moment) meanwhile: heartbeats go on however
        long a save takes. ``serve`` may raise (a lost connection); the caller decides."""
        while True:
            self.drain()
            if not self.busy:
                return
            serve(0.1)

    def settle_offline(self) -> None:
        """:meth:`settle` when the connection is gone: block for each result."""
        while self._pending > 0:
            then, result, error = self._results.get()
            self._pending -= 1
            then(result, error)

    def shut_down(self) -> None:
        """Finish what is queued, stop the threads, and hand back the last results."""
        self._takes.shutdown(wait=True)
        self._disk.shutdown(wait=True)
        self.drain()
