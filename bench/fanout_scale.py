"""What one broker pays to copy a broadcast to many queues: the numbers behind the scale estimate.

    python bench/fanout_scale.py [--targets 1,8,64,256] [--delivered-mib 2048]
                                 [--queue-type classic,quorum] [--chunk-kib 1024] [--window 32]

Stock pika on a throwaway RabbitMQ node of its own (``tests/rabbitmq_node.py``: its own ports
and data, so the broker's CPU, memory and disk writes are its alone). One publisher publishes
1 MiB messages once to a topic exchange; N queues are bound with the routing key, as the data
queues of a broadcast's targets are (docs/architecture.md, "Queues and flows"); the broker
copies. The consumers are a few processes, each consuming its share of the N queues on one
channel (light receivers: they count and ack, nothing else). The publisher never runs more than
``--window`` messages ahead of the slowest queue's consumer, as objstream's sender does.

Each run publishes ``delivered-mib / N`` MiB (at least 8), so every run delivers about the same
volume. One markdown row per (queue type, N): wall time, the rate every target got, the
broker's CPU seconds per GiB delivered, its peak resident memory, the bytes its process wrote
to disk per GiB delivered (``/proc/PID/io``: a quorum queue keeps its own copy of every message
in its log), and the publisher's CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pika

from bench.sides import cpu_seconds, node_field, nodes_cpu_seconds
from tests.rabbitmq_node import LocalRabbitNode

MiB = 1024 * 1024
GiB = 1024 * MiB
CTX = mp.get_context("spawn")
EXCHANGE = "fanout-scale"
KEY = "data:bench"
CONSUMER_PROCESSES = 4


def _queues(n: int) -> list[str]:
    return [f"fanout-scale.{i}" for i in range(n)]


def consume(
    url: str, queues: list[str], *, first: int, counts: Any, total: int, ready: Any
) -> None:
    """One consumer process: its share of the queues on one channel; counts[first + i] is the
    number of messages queue i has given it so far."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=32 * len(queues))
    left = {"n": total * len(queues)}
    for slot, queue in enumerate(queues, start=first):

        def on_message(ch: Any, method: Any, props: Any, body: bytes, slot: int = slot) -> None:
            counts[slot] += 1
            ch.basic_ack(method.delivery_tag)
            left["n"] -= 1
            if left["n"] == 0:
                ch.stop_consuming()

        channel.basic_consume(queue, on_message)
    ready.put("ready")
    channel.start_consuming()
    connection.close()


def _declare(url: str, n: int, queue_type: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.exchange_declare(EXCHANGE, "topic")
    arguments = {"x-queue-type": queue_type}
    for queue in _queues(n):
        channel.queue_declare(queue, durable=queue_type == "quorum", arguments=arguments)
        channel.queue_bind(queue, EXCHANGE, KEY)
    connection.close()


def _delete(url: str, n: int) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for queue in _queues(n):
        channel.queue_delete(queue)
    channel.exchange_delete(EXCHANGE)
    connection.close()


class BrokerWatch:
    """CPU, peak resident memory and bytes written of the node's Erlang VM, while it runs."""

    def __init__(self, node: LocalRabbitNode) -> None:
        self.node = node
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def cpu(self) -> float:
        return nodes_cpu_seconds([self.node])

    def written(self) -> int:
        return node_field(self.node, "io", "write_bytes:")

    def rss(self) -> int:
        return node_field(self.node, "status", "VmRSS:") * 1024  # kB

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_rss = max(self.peak_rss, self.rss())

    def __enter__(self) -> BrokerWatch:
        self.peak_rss = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def one_run(
    node: LocalRabbitNode, n: int, *, queue_type: str, mib: int, chunk: int, window: int
) -> dict[str, float]:
    url = node.url
    total = mib * MiB // chunk
    _declare(url, n, queue_type)
    counts = CTX.Array("q", n, lock=False)
    ready = CTX.Queue()
    names = _queues(n)
    per = -(-n // CONSUMER_PROCESSES)  # each process a contiguous block of the queues
    procs = []
    for first in range(0, n, per):
        block = names[first : first + per]
        p = CTX.Process(
            target=consume,
            args=(url, block),
            kwargs={"first": first, "counts": counts, "total": total, "ready": ready},
        )
        p.start()
        procs.append(p)
    for _ in procs:
        ready.get(timeout=120)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    body = os.urandom(chunk)
    watch = BrokerWatch(node)
    with watch:
        cpu_before, written_before = watch.cpu(), watch.written()
        publisher_cpu = cpu_seconds()
        start = time.monotonic()
        for seq in range(total):
            while min(counts) < seq + 1 - window:  # the slowest target's window
                connection.process_data_events(0.001)
            channel.basic_publish(EXCHANGE, KEY, body)
        publisher_cpu = cpu_seconds() - publisher_cpu
        for p in procs:
            p.join()
        wall = time.monotonic() - start
        broker_cpu = watch.cpu() - cpu_before
        written = watch.written() - written_before
    connection.close()
    _delete(url, n)
    delivered = n * total * chunk
    return {
        "wall": wall,
        "per_target": total * chunk / MiB / wall,
        "published": total * chunk / MiB,
        "broker_cpu_per_gib": broker_cpu / (delivered / GiB),
        "broker_peak_mib": watch.peak_rss / MiB,
        "written_per_gib": written / (delivered / GiB) / GiB,
        "publisher_cpu": publisher_cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="1,8,64,256")
    parser.add_argument("--delivered-mib", type=int, default=2048)
    parser.add_argument("--queue-type", default="classic,quorum")
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--window", type=int, default=32)
    args = parser.parse_args()
    if not LocalRabbitNode.available():
        print("fanout_scale: needs the rabbitmq-server and rabbitmqctl binaries", file=sys.stderr)
        return 2
    node = LocalRabbitNode()
    node.start()
    try:
        print(
            "| queues | N | published | wall | MiB/s per target | broker CPU s per GiB delivered "
            "| broker peak RSS | broker disk writes per GiB delivered | publisher CPU |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for queue_type in args.queue_type.split(","):
            for n in (int(t) for t in args.targets.split(",")):
                mib = max(8, args.delivered_mib // n)
                r = one_run(
                    node,
                    n,
                    queue_type=queue_type,
                    mib=mib,
                    chunk=args.chunk_kib * 1024,
                    window=args.window,
                )
                print(
                    f"| {queue_type} | {n} | {r['published']:.0f} MiB | {r['wall']:.1f} s | "
                    f"{r['per_target']:.0f} | {r['broker_cpu_per_gib']:.2f} | "
                    f"{r['broker_peak_mib']:.0f} MiB | {r['written_per_gib']:.2f} GiB | "
                    f"{r['publisher_cpu']:.1f} s |",
                    flush=True,
                )
    finally:
        node.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
