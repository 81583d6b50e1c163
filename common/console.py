"""What the command line says on standard error: notes, one-line errors and log records.

Every line a command writes to stderr goes through here, so that ``-q``/``--quiet`` and
``--log-format json`` hold for all of them:

- a *note* (``objstream: listening for site ...``) says what a command is doing; ``--quiet``
  hides it;
- an *error* (``objstream: error: ...``) is the one line of an expected failure; always shown;
- log records (the library's ``objstream.*`` loggers) show from ``--log-level`` up
  (``warning`` unless given; ``error`` with ``--quiet``).

With ``--log-format json`` each of them is one JSON object per line (``time``, ``level``,
``name``, ``message``), for log collectors and other programs. In text, a peer's words (an
object's name, a refusal's detail) never break a line: control characters are shown escaped.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
JSON_RENAMES = {"asctime": "time", "levelname": "level"}


def iso_time(seconds: float) -> str:
    """ISO 8601 local time with its offset, to the millisecond: ``2026-12-03T18:33:41.942+00:00``
    (every JSON line's ``time``)."""
    from datetime import datetime

    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="milliseconds")


def printable(text: object) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``...): a name a
    peer chose cannot start a new line or drive the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")


class TextFormatter(logging.Formatter):
    """The text log format, a record's message made :func:`printable` (a traceback, added
    after it with ``--log-level debug``, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def plural(count: int, word: str, words: str | None = None) -> str:
    """``1 byte``, ``2 bytes``; ``1 entry``, ``2 entries`` (``words`` when not ``word + s``)."""
    return f"{count} {word if count == 1 else words or word + 's'}"


@dataclass
class Console:
    """The command line's stderr (one per process: :data:`console`)."""

    quiet: bool = False
    log_format: LogFormat = "text"

    def note(self, text: str) -> None:
        """A line about what the command is doing; hidden by ``--quiet``."""
        if not self.quiet:
            self._say("info", text)

    def warn(self, text: str) -> None:
        """A line that must be seen, but is not a failure (``objstream: interrupted``)."""
        self._say("warning", text)

    def error(self, text: str) -> None:
        """The one line of an expected failure (``objstream: error: ...``)."""
        self._say("error", text)

    def _say(self, level: str, text: str) -> None:
        if self.log_format == "json":
            import json

            record = {
                "time": iso_time(time.time()),
                "level": level.upper(),
                "name": "objstream",
                "message": text,
            }
            line = json.dumps(record, ensure_ascii=False)
        else:
            line = f"objstream: {'error: ' if level == 'error' else ''}{printable(text)}"
        print(line, file=sys.stderr, flush=True)

    def configure_logging(self, level: str) -> None:
        """Send the library's log records to stderr, from ``level`` up, in this console's
        format."""
        handler = logging.StreamHandler(sys.stderr)
        if self.log_format == "json":
            from pythonjsonlogger.json import JsonFormatter

            class IsoJsonFormatter(JsonFormatter):
                def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
                    return iso_time(record.created)

            handler.setFormatter(
                IsoJsonFormatter(JSON_FIELDS, rename_fields=JSON_RENAMES, json_ensure_ascii=False)
            )
        else:
            handler.setFormatter(TextFormatter(TEXT_FORMAT))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(level.upper())
        # pika logs connection failures with tracebacks at ERROR; we report them in one line
        # ourselves, so its own records only show with --log-level debug.
        logging.getLogger("pika").setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)


console = Console()
"""The process's console, set from the global options by :func:`objstream.common.cli.main`."""
