"""What a command shows and counts of its transfers, without a broker: the JSON progress lines
(``--progress json``), the Prometheus metrics of ``listen`` / ``serve`` (``--metrics-port``),
and the one-line errors of their options."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from objstream.common.cli import EXIT_USAGE
from objstream.common.errors import ConfigError
from objstream.common.metrics import MAX_SERIES, Metrics
from objstream.common.progress import JsonProgress, fan_out
from objstream.common.streaming import StreamOutcome
from objstream.producer.transfer import Transfer

# -- --progress json ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ticks(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_ticks_are_rate_limited_per_stream_first_and_last_always() -> None:
    out, clock = io.StringIO(), Clock()
    progress = JsonProgress(out, interval=0.1, clock=clock)
    for step in range(100):  # 100 ticks in 0.99 s: ~10 lines, not 100
        clock.now = step * 0.01
        progress("site-1", "a" * 32, step * 10, 1000)
    clock.now = 0.995  # within the interval of the last line, but the total: always
    progress("site-1", "a" * 32, 1000, 1000)
    progress("site-1", "a" * 32, 1000, 1000)  # the same again (a commit after the last chunk)
    lines = ticks(out)
    assert 9 <= len(lines) <= 12, lines
    assert lines[0]["done"] == 0  # the first tick goes out at once
    assert lines[-1] == {**lines[-1], "done": 1000, "total": 1000}
    assert [line["done"] for line in lines].count(1000) == 1
    assert set(lines[0]) == {"event", "site", "stream_id", "done", "total", "time"}
    assert {line["event"] for line in lines} == {"progress"}
    assert {line["site"] for line in lines} == {"site-1"}


def test_json_ticks_of_two_streams_are_limited_apart() -> None:
    out, clock = io.StringIO(), Clock()
    progress = JsonProgress(out, interval=0.1, clock=clock)
    progress("site-1", "a" * 32, 0, None)
    progress("site-2", "b" * 32, 0, None)  # another stream: not held back by the first
    clock.now = 0.05
    progress("site-1", "a" * 32, 5, None)  # too soon, and no total to reach
    clock.now = 0.2
    progress("site-1", "a" * 32, 9, None)
    assert [(t["stream_id"][0], t["done"]) for t in ticks(out)] == [("a", 0), ("b", 0), ("a", 9)]  # type: ignore[index]


def test_each_target_of_a_broadcast_gets_its_final_tick() -> None:
    out, clock = io.StringIO(), Clock()
    progress = JsonProgress(out, interval=0.1, clock=clock)
    stream = "c" * 32  # one stream id for every target of a broadcast
    progress("site-1", stream, 100, 100)
    progress("site-2", stream, 100, 100)  # was swallowed: the same stream "already final"
    assert [(t["site"], t["done"]) for t in ticks(out)] == [("site-1", 100), ("site-2", 100)]


def test_a_closed_stderr_stops_the_lines_not_the_transfer() -> None:
    out = io.StringIO()
    progress = JsonProgress(out, interval=0)
    progress("site-1", "a" * 32, 0, 10)
    out.close()  # the reader went away
    progress("site-1", "a" * 32, 5, 10)  # no exception into the transfer
    progress("site-2", "b" * 32, 0, 10)


def test_fan_out_calls_every_hook_and_keeps_one_as_is() -> None:
    calls: list[tuple[str, int]] = []

    def one(site: str, stream_id: str, done: int, total: int | None) -> None:
        calls.append(("one", done))

    def two(site: str, stream_id: str, done: int, total: int | None) -> None:
        calls.append(("two", done))

    assert fan_out(None, one, None) is one
    assert fan_out(None, None) is None
    both = fan_out(one, two)
    assert both is not None
    both("s", "x", 7, None)
    assert calls == [("one", 7), ("two", 7)]


# -- metrics --------------------------------------------------------------------------------------


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = prometheus_client.generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def series(metrics: Metrics, name: str) -> list[frozenset[tuple[str, str]]]:
    return [labels for n, labels in samples(metrics) if n == name]


def test_received_bytes_count_what_arrived_not_a_resumed_prefix() -> None:
    metrics = Metrics("receiver")
    metrics.progress("server", "a" * 32, 0, 300)  # a fresh stream
    metrics.progress("server", "a" * 32, 100, 300)
    metrics.progress("server", "b" * 32, 1000, 3000)  # resumed: 1000 bytes were kept
    metrics.progress("server", "b" * 32, 1500, 3000)
    metrics.progress("server", "c" * 32, 50, 50)  # carried whole in its offer
    assert value(metrics, "objstream_received_bytes_total") == 100 + 500 + 50
    assert value(metrics, "objstream_stream_done_bytes", stream_id="b" * 32, peer="server") == 1500
    assert value(metrics, "objstream_stream_size_bytes", stream_id="b" * 32, peer="server") == 3000
    metrics.progress("server", "a" * 32, 300, 300)
    metrics.progress("server", "a" * 32, 300, 300)  # the final tick again (after the commit)
    assert value(metrics, "objstream_received_bytes_total") == 300 + 500 + 50


def test_an_ended_stream_is_counted_by_outcome_and_its_series_go() -> None:
    metrics = Metrics("receiver")
    for sid in ("a", "b", "c"):
        metrics.progress("server", sid * 32, 0, 10)
    metrics.ended(StreamOutcome("server", "a" * 32))
    metrics.ended(StreamOutcome("server", "b" * 32, "checksum"))
    metrics.ended(StreamOutcome("evil", "d" * 32, "forbidden", refused=True))
    assert value(metrics, "objstream_streams_total", outcome="ok", code="") == 1
    assert value(metrics, "objstream_streams_total", outcome="failed", code="checksum") == 1
    assert value(metrics, "objstream_streams_total", outcome="refused", code="forbidden") == 1
    assert series(metrics, "objstream_stream_done_bytes") == [
        frozenset({("stream_id", "c" * 32), ("peer", "server")})
    ]
    assert len(series(metrics, "objstream_stream_size_bytes")) == 1


def test_progress_series_stay_bounded_when_outcomes_never_come() -> None:
    metrics = Metrics("server")
    for n in range(MAX_SERIES + 10):
        metrics.progress("site-1", f"{n:032x}", 1, 2)
    assert len(series(metrics, "objstream_stream_done_bytes")) == MAX_SERIES


def test_counts_the_objects_keep_are_read_at_each_scrape() -> None:
    metrics = Metrics("server")
    counts = {"active": 2, "sent": 10, "resent": 0, "reconnects": 0}
    metrics.watch_server(*(lambda name=name: counts[name] for name in counts))
    assert value(metrics, "objstream_streams_in_flight") == 2
    counts.update(active=0, sent=99, resent=3, reconnects=1)
    assert value(metrics, "objstream_streams_in_flight") == 0
    assert value(metrics, "objstream_reconnects_total") == 1
    assert value(metrics, "objstream_sent_bytes_total") == 99
    assert value(metrics, "objstream_resent_chunks_total") == 3
    assert value(metrics, "objstream_received_bytes_total") is None  # a server sends


def test_metrics_stay_out_of_the_global_registry() -> None:
    Metrics("receiver").progress("server", "a" * 32, 0, 1)
    names = {s.name for family in prometheus_client.REGISTRY.collect() for s in family.samples}
    assert not {name for name in names if name.startswith("objstream_")}


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_port_in_use_is_a_config_error(busy_port: int) -> None:
    with pytest.raises(ConfigError, match=f"--metrics-port {busy_port} on 127.0.0.1: already in"):
        Metrics("receiver").start(busy_port)


def test_the_endpoint_serves_the_registry_over_http() -> None:
    import urllib.request

    metrics = Metrics("receiver")
    port = metrics.start(0)
    try:
        metrics.progress("server", "a" * 32, 0, 10)
        metrics.progress("server", "a" * 32, 7, 10)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    finally:
        metrics.close()
    assert "objstream_received_bytes_total 7.0" in text.splitlines()


@pytest.mark.parametrize("command", ["listen", "serve"])
def test_a_port_in_use_is_one_line_exit_2_before_connecting(
    command: str, busy_port: int, tmp_path: Path
) -> None:
    """Nothing listens at the URL (exit 3 if the command got that far): the port is checked
    first, in a process of its own as users run it."""
    argv = {
        "listen": ["consumer", "listen", "--site", "site-1", "--dest", str(tmp_path)],
        "serve": ["producer", "serve", "--site", "server", "--source-dir", str(tmp_path)],
    }[command]
    run = subprocess.run(
        [sys.executable, "-m", "objstream", *argv, "--metrics-port", str(busy_port),
         "--url", "amqp://guest:guest@127.0.0.1:9/%2F"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == EXIT_USAGE, run.stderr
    assert run.stderr.splitlines() == [
        f"objstream: error: --metrics-port {busy_port} on 127.0.0.1: already in use"
    ]


@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("--metrics-port", "http", "'http' is not a port number"),
        ("--metrics-port", "70000", "70000 is not a port number (0 to 65535)"),
        ("--progress", "xml", "invalid choice: 'xml'"),
    ],
)
def test_bad_option_values_are_usage_errors(
    option: str, value: str, why: str, tmp_path: Path
) -> None:
    argv = ["consumer", "listen", "--site", "site-1", "--dest", str(tmp_path), option, value]
    run = subprocess.run(
        [sys.executable, "-m", "objstream", *argv],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == EXIT_USAGE
    assert why in run.stderr.splitlines()[-1]


def test_only_metrics_import_prometheus_client() -> None:
    code = (
        "from objstream.common.cli import build_parser\n"
        "argv = ['consumer', 'listen', '--site', 's', '--dest', 'd', '--progress', 'json']\n"
        "build_parser(argv=argv).parse_args(argv)\n"
        "import objstream.common.monitoring, sys\n"
        "print('prometheus_client' in sys.modules)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert run.stdout.strip() == "False"


# -- resends, as the sending driver counts them ----------------------------------------------------


def test_a_chunk_published_again_to_whom_it_reached_is_a_resend() -> None:
    transfer = Transfer.__new__(Transfer)  # only the bookkeeping of _again
    transfer._upto, transfer._joined_at = {}, {}
    assert [transfer._again(seq, None) for seq in range(4)] == [False] * 4  # the broadcast
    assert transfer._again(2, None)  # the broadcast rewound: resent to all
    assert transfer._again(1, "site-1")  # unicast of what the broadcast carried
    assert not transfer._again(4, "site-1")  # beyond the broadcast: new
    assert transfer._again(4, "site-1")  # and again on its own route
    transfer._joined_at["late"] = 3  # joined when the broadcast was at 3
    assert not transfer._again(0, "late")  # catching up on what it missed: not a resend
    assert transfer._again(3, "late")  # the broadcast carried 3 to it
