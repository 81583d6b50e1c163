"""Big tensors with flat memory: bfloat16 ``.safetensors`` pushed and retrieved, as processes.

    python bench/tensors.py [--rows 2048x1,512x3,32x32] [--runs 1] [--dir DIR]

Each row is ``MIBxCOUNT``: a bfloat16 ``.safetensors`` of COUNT tensors of MIB MiB. For each,
three transfers, every side a process of its own (the ``objstream`` command line):

- push: ``producer send-container FILE`` -> ``consumer listen``;
- retrieval: ``producer serve --container m=FILE`` -> ``consumer retrieve-container --out``;
- file: ``producer send-file FILE`` -> ``consumer listen``, the same bytes as a plain file.

Each side's peak anonymous memory (``RssAnon``, polled every 10 ms) and peak RSS (``VmHWM``,
everything it ever held) are reported, with MiB/s from the sending command's start to its end
(push, file) or the retrieving command's (retrieval), and the container's rate against the
file's. The received files are compared with the source byte for byte. Needs a broker
(``OBJSTREAM_URL``, default localhost) and about 3 times the largest row's size in free disk.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ml_dtypes
import numpy as np

from bench.checkpoint import WRAPPER

MiB = 1 << 20


def write_tensors(path: Path, tensor_mib: int, count: int) -> int:
    """A bfloat16 ``.safetensors`` of ``count`` tensors of ``tensor_mib`` MiB, formatted as the
    safetensors package writes it, written 32 MiB at a time; returns its size."""
    block = np.random.default_rng(0).standard_normal(16 << 20, dtype=np.float32)
    block = block.astype(ml_dtypes.bfloat16).view(np.uint8)
    size = tensor_mib * MiB
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for i in range(count):
        shape = [size // 2 // 4096, 4096] if size >= 8192 else [size // 2]
        header[f"layer.{i}"] = {
            "dtype": "BF16",
            "shape": shape,
            "data_offsets": [i * size, (i + 1) * size],
        }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        left, n = count * size, 0
        while left:
            part = np.roll(block, n)[: min(left, block.nbytes)]
            f.write(part.data)
            left -= part.nbytes
            n += 1
    return path.stat().st_size


@dataclass
class Side:
    """One process: ``objstream ARGS``, its anonymous memory polled while it runs."""

    args: list[str]
    env: dict[str, str]
    work: Path
    name: str
    peak_anon_kib: int = 0
    started: float = 0.0
    ended: float = 0.0
    process: subprocess.Popen[bytes] = field(init=False)
    _poller: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, str(self.work / self.name), *self.args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        status = f"/proc/{self.process.pid}/status"
        while self.process.poll() is None:
            try:
                with open(status, encoding="ascii") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.peak_anon_kib = max(self.peak_anon_kib, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        self.ended = time.monotonic()

    def wait(self, timeout: float = 1200) -> str:
        out, err = self.process.communicate(timeout=timeout)
        self._poller.join()
        if self.process.returncode != 0:
            raise RuntimeError(f"{' '.join(self.args[:2])} failed: {err.decode()[-2000:]}")
        return out.decode()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=60)
        self._poller.join()

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    @property
    def anon_mib(self) -> float:
        return self.peak_anon_kib / 1024

    @property
    def hwm_mib(self) -> float:
        try:
            return float((self.work / self.name).read_text())
        except (OSError, ValueError):
            return float("nan")


def _same(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as x, open(b, "rb") as y:
        while block := x.read(8 * MiB):
            if block != y.read(8 * MiB):
                return False
    return True


NAMESPACES: list[str] = []


def _env() -> dict[str, str]:
    namespace = f"bench-tensors-{uuid.uuid4().hex[:8]}"
    NAMESPACES.append(namespace)
    return dict(os.environ, OBJSTREAM_NAMESPACE=namespace, OBJSTREAM_LOG_LEVEL="warning")


def cleanup() -> None:
    """Delete what the runs declared on the broker (reply queues expire by themselves)."""
    import pika

    url = os.environ.get("OBJSTREAM_URL", "amqp://guest:guest@localhost:5672/%2F")
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for ns in NAMESPACES:
            for queue in (f"{ns}.site.site-1", f"{ns}.serve.server"):
                channel.queue_delete(queue)
            for site in ("server", "site-1"):
                channel.queue_delete(f"{ns}.dead.{site}")
                channel.exchange_delete(f"{ns}.dead.{site}")
            channel.exchange_delete(ns)
    finally:
        connection.close()


def push(src: Path, work: Path, command: str) -> dict[str, float]:
    """``command`` (send-container or send-file) of ``src`` to a listener."""
    env = _env()
    dest = work / f"in-{command}"
    listener = Side(
        ["consumer", "listen", "--site", "site-1", "--dest", str(dest), "--count", "1", "--json"],
        env,
        work,
        f"rx-{command}",
    )
    time.sleep(1.5)  # the listener declares the site's inbox
    sender = Side(
        ["producer", command, "--site", "server", "--to", "site-1", str(src)], env, work, "tx"
    )
    sender.wait()
    record = json.loads(listener.wait(timeout=300))
    got = Path(record["path"])
    same = _same(src, got)
    got.unlink()
    return _figures(src, sender, listener, sender.seconds, same)


def retrieve(src: Path, work: Path) -> dict[str, float]:
    env = _env()
    server = Side(
        ["producer", "serve", "--site", "server", "--container", f"m={src}"], env, work, "srv"
    )
    time.sleep(1.5)
    out = work / "out" / "m.safetensors"
    requester = Side(
        ["consumer", "retrieve-container", "--site", "site-1", "--from", "server", "m",
         "--out", str(out)],
        env,
        work,
        "rq",
    )  # fmt: skip
    requester.wait()
    server.stop()
    same = _same(src, out)
    out.unlink()
    return _figures(src, server, requester, requester.seconds, same)


def _figures(
    src: Path, sender: Side, receiver: Side, seconds: float, same: bool
) -> dict[str, float]:
    return {
        "mib_s": src.stat().st_size / MiB / seconds,
        "sender_anon": sender.anon_mib,
        "sender_hwm": sender.hwm_mib,
        "receiver_anon": receiver.anon_mib,
        "receiver_hwm": receiver.hwm_mib,
        "same": float(same),
    }


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="2048x1,512x3,32x32", help="MIBxCOUNT,...")
    parser.add_argument("--runs", type=int, default=1, help="runs per figure (median)")
    parser.add_argument("--dir", type=Path, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    rows = [tuple(int(n) for n in row.split("x")) for row in args.rows.split(",")]
    print("| tensors | way | MiB/s | vs file | peak anon sender / receiver | peak RSS (VmHWM) "
          "sender / receiver | identical |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        for tensor_mib, count in rows:
            src = work / "model.safetensors"
            write_tensors(src, tensor_mib, count)
            ways = {
                "file (send-file)": [push(src, work, "send-file") for _ in range(args.runs)],
                "push": [push(src, work, "send-container") for _ in range(args.runs)],
                "retrieval": [retrieve(src, work) for _ in range(args.runs)],
            }
            file_rate = _median(ways["file (send-file)"])["mib_s"]
            for way, runs in ways.items():
                m = _median(runs)
                print(
                    f"| {count} x {tensor_mib} MiB | {way} | {m['mib_s']:.0f} "
                    f"| {m['mib_s'] / file_rate:.0%} "
                    f"| {m['sender_anon']:.0f} / {m['receiver_anon']:.0f} MiB "
                    f"| {m['sender_hwm']:.0f} / {m['receiver_hwm']:.0f} MiB "
                    f"| {'yes' if m['same'] == 1 else 'NO'} |",
                    flush=True,
                )
            src.unlink()
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
