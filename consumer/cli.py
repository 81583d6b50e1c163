"""``objstream consumer ...``: the receiving side's commands."""

from __future__ import annotations

import argparse
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

from objstream.common import monitoring, progress
from objstream.common.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    HelpFormatter,
    StopFlag,
    count_arg,
    failures_reported,
    size_arg,
)
from objstream.common.console import console, plural, printable
from objstream.common.errors import ConfigError, SenderGone, TransferFailed
from objstream.common.request_session import Kind
from objstream.common.settings import Settings, check_object_name
from objstream.consumer import partials_cli
from objstream.consumer.listing_cli import check_list_args, list_cmd
from objstream.consumer.output_formats import FORMATS, TORCH_SUFFIXES
from objstream.consumer.receiver import Receiver
from objstream.consumer.retriever import Retriever, check_keys
from objstream.consumer.streams import Received

log = logging.getLogger(__name__)


def add_commands(commands: Any, parent: argparse.ArgumentParser) -> None:
    side = commands.add_parser(
        "consumer",
        parents=[parent],
        epilog="example:\n  objstream consumer listen --site site-1 --dest in",
        formatter_class=HelpFormatter,
        help="receive objects from other sites",
        description="The receiving side.",
    )
    sub = side.add_subparsers(
        dest="command", required=True, metavar="{listen,retrieve-file,retrieve-container,partials}"
    )
    listen = sub.add_parser(
        "listen",
        parents=[parent],
        help="receive the files and containers streamed to a site",
        description="Receive the files and containers streamed to a site into a directory. "
        "Containers are saved under their name in the format its suffix names (.npz, "
        ".safetensors, .json; .npz is added to other names), entry by entry; a directory "
        "container (send-container DIR) as the same directory tree. Each file is written "
        "to a partial file, verified (size, SHA-256), then renamed to the sender's base name "
        "(sanitized; an existing file is never overwritten: NAME-1.EXT, NAME-2.EXT... instead); "
        "a file of a tree (send-file -r DIR) under its path in DIR, never outside it. "
        "With --count N it exits after N objects arrived (non-zero if any failed); without "
        "it, it runs until SIGINT/SIGTERM and exits 0, failed streams being reported on "
        "stderr (and with --json on stdout) as they end.",
        epilog="example:\n  objstream consumer listen --site site-1 --dest in --count 1",
        formatter_class=HelpFormatter,
    )
    listen.add_argument("--site", required=True, help="this site's name")
    listen.add_argument("--dest", required=True, metavar="DIR", help="directory to store into")
    listen.add_argument(
        "--count",
        type=count_arg,
        metavar="N",
        help="exit after N objects arrived (exit 1 if any failed); streams a stopped "
        "listener left whose sender has gone meanwhile are not counted",
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
    listen.add_argument(
        "--accept-from",
        action="append",
        metavar="USER",
        help="take pushes only from this broker user (repeatable; env OBJSTREAM_ACCEPT_FROM, "
        "comma-separated); offers from others are refused at once with code forbidden",
    )
    _full_option(listen)
    progress.add_option(listen)
    monitoring.add_metrics_options(listen)
    listen.set_defaults(handler=listen_cmd, settings_overrides=_listen_overrides)
    _add_retrieve_commands(sub, parent)
    partials_cli.add_command(sub, parent)


def _add_retrieve_commands(sub: Any, parent: argparse.ArgumentParser) -> None:
    rf = sub.add_parser(
        "retrieve-file",
        parents=[parent],
        help="ask another site for a file from its source dir",
        description="Ask OWNER (running `objstream producer serve`) for the file NAME and store "
        "it in DIR; prints the stored path. A refusal (not_found, forbidden, "
        "outside_source_dir, too_large, busy) exits 1 at once; no progress for --timeout "
        "seconds exits 4. With --list, print the files OWNER lets this site retrieve instead.",
        epilog="examples:\n  objstream consumer retrieve-file --site site-1 --from server "
        "big.bin --dest in\n  objstream consumer retrieve-file --site site-1 --from server --list",
        formatter_class=HelpFormatter,
    )
    rf.add_argument(
        "name",
        metavar="NAME",
        nargs="?",
        help="file name, relative to the owner's source dir (with --list: a prefix)",
    )
    rf.add_argument(
        "--dest", metavar="DIR", help="directory to store into (required unless --list)"
    )
    rf.add_argument(
        "--range",
        dest="byte_range",
        type=_byte_range,
        metavar="START:END",
        help="only bytes START to END (END excluded) of the file, e.g. 0:4MiB; stored as a "
        "file of its own under NAME (the owner reads only those)",
    )
    _retrieve_options(rf)
    rf.set_defaults(handler=retrieve_file_cmd, settings_overrides=_overrides)

    rc = sub.add_parser(
        "retrieve-container",
        parents=[parent],
        help="ask another site for a named container",
        description="Ask OWNER for the container NAME and write it to PATH, in the format the "
        "suffix names (.npz, .safetensors, .json), entry by entry; prints the stored path "
        "(an existing file is never overwritten: NAME-1.EXT... instead). With --list, print "
        "the containers OWNER lets this site retrieve instead.",
        epilog="examples:\n  objstream consumer retrieve-container --site site-1 --from server "
        "model --out model.npz\n  objstream consumer retrieve-container --site site-1 --from "
        "server --list",
        formatter_class=HelpFormatter,
    )
    rc.add_argument(
        "name", metavar="NAME", nargs="?", help="the container's name at the owner (--list: prefix)"
    )
    rc.add_argument(
        "--out",
        metavar="PATH",
        help="where to write (required unless --list): PATH.npz/.safetensors/.json in that "
        "format; a served checkpoint directory as the directory PATH (no suffix, or ending in "
        "/); into PATH under the container's own name if PATH is an existing directory",
    )
    rc.add_argument(
        "--keys",
        type=_patterns,
        metavar="PATTERN[,PATTERN...]",
        help="only the entries (a safetensors' tensors) whose names match one of these glob "
        "patterns, e.g. 'layers.0.*,lm_head.*': the owner reads and sends them alone",
    )
    _retrieve_options(rc)
    rc.set_defaults(handler=retrieve_container_cmd, settings_overrides=_overrides)


def _byte_range(text: str) -> tuple[int, int]:
    """``--range START:END``: sizes (``4MiB``, plain bytes), START before END."""
    start, colon, end = text.partition(":")
    if not colon or not start or not end:
        raise argparse.ArgumentTypeError(f"{text!r} is not START:END (such as 0:4MiB)")
    first, last = size_arg(start), size_arg(end)
    if first >= last:
        raise argparse.ArgumentTypeError(f"{text!r}: END must be after START")
    return first, last


def _patterns(text: str) -> list[str]:
    """``--keys``: comma-separated glob patterns, each checked as a request carries them."""
    try:
        return check_keys([p for p in text.split(",") if p])
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _retrieve_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--site", required=True, help="this site's name")
    cmd.add_argument(
        "--from", dest="owner", required=True, metavar="OWNER", help="the site that serves it"
    )
    cmd.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up after this long without progress (default 60)",
    )
    cmd.add_argument("--json", action="store_true", help="print the result as one JSON object")
    cmd.add_argument(
        "--list",
        action="store_true",
        help="print what OWNER serves that this site's broker user may retrieve (sizes; "
        "a container's entries), with NAME only names that begin with it; exit 1 if OWNER "
        "refuses or does not support listing",
    )
    _full_option(cmd)
    progress.add_option(cmd)


def _print_retrieved(args: argparse.Namespace, item: Received, seconds: float) -> None:
    rate = item.size / (1024 * 1024) / seconds if seconds > 0 else 0.0
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "kind": item.kind,
                    "name": item.name,
                    "path": str(item.path),
                    "bytes": item.size,
                    "seconds": round(seconds, 3),
                    "mib_per_s": round(rate, 1),
                    "sha256": item.sha256,
                    "from": item.sender,
                    "sender_user": item.sender_user,
                    "resumed_bytes": item.resumed_bytes,
                    "bytes_reused": item.reused_bytes,
                }
            )
        )
    else:
        if item.resumed_bytes:
            console.note(
                f"resumed: {item.resumed_bytes} of {item.size} bytes were kept from an earlier "
                "attempt"
            )
        print(printable(item.path))


def _retrieve(
    retriever: Retriever, kind: Kind, args: argparse.Namespace, stop: StopFlag
) -> Received:
    """Retrieve as asked; a signal gives the retrieval up (the owner is told `aborted`, what
    is verified is kept) and the command exits 130 (SIGINT) or 143 (SIGTERM)."""
    keys = getattr(args, "keys", None)
    span = getattr(args, "byte_range", None)
    with failures_reported(stop, partial(_print_failed, args, kind) if args.json else None):
        return retriever.retrieve(
            kind, args.owner, args.name, args.timeout, keys=keys, byte_range=span
        )


def _print_failed(
    args: argparse.Namespace, kind: Kind, error: BaseException, seconds: float
) -> None:
    """``--json`` on failure: one object too, as the sends print (the error line and the exit
    code are the same as without it)."""
    interrupted = isinstance(error, KeyboardInterrupt)
    code = getattr(error, "code", None)
    record = {
        "ok": False,
        "kind": kind,
        "name": args.name,
        "from": args.owner,
        "seconds": round(seconds, 3),
        "code": "interrupted" if interrupted else (str(code) if code is not None else None),
        "error": "interrupted" if interrupted else str(error),
    }
    print(json.dumps(record), flush=True)


def _listing_or_checked(args: argparse.Namespace, stores: str) -> bool:
    """True if the command is a ``--list``; else check NAME and ``stores`` (before connecting).

    Raises:
        ConfigError: a missing NAME or ``stores``, a bad name, or ``stores`` with ``--list``.
    """
    if args.list:
        check_list_args(args, stores)
        return True
    if args.name is None:
        raise ConfigError(f"give NAME (the object to retrieve) and {stores}, or --list")
    check_object_name(args.name)
    if getattr(args, stores.lstrip("-")) is None:
        raise ConfigError(f"give {stores}: where to store {args.name!r}")
    return False


def retrieve_file_cmd(args: argparse.Namespace, settings: Settings) -> int:
    if args.list and args.byte_range is not None:
        raise ConfigError("--range selects the bytes to retrieve: not with --list")
    if _listing_or_checked(args, "--dest"):
        return list_cmd(args, settings, "file")
    started = time.monotonic()
    bars = progress.display(args.progress)
    stop = StopFlag()
    stop.install()
    with Retriever(args.site, args.dest, settings, progress=bars, cancel=stop.event) as retriever:
        item = _retrieve(retriever, "file", args, stop)
    bars.close()
    _print_retrieved(args, item, time.monotonic() - started)
    return EXIT_OK


def output_place(out: str) -> tuple[Path, str | None]:
    """Where ``retrieve-container --out OUT`` writes: a directory, and the name to save under
    there (``None``: the container's own name, which a directory container keeps as a
    directory). Checked before anything moves.

    Raises:
        ConfigError: ``OUT``'s suffix names no format a container is written in.
    """
    path = Path(out)
    if path.is_dir():
        return path, None  # into it, under the container's own name (as cp does)
    if out.endswith("/"):
        return path.parent, path.name + "/"  # a directory container, as the directory OUT
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        raise ConfigError(
            f"--out {out}: objstream never writes pickles; name it .safetensors (torch loads "
            "it with safetensors.torch.load_file)"
        )
    if suffix and suffix not in FORMATS:
        raise ConfigError(
            f"--out {out}: {suffix} is not a container format: name it .npz, .safetensors or "
            ".json, or give a directory"
        )
    return path.parent, path.name


def retrieve_container_cmd(args: argparse.Namespace, settings: Settings) -> int:
    if args.list and args.keys is not None:
        raise ConfigError("--keys selects the entries to retrieve: not with --list")
    if _listing_or_checked(args, "--out"):
        return list_cmd(args, settings, "container")
    dest, store_as = output_place(args.out)  # before connecting
    started = time.monotonic()
    bars = progress.display(args.progress)
    stop = StopFlag()
    stop.install()
    with Retriever(
        args.site,
        dest,
        settings,
        progress=bars,
        cancel=stop.event,
        store_containers=True,  # chunk by chunk into the file: never an entry whole in memory
        store_as=store_as,
    ) as retriever:
        item = _retrieve(retriever, "container", args, stop)
    bars.close()
    _print_retrieved(args, item, time.monotonic() - started)
    return EXIT_OK


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"timeout": args.timeout, "delta": False if args.full else None}


def _listen_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {**_overrides(args), "accept_from": args.accept_from}


def _full_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--full",
        action="store_true",
        help="ask for every chunk, even those this site holds already from an earlier version "
        "(default: only what it lacks, a delta, when the sender offers one)",
    )


def _report(args: argparse.Namespace, item: Received | TransferFailed) -> None:
    if isinstance(item, TransferFailed):
        gone = isinstance(item, SenderGone)
        if args.json:
            print(
                json.dumps(
                    {
                        "ok": False,
                        "stream_id": item.stream_id,
                        "sender": item.site,
                        "code": str(item.code),
                        "detail": item.detail,
                        **({"sender_gone": True} if gone else {}),
                    }
                ),
                flush=True,
            )
        if gone:
            console.warn(
                f"a stream left by an earlier listener ended, its sender gone: {item}; what "
                "arrived is kept for a retrieval"
            )
        else:
            console.error(str(item))
        return
    what = item.kind
    if item.kind == "container":
        entries = plural(item.entry_count or 0, "entry", "entries")
        what = f"container ({item.container_type}, {entries})"
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
            "sender_user": item.sender_user,
            "resumed_bytes": item.resumed_bytes,
            "bytes_reused": item.reused_bytes,
        }
        print(json.dumps(record), flush=True)
    else:
        print(
            printable(
                f"received {what} {item.name} from {item.sender} (user {item.sender_user}) -> "
                f"{item.path} ({plural(item.size, 'byte')}, sha256 {item.sha256} verified)"
            ),
            flush=True,
        )


def listen_cmd(args: argparse.Namespace, settings: Settings) -> int:
    watch = monitoring.watch(args, "receiver")  # a port in use fails here, before connecting
    stop = StopFlag()
    stop.install()
    done = failed = 0
    idle_since = time.monotonic()
    receiver = Receiver(
        args.site,
        args.dest,
        settings,
        progress=watch.progress,
        store_containers=True,  # each chunk into its place in the file; survives this process
    )
    watch.receiver(receiver)
    try:
        console.note(
            f"listening for site {args.site} on {settings.masked_url} (namespace "
            f"{settings.namespace}); stop with Ctrl-C"
        )
        while not stop and (args.count is None or done < args.count):
            item: Received | TransferFailed | None
            try:
                item = receiver.receive(timeout=0.2)  # look at the stop flag often
            except TransferFailed as e:
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
                    console.error(f"nothing arrived for site {args.site} in {args.timeout:g} s")
                    return EXIT_TIMEOUT
                continue
            _report(args, item)
            watch.arrived(item)
            if isinstance(item, SenderGone):
                continue  # nothing arrived: not one of --count's objects
            idle_since = time.monotonic()
            done += 1
            failed += isinstance(item, TransferFailed)
    finally:
        # Closing settles what was under way (a commit, a verdict): every object stored must
        # be reported, including those that ended after the loop last looked. (Not counted:
        # the listener was stopping, or had its --count already.)
        receiver.close()
        for item in receiver.drain():
            _report(args, item)
            watch.arrived(item)
        watch.close()
    # Without --count a listener is a service: what a remote party sends must not make it
    # fail; failures were reported as they happened.
    return EXIT_FAILED if failed and args.count is not None else EXIT_OK
