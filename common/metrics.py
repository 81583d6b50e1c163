"""Prometheus metrics of a long-running site: ``listen`` and ``serve`` with ``--metrics-port``.

The metrics live in a :class:`~prometheus_client.CollectorRegistry` of their own, never the
library's global one, so that objstream never adds to (or collides with) an application's
metrics. They are fed from outside the protocol: the ``progress`` and outcome hooks of a
:class:`~objstream.consumer.Receiver` or :class:`~objstream.producer.RetrievalServer`, and
counters those objects keep (read when scraped); the sessions know nothing of them.

Names (``ROLE`` is ``receiver`` for ``listen``, ``server`` for ``serve``):

- ``objstream_received_bytes_total`` (receiver): bytes stored and checked (CRC-32) as they
  arrived, every stream; a resumed stream's kept prefix is not counted again.
- ``objstream_sent_bytes_total`` (server): message bodies published (chunks, objects carried
  whole in their offer), resends included.
- ``objstream_streams_total{outcome, code}``: streams that ended, by ``outcome`` (``ok``,
  ``failed``, ``refused``: refused before any data moved, an offer or a retrieval request)
  and ``code`` (empty for ``ok``; otherwise the failure or refusal code: ``checksum``,
  ``timeout``, ``forbidden``, ``busy``, ``not_found``...). A served stream counts once per
  requester.
- ``objstream_streams_in_flight``: streams under way now.
- ``objstream_stream_done_bytes{stream_id, peer}`` and ``objstream_stream_size_bytes{stream_id,
  peer}``: how far each stream under way is with each peer (the size when the sender gave
  it); a stream's series go when it ends, so their number stays bounded by the streams in
  flight.
- ``objstream_resend_requests_total`` (receiver): progress reports that asked the sender to
  resend (a gap, a corrupt chunk); ``objstream_redelivered_chunks_total`` (receiver): chunks
  the broker delivered again (after a lost channel or connection);
  ``objstream_reconnects_total`` (both): broker connections lost and re-established.
- ``objstream_resent_chunks_total`` (server): chunks published again to a requester that had
  been sent them (no progress for a while, a resend request, a reconnect).

Peer names never label a counter: they come from other sites, and a counter's series live as
long as the process.
"""

from __future__ import annotations

import errno
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from objstream.common.errors import ConfigError
from objstream.common.monitoring import DEFAULT_ADDR
from objstream.common.streaming import StreamOutcome

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric

Role = Literal["receiver", "server"]

MAX_SERIES = 1024
"""Streams whose progress series are kept at most; beyond, the oldest go (an outcome that was
never reported must not let them grow for ever)."""


class _ReadCounters(Collector):
    """Counters whose values an object keeps, read at each scrape."""

    def __init__(self) -> None:
        self._counters: list[tuple[str, str, Callable[[], int]]] = []

    def add(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._counters.append((name, documentation, read))

    def collect(self) -> Iterable[Metric]:
        for name, documentation, read in self._counters:
            yield CounterMetricFamily(name, documentation, value=read())

    def describe(self) -> Iterable[Metric]:
        return []  # known only once watched: never checked for collisions at registration


class Metrics:
    """The metrics of one receiving or serving site, and the HTTP endpoint that shows them.

    Pass :meth:`progress` as the object's ``progress`` hook (with a display:
    :func:`~objstream.common.progress.fan_out`) and report outcomes to :meth:`ended`; then
    :meth:`watch_receiver` or :meth:`watch_server` for what the object counts itself.
    Thread-safe: a server calls the hooks from its workers, the HTTP server scrapes from its own.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        self._received = (
            Counter(
                "objstream_received_bytes",
                "Bytes stored and checked as they arrived, every stream (a resumed stream's "
                "kept prefix is not counted again).",
                registry=self.registry,
            )
            if role == "receiver"
            else None
        )
        self._streams = Counter(
            "objstream_streams",
            "Streams that ended, by outcome (ok, failed, refused before any data moved) and "
            "failure or refusal code.",
            ["outcome", "code"],
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "objstream_streams_in_flight", "Streams under way now.", registry=self.registry
        )
        self._done = Gauge(
            "objstream_stream_done_bytes",
            "Bytes stored so far of each stream under way, by stream and peer site.",
            ["stream_id", "peer"],
            registry=self.registry,
        )
        self._size = Gauge(
            "objstream_stream_size_bytes",
            "Size of each stream under way (when its sender gave it), by stream and peer site.",
            ["stream_id", "peer"],
            registry=self.registry,
        )
        self._read = _ReadCounters()
        self.registry.register(self._read)
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()  # (stream, peer) -> done
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # -- the hooks --------------------------------------------------------------------------------

    def progress(self, site: str, stream_id: str, done: int, total: int | None) -> None:
        """A :data:`~objstream.common.streaming.ProgressHook`: ``site`` stored ``done`` bytes."""
        key = (stream_id, site)
        with self._lock:
            last = self._seen.get(key)
            if last is None:
                # A stream's first tick says what was there before this process took it (a
                # resumed prefix), unless it is also its last: an object carried whole in its
                # offer arrived with it.
                last = 0 if total is not None and done >= total else done
                while len(self._seen) >= MAX_SERIES:
                    self._forget(next(iter(self._seen)))
            self._seen[key] = max(last, done)
            if self._received is not None and done > last:
                self._received.inc(done - last)
            self._done.labels(stream_id, site).set(done)
            if total is not None:
                self._size.labels(stream_id, site).set(total)

    def ended(self, outcome: StreamOutcome) -> None:
        """An :data:`~objstream.common.streaming.OutcomeHook`: count it, drop its series."""
        self._streams.labels(outcome.outcome, outcome.code or "").inc()
        with self._lock:
            self._forget((outcome.stream_id, outcome.site))

    def _forget(self, key: tuple[str, str]) -> None:
        if self._seen.pop(key, None) is None:
            return
        for gauge in (self._done, self._size):
            gauge.remove(*key)  # nothing if never set (no size given)

    # -- what the objects count themselves --------------------------------------------------------

    def watch_receiver(
        self,
        in_flight: Callable[[], int],
        resend_requests: Callable[[], int],
        redelivered: Callable[[], int],
        reconnects: Callable[[], int],
    ) -> None:
        """A receiver's own counts (its properties, read at each scrape)."""
        self._in_flight.set_function(in_flight)
        self._read.add(
            "objstream_resend_requests",
            "Progress reports that asked a sender to resend (a gap, a corrupt chunk).",
            resend_requests,
        )
        self._read.add(
            "objstream_redelivered_chunks",
            "Chunks the broker delivered again (after a lost channel or connection).",
            redelivered,
        )
        self._read.add(
            "objstream_reconnects", "Broker connections lost and re-established.", reconnects
        )

    def watch_server(
        self,
        in_flight: Callable[[], int],
        sent_bytes: Callable[[], int],
        resent_chunks: Callable[[], int],
        reconnects: Callable[[], int],
    ) -> None:
        """A server's own counts (its properties, read at each scrape)."""
        self._in_flight.set_function(in_flight)
        self._read.add(
            "objstream_sent_bytes",
            "Message bodies published (chunks, objects carried whole in their offer), resends "
            "included.",
            sent_bytes,
        )
        self._read.add(
            "objstream_resent_chunks",
            "Chunks published again to a requester that had been sent them.",
            resent_chunks,
        )
        self._read.add(
            "objstream_reconnects", "Broker connections lost and re-established.", reconnects
        )

    # -- the endpoint -----------------------------------------------------------------------------

    def start(self, port: int, addr: str = DEFAULT_ADDR) -> int:
        """Serve ``/metrics`` on ``addr:port`` (port 0: a free one) from a daemon thread;
        returns the port.

        Raises:
            ConfigError: the port is taken, or the address cannot be bound.
        """
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        except OSError as e:
            why = "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise ConfigError(f"--metrics-port {port} on {addr}: {why}") from e
        port_bound: int = self._server.server_port
        return port_bound

    def close(self) -> None:
        """Stop the endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
