"""``objstream consumer ...``: the receiving side's commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from common.cli import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, StopFlag
from common.errors import ErrorCode, ObjstreamError, TransferFailed
from common.settings import Settings
from consumer.container_assembler import ContainerEntry
from consumer.container_files import ContainerFile
from consumer.receiver import Received, Receiver

log = logging.getLogger(__name__)


def add_commands(commands: Any, parent: argparse.ArgumentParser) -> None:
    side = commands.add_parser(
        "consumer", help="receive objects from other sites", description="The receiving side."
    )
    sub = side.add_subparsers(dest="command", required=True, metavar="{listen}")
    listen = sub.add_parser(
        "listen",
        parents=[parent],
        help="receive the files and containers streamed to a site",
        description="Receive the files and containers streamed to a site into a directory. "
        "Containers are saved under their name in the format its suffix names (.npz, "
        ".safetensors, .json; .npz is added to other names), entry by entry. Each file is written "
        "to a partial file, verified (size, SHA-256), then renamed to the sender's base name "
        "(sanitized; an existing file is never overwritten: NAME-1.EXT, NAME-2.EXT... instead). "
        "Without --count it runs until SIGINT/SIGTERM.",
        epilog="example:\n  objstream consumer listen --site site-1 --dest /tmp/in --count 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listen.add_argument("--site", required=True, help="this site's name")
    listen.add_argument("--dest", required=True, metavar="DIR", help="directory to store into")
    listen.add_argument(
        "--count", type=int, metavar="N", help="exit after N objects (non-zero if any failed)"
    )
    listen.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="fail a stream after this long without data; with --count, also "
        "give up (exit 4) when nothing arrives for this long (default 60)",
    )
    listen.add_argument(
        "--json", action="store_true", help="print one JSON object per object received"
    )
    listen.set_defaults(handler=listen_cmd, settings_overrides=_overrides)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"timeout": args.timeout}


class ContainerFiles:
    """Writes the containers a listener receives into its dest, entry by entry."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.open: dict[str, ContainerFile] = {}

    def on_entry(self, entry: ContainerEntry) -> None:
        writer = self.open.get(entry.stream_id)
        if writer is None:
            writer = self.open[entry.stream_id] = ContainerFile(
                self.dest, entry.stream_id, entry.name
            )
        writer.add(entry)

    def commit(self, item: Received) -> Received:
        """Finish the file of a received container; the result names its path."""
        writer = self.open.pop(item.stream_id, None) or ContainerFile(
            self.dest, item.stream_id, item.name
        )
        try:
            path = writer.commit(item.container_type or "dict")
        except BaseException:
            writer.discard()
            raise
        return dataclasses.replace(item, path=path)

    def discard(self, stream_id: str) -> None:
        writer = self.open.pop(stream_id, None)
        if writer is not None:
            writer.discard()


def _report(args: argparse.Namespace, item: Received | TransferFailed) -> None:
    if isinstance(item, TransferFailed):
        if args.json:
            print(
                json.dumps(
                    {
                        "ok": False,
                        "stream_id": item.stream_id,
                        "sender": item.site,
                        "code": str(item.code),
                        "detail": item.detail,
                    }
                ),
                flush=True,
            )
        print(f"objstream: error: {item}", file=sys.stderr, flush=True)
        return
    what = item.kind
    if item.kind == "container":
        what = f"container ({item.container_type}, {item.entry_count} entries)"
    if args.json:
        record = {
            "ok": True,
            "stream_id": item.stream_id,
            "kind": item.kind,
            "name": item.name,
            "path": str(item.path),
            "bytes": item.size,
            "sha256": item.sha256,
            "sender": item.sender,
        }
        print(json.dumps(record), flush=True)
    else:
        print(
            f"received {what} {item.name} from {item.sender} -> {item.path} ({item.size} "
            f"bytes, sha256 {item.sha256} verified)",
            flush=True,
        )


def listen_cmd(args: argparse.Namespace, settings: Settings) -> int:
    stop = StopFlag()
    stop.install()
    done = failed = 0
    idle_since = time.monotonic()
    containers = ContainerFiles(Path(args.dest))
    with Receiver(args.site, args.dest, settings, on_entry=containers.on_entry) as receiver:
        log.info(
            "listening for site %s on %s (namespace %s)",
            args.site,
            settings.masked_url,
            settings.namespace,
        )
        while not stop and (args.count is None or done < args.count):
            item: Received | TransferFailed | None
            try:
                received = receiver.receive(timeout=0.5)
                if received is not None and received.kind == "container":
                    try:
                        received = containers.commit(received)
                    except (ObjstreamError, OSError) as e:
                        raise TransferFailed(
                            received.sender, received.stream_id, ErrorCode.IO, f"saving: {e}"
                        ) from e
                item = received
            except TransferFailed as e:
                containers.discard(e.stream_id)
                item = e
            if item is None:
                busy = receiver.active_streams > 0
                if busy:
                    idle_since = time.monotonic()
                elif (
                    args.count is not None
                    and args.timeout is not None
                    and time.monotonic() - idle_since > args.timeout
                ):
                    print(
                        f"objstream: error: nothing arrived for site {args.site} in "
                        f"{args.timeout:g} s",
                        file=sys.stderr,
                    )
                    return EXIT_TIMEOUT
                continue
            idle_since = time.monotonic()
            done += 1
            failed += isinstance(item, TransferFailed)
            _report(args, item)
    return EXIT_FAILED if failed else EXIT_OK
