"""``send-file`` with several paths, a tree (``-r``) or standard input (``-``): each object sent
in turn on one connection, each verified by every target before the next goes.

Output, per object, is what ``send-file`` prints for one file: a line per target on stdout, or
with ``--json`` one JSON object (the same fields), one per line in the order sent. A failed
object is one ``objstream: error: PATH: ...`` line on stderr and the command goes on with the
next; something skipped in a tree is one ``objstream: skipped PATH: why`` line. The exit code
is the worst outcome: 0 when every object reached every target, 4 when every failure was a
timeout, 1 for any other failure. A broker failure (exit 3) or a signal (130, 143) stops the
command: the object in progress is reported and the rest are not sent.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import TYPE_CHECKING

from objstream.common.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    Interrupted,
    ProgressBars,
    StopFlag,
    exit_code_for,
)
from objstream.common.console import console
from objstream.common.errors import ConfigError, ObjstreamError, SendFailed
from objstream.producer.cli import print_sent
from objstream.producer.file_sets import STDIN, Item, expand
from objstream.producer.pipe_source import PipeSource

if TYPE_CHECKING:
    from objstream.common.settings import Settings
    from objstream.producer.sender import TargetResult
    from objstream.producer.streamer import FileStreamer

_RANK = {EXIT_OK: 0, EXIT_TIMEOUT: 1, EXIT_FAILED: 2}
"""How bad each per-object outcome is: the command exits with the worst."""


def is_many(args: argparse.Namespace) -> bool:
    """Whether the command line sends anything but exactly one plain file (which keeps the
    single-file code path, and its output, unchanged). A lone directory comes here too, to be
    told about ``-r``."""
    [first, *more] = args.path
    return bool(more) or args.recursive or first == STDIN or os.path.isdir(first)


def check_usage(args: argparse.Namespace) -> None:
    """Raises ConfigError (exit 2) for options that do not go together."""
    if args.name is not None and STDIN not in args.path:
        raise ConfigError("--name names standard input: give it with - as a PATH")
    if args.min_targets is not None and is_many(args):
        raise ConfigError("--min-targets sends one object: give one PATH, not a tree or stdin")


def send_many(args: argparse.Namespace, settings: Settings) -> int:
    """Send every object the command line names; returns the exit code (see the module)."""
    from objstream.producer.streamer import FileStreamer

    stop = StopFlag()
    try:
        found = expand(args.path, recursive=args.recursive, stdin_name=args.name, cancel=stop.event)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for skipped in found.skipped:
        console.warn(f"skipped {skipped}")
    if not found.items:
        raise ObjstreamError("nothing to send: " + ", ".join(args.path))
    worst = EXIT_OK
    bars = ProgressBars()
    stop.install()
    try:
        streamer = FileStreamer(args.site, settings, progress=bars, cancel=stop.event)
    except ObjstreamError as e:  # no broker...: nothing was sent, as one file would say
        if args.json:
            for item in found.items:
                print(json.dumps(_outcome(args, item, [], 0.0, e)), flush=True)
        raise
    with streamer:
        for item in found.items:
            if stop:
                raise stop.interrupted()
            code = _send_one(args, streamer, item, stop)
            worst = max(worst, code, key=_RANK.__getitem__)
    bars.close()
    return worst


def _send_one(args: argparse.Namespace, streamer: FileStreamer, item: Item, stop: StopFlag) -> int:
    """Send ``item`` to every target and report it; the exit code of its outcome.

    Raises:
        Interrupted: a signal stopped it (every target was told ``aborted``).
        ObjstreamError: the broker failed (exit 3): nothing more can be sent.
    """
    from objstream.producer.sender import TargetResult

    started = time.monotonic()
    try:
        source = item.open()
        if isinstance(source, PipeSource):
            _wait_for_input(streamer, source, stop)
        results = streamer.stream_object(args.to, source)
    except (ObjstreamError, OSError) as e:
        seconds = time.monotonic() - started
        done = [r for r in getattr(e, "results", []) if isinstance(r, TargetResult)]
        if isinstance(e, SendFailed) and stop:
            error: BaseException = stop.interrupted()
        else:
            error = e
        if args.json:
            print(json.dumps(_outcome(args, item, done, seconds, error)), flush=True)
        elif stored := [r for r in done if r.ok]:  # they, then the error line of the others
            print_sent(_label(args, item), stored, seconds)
        if error is not e:
            raise error from e
        code = exit_code_for(e) if isinstance(e, ObjstreamError) else EXIT_FAILED
        if code not in _RANK:  # the broker: nothing more can go
            raise
        label = "standard input" if item.label == STDIN else item.label
        console.error(f"{label}: {_reason(e)}")
        return code
    except KeyboardInterrupt as e:
        if args.json:
            print(json.dumps(_outcome(args, item, [], time.monotonic() - started, e)), flush=True)
        if stop and not isinstance(e, Interrupted):
            raise stop.interrupted() from e  # a pipe's wait stopped by the signal: 130 or 143
        raise
    seconds = time.monotonic() - started
    if args.json:
        print(json.dumps(_outcome(args, item, results, seconds)), flush=True)
        return EXIT_OK
    print_sent(_label(args, item), results, seconds)
    return EXIT_OK


def _label(args: argparse.Namespace, item: Item) -> str:
    return f"standard input as {args.name}" if item.label == STDIN else f"file {item.label}"


def _wait_for_input(streamer: FileStreamer, source: PipeSource, stop: StopFlag) -> None:
    """Wait, with the connection served, until standard input has its first chunk (or ended):
    the offer goes out only then, since a receiver lets go of a stream whose sender sends
    nothing for long (``OBJSTREAM_CONTACT_TIMEOUT``)."""
    source.start(int(streamer.settings.chunk_size))
    while not source.ready.is_set():
        if stop:
            source.close()
            raise stop.interrupted()
        streamer.serve(0.2)


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and not isinstance(error, ObjstreamError):
        return error.strerror or str(error)
    return str(error)


def _outcome(
    args: argparse.Namespace,
    item: Item,
    results: list[TargetResult],
    seconds: float,
    error: BaseException | None = None,
) -> dict[str, object]:
    """The object ``send-file --json`` prints for one file, for this item."""
    from objstream.producer.cli import _json_outcome

    name = args.name if item.label == STDIN else item.label
    view = argparse.Namespace(path=name, to=args.to)
    return _json_outcome(view, results, seconds, error)


__all__ = ["check_usage", "is_many", "send_many"]
