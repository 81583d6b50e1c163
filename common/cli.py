"""The ``objstream`` command line: global options, exit codes, one-line errors.

``objstream producer ...`` and ``objstream consumer ...`` are defined in ``producer/cli.py`` and
``consumer/cli.py`` (``objstream job ...`` in ``jobs/cli.py``, ``objstream admin ...`` in
``common/admin.py``); ``python -m objstream.producer`` / ``python -m objstream.consumer``
run the same commands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from types import FrameType
from typing import Any

from objstream.common.errors import (
    AuthenticationRefused,
    BrokerRefused,
    BrokerUnreachable,
    ConfigError,
    ObjstreamError,
    SendFailed,
    TimedOut,
)
from objstream.common.settings import Settings, load_settings, parse_size

EXIT_OK = 0
EXIT_FAILED = 1  # transfer failed: checksum, refused, not found, peer failure
EXIT_USAGE = 2  # bad command line or configuration
EXIT_BROKER = 3  # broker unreachable or authentication refused
EXIT_TIMEOUT = 4  # timed out without progress
EXIT_INTERRUPTED = 130  # Ctrl-C (the shell convention: 128 + SIGINT)

SIDES = ("producer", "consumer", "job", "admin")
SIDE_MODULES = {
    "producer": "objstream.producer.cli",
    "consumer": "objstream.consumer.cli",
    "job": "objstream.jobs.cli",
    "admin": "objstream.common.admin",
}
"""The module that defines each side's commands (its ``add_commands``)."""

Handler = Callable[[argparse.Namespace, Settings], int]


def _version() -> str:
    try:
        return version("objstream")
    except PackageNotFoundError:
        return "unknown"


def size_arg(text: str) -> int:
    """argparse type for sizes such as ``256KiB``, ``4MiB`` or plain bytes."""
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def global_options() -> argparse.ArgumentParser:
    """Options every sub-command accepts (they override the ``OBJSTREAM_*`` variables)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("global options")
    group.add_argument(
        "--url",
        help="broker URL (env OBJSTREAM_URL; default amqp://guest:guest@localhost:5672/%%2F)",
    )
    group.add_argument(
        "--namespace",
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
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (env OBJSTREAM_LOG_LEVEL; default info)",
    )
    return parent


def build_parser(sides: Sequence[str] = SIDES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="objstream",
        description="Stream large files between sites over RabbitMQ, memory-flat and verified.",
        epilog="examples:\n"
        "  objstream consumer listen --site site-1 --dest /tmp/in --count 1\n"
        "  objstream producer send-file --site server --to site-1 big.bin",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"objstream {_version()}")
    commands = parser.add_subparsers(
        dest="side", required=True, metavar="{" + ",".join(sides) + "}"
    )
    parent = global_options()
    for side in sides:
        module = importlib.import_module(SIDE_MODULES[side])
        module.add_commands(commands, parent)
    return parser


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    return load_settings(
        url=args.url, namespace=args.namespace, log_level=args.log_level,
        connect_timeout=args.connect_timeout, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
        tls_key=args.tls_key, **extra,
    )  # fmt: skip


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pika logs connection failures with tracebacks at ERROR; we report them in one line
    # ourselves, so its own records only show with --log-level debug.
    logging.getLogger("pika").setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)


def exit_code_for(error: ObjstreamError) -> int:
    if isinstance(error, BrokerUnreachable | AuthenticationRefused | BrokerRefused):
        return EXIT_BROKER
    if isinstance(error, ConfigError):
        return EXIT_USAGE
    if isinstance(error, TimedOut):
        return EXIT_TIMEOUT
    if isinstance(error, SendFailed) and all(isinstance(f, TimedOut) for f in error.failures):
        return EXIT_TIMEOUT
    return EXIT_FAILED


class ProgressBars:
    """A progress bar per stream on stderr when it is a terminal (and quiet otherwise).

    Pass an instance as the ``progress`` hook of a streamer, receiver or retriever. Bars show up
    only for transfers that last more than half a second.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bars: dict[str, Any] = {}

    def __call__(self, site: str, stream_id: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        bar = self._bars.get(stream_id)
        if bar is None:
            from tqdm import tqdm

            # A terminal may report a size of 0 x 0 (a fresh pty), where tqdm would draw
            # nothing at all: give it the usual fallback size instead.
            size = shutil.get_terminal_size()
            bar = self._bars[stream_id] = tqdm(
                total=total, desc=site, unit="B", unit_scale=True, unit_divisor=1024,
                delay=0.5, file=sys.stderr, leave=False, ncols=min(size.columns or 80, 100),
                nrows=size.lines or 24,
            )  # fmt: skip
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()
            del self._bars[stream_id]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


class StopFlag:
    """Set by SIGINT/SIGTERM so long-running commands can stop cleanly between batches."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("got signal %d, stopping", signum)
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


def main(argv: Sequence[str] | None = None, sides: Sequence[str] = SIDES) -> int:
    """Entry point of ``objstream``; returns the exit code."""
    parser = build_parser(sides)
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args, **args.settings_overrides(args))
        configure_logging(settings.log_level)
        handler: Handler = args.handler
        return handler(args, settings)
    except ObjstreamError as e:
        logging.getLogger(__name__).debug("failed", exc_info=True)
        print(f"objstream: error: {e}", file=sys.stderr)
        return exit_code_for(e)
    except OSError as e:
        logging.getLogger(__name__).debug("failed", exc_info=True)
        print(
            f"objstream: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("objstream: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(argv: Sequence[str] | None = None, sides: Sequence[str] = SIDES) -> None:
    sys.exit(main(argv, sides))
