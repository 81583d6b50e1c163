"""The processes the benchmarks run: each function is one side, run in a spawned process.

Every side returns a dict with its timings (``time.monotonic()``, which is one clock for all
processes on Linux) and its peak RSS in MiB.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pika

from objstream.jobs.runner import peak_rss_mib

Result = dict[str, Any]
MiB = 1024 * 1024


def nodes_cpu_seconds(nodes: Any) -> float:
    """CPU seconds (user + system) of the throwaway nodes' Erlang VMs so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for node in nodes:
        for pid in node._beam_pids():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(stat[11]) + int(stat[12])) / ticks
    return total


def node_field(node: Any, file: str, key: str) -> int:
    """The sum over the node's Erlang VMs of the number after ``key`` in /proc/PID/FILE
    (``status``'s ``VmRSS:`` in kB, ``io``'s ``write_bytes:``...)."""
    total = 0
    for pid in node._beam_pids():
        try:
            with open(f"/proc/{pid}/{file}", encoding="ascii") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith(key))
        except OSError:
            continue
    return total


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 3)


def _settings(url: str, namespace: str, **extra: Any) -> Any:
    from objstream.common.settings import Settings

    return Settings(url=url, namespace=namespace, stream_ttl=600, **extra)


# -- the raw pika ceiling: stock pika, no framing, no reassembly ---------------------------------


def raw_consume(url: str, queue: str, count: int, ready: Any) -> Result:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=64)
    got = {"n": 0, "bytes": 0, "first": 0.0, "last": 0.0}

    def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
        if got["n"] == 0:
            got["first"] = time.monotonic()
        got["n"] += 1
        got["bytes"] += len(body)
        ch.basic_ack(method.delivery_tag)
        if got["n"] == count:
            got["last"] = time.monotonic()
            ch.stop_consuming()

    channel.basic_consume(queue, on_message)
    cpu_before = cpu_seconds()
    ready.put("ready")
    channel.start_consuming()
    connection.close()
    return {
        "bytes": got["bytes"],
        "end": got["last"],
        "peak_rss_mib": peak_rss_mib(),
        "cpu_s": cpu_seconds() - cpu_before,
    }


def raw_publish(url: str, queue: str, count: int, size: int) -> Result:
    body = os.urandom(size)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    props = pika.BasicProperties(delivery_mode=1)
    start = time.monotonic()
    for _ in range(count):
        channel.basic_publish("", queue, body, props)
    connection.close()
    return {"start": start, "peak_rss_mib": peak_rss_mib(), "cpu_s": cpu_seconds()}


def raw_publish_confirmed(url: str, queue: str, count: int, size: int, window: int) -> Result:
    """Persistent messages with up to ``window`` unconfirmed publishes (an async publisher)."""
    body = os.urandom(size)
    props = pika.BasicProperties(delivery_mode=2)
    state: dict[str, Any] = {"sent": 0, "acked": 0, "start": 0.0}

    def pump() -> None:
        channel = state["channel"]
        while state["sent"] < count and state["sent"] - state["acked"] < window:
            channel.basic_publish("", queue, body, props)
            state["sent"] += 1

    def on_ack(frame: Any) -> None:
        tag = frame.method.delivery_tag
        state["acked"] = max(state["acked"], tag) if frame.method.multiple else state["acked"] + 1
        if state["acked"] >= count:
            connection.close()
        else:
            pump()

    def on_channel(channel: Any) -> None:
        state["channel"] = channel
        channel.confirm_delivery(on_ack)
        state["start"] = time.monotonic()
        pump()

    connection = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel),
        on_close_callback=lambda conn, reason: conn.ioloop.stop(),
    )
    connection.ioloop.start()
    return {"start": state["start"], "peak_rss_mib": peak_rss_mib(), "cpu_s": cpu_seconds()}


# -- objstream sides ----------------------------------------------------------------------------


def receive(url: str, namespace: str, *, site: str, dest: str, count: int, ready: Any,
            keep: bool = False, settings: dict[str, Any] | None = None) -> Result:  # fmt: skip
    """Receive ``count`` objects for ``site``; files are deleted as they arrive. ``settings``:
    more of them (TLS files...)."""
    from objstream.consumer import Receiver

    ends = []
    with Receiver(site, dest, _settings(url, namespace, **(settings or {}))) as receiver:
        cpu_before = cpu_seconds()  # connected and idle: what follows is the transfer's
        ready.put("ready")
        for _ in range(count):
            item = receiver.receive(timeout=300)
            assert item is not None, "nothing arrived"
            ends.append(time.monotonic())
            if item.path is not None and not keep:
                item.path.unlink()
            entries = item.entry_count
            del item
    return {
        "end": ends[-1],
        "entries": entries,
        "peak_rss_mib": peak_rss_mib(),
        "cpu_s": cpu_seconds() - cpu_before,
    }


def send_file(url: str, namespace: str, *, targets: list[str], path: str, chunk_size: int,
              window: int, settings: dict[str, Any] | None = None) -> Result:  # fmt: skip
    from objstream.producer import FileStreamer

    with FileStreamer("server", _settings(url, namespace, **(settings or {}))) as streamer:
        start, cpu_before = time.monotonic(), cpu_seconds()
        results = streamer.stream_file(targets, path, chunk_size=chunk_size, window=window)
        end = time.monotonic()
        cpu = cpu_seconds() - cpu_before
        published = streamer.bytes_published
    assert all(r.ok for r in results)
    return {"start": start, "end": end, "bytes": results[0].size, "published": published,
            "peak_rss_mib": peak_rss_mib(), "cpu_s": cpu}  # fmt: skip


def serve_model(url: str, namespace: str, *, size: int, ready: Any, stop: Any) -> Result:
    """Serve a float32 container of ``size`` bytes as "model" (8 entries)."""
    import numpy as np

    from objstream.producer import ContainerRetriever, RetrievalServer

    rng = np.random.default_rng(0)
    model = {f"layer-{i}": rng.standard_normal(size // 8 // 4, dtype=np.float32)
             for i in range(8)}  # fmt: skip
    with RetrievalServer("server", _settings(url, namespace, max_streams=64)) as server:
        ContainerRetriever(server).add_container("model", model)
        cpu_before = cpu_seconds()
        ready.put("ready")
        server.serve(stop=stop.is_set, poll=0.05)
        return {"published": server.bytes_published, "joined": server.joined,
                "cpu_s": cpu_seconds() - cpu_before, "peak_rss_mib": peak_rss_mib()}  # fmt: skip


def retrieve_model(url: str, namespace: str, *, site: str, ready: Any, go: Any) -> Result:
    """Retrieve "model" once ``go`` is set (every retriever at the same moment)."""
    from objstream.consumer import Retriever

    with Retriever(site, "/tmp", _settings(url, namespace)) as retriever:
        ready.put(site)
        go.wait(60)
        start = time.monotonic()
        model = retriever.retrieve_container("server", "model", timeout=120)
        end = time.monotonic()
    size = sum(array.nbytes for array in model.values())
    return {"start": start, "end": end, "bytes": size, "peak_rss_mib": peak_rss_mib()}


def send_container(url: str, namespace: str, entries: int, entry_size: int) -> Result:
    import numpy as np

    from objstream.producer import ContainerStreamer

    rng = np.random.default_rng(0)
    model = {f"layer-{i}": rng.standard_normal(entry_size // 4, dtype=np.float32)
             for i in range(entries)}  # fmt: skip
    with ContainerStreamer("server", _settings(url, namespace)) as streamer:
        start = time.monotonic()
        [result] = streamer.stream_container("site-1", model, "model")
        end = time.monotonic()
    assert result.ok
    return {"start": start, "end": end, "bytes": entries * entry_size,
            "peak_rss_mib": peak_rss_mib(), "cpu_s": cpu_seconds()}  # fmt: skip


def send_small_files(url: str, namespace: str, directory: str, count: int) -> Result:
    from objstream.producer import FileStreamer

    paths = sorted(Path(directory).iterdir())[:count]
    with FileStreamer("server", _settings(url, namespace)) as streamer:
        return _timed([lambda p=p: streamer.stream_file("site-1", p) for p in paths])


def serve_container(url: str, namespace: str, size: int, ready: Any, stop: Any) -> Result:
    from objstream.producer import ContainerRetriever, RetrievalServer

    with RetrievalServer("server", _settings(url, namespace, max_streams=64)) as server:
        ContainerRetriever(server).add_container("small", {"blob": os.urandom(size)})
        ready.put("ready")
        server.serve(stop=stop.is_set, poll=0.05)
        served = server.accepted
    return {"served": served, "peak_rss_mib": peak_rss_mib(), "cpu_s": cpu_seconds()}


def retrieve_many(url: str, namespace: str, count: int) -> Result:
    from objstream.consumer import Retriever

    with Retriever("site-1", "/tmp", _settings(url, namespace)) as retriever:
        retriever.retrieve_container("server", "small", timeout=30)  # connections are up
        return _timed([lambda: retriever.retrieve_container("server", "small", timeout=30)] * count)


def _timed(calls: list[Any]) -> Result:
    """Run ``calls`` one after the other; the span and each call's latency."""
    latencies = []
    start = time.monotonic()
    for call in calls:
        t0 = time.monotonic()
        call()
        latencies.append(time.monotonic() - t0)
    end = time.monotonic()
    return {"start": start, "end": end, "latencies": latencies,
            "peak_rss_mib": peak_rss_mib(), "cpu_s": cpu_seconds()}  # fmt: skip
