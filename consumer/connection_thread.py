"""A connection served by a thread of its own, as dramatiq's consumer threads do.

By default a receiver's connection is served by whoever calls ``receive()`` (or a retrieval):
heartbeats, acks and progress go out only while that thread is inside objstream. With
``connection_thread=True`` a :class:`ConnectionThread` owns the connection instead: it opens it,
serves it all the time, and runs what the caller's thread asks of the connection
(:meth:`ConnectionThread.call`) between event batches. pika connections are not thread-safe,
so nothing else ever touches the connection; the caller only waits (:meth:`ConnectionThread.wait`)
and reads the outcomes the connection thread appended.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

SLICE = 0.05
"""Seconds the thread serves the connection between looks at what the caller asked of it."""


class ConnectionThread:
    """The thread that serves one connection.

    Args:
        name: the thread's name.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._batch = threading.Condition()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, setup: Callable[[], None], serve: Callable[[float], None]) -> None:
        """Start the thread: it runs ``setup`` (connect, open...) and then ``serve`` (one slice
        of events and housekeeping) until stopped. Returns once ``setup`` is done.

        Raises:
            Exception: what ``setup`` raised.
        """
        started: Future[None] = Future()

        def run() -> None:
            try:
                setup()
            except BaseException as e:
                started.set_exception(e)
                return
            started.set_result(None)
            self._loop(serve)

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        started.result()

    def _loop(self, serve: Callable[[float], None]) -> None:
        while True:
            self._run_calls()
            if self._stopping.is_set():
                self._run_calls()
                return
            try:
                serve(SLICE)
            except BaseException as e:  # the connection is lost for good
                self._error = e
                self._fail_calls(e)
                with self._batch:
                    self._batch.notify_all()
                return
            with self._batch:
                self._batch.notify_all()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

    def _fail_calls(self, error: BaseException) -> None:
        while True:
            try:
                _, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the connection's thread; return its result or raise what it raised.

        Raises:
            Exception: the connection was lost for good (what the thread died of).
        """
        self._check()
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        future: Future[T] = Future()
        self._calls.put((fn, future))
        if not self._thread.is_alive():  # it died meanwhile: nobody runs the call
            self._check()
        return future.result()

    def wait(self, time_limit: float) -> None:
        """Wait up to ``time_limit`` s for the thread to serve a batch of events.

        Raises:
            Exception: the connection was lost for good.
        """
        self._check()
        with self._batch:
            self._batch.wait(time_limit)
        self._check()

    def stop(self, teardown: Callable[[], None]) -> None:
        """Run ``teardown`` (close the connection...) on the thread, then stop it."""
        if self._thread is None or not self._thread.is_alive():
            teardown()  # the thread is gone: nothing else touches the connection
            return
        future: Future[None] = Future()
        self._calls.put((teardown, future))
        self._stopping.set()
        self._thread.join()
        if not future.done():  # the thread died before it got to it
            teardown()
            return
        future.result()
