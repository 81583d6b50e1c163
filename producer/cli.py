"""``objstream producer ...``: the sending side's commands."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from common.cli import size_arg
from common.settings import Settings
from producer.streamer import FileStreamer


def add_commands(commands: Any, parent: argparse.ArgumentParser) -> None:
    side = commands.add_parser(
        "producer", help="send objects to other sites", description="The sending side."
    )
    sub = side.add_subparsers(dest="command", required=True, metavar="{send-file}")
    send = sub.add_parser(
        "send-file",
        parents=[parent],
        help="stream a file to one or more sites",
        description="Stream a file to one or more sites; returns once each stored and verified "
        "it. Exit codes: 0 ok, 1 transfer failed, 2 usage, 3 broker unreachable, 4 timed out.",
        epilog="example:\n  objstream producer send-file --site server --to site-1,site-2 big.bin",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    send.add_argument("path", metavar="PATH", help="file to send")
    send.add_argument("--site", required=True, help="this site's name")
    send.add_argument(
        "--to",
        required=True,
        type=_sites,
        metavar="TARGET[,TARGET...]",
        help="receiving site(s), comma-separated",
    )
    send.add_argument(
        "--chunk-size",
        type=size_arg,
        metavar="SIZE",
        help="bytes per chunk, e.g. 256KiB, 4MiB (default 1MiB)",
    )
    send.add_argument(
        "--window",
        type=int,
        metavar="N",
        help="chunks in flight beyond what a receiver stored (default 32)",
    )
    send.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="fail a target after this long without progress (default 60)",
    )
    send.add_argument("--json", action="store_true", help="print the result as one JSON object")
    send.set_defaults(handler=send_file, settings_overrides=_overrides)


def _sites(text: str) -> list[str]:
    sites = [s.strip() for s in text.split(",") if s.strip()]
    if not sites:
        raise argparse.ArgumentTypeError("no site given")
    return sites


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"chunk_size": args.chunk_size, "window": args.window, "timeout": args.timeout}


def send_file(args: argparse.Namespace, settings: Settings) -> int:
    started = time.monotonic()
    with FileStreamer(args.site, settings) as streamer:
        results = streamer.stream_file(args.to, args.path)
    seconds = time.monotonic() - started
    size = results[0].size
    rate = size / (1024 * 1024) / seconds if seconds > 0 else 0.0
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "name": args.path,
                    "bytes": size,
                    "seconds": round(seconds, 3),
                    "mib_per_s": round(rate, 1),
                    "sha256": results[0].sha256,
                    "targets": [
                        {"site": r.site, "stream_id": r.stream_id, "stored_as": r.stored_as}
                        for r in results
                    ],
                }
            )
        )
    else:
        for r in results:
            print(
                f"sent {args.path} to {r.site} as {r.stored_as}: {size} bytes in "
                f"{seconds:.2f} s ({rate:.1f} MiB/s), sha256 {r.sha256} verified"
            )
    return 0
