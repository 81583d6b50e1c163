"""Peak memory of sending and receiving a big container, as separate processes.

    python bench/container_memory.py [--entries 8] [--entry-size 64MiB] [--on-entry]

The sender builds a dict of float32 arrays (``entries`` x ``entry-size``) and streams it; the
receiver keeps the container (or, with ``--on-entry``, takes each entry through the callback and
drops it). Each side reports its peak RSS; the arrays are compared by SHA-256. Prints one line
and a JSON object. Needs a broker (OBJSTREAM_URL, default localhost).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from objstream.jobs.runner import peak_rss_mib

MiB = 1024 * 1024


def _sender(namespace: str, entries: int, entry_size: int, out: Any) -> None:
    import numpy as np

    from objstream.common.settings import Settings
    from objstream.producer import ContainerStreamer

    settings = Settings(namespace=namespace)
    rng = np.random.default_rng(0)
    model = {
        f"layer-{i}": rng.standard_normal(entry_size // 4, dtype=np.float32) for i in range(entries)
    }
    digests = {k: hashlib.sha256(v.data).hexdigest() for k, v in model.items()}
    base = peak_rss_mib()
    started = time.monotonic()
    with ContainerStreamer("server", settings) as streamer:
        streamer.stream_container("site-1", model, "model")
    seconds = time.monotonic() - started
    out.put(
        {
            "side": "sender",
            "peak_rss_mib": peak_rss_mib(),
            "rss_before_mib": base,
            "seconds": seconds,
            "digests": digests,
        }
    )


def _receiver(namespace: str, on_entry: bool, out: Any) -> None:
    from objstream.common.settings import Settings
    from objstream.consumer import Receiver

    settings = Settings(namespace=namespace)
    digests: dict[str, str] = {}

    def take(entry: Any) -> None:
        digests[entry.key] = hashlib.sha256(entry.value.data).hexdigest()

    with Receiver("site-1", "/tmp", settings, on_entry=take if on_entry else None) as receiver:
        out.put({"side": "ready"})
        item = receiver.receive(timeout=600)
    assert item is not None
    if not on_entry:
        digests = {k: hashlib.sha256(v.data).hexdigest() for k, v in item.value.items()}
    out.put({"side": "receiver", "peak_rss_mib": peak_rss_mib(), "digests": digests})


def main() -> int:
    from objstream.common.settings import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=8)
    parser.add_argument("--entry-size", type=parse_size, default=64 * MiB)
    parser.add_argument("--on-entry", action="store_true")
    args = parser.parse_args()
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    receiver = ctx.Process(target=_receiver, args=(namespace, args.on_entry, out))
    receiver.start()
    assert out.get(timeout=60)["side"] == "ready"
    sender = ctx.Process(target=_sender, args=(namespace, args.entries, args.entry_size, out))
    sender.start()
    results = {r["side"]: r for r in (out.get(timeout=900), out.get(timeout=900))}
    sender.join()
    receiver.join()
    total = args.entries * args.entry_size / MiB
    s, r = results["sender"], results["receiver"]
    equal = s.pop("digests") == r.pop("digests")
    summary = {
        "container_mib": total,
        "entries": args.entries,
        "on_entry": args.on_entry,
        "seconds": round(s["seconds"], 2),
        "mib_per_s": round(total / s["seconds"], 1),
        "sender_peak_rss_mib": round(s["peak_rss_mib"], 1),
        "sender_extra_mib": round(s["peak_rss_mib"] - total, 1),
        "receiver_peak_rss_mib": round(r["peak_rss_mib"], 1),
        "receiver_extra_mib": round(r["peak_rss_mib"] - (0 if args.on_entry else total), 1),
        "arrays_equal": equal,
    }
    print(
        f"container {total:.0f} MiB ({args.entries} entries{', on_entry' if args.on_entry else ''})"
        f": {summary['mib_per_s']} MiB/s; sender peak {summary['sender_peak_rss_mib']} MiB "
        f"(+{summary['sender_extra_mib']}), receiver peak {summary['receiver_peak_rss_mib']} MiB "
        f"(+{summary['receiver_extra_mib']}); equal: {equal}"
    )
    print(json.dumps(summary))
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
