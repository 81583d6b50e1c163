"""What a command shows and counts of its transfers: the ``--progress`` display and the
Prometheus metrics of ``--metrics-port`` (``listen`` and ``serve``), fed by the same hooks.

``prometheus_client`` is imported only when ``--metrics-port`` is given (:mod:`.metrics`):
the other commands do not pay for it (start-up time is import time).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Protocol

from objstream.common.console import console
from objstream.common.errors import OfferRefused, TransferFailed
from objstream.common.progress import Display, display, fan_out
from objstream.common.streaming import ProgressHook, StreamOutcome

if TYPE_CHECKING:
    from objstream.common.metrics import Metrics, Role

DEFAULT_ADDR = "127.0.0.1"


class Arrived(Protocol):
    """An object a receiver stored (a :class:`~objstream.consumer.Received`)."""

    @property
    def stream_id(self) -> str: ...

    @property
    def sender(self) -> str: ...


class ServerCounts(Protocol):
    """What a :class:`~objstream.producer.RetrievalServer` counts itself."""

    @property
    def active(self) -> int: ...

    @property
    def bytes_published(self) -> int: ...

    @property
    def chunks_resent(self) -> int: ...

    @property
    def reconnects(self) -> int: ...


class ReceiverCounts(Protocol):
    """What a :class:`~objstream.consumer.Receiver` counts itself."""

    @property
    def active_streams(self) -> int: ...

    @property
    def resend_requests(self) -> int: ...

    @property
    def redelivered_chunks(self) -> int: ...

    @property
    def reconnects(self) -> int: ...


class Watch:
    """A command's progress display and metrics (either may do nothing).

    Args:
        display: what ``--progress`` chose.
        metrics: what ``--metrics-port`` asked for, its endpoint started; None without it.
    """

    def __init__(self, display: Display, metrics: Metrics | None) -> None:
        self.display = display
        self.metrics = metrics

    @property
    def progress(self) -> ProgressHook | None:
        """The ``progress`` hook to give the receiver, retriever, streamer or server."""
        return fan_out(self.display, None if self.metrics is None else self.metrics.progress)

    def ended(self, outcome: StreamOutcome) -> None:
        """An outcome hook: a stream ended (or a request was refused)."""
        if self.metrics is not None:
            self.metrics.ended(outcome)

    def arrived(self, item: Arrived | TransferFailed) -> None:
        """What a receiver handed out: an object stored, or a stream that failed."""
        if isinstance(item, TransferFailed):
            refused = isinstance(item, OfferRefused)
            self.ended(StreamOutcome(item.site, item.stream_id, str(item.code), refused))
        else:
            self.ended(StreamOutcome(item.sender, item.stream_id))

    def server(self, server: ServerCounts) -> None:
        """Have the metrics read what ``server`` counts itself, at each scrape."""
        if self.metrics is not None:
            self.metrics.watch_server(
                lambda: server.active,
                lambda: server.bytes_published,
                lambda: server.chunks_resent,
                lambda: server.reconnects,
            )

    def receiver(self, receiver: ReceiverCounts) -> None:
        """Have the metrics read what ``receiver`` counts itself, at each scrape."""
        if self.metrics is not None:
            self.metrics.watch_receiver(
                lambda: receiver.active_streams,
                lambda: receiver.resend_requests,
                lambda: receiver.redelivered_chunks,
                lambda: receiver.reconnects,
            )

    def close(self) -> None:
        """Close the display and stop the metrics endpoint."""
        self.display.close()
        if self.metrics is not None:
            self.metrics.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def watch(args: argparse.Namespace, role: Role | None = None) -> Watch:
    """The display ``--progress`` chose (none if the command has no such option) and, for
    ``role``, the metrics ``--metrics-port`` asks for: their endpoint is started now, before the
    command connects, so that a port in use fails at once, and named on stderr.

    Raises:
        ConfigError: the metrics port is in use (exit 2).
    """
    metrics = None
    if role is not None and args.metrics_port is not None:
        from objstream.common.metrics import Metrics

        metrics = Metrics(role)
        port = metrics.start(args.metrics_port, args.metrics_addr)
        host = f"[{args.metrics_addr}]" if ":" in args.metrics_addr else args.metrics_addr
        console.note(f"metrics on http://{host}:{port}/metrics")
    return Watch(display(getattr(args, "progress", "none")), metrics)


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    """``--metrics-port`` and ``--metrics-addr`` on a long-running command."""
    parser.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics on http://ADDR:PORT/metrics (0: a free port, named on "
        "stderr); a port in use is an error, exit 2",
    )
    parser.add_argument(
        "--metrics-addr",
        default=DEFAULT_ADDR,
        metavar="ADDR",
        help=f"address the metrics endpoint listens on (default {DEFAULT_ADDR}: this machine "
        "only; 0.0.0.0 for every interface)",
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port
