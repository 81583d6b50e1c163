"""dict_streaming: the producer registers a container "model" with the container retriever; the
consumer is given the task ``retrieve_dict`` for "model", retrieves it from the producer through
the retriever, verifies it and reports."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from objstream.common.settings import Settings
from objstream.consumer import ContainerEntry, Retriever
from objstream.jobs.data import layer
from objstream.jobs.runner import Result
from objstream.producer import ContainerRetriever, RetrievalServer

MODEL = "model"


def producer_side(
    settings: Settings,
    *,
    site: str,
    entries: int,
    entry_size: int,
    seed: int,
    count: int,
    timeout: float,
) -> Result:
    model = {f"layer-{i}": layer(i, entry_size, seed) for i in range(entries)}
    started = time.monotonic()
    with RetrievalServer(site, settings) as server:
        ContainerRetriever(server).add_container(MODEL, model)

        def done() -> bool:
            if server.accepted >= count and server.active == 0:
                return True
            return server.accepted == 0 and time.monotonic() - started > timeout

        server.serve(stop=done)
        served = server.accepted
    seconds = time.monotonic() - started
    ok = served >= count
    return {
        "ok": ok,
        "role": "producer",
        "served": served,
        "bytes": served * entries * (entry_size // 4) * 4,
        "seconds": round(seconds, 3),
        **({} if ok else {"error": f"no request came in {timeout:g} s"}),
    }


def retrieve_dict(
    retriever: Retriever, owner: str, name: str, timeout: float
) -> dict[str, Any] | None:
    """The consumer's task: retrieve the dict ``name`` from ``owner``."""
    value: dict[str, Any] | None = retriever.retrieve_container(owner, name, timeout=timeout)
    return value


def consumer_side(
    settings: Settings,
    *,
    site: str,
    owner: str,
    entries: int,
    entry_size: int,
    seed: int,
    timeout: float,
    dest: str,
) -> Result:
    checked: list[str] = []
    wrong: list[str] = []

    def verify(entry: ContainerEntry) -> None:
        # Each entry is compared with what the producer's seed gives, then dropped: flat memory.
        index = int(str(entry.key).removeprefix("layer-"))
        expected = layer(index, entry_size, seed)
        ok = isinstance(entry.value, np.ndarray) and entry.value.dtype == expected.dtype
        if not (ok and np.array_equal(entry.value, expected)):
            wrong.append(str(entry.key))
        checked.append(str(entry.key))

    started = time.monotonic()
    with Retriever(site, dest, settings, on_entry=verify) as retriever:
        retrieve_dict(retriever, owner, MODEL, timeout)
    seconds = time.monotonic() - started
    ok = not wrong and len(checked) == entries
    return {
        "ok": ok,
        "role": "consumer",
        "task": "retrieve_dict",
        "entries": len(checked),
        "bytes": entries * (entry_size // 4) * 4,
        "seconds": round(seconds, 3),
        **({} if ok else {"error": f"entries differ: {wrong}" if wrong else "entries missing"}),
    }
