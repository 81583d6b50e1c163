"""Bench row: a 1 GiB bfloat16 .safetensors through ``send-container`` into ``listen``.

Prints MiB/s (send-container's wall time, start to verified) and both sides' peak RSS.
Run: ``OBJSTREAM_URL=... python bench/checkpoint.py [--gib 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# The CLI, then its own peak RSS (MiB) written to the file named first.
WRAPPER = (
    "import sys\n"
    "from objstream.common.cli import main\n"
    "from objstream.jobs.runner import peak_rss_mib\n"
    "rc = main(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(peak_rss_mib()))\n"
    "sys.exit(rc)\n"
)


def write_bfloat16(path: Path, gib: float) -> int:
    """A bfloat16 safetensors of ``gib`` GiB in 32 MiB tensors; returns its size."""
    tensor = np.arange(16 << 20, dtype=np.float32).astype(ml_dtypes.bfloat16)
    count = max(1, int(gib * (1 << 30)) // tensor.nbytes)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for i in range(count):
        span = [i * tensor.nbytes, (i + 1) * tensor.nbytes]
        header[f"layer.{i:04d}"] = {"dtype": "BF16", "shape": [4096, 4096], "data_offsets": span}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for _ in range(count):
            f.write(tensor.view(np.uint8).data)
    return path.stat().st_size


def run(gib: float) -> dict[str, float]:
    """One transfer; MiB/s and peak RSS (MiB) of each side."""
    env = dict(os.environ, OBJSTREAM_NAMESPACE=f"bench-{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        size = write_bfloat16(work / "model.safetensors", gib)
        side = [sys.executable, "-c", WRAPPER]
        listen = subprocess.Popen([*side, str(work / "rx"), "consumer", "listen", "--site",
                                   "site-1", "--dest", str(work / "in"), "--count", "1"],
                                  env=env, stdout=subprocess.DEVNULL)  # fmt: skip
        time.sleep(2)
        started = time.monotonic()
        subprocess.run([*side, str(work / "tx"), "producer", "send-container", "--site",
                        "server", "--to", "site-1", str(work / "model.safetensors")],
                       env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        seconds = time.monotonic() - started
        listen.wait(timeout=120)
        return {
            "mib_per_s": size / (1 << 20) / seconds,
            "sender_rss_mib": float((work / "tx").read_text()),
            "receiver_rss_mib": float((work / "rx").read_text()),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    r = run(args.gib)
    print(
        f"| bfloat16 .safetensors {args.gib:g} GiB, send-container -> listen | "
        f"{r['mib_per_s']:.0f} MiB/s; peak RSS sender {r['sender_rss_mib']:.0f} MiB, "
        f"receiver {r['receiver_rss_mib']:.0f} MiB |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
