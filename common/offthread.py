"""Blocking work on a worker thread while the calling thread keeps its connection served.

A pika connection belongs to the thread that opened it and must be served (heartbeats, replies)
while that thread waits: hashing a kept prefix of GiBs on a slow disk must not cost it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def off_thread(work: Callable[[], T], meanwhile: Callable[[], None], name: str) -> T:
    """Run ``work`` on a thread named ``name``, calling ``meanwhile`` (which serves the
    connection for a moment) until it is done; return its result or raise what it raised."""
    with ThreadPoolExecutor(1, thread_name_prefix=name) as pool:
        future = pool.submit(work)
        while not future.done():
            meanwhile()
        return future.result()
