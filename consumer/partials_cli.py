"""``objstream consumer partials``: list, or clean, what interrupted transfers left in a
destination directory (see :mod:`objstream.consumer.partials`)."""

from __future__ import annotations

import argparse
import json
import re
import time
from typing import Any

from objstream.common.cli import EXIT_OK, HelpFormatter
from objstream.common.errors import ObjstreamError
from objstream.common.settings import Settings
from objstream.consumer.partials import Partial, PartialsDir, Removal, Status

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


class PartialsHeld(ObjstreamError):
    """``--clean`` left partial objects a running receiver holds (exit 1)."""

    def __init__(self, held: list[Partial]) -> None:
        self.held = held
        names = ", ".join(_shown(p) for p in held[:3]) + (", ..." if len(held) > 3 else "")
        super().__init__(
            f"{len(held)} partial object{'s' if len(held) != 1 else ''} left in place, a running "
            f"receiver holds {'them' if len(held) != 1 else 'it'}: {names}; stop it first, or "
            "let it finish"
        )


def duration_arg(text: str) -> float:
    """argparse type for a duration: ``90``, ``90s``, ``30m``, ``12h``, ``7d``, ``2w``."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration such as 90s, 30m, 12h, 7d or 2w"
        )
    return float(match[1]) * _UNITS[match[2] or "s"]


def add_command(sub: Any, parent: argparse.ArgumentParser) -> None:
    cmd = sub.add_parser(
        "partials",
        parents=[parent],
        help="list (or --clean) the partial files interrupted transfers left in a directory",
        description="List the partial objects kept in DIR by transfers that did not finish "
        "(listen, retrieve-file, retrieve-container keep them so that they can resume): "
        "status, age, bytes stored of the total, sender and name. Status: held (a running "
        "receiver works on it), resumable (its receiver is gone: the next receiver on DIR "
        "takes it over), kept (its sender went away: retrieving the same file from the same "
        "site again continues it), orphan (no readable state: nothing will resume it). With "
        "--clean, delete them and their state files, except those a running receiver holds; "
        "only DIR's own .objstream-<id>.* files are touched, and symlinks are never followed. "
        "Needs no broker. Exit codes: 0 ok, 1 --clean left partial objects a running receiver "
        "holds (the others were deleted), 2 usage (DIR missing or not a directory).",
        epilog="examples:\n"
        "  objstream consumer partials --dest in\n"
        "  objstream consumer partials --dest in --clean --older-than 7d",
        formatter_class=HelpFormatter,
    )
    cmd.add_argument("--dest", required=True, metavar="DIR", help="the destination directory")
    cmd.add_argument(
        "--clean",
        action="store_true",
        help="delete them (and their state files); those a running receiver holds stay",
    )
    cmd.add_argument(
        "--older-than",
        type=duration_arg,
        metavar="DURATION",
        help="only those untouched for longer than this: 90s, 30m, 12h, 7d, 2w",
    )
    cmd.add_argument(
        "--json", action="store_true", help="one JSON object per partial object (per line)"
    )
    cmd.set_defaults(handler=partials_cmd, settings_overrides=lambda args: {})


def partials_cmd(args: argparse.Namespace, settings: Settings) -> int:
    now = time.time()
    with PartialsDir(args.dest) as directory:
        found = [
            p for p in directory.scan() if args.older_than is None or p.age(now) > args.older_than
        ]
        if not args.clean:
            _list(args, found, now)
            return EXIT_OK
        held: list[Partial] = []
        removed = 0
        for partial in found:
            outcome = directory.remove(partial, now)
            if outcome is Removal.HELD:
                held.append(partial)
            elif outcome is Removal.REMOVED:
                removed += 1
                _print_removed(args, partial, now)
    if held:
        raise PartialsHeld(held)
    if not removed and not args.json:
        print(f"nothing to clean in {args.dest}")
    return EXIT_OK


def _list(args: argparse.Namespace, found: list[Partial], now: float) -> None:
    if args.json:
        for partial in found:
            print(json.dumps(partial.to_json(now)))
        return
    if not found:
        print(f"no partial objects in {args.dest}")
        return
    rows = [("STATUS", "AGE", "STORED / TOTAL", "SENDER", "NAME")]
    rows += [
        (p.status.value, _age(p.age(now)), _stored(p), p.sender or "-", _name(p)) for p in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        print("  ".join(cells) + f"  {row[4]}")
    disk = sum(p.disk_bytes for p in found)
    held = sum(p.status is Status.HELD for p in found)
    print(
        f"{len(found)} partial object{'s' if len(found) != 1 else ''}, {_bytes(disk)} on disk"
        + (f", {held} held by a running receiver" if held else "")
    )


def _print_removed(args: argparse.Namespace, partial: Partial, now: float) -> None:
    if args.json:
        print(json.dumps({**partial.to_json(now), "deleted": True}), flush=True)
    else:
        print(
            f"deleted {_shown(partial)}: {partial.status.value}, {_stored(partial)}, "
            f"{_age(partial.age(now))} old, {_bytes(partial.disk_bytes)} freed",
            flush=True,
        )


def _shown(partial: Partial) -> str:
    return f"{_name(partial)} (stream {partial.stream_id[:8]})"


def _name(partial: Partial) -> str:
    """The object's name on one line: one with control characters (a newline) is quoted."""
    if partial.name is None:
        return "?"
    return partial.name if partial.name.isprintable() else json.dumps(partial.name)


def _stored(partial: Partial) -> str:
    if partial.stored_bytes is None:
        return f"{_bytes(partial.disk_bytes)} on disk"
    total = "?" if partial.total_bytes is None else _bytes(partial.total_bytes)
    return f"{_bytes(partial.stored_bytes)} / {total}"


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
