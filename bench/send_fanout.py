"""What the sender pays to broadcast one file to N local receivers (protocol v2).

    python bench/send_fanout.py [--size 256] [--targets 1,2,4,8] [--runs 1]

Each receiver and the sender are processes of their own. One markdown row per N: wall time
until the sender had every verdict, the bytes of message bodies the sender published
(``Streamer.bytes_published``) against the object's size, and the sender's CPU seconds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sides import Result, _settings, cpu_seconds, receive

MiB = 1024 * 1024
CTX = mp.get_context("spawn")
URL = os.environ.get("OBJSTREAM_URL", "amqp://guest:guest@localhost:5672/%2F")


def send(url: str, namespace: str, targets: list[str], path: str) -> Result:
    from objstream.producer import FileStreamer

    with FileStreamer("server", _settings(url, namespace)) as streamer:
        start, cpu_before = time.monotonic(), cpu_seconds()
        results = streamer.stream_file(targets, path)
        wall = time.monotonic() - start
        cpu = cpu_seconds() - cpu_before
        published = streamer.bytes_published
    assert all(r.ok for r in results)
    return {"wall_s": wall, "cpu_s": cpu, "published": published}


def run(n: int, path: str, size: int) -> Result:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as dest, CTX.Pool(n + 1) as pool, CTX.Manager() as m:
        ready: Any = m.Queue()
        receivers = [
            pool.apply_async(receive, (URL, namespace), {
                "site": f"site-{i}", "dest": f"{dest}/{i}", "count": 1, "ready": ready})
            for i in range(n)
        ]  # fmt: skip
        for _ in range(n):
            ready.get(timeout=60)
        sent = pool.apply(send, (URL, namespace, [f"site-{i}" for i in range(n)], path))
        for r in receivers:
            r.get(timeout=600)
    sent["ratio"] = sent["published"] / size
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="MiB")
    parser.add_argument("--targets", default="1,2,4,8")
    args = parser.parse_args()
    size = args.size * MiB
    with tempfile.NamedTemporaryFile(dir="/tmp") as f:
        f.write(os.urandom(size))
        f.flush()
        print("| targets | wall s | sender CPU s | published MiB | published / size |")
        print("|---|---|---|---|---|")
        for n in (int(x) for x in args.targets.split(",")):
            row = run(n, f.name, size)
            print(f"| {n} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | "
                  f"{row['published'] / MiB:.1f} | {row['ratio']:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
