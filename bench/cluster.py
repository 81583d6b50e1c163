"""A 1 GiB push on a 3-node RabbitMQ cluster with quorum queues, beside a single node, in one run.

    python bench/cluster.py [--runs 1] [--size 1GiB]

Throwaway local nodes (tests/rabbitmq_node.py, tests/rabbitmq_cluster.py), never the broker at
OBJSTREAM_URL: a single node with classic queues, the same node with quorum queues, and a
3-node cluster with quorum queues (the sender connected to node 1, the receiver to node 2; each
queue replicated on the three). Every side is a process of its own (bench/sides.py); the
figures are the sender's MiB/s and the CPU seconds of every RabbitMQ node (beam.smp) during the
transfer, per GiB. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import sides
from bench.run import Proc, _ready
from objstream.common.settings import parse_size
from tests.rabbitmq_cluster import LocalRabbitCluster
from tests.rabbitmq_node import LocalRabbitNode

MiB = 1024 * 1024
GiB = 1024 * MiB


def push(
    path: Path, send_url: str, receive_url: str, nodes: Sequence[LocalRabbitNode], queue_type: str
) -> dict[str, float]:
    """One push of ``path``; the sides read OBJSTREAM_QUEUE_TYPE from their environment."""
    os.environ["OBJSTREAM_QUEUE_TYPE"] = queue_type
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="bench-in-") as dest:
        ready, wait = _ready()
        consumer = Proc(sides.receive, url=receive_url, namespace=namespace, site="site-1",
                        dest=dest, count=1, ready=ready)  # fmt: skip
        wait()
        cpu = sides.nodes_cpu_seconds(nodes)
        producer = Proc(sides.send_file, url=send_url, namespace=namespace, targets=["site-1"],
                        path=str(path), chunk_size=MiB, window=32)  # fmt: skip
        p, c = producer.result(), consumer.result()
        cpu = sides.nodes_cpu_seconds(nodes) - cpu
    gib = p["bytes"] / GiB
    return {"mib_s": p["bytes"] / MiB / (p["end"] - p["start"]), "broker_cpu": cpu / gib,
            "sender_cpu": p["cpu_s"] / gib, "receiver_cpu": c["cpu_s"] / gib}  # fmt: skip


def _median(runs: int, once: Callable[[], dict[str, float]]) -> dict[str, float]:
    results = [once() for _ in range(runs)]
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--size", default="1GiB")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-src-") as src:
        path = Path(src) / "big.bin"
        with open(path, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        single = LocalRabbitNode()
        try:
            single.start()
            for queue_type in ("classic", "quorum"):

                def once(queue_type: str = queue_type) -> dict[str, float]:
                    return push(path, single.url, single.url, [single], queue_type)

                rows.append((f"1 node, {queue_type} queues", _median(args.runs, once)))
        finally:
            single.cleanup()
        cluster = LocalRabbitCluster(3)
        try:
            started = time.monotonic()
            cluster.start()
            formed = time.monotonic() - started
            rows.append(("3 nodes, quorum queues (sender on node 1, receiver on node 2)",
                         _median(args.runs, lambda: push(path, cluster.url_from(0),
                                 cluster.url_from(1), cluster.nodes, "quorum"))))  # fmt: skip
        finally:
            cluster.cleanup()
    print(f"{size / GiB:g} GiB push, median of {args.runs}; {platform.node()}, "
          f"{os.cpu_count()} CPUs; cluster formed in {formed:.0f} s\n")  # fmt: skip
    print("| broker | MiB/s | broker CPU s/GiB (all nodes) | sender / receiver CPU s/GiB |")
    print("|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['mib_s']:.0f} | {r['broker_cpu']:.1f} | "
              f"{r['sender_cpu']:.1f} / {r['receiver_cpu']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
