"""The running SHA-256 of a stream, fed on a worker thread while its caller goes on.

Both ends of every stream hash every byte (about 0.6 s per GiB each, with the CPU's SHA
instructions): done in line, the sender does not publish and the receiver does not read its
socket meanwhile. :class:`RunningSha256` hands each large update to a worker thread
(hashlib lets go of the GIL while it hashes) and returns at once; reading the digest (or a
copy) waits for the updates before it. Updates are applied in order, at most
:data:`QUEUED_BYTES` of them waiting per digest (the caller waits beyond that, so memory
stays flat). Only ``bytes`` go to the thread: they cannot change while they wait. Anything
else (a view of a buffer its owner will reuse, a small update) is hashed in line, after the
updates before it.

A few threads serve every digest of the process (one update of a digest at a time, so several
streams hash in parallel as they did in line, each in order).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

QUEUED_BYTES = 4 * 1024 * 1024
"""Bytes of updates one digest lets wait for the worker before :meth:`RunningSha256.update`
waits: a few chunks, enough to overlap hashing with a chunk's I/O."""

IN_LINE_BELOW = 64 * 1024
"""Smaller updates are hashed in line: a thread's hand-over costs more than they do."""

WORKERS = 4

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="objstream-sha256")
        return _pool


def _forget_workers() -> None:  # a forked child has none of its parent's threads
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_workers)


class RunningSha256:
    """A SHA-256 like hashlib's (``update``, ``digest``, ``hexdigest``, ``copy``), whose large
    ``bytes`` updates run on a worker thread. ``copy()`` gives a plain hashlib object.

    ``start``: a hashlib SHA-256 object to go on from (fed with a stream's kept prefix).
    """

    def __init__(self, start: Any = None) -> None:
        self._sha = start if start is not None else hashlib.sha256()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[bytes] = deque()
        self._queued = 0  # bytes in the queue, the one being hashed included
        self._working = False  # a worker drains the queue
        self._error: BaseException | None = None

    def update(self, data: Any) -> None:
        if type(data) is not bytes or len(data) < IN_LINE_BELOW:
            self._settle()
            self._sha.update(data)
            return
        with self._lock:
            while self._queued >= QUEUED_BYTES and self._working:
                self._changed.wait()
            if self._error is not None:  # pragma: no cover - see _drain
                raise self._error
            self._queue.append(data)
            self._queued += len(data)
            if not self._working:
                self._working = True
                _workers().submit(self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue or self._error is not None:
                    self._working = False
                    self._changed.notify_all()
                    return
                data = self._queue[0]
            try:
                self._sha.update(data)
            except BaseException as e:  # pragma: no cover - hashlib on bytes does not raise
                self._error = e
            with self._lock:
                self._queue.popleft()
                self._queued -= len(data)
                self._changed.notify_all()

    def _settle(self) -> None:
        """Wait until every update given so far is applied."""
        with self._lock:
            while self._working:
                self._changed.wait()
            if self._error is not None:
                raise self._error

    def digest(self) -> bytes:
        self._settle()
        return self._sha.digest()

    def hexdigest(self) -> str:
        self._settle()
        return self._sha.hexdigest()

    def copy(self) -> Any:
        self._settle()
        return self._sha.copy()
