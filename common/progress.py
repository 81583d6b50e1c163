"""What a command shows of its transfers as they go: ``--progress bar|json|none``.

- ``bar`` (the default): a bar per stream on stderr when it is a terminal, nothing otherwise
  (:class:`~objstream.common.cli.ProgressBars`).
- ``json``: one JSON object per line on **stderr** for each progress tick, for another program
  to follow (:class:`JsonProgress`). stderr, not stdout: stdout keeps what it carries without
  the option (the ``--json`` result, or the stored path that a script captures), unchanged and
  alone; a reader of stderr takes the lines that start with ``{`` (the log lines and the
  ``objstream: error: ...`` line do not).
- ``none``: nothing, even on a terminal.

Every display is a :data:`~objstream.common.streaming.ProgressHook` with a ``close()``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, TextIO

from objstream.common.streaming import ProgressHook

CHOICES = ("bar", "json", "none")
JSON_INTERVAL = 0.1
"""Least seconds between two JSON ticks of one stream (at most ~10 lines per second each);
the first tick of a stream and the one that reaches its total always go out."""
REMEMBERED = 4096
"""Streams a :class:`JsonProgress` remembers (their last tick), oldest forgotten first."""


class Display(Protocol):
    """A progress hook a command closes when its transfers are over."""

    def __call__(self, site: str, stream_id: str, done: int, total: int | None) -> None: ...

    def close(self) -> None: ...


class JsonProgress:
    """Progress ticks as JSON lines: ``{"event": "progress", "site": ..., "stream_id": ...,
    "done": ..., "total": ..., "time": ...}``.

    ``site`` is the peer (the receiving site of a send, the sending site of a receive),
    ``done`` the bytes it (or this side) stored and verified so far, ``total`` the object's
    size (null if the sender did not say), ``time`` the wall clock in seconds since the epoch.
    A line goes out at most every ``interval`` seconds per stream, and always for a stream's
    first tick and for the tick that reaches ``total`` (once). Thread-safe: a serving site
    calls it from several threads.
    """

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        interval: float = JSON_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = out
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        # (site, stream) -> when, done: a broadcast's targets share its stream id
        self._last: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()
        self._broken = False

    def __call__(self, site: str, stream_id: str, done: int, total: int | None) -> None:
        now = self._clock()
        final = total is not None and done >= total
        with self._lock:
            if self._broken:
                return
            last = self._last.get((site, stream_id))
            if last is not None:
                when, last_done = last
                if done == last_done or (not final and now - when < self._interval):
                    return
            self._last[(site, stream_id)] = (now, done)
            self._last.move_to_end((site, stream_id))
            while len(self._last) > REMEMBERED:
                self._last.popitem(last=False)
            tick = {
                "event": "progress",
                "site": site,
                "stream_id": stream_id,
                "done": done,
                "total": total,
                "time": round(time.time(), 3),
            }
            out = self._out or sys.stderr
            try:
                print(json.dumps(tick), file=out, flush=True)
            except (OSError, ValueError):  # stderr closed (its reader went away): the
                self._broken = True  # transfer goes on without its lines

    def close(self) -> None:
        """Nothing to release (every line is flushed as it goes)."""


def display(choice: str) -> Display:
    """The display ``--progress`` names (``bar`` shows only on a terminal)."""
    from objstream.common.cli import ProgressBars

    if choice == "json":
        return JsonProgress()
    return ProgressBars(enabled=False if choice == "none" else None)


def fan_out(*hooks: ProgressHook | None) -> ProgressHook | None:
    """One hook that calls each of ``hooks`` (those that are not None) in turn."""
    chosen = [hook for hook in hooks if hook is not None]
    if len(chosen) <= 1:
        return chosen[0] if chosen else None

    def every(site: str, stream_id: str, done: int, total: int | None) -> None:
        for hook in chosen:
            hook(site, stream_id, done, total)

    return every


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--progress bar|json|none`` on a transfer command."""
    parser.add_argument(
        "--progress",
        choices=CHOICES,
        default="bar",
        help="bar: a progress bar on stderr when it is a terminal (default); json: one JSON "
        "line per progress tick on stderr (event, site, stream_id, done, total, time; at most "
        "~10 a second per stream, and the last); none: nothing",
    )
