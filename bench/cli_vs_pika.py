"""Bench row: a verified file-to-file send as a user runs it, against bare stock pika.

    python bench/cli_vs_pika.py [--gib 3] [--runs 3]

Alternates, ``--runs`` times each, in the same run on the broker at ``OBJSTREAM_URL``:

- bare pika: ``--gib`` GiB as 1 MiB transient messages, no confirms, one publisher and one
  consumer process (bench/run.py's ceiling row), MiB/s from the publisher's first message to
  the consumer's last;
- objstream: ``objstream consumer listen --count 1`` already running, then the wall time of the
  command ``objstream producer send-file`` of a ``--gib`` GiB file, start-up, connecting and
  the receiver's verification included (it returns once the target verified the SHA-256 and
  renamed the file into place).

Prints each run and the median ratio objstream / pika.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import URL, raw

MiB = 1 << 20


def send_once(path: Path, dest: Path) -> float:
    """Wall seconds of ``send-file`` to a listening site (listener started and ready first)."""
    env = dict(os.environ, OBJSTREAM_URL=URL, OBJSTREAM_NAMESPACE=f"bench-{uuid.uuid4().hex[:8]}")
    listener = subprocess.Popen(
        [
            "objstream",
            "consumer",
            "listen",
            "--site",
            "site-1",
            "--dest",
            str(dest),
            "--count",
            "1",
        ],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert listener.stderr is not None
        line = listener.stderr.readline()  # "objstream: listening for site ..."
        if "listening" not in line:
            raise RuntimeError(f"listen did not start: {line}")
        began = time.monotonic()
        subprocess.run(
            ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1", str(path)],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        seconds = time.monotonic() - began
        listener.wait(60)
    finally:
        listener.kill()
        for file in dest.iterdir():
            file.unlink()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    size = int(args.gib * 1024) * MiB
    ratios = []
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        path = Path(tmp) / "object.bin"
        with open(path, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        dest = Path(tmp) / "in"
        dest.mkdir()
        for run in range(1, args.runs + 1):
            ceiling = raw(size // MiB, MiB, confirmed=False)["mib_s"]
            seconds = send_once(path, dest)
            rate = size / MiB / seconds
            ratios.append(rate / ceiling)
            print(
                f"run {run}: pika {ceiling:.0f} MiB/s; send-file {seconds:.2f} s = {rate:.0f} "
                f"MiB/s = {rate / ceiling:.3f}x",
                flush=True,
            )
    print(f"{args.gib:g} GiB: send-file / pika, median {statistics.median(ratios):.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
