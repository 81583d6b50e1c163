"""Federated-learning rounds with and without delta transfers: ``objstream job rounds``, twice.

    python bench/rounds.py [--clients 4] [--rounds 5] [--size 64MiB] [--change 0.05]
                           [--tensors 40] [--pick same|rotate]

Runs the job as it is shipped (a server and each client in a process of its own, against the
broker of ``OBJSTREAM_URL``, in a namespace of its own), once with deltas (the default) and
once with ``--full``, and prints one markdown row per round: the bytes published down (the
server's broadcast to every client, one copy whatever the number of clients) and up (every
client's update), the bytes each target copied from what it held instead, and the round's
seconds (the server's broadcast, the clients' checks and updates, the server's checks and
aggregate). Both runs start from empty directories. Every round of both runs is verified by
the job (bit for bit against the seed, and each receiver's SHA-256 against its sender's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from typing import Any

MiB = 1024 * 1024


def run(args: argparse.Namespace, *extra: str) -> list[dict[str, Any]]:
    """The job's JSON objects (one per round, then the summary); exits on failure."""
    namespace = f"bench-rounds-{uuid.uuid4().hex[:8]}"
    options = (
        f"--clients {args.clients} --rounds {args.rounds} --size {args.size} --change "
        f"{args.change} --tensors {args.tensors} --pick {args.pick}"
    )
    command = ["objstream", "--namespace", namespace, "job", "rounds", "--json"]
    command += [*options.split(), *extra]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=os.environ)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
    subprocess.run(
        ["objstream", "admin", "cleanup", "--namespace", namespace],
        capture_output=True,
        check=False,
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


def mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", default="64MiB")
    parser.add_argument("--change", type=float, default=0.05)
    parser.add_argument("--tensors", type=int, default=40)
    parser.add_argument("--pick", choices=["same", "rotate"], default="same")
    args = parser.parse_args()
    *delta, delta_summary = run(args)
    *full, full_summary = run(args, "--full")
    print(
        f"`objstream job rounds --clients {args.clients} --rounds {args.rounds} --size "
        f"{args.size} --change {args.change} --tensors {args.tensors} --pick {args.pick}`: "
        f"{delta_summary['changed']} of {args.tensors} tensors change a round; MiB published "
        "(down: one broadcast to every client; up: all the updates), MiB reused by the targets\n"
    )
    print("| round | delta: down | up | reused | % of round 1 | s | --full: down | up | s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d, f in zip(delta, full, strict=True):
        print(
            f"| {d['round']} | {mib(d['down_published'])} | {mib(d['up_published'])} "
            f"| {mib(d['reused'])} | {100 * d['of_round_1']:.1f} | {d['seconds']:.2f} "
            f"| {mib(f['down_published'])} | {mib(f['up_published'])} | {f['seconds']:.2f} |"
        )
    print(
        f"| all | {mib(sum(r['down_published'] for r in delta))} "
        f"| {mib(sum(r['up_published'] for r in delta))} | {mib(delta_summary['reused'])} "
        f"| {100 * delta_summary['moved'] / full_summary['moved']:.1f} "
        f"| {delta_summary['seconds']:.2f} | {mib(sum(r['down_published'] for r in full))} "
        f"| {mib(sum(r['up_published'] for r in full))} | {full_summary['seconds']:.2f} |"
    )
    rss = ", ".join(f"{k} {v}" for k, v in delta_summary["peak_rss_mib"].items())
    print(f"\npeak RSS (MiB, delta run; mapped model files included): {rss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
