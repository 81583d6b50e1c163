"""The ``objstream`` command line: global options, exit codes, one-line errors.

``objstream producer ...`` and ``objstream consumer ...`` are defined in ``producer/cli.py`` and
``consumer/cli.py`` (``objstream job ...`` in ``jobs/cli.py``, ``objstream admin ...`` in
``common/admin.py``); ``python -m objstream.producer`` / ``python -m objstream.consumer``
run the same commands.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import objstream
from objstream.common.errors import (
    AuthenticationRefused,
    BrokerRefused,
    BrokerUnreachable,
    ConfigError,
    ObjstreamError,
    RabbitmqctlFailed,
    SendFailed,
    TimedOut,
)

if TYPE_CHECKING:  # pydantic's import is most of a start-up: only commands that run need it
    import threading
    from types import FrameType

    from objstream.common.settings import Settings

# logging, threading and signal are imported where they are used: `objstream --version` and
# `--help` need none of them, and logging alone cost a third of this module's import.

EXIT_OK = 0
EXIT_FAILED = 1  # transfer failed: checksum, refused, not found, peer failure
EXIT_USAGE = 2  # bad command line or configuration
EXIT_BROKER = 3  # broker unreachable, authentication refused, broker or rabbitmqctl refused
EXIT_TIMEOUT = 4  # timed out without progress
EXIT_INTERRUPTED = 130  # Ctrl-C (the shell convention: 128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM)

SIDES = ("producer", "consumer", "job", "admin")
SIDE_MODULES = {
    "producer": "objstream.producer.cli",
    "consumer": "objstream.consumer.cli",
    "job": "objstream.jobs.cli",
    "admin": "objstream.common.admin",
}
"""The module that defines each side's commands (its ``add_commands``)."""

SIDE_HELP = {
    "producer": "send objects to other sites",
    "consumer": "receive objects from other sites",
    "job": "run the example jobs (file_streaming, dict_streaming)",
    "admin": "broker administration for objstream (users and permissions, cleanup, regions)",
}
"""What ``objstream --help`` says of each side without importing its module."""

GLOBAL_OPTIONS = {"--url", "--namespace", "--log-level", "--log-format"}

Handler = Callable[[argparse.Namespace, "Settings"], int]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` text: a description's lines wrapped to the terminal, an indented line (an
    example) kept as it is written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        lines = []
        for line in text.splitlines():
            if not line.strip() or line[0].isspace():
                lines.append(indent + line)
            else:
                lines.append(
                    textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                )
        return "\n".join(lines)


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line like every other failure (exit 2):
    ``objstream: error: the following arguments are required: --site (objstream producer
    send-file --help)``. Sub-commands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"objstream: error: {message} (see {self.prog} --help)\n")


def size_arg(text: str) -> int:
    """argparse type for sizes such as ``256KiB``, ``4MiB`` or plain bytes."""
    from objstream.common.settings import parse_size

    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def count_arg(text: str) -> int:
    """argparse type for a count of things: a whole number, 1 or more."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count} is not 1 or more")
    return count


def global_options(default: Any = argparse.SUPPRESS) -> argparse.ArgumentParser:
    """Options every command accepts, before or after its name (they override the
    ``OBJSTREAM_*`` variables).

    The top-level parser has them with ``default=None``; each side and command has them with
    ``default=SUPPRESS``, so that a value given before the sub-command is not overwritten by the
    sub-parser's default (argparse copies every attribute of a sub-parser's result).
    """
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("global options (before or after the command)")
    group.add_argument(
        "--url",
        default=default,
        help="broker URL, amqp:// or amqps:// (env OBJSTREAM_URL; default "
        "amqp://guest:guest@localhost:5672/%%2F)",
    )
    group.add_argument(
        "--namespace",
        default=default,
        help="prefix of every exchange and queue (env OBJSTREAM_NAMESPACE; default objstream)",
    )
    group.add_argument(
        "--connect-timeout",
        type=float,
        metavar="SECONDS",
        help="limit of one connect attempt: TCP, TLS, AMQP handshake (env "
        "OBJSTREAM_CONNECT_TIMEOUT; default 10)",
    )
    group.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="amqps://: CA file the broker's certificate must chain to (env OBJSTREAM_TLS_CA; "
        "default: the system's CAs)",
    )
    group.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="amqps://: client certificate; without a password in the URL the login is "
        "EXTERNAL, as its common name (env OBJSTREAM_TLS_CERT)",
    )
    group.add_argument(
        "--tls-key",
        metavar="PEM",
        help="amqps://: the client certificate's private key (env OBJSTREAM_TLS_KEY)",
    )
    group.add_argument(
        "--log-level",
        default=default,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (env OBJSTREAM_LOG_LEVEL; default warning, error with "
        "--quiet)",
    )
    group.add_argument(
        "--log-format",
        default=default,
        choices=["text", "json"],
        help="stderr as text lines or one JSON object a line: notes, errors and log records "
        "(env OBJSTREAM_LOG_FORMAT; default text)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="only errors on stderr: no progress bars, no notes (results still on stdout)",
    )
    return parent


def chosen_side(argv: Sequence[str], sides: Sequence[str]) -> str | None:
    """The side ``argv`` names (the first word that is not a global option or its value), so
    that only that side's module is imported; ``None`` if there is none (``--version``,
    ``--help``, a typo: argparse then says what is wrong)."""
    words = iter(argv)
    for word in words:
        if word in GLOBAL_OPTIONS:
            next(words, None)  # its value
        elif not word.startswith("-"):
            return word if word in sides else None
    return None


def build_parser(
    sides: Sequence[str] = SIDES, argv: Sequence[str] | None = None
) -> argparse.ArgumentParser:
    """The ``objstream`` parser. With ``argv``, only the side it names is built in full (its
    module imported); the others are listed with their help. Start-up time is import time."""
    parser = Parser(
        prog="objstream",
        description="Stream large files between sites over RabbitMQ, memory-flat and verified.",
        epilog="examples:\n"
        "  objstream consumer listen --site site-1 --dest in --count 1\n"
        "  objstream producer send-file --site server --to site-1 big.bin\n"
        "  objstream --namespace demo consumer listen --site site-1 --dest in",
        formatter_class=HelpFormatter,
        parents=[global_options(default=None)],
    )
    parser.add_argument("--version", action="version", version=f"objstream {objstream.__version__}")
    commands = parser.add_subparsers(
        dest="side", required=True, metavar="{" + ",".join(sides) + "}"
    )
    parent = global_options()
    wanted = sides if argv is None else [side for side in [chosen_side(argv, sides)] if side]
    for side in sides:
        if side in wanted:
            module = importlib.import_module(SIDE_MODULES[side])
            module.add_commands(commands, parent)
        else:
            commands.add_parser(side, help=SIDE_HELP[side])
    return parser


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    from objstream.common.settings import load_settings

    return load_settings(
        url=args.url,
        namespace=args.namespace,
        log_level=args.log_level or ("error" if args.quiet else None),
        log_format=args.log_format,
        connect_timeout=args.connect_timeout,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        **extra,
    )


def exit_code_for(error: ObjstreamError) -> int:
    if isinstance(
        error, BrokerUnreachable | AuthenticationRefused | BrokerRefused | RabbitmqctlFailed
    ):
        return EXIT_BROKER
    if isinstance(error, ConfigError):
        return EXIT_USAGE
    if isinstance(error, TimedOut):
        return EXIT_TIMEOUT
    if isinstance(error, SendFailed) and all(isinstance(f, TimedOut) for f in error.failures):
        return EXIT_TIMEOUT
    return EXIT_FAILED


MiB = 1024 * 1024
BAR_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} MiB [{elapsed}<{remaining}, {rate_fmt}]"
)
BAR_FORMAT_NO_TOTAL = "{desc}: {n:.1f} MiB [{elapsed}, {rate_fmt}]"


class ProgressBars:
    """A progress bar per stream on stderr when it is a terminal (and quiet otherwise).

    Pass an instance as the ``progress`` hook of a streamer, receiver or retriever. Bars show up
    only for transfers that last more than half a second.
    """

    def __init__(self, enabled: bool | None = None, *, delay: float = 0.5) -> None:
        from objstream.common.console import console

        if enabled is None:
            enabled = sys.stderr.isatty() and not console.quiet and console.log_format == "text"
        self.enabled = enabled
        self._delay = delay
        self._bars: dict[str, Any] = {}
        self._done: dict[str, int] = {}

    def __call__(self, site: str, stream_id: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        bar = self._bars.get(stream_id)
        if bar is None:
            from tqdm import tqdm

            # A terminal may report a size of 0 x 0 (a fresh pty), where tqdm would draw
            # nothing at all: give it the usual fallback size instead.
            size = shutil.get_terminal_size()
            # Counted in MiB, not bytes: tqdm's unit_scale divides rates by 1000 and calls
            # them MB/s, whatever the unit_divisor.
            bar = self._bars[stream_id] = tqdm(
                total=None if total is None else total / MiB,
                desc=site,
                unit="MiB",
                bar_format=BAR_FORMAT if total is not None else BAR_FORMAT_NO_TOTAL,
                delay=self._delay,
                file=sys.stderr,
                leave=False,
                ncols=min(size.columns or 80, 100),
                nrows=size.lines or 24,
            )
            self._done[stream_id] = 0
        bar.update((done - self._done[stream_id]) / MiB)
        self._done[stream_id] = done
        if total is not None and done >= total:
            bar.close()
            del self._bars[stream_id], self._done[stream_id]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        self._done.clear()


class StopFlag:
    """Set by SIGINT/SIGTERM so long-running commands can stop cleanly between batches.

    The first signal only sets the flag: the command finishes its step with the connection in a
    known state (a send tells every target, on a connection that is not half way through a
    frame). A second signal raises :class:`KeyboardInterrupt` at once.
    """

    def __init__(self) -> None:
        import threading

        self.event: threading.Event = threading.Event()
        self.signum: int | None = None

    def install(self) -> None:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            raise self.interrupted()
        import logging

        logging.getLogger(__name__).info("got signal %d, stopping", signum)
        self.signum = signum
        self.event.set()

    def interrupted(self) -> Interrupted:
        """What a command raises once it stopped on the signal (exit 128 + its number)."""
        return Interrupted(self.signum)

    def __bool__(self) -> bool:
        return self.event.is_set()


def error_words(error: BaseException) -> str:
    """What the error line says of ``error`` (``No such file or directory: big.bin``)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, OSError) and not isinstance(error, ObjstreamError):
        reason = error.strerror or str(error)
        return f"{error.filename}: {reason}" if error.filename else reason
    return str(error)


def error_code(error: BaseException) -> str | None:
    """The ``code`` a ``--json`` object gives ``error``: a transfer's failure code,
    ``interrupted``, ``io`` for a file that cannot be read, ``usage``, ``broker``."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    code = getattr(error, "code", None)
    if code is not None:
        return str(code)
    if isinstance(error, OSError):
        return "io"
    if isinstance(error, ObjstreamError):
        return {EXIT_USAGE: "usage", EXIT_BROKER: "broker", EXIT_TIMEOUT: "timeout"}.get(
            exit_code_for(error)
        )
    return None


FailureReport = Callable[[BaseException, float], None]
"""Told what made a command fail (the error, or :class:`Interrupted`) and after how many
seconds: ``--json``'s object on failure."""


@contextlib.contextmanager
def failures_reported(stop: StopFlag, report: FailureReport | None) -> Iterator[None]:
    """Run a command's transfer: what fails in it, or the signal that stopped it (raised as
    :class:`Interrupted`: exit 130 or 143), is given to ``report`` before it goes on up."""
    started = time.monotonic()
    try:
        yield
    except (ObjstreamError, KeyboardInterrupt) as e:
        error: BaseException = stop.interrupted() if stop else e
        if report is not None:
            report(error, time.monotonic() - started)
        if error is not e:
            raise error from e
        raise


class Interrupted(KeyboardInterrupt):
    """A command stopped by a signal: exits 130 after SIGINT (Ctrl-C), 143 after SIGTERM."""

    def __init__(self, signum: int | None = None) -> None:
        super().__init__()
        self.exit_code = EXIT_TERMINATED if signum == 15 else EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None, sides: Sequence[str] = SIDES) -> int:
    """Entry point of ``objstream``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(sides, argv)  # imports the side's modules: most of a start-up
        args = parser.parse_args(argv)
        import logging
    except KeyboardInterrupt:  # Ctrl-C while starting: no traceback from inside an import
        print("objstream: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED

    from objstream.common.console import console

    console.quiet = bool(args.quiet)
    if args.log_format is not None:  # before the settings: their own error is said in it
        console.log_format = args.log_format
    try:
        settings = settings_from(args, **args.settings_overrides(args))
        console.log_format = settings.log_format
        console.configure_logging(settings.log_level)
        handler: Handler = args.handler
        return handler(args, settings)
    except ObjstreamError as e:
        logging.getLogger(__name__).debug("failed", exc_info=True)
        console.error(str(e))
        return exit_code_for(e)
    except OSError as e:
        logging.getLogger(__name__).debug("failed", exc_info=True)
        console.error(error_words(e))
        return EXIT_FAILED
    except KeyboardInterrupt as e:
        console.warn("interrupted")
        return e.exit_code if isinstance(e, Interrupted) else EXIT_INTERRUPTED


def run(argv: Sequence[str] | None = None, sides: Sequence[str] = SIDES) -> None:
    sys.exit(main(argv, sides))
