"""How to send one object to N targets: measured with stock pika, before protocol v2 chooses.

    python bench/broadcast.py [--size 256] [--targets 1,2,4,8] [--runs 3] [--chunk-kib 1024]

Three ways of giving each of N consumers every chunk of one object, each with the end-to-end
window objstream uses (the publisher never runs more than ``--window`` chunks ahead of the
slowest consumer's acked position, shared through memory instead of progress messages):

- ``per-target``: what protocol v1 does. The publisher publishes every chunk N times, once to
  each target's queue (transient).
- ``exchange``: one publish per chunk to a direct exchange; N queues are bound with the same
  routing key, and the broker copies (transient).
- ``stream``: one publish per chunk to a RabbitMQ stream queue (``x-queue-type: stream``,
  always on disk); N consumers read it at their own offset (``x-stream-offset: first``).

Every side is a process of its own. It prints one markdown row per (way, N): the time until
the last consumer has the whole object, the object's throughput (MiB/s per target), what the
publisher sent into the broker, and the CPU seconds of the publisher, of all consumers, and of
the broker (``beam.smp``, read from /proc) during the run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sides import cpu_seconds

MiB = 1024 * 1024
CTX = mp.get_context("spawn")
URL = os.environ.get("OBJSTREAM_URL", "amqp://guest:guest@localhost:5672/%2F")
WAYS = ("per-target", "exchange", "stream")


def _broker_cpu() -> float:
    """CPU seconds of the local RabbitMQ node (beam.smp), or 0 if it is not local."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)
        except OSError:
            continue
        if "beam.smp" not in fields[0]:
            continue
        rest = fields[1].split()
        total += (int(rest[11]) + int(rest[12])) / ticks
    return total


def consume(
    *, url: str, way: str, queue: str, index: int, count: int, acked: Any, ready: Any
) -> dict[str, float]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=64)
    state = {"n": 0, "since_ack": 0}

    def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
        state["n"] += 1
        state["since_ack"] += 1
        if state["since_ack"] >= 8 or state["n"] == count:
            ch.basic_ack(method.delivery_tag, multiple=True)
            state["since_ack"] = 0
            acked[index] = state["n"]
        if state["n"] == count:
            ch.stop_consuming()

    arguments = {"x-stream-offset": "first"} if way == "stream" else None
    channel.basic_consume(queue, on_message, arguments=arguments)
    cpu = cpu_seconds()
    ready.put(index)
    channel.start_consuming()
    end = time.monotonic()
    connection.close()
    return {"end": end, "cpu_s": cpu_seconds() - cpu}


def publish(
    *, url: str, way: str, exchange: str, queues: list[str], count: int, size: int, window: int,
    acked: Any,
) -> dict[str, float]:  # fmt: skip
    body = os.urandom(size)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    transient = pika.BasicProperties(delivery_mode=1)
    persistent = pika.BasicProperties(delivery_mode=2)
    cpu = cpu_seconds()
    start = time.monotonic()
    sent = 0
    for seq in range(count):
        while seq - min(acked[:]) >= window:
            connection.process_data_events(time_limit=0.001)
        if way == "per-target":
            for queue in queues:
                channel.basic_publish("", queue, body, transient)
                sent += size
        elif way == "exchange":
            channel.basic_publish(exchange, "chunks", body, transient)
            sent += size
        else:
            channel.basic_publish("", queues[0], body, persistent)
            sent += size
    connection.close()
    return {"start": start, "sent": sent, "cpu_s": cpu_seconds() - cpu}


def _declare(url: str, way: str, targets: int) -> tuple[str, list[str]]:
    run = uuid.uuid4().hex[:8]
    exchange = f"bench-broadcast-{run}"
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    if way == "stream":
        name = f"bench-broadcast-{run}-stream"
        channel.queue_declare(name, durable=True, arguments={"x-queue-type": "stream"})
        queues = [name]
    else:
        queues = [f"bench-broadcast-{run}-{i}" for i in range(targets)]
        if way == "exchange":
            channel.exchange_declare(exchange, exchange_type="direct", auto_delete=True)
        for queue in queues:
            channel.queue_declare(queue, auto_delete=False)
            if way == "exchange":
                channel.queue_bind(queue, exchange, routing_key="chunks")
    connection.close()
    return exchange, queues


def _delete(url: str, exchange: str, queues: list[str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for queue in queues:
        channel.queue_delete(queue)
    channel.exchange_delete(exchange)
    connection.close()


def _side(fn: Any, kwargs: dict[str, Any], out: Any) -> None:
    try:
        out.put(fn(**kwargs))
    except BaseException as e:  # the parent reports it
        out.put({"error": f"{type(e).__name__}: {e}"})


def _start(fn: Any, **kwargs: Any) -> Any:
    out = CTX.Queue()
    CTX.Process(target=_side, args=(fn, kwargs, out), daemon=True).start()
    return out


def _result(out: Any) -> dict[str, float]:
    result: dict[str, Any] = out.get(timeout=900)
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def one_run(
    url: str, way: str, targets: int, *, count: int, size: int, window: int
) -> dict[str, float]:
    exchange, queues = _declare(url, way, targets)
    acked = CTX.Array("q", targets)
    ready = CTX.Queue()
    try:
        consumers = [
            _start(
                consume,
                url=url,
                way=way,
                queue=queues[0 if way == "stream" else i],
                index=i,
                count=count,
                acked=acked,
                ready=ready,
            )
            for i in range(targets)
        ]
        for _ in range(targets):
            ready.get(timeout=60)
        broker_before = _broker_cpu()
        publisher = _start(
            publish, url=url, way=way, exchange=exchange, queues=queues, count=count, size=size,
            window=window, acked=acked,
        )  # fmt: skip
        p = _result(publisher)
        ends = [_result(c) for c in consumers]
        broker = _broker_cpu() - broker_before
    finally:
        _delete(url, exchange, queues)
    seconds = max(e["end"] for e in ends) - p["start"]
    return {
        "seconds": seconds,
        "mib_s": count * size / MiB / seconds,
        "sent_mib": p["sent"] / MiB,
        "publisher_cpu": p["cpu_s"],
        "consumers_cpu": sum(e["cpu_s"] for e in ends),
        "broker_cpu": broker,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="object size in MiB")
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--targets", default="1,2,4,8")
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.chunk_kib * 1024
    count = args.size * MiB // size
    print(f"# {args.size} MiB in {args.chunk_kib} KiB chunks, window {args.window}, "
          f"median of {args.runs} runs, broker {URL.split('@')[-1]}")  # fmt: skip
    print()
    print(
        "| way | targets | seconds | MiB/s per target | sent into broker MiB "
        "| CPU s publisher / consumers / broker |"
    )
    print("|---|---|---|---|---|---|")
    for targets in (int(t) for t in args.targets.split(",")):
        for way in args.ways.split(","):
            runs = [
                one_run(URL, way, targets, count=count, size=size, window=args.window)
                for _ in range(args.runs)
            ]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(
                f"| {way} | {targets} | {med['seconds']:.2f} | {med['mib_s']:.0f} | "
                f"{med['sent_mib']:.0f} | {med['publisher_cpu']:.1f} / "
                f"{med['consumers_cpu']:.1f} / {med['broker_cpu']:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
