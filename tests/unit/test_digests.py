"""The running SHA-256 fed on worker threads (no broker): hashlib's digest whatever the mix of
updates, in order, with a bounded number of bytes waiting."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from typing import Any

from objstream.common.digests import IN_LINE_BELOW, QUEUED_BYTES, RunningSha256

MiB = 1 << 20


def _mix(seed: int) -> list[Any]:
    rng = random.Random(seed)
    updates: list[Any] = []
    for _ in range(40):
        data = rng.randbytes(rng.choice([0, 7, IN_LINE_BELOW - 1, IN_LINE_BELOW, MiB, MiB + 5]))
        updates.append(rng.choice([data, bytearray(data), memoryview(data)]))
    return updates


def test_the_digest_is_hashlibs_whatever_the_updates() -> None:
    for seed in range(5):
        running, plain = RunningSha256(), hashlib.sha256()
        for i, data in enumerate(_mix(seed)):
            running.update(data)
            plain.update(data)
            if i % 9 == 0:  # reading midway waits for the updates before it
                assert running.hexdigest() == plain.hexdigest()
                assert running.copy().digest() == plain.copy().digest()
        assert running.digest() == plain.digest()
        assert running.hexdigest() == plain.hexdigest()


def test_it_goes_on_from_a_prefix() -> None:
    prefix = hashlib.sha256(b"kept" * 1000)
    running = RunningSha256(prefix.copy())
    running.update(os.urandom(2 * MiB))
    data = running.copy()
    assert running.hexdigest() == data.hexdigest()
    assert running.copy().hexdigest() != prefix.hexdigest()


class _Slow:
    """A SHA-256 that takes its time and notes what it was given, in order."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.seen: list[bytes] = []
        self.hashed = 0

    def update(self, data: Any) -> None:
        time.sleep(0.005)
        self.seen.append(bytes(data))
        self.hashed += len(data)
        self.sha.update(data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def test_updates_apply_in_order_and_few_bytes_wait() -> None:
    slow = _Slow()
    running = RunningSha256(slow)
    given = 0
    sent = []
    for i in range(24):
        data = bytes([i]) * (MiB if i % 5 else 100)  # small ones are hashed in line, in turn
        sent.append(data)
        running.update(data)
        given += len(data)
        assert given - slow.hashed <= QUEUED_BYTES + MiB  # what waits stays bounded
    running.hexdigest()
    assert slow.seen == sent


def test_a_mutable_buffer_is_hashed_before_update_returns() -> None:
    buffer = bytearray(b"a" * MiB)
    running = RunningSha256()
    running.update(buffer)
    buffer[:] = b"b" * MiB  # the owner reuses it at once
    assert running.hexdigest() == hashlib.sha256(b"a" * MiB).hexdigest()


def test_many_streams_at_once() -> None:
    datas = [[os.urandom(MiB // 2) for _ in range(6)] for _ in range(8)]
    results: list[str] = [""] * 8

    def feed(i: int) -> None:
        running = RunningSha256()
        for data in datas[i]:
            running.update(data)
        results[i] = running.hexdigest()

    threads = [threading.Thread(target=feed, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [hashlib.sha256(b"".join(d)).hexdigest() for d in datas]


def test_a_forked_child_gets_workers_of_its_own() -> None:
    data = os.urandom(MiB)
    RunningSha256().update(data)  # the parent's workers exist
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        running = RunningSha256()
        running.update(data)
        os._exit(0 if running.hexdigest() == hashlib.sha256(data).hexdigest() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
