"""``objstream consumer retrieve-file --list`` / ``retrieve-container --list``: ask a serving
site what it offers this site, and print it (a table, or with ``--json`` one object)."""

from __future__ import annotations

import argparse
import json
import tempfile
from functools import partial
from typing import Any

from objstream.common.cli import EXIT_OK, StopFlag, failures_reported
from objstream.common.console import console, printable
from objstream.common.errors import ConfigError
from objstream.common.listing import MAX_LISTED, ListedObject, Listing
from objstream.common.request_session import Kind
from objstream.common.settings import MAX_NAME_LENGTH, Settings, check_site
from objstream.consumer.retriever import Retriever


def check_list_args(args: argparse.Namespace, stores: str) -> None:
    """``--list`` stores nothing: ``stores`` (``--dest``, ``--out``) has no place with it.

    Raises:
        ConfigError: it was given (one line, exit 2), or NAME is too long for a prefix.
    """
    if getattr(args, stores.lstrip("-")) is not None:
        raise ConfigError(f"--list stores nothing: leave out {stores}")
    if args.name is not None and len(args.name) > MAX_NAME_LENGTH:
        raise ConfigError(f"prefix of {len(args.name)} characters (at most {MAX_NAME_LENGTH})")


def list_cmd(args: argparse.Namespace, settings: Settings, kind: Kind) -> int:
    """List what ``--from`` serves this site: of ``kind``, names beginning with NAME."""
    check_site(args.owner)  # before connecting
    prefix = args.name or ""
    stop = StopFlag()
    stop.install()
    # A retriever needs a directory of its own; listing stores nothing in it.
    with (
        failures_reported(stop, partial(_print_failed, args, kind) if args.json else None),
        tempfile.TemporaryDirectory(prefix="objstream-list-") as scratch,
        Retriever(args.site, scratch, settings, cancel=stop.event) as retriever,
    ):
        listing = retriever.list(args.owner, kind, prefix=prefix, timeout=args.timeout)
    objects = sorted(listing.objects, key=lambda o: (o.kind, o.name))
    if args.json:
        print(json.dumps(_record(args, kind, listing, objects)))
    else:
        _print_table(objects, kind)
        _print_notes(args, kind, listing)
    return EXIT_OK


def _record(
    args: argparse.Namespace, kind: Kind, listing: Listing, objects: list[ListedObject]
) -> dict[str, Any]:
    return {
        "ok": True,
        "from": listing.site,
        "kind": kind,
        "prefix": args.name or "",
        "count": len(objects),
        "truncated": listing.truncated,
        "objects": [o.model_dump(exclude_none=True) for o in objects],
    }


def _print_failed(
    args: argparse.Namespace, kind: Kind, error: BaseException, seconds: float
) -> None:
    interrupted = isinstance(error, KeyboardInterrupt)
    code = getattr(error, "code", None)
    record = {
        "ok": False,
        "from": args.owner,
        "kind": kind,
        "prefix": args.name or "",
        "seconds": round(seconds, 3),
        "code": "interrupted" if interrupted else (str(code) if code is not None else None),
        "error": "interrupted" if interrupted else str(error),
    }
    print(json.dumps(record), flush=True)


def _print_table(objects: list[ListedObject], kind: Kind) -> None:
    """Sizes first, right-aligned, the name last (as ``ls -l``): a name with spaces stays
    readable, and one with a newline is escaped."""
    if not objects:
        return
    width = max(len("BYTES"), *(len(str(o.size)) for o in objects))
    if kind == "container":
        entries = max(len("ENTRIES"), *(len(str(o.entries)) for o in objects))
        print(f"{'BYTES':>{width}}  {'ENTRIES':>{entries}}  NAME")
        for o in objects:
            count = o.entries if o.entries is not None else "-"
            print(f"{o.size:>{width}}  {count:>{entries}}  {printable(o.name)}")
    else:
        print(f"{'BYTES':>{width}}  NAME")
        for o in objects:
            print(f"{o.size:>{width}}  {printable(o.name)}")


def _print_notes(args: argparse.Namespace, kind: Kind, listing: Listing) -> None:
    what = "files" if kind == "file" else "containers"
    if not listing.objects:
        begin = f" whose names begin with {args.name!r}" if args.name else ""
        console.note(f"site {listing.site!r} has no {what}{begin} for site {args.site!r}")
    if listing.truncated:
        console.warn(
            f"truncated: site {listing.site!r} serves more {what} than one listing holds (at "
            f"most {MAX_LISTED}); give NAME to list only names that begin with it"
        )
