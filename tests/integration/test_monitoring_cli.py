"""What operators and driving programs see of transfers, through the command line against the
real broker: ``listen`` / ``serve`` with ``--metrics-port`` scraped over HTTP during and after
real transfers, and ``--progress json`` on every transfer command."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from objstream.common.cli import EXIT_FAILED, EXIT_USAGE
from objstream.common.settings import KiB, MiB, Settings
from tests.conftest import random_file, sha256_of
from tests.integration.conftest import Declared
from tests.integration.test_cli import _env

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _objstream(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["objstream", *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


class Scraped:
    """A long-running command with ``--metrics-port 0``, and its endpoint."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            ["objstream", *argv, "--metrics-port", "0"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stderr is not None
        first = self.process.stderr.readline()  # named before it connects
        assert first.startswith("objstream: metrics on http://127.0.0.1:"), first
        self.url = first.split()[-1]

    def samples(self) -> Samples:
        with urllib.request.urlopen(self.url, timeout=10) as answer:
            text = answer.read().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def wait_for(self, check: Callable[[Samples], bool], within: float = 60) -> Samples:
        deadline = time.monotonic() + within
        while True:
            got = self.samples()
            if check(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.02)

    def stop(self) -> tuple[str, str]:
        self.process.terminate()
        out, err = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, err
        return out, err


@pytest.fixture
def scraped() -> Iterator[Callable[[list[str], dict[str, str]], Scraped]]:
    started: list[Scraped] = []

    def start(argv: list[str], env: dict[str, str]) -> Scraped:
        started.append(Scraped(argv, env))
        return started[-1]

    yield start
    for command in started:
        command.process.kill()
        command.process.communicate()


def _streams(samples: Samples, outcome: str, code: str = "") -> float:
    labels = frozenset({("outcome", outcome), ("code", code)})
    return samples.get(("objstream_streams_total", labels), 0.0)


def _progress_series(samples: Samples) -> list[dict[str, str]]:
    return [dict(labels) for name, labels in samples if name == "objstream_stream_done_bytes"]


def _in_flight(samples: Samples) -> float:
    return samples[("objstream_streams_in_flight", frozenset())]


def _scrape_during(command: Scraped, transfer: subprocess.Popen[str]) -> Samples:
    """A scrape while the transfer runs: a stream in flight, with its progress series."""
    during = command.wait_for(lambda s: bool(_progress_series(s)) or transfer.poll() is not None)
    assert transfer.poll() is None, "the transfer ended before a scrape saw it"
    return during


# -- --metrics-port -------------------------------------------------------------------------------


def test_listen_metrics_during_and_after_a_real_transfer(
    tmp_path: Path, settings: Settings, declared: Declared, scraped: Callable[..., Scraped]
) -> None:
    declared.sites.add("site-1")
    env = _env(settings)
    size = 3 * MiB + 5
    src = tmp_path / "big.bin"
    digest = random_file(src, size)
    listen = scraped(["consumer", "listen", "--site", "site-1", "--dest", f"{tmp_path}/in"], env)
    before = listen.wait_for(lambda s: ("objstream_received_bytes_total", frozenset()) in s)
    assert before[("objstream_received_bytes_total", frozenset())] == 0
    # Small chunks, one in flight: the transfer lasts long enough to be seen under way.
    send = subprocess.Popen(
        ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1",
         "--chunk-size", "8KiB", "--window", "1", "--json", str(src)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        during = _scrape_during(listen, send)
        out, err = send.communicate(timeout=120)
    finally:
        send.kill()
    assert send.returncode == 0, err
    [stream] = _progress_series(during)
    assert stream == {"stream_id": json.loads(out)["targets"][0]["stream_id"], "peer": "server"}
    assert _in_flight(during) == 1
    labels = frozenset(stream.items())
    assert during[("objstream_stream_size_bytes", labels)] == size
    assert 0 <= during[("objstream_stream_done_bytes", labels)] < size

    # (A stream leaves the receiver's table at its next turn after its outcome.)
    after = listen.wait_for(lambda s: _streams(s, "ok") == 1 and _in_flight(s) == 0)
    assert _streams(after, "ok") == 1
    assert after[("objstream_received_bytes_total", frozenset())] == size
    assert _in_flight(after) == 0
    assert _progress_series(after) == []  # a stream's series go with it
    for name in ("resend_requests", "redelivered_chunks", "reconnects"):
        assert after[(f"objstream_{name}_total", frozenset())] == 0
    listen.stop()
    assert sha256_of(tmp_path / "in" / "big.bin") == digest


def test_listen_metrics_count_a_refused_offer_by_its_code(
    tmp_path: Path, settings: Settings, declared: Declared, scraped: Callable[..., Scraped]
) -> None:
    declared.sites.add("site-1")
    env = _env(settings)
    src = tmp_path / "small.bin"
    random_file(src, 100 * KiB)
    listen = scraped(
        ["consumer", "listen", "--site", "site-1", "--dest", str(tmp_path / "in"),
         "--accept-from", "nobody-else"],
        env,
    )  # fmt: skip
    listen.wait_for(lambda s: ("objstream_received_bytes_total", frozenset()) in s)
    send = ["producer", "send-file", "--site", "server", "--to", "site-1", str(src)]
    sent = _objstream(*send, env=env)
    assert sent.returncode == EXIT_FAILED, sent.stderr
    after = listen.wait_for(lambda s: _streams(s, "refused", "forbidden") == 1)
    assert _streams(after, "refused", "forbidden") == 1
    assert _streams(after, "ok") == 0
    assert after[("objstream_received_bytes_total", frozenset())] == 0
    listen.stop()


def test_serve_metrics_during_and_after_a_real_retrieval(
    tmp_path: Path, settings: Settings, declared: Declared, scraped: Callable[..., Scraped]
) -> None:
    declared.sites.update({"server", "site-1"})
    size = 3 * MiB + 5
    source = tmp_path / "src"
    source.mkdir()
    digest = random_file(source / "big.bin", size)
    # The server streams in its own chunk size and window: small, so that it lasts.
    serve_env = _env(settings, OBJSTREAM_CHUNK_SIZE="8KiB", OBJSTREAM_WINDOW="1")
    argv = ["producer", "serve", "--site", "server", "--source-dir", str(source)]
    serve = scraped(argv, serve_env)
    before = serve.wait_for(lambda s: ("objstream_sent_bytes_total", frozenset()) in s)
    assert before[("objstream_sent_bytes_total", frozenset())] == 0
    env = _env(settings)
    retrieve = subprocess.Popen(
        ["objstream", "consumer", "retrieve-file", "--site", "site-1", "--from", "server",
         "big.bin", "--dest", str(tmp_path / "got"), "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        during = _scrape_during(serve, retrieve)
        out, err = retrieve.communicate(timeout=120)
    finally:
        retrieve.kill()
    assert retrieve.returncode == 0, err
    assert json.loads(out)["sha256"] == digest
    [stream] = _progress_series(during)
    assert stream["peer"] == "site-1"
    assert _in_flight(during) == 1
    assert during[("objstream_stream_size_bytes", frozenset(stream.items()))] == size

    refused = _objstream(
        "consumer", "retrieve-file", "--site", "site-1", "--from", "server", "nope.bin",
        "--dest", str(tmp_path / "got"), env=env,
    )  # fmt: skip
    assert refused.returncode == EXIT_FAILED, refused.stderr
    after = serve.wait_for(lambda s: _streams(s, "ok") == 1 and _in_flight(s) == 0)
    assert _streams(after, "ok") == 1
    assert _streams(after, "refused", "not_found") == 1
    assert after[("objstream_sent_bytes_total", frozenset())] >= size
    assert after[("objstream_resent_chunks_total", frozenset())] == 0
    assert after[("objstream_reconnects_total", frozenset())] == 0
    assert _in_flight(after) == 0
    assert _progress_series(after) == []
    serve.stop()


def test_serve_metrics_count_the_chunks_resent_to_a_requester_that_fell_silent(
    tmp_path: Path, settings: Settings, declared: Declared, scraped: Callable[..., Scraped]
) -> None:
    """The requester is stopped (SIGSTOP) mid-stream: the server hears nothing, resends after
    ``resend_after``, and counts it; the requester, continued, drops the duplicates."""
    declared.sites.update({"server", "site-1"})
    size = 2 * MiB
    source = tmp_path / "src"
    source.mkdir()
    digest = random_file(source / "big.bin", size)
    serve_env = _env(
        settings, OBJSTREAM_CHUNK_SIZE="8KiB", OBJSTREAM_WINDOW="1", OBJSTREAM_RESEND_AFTER="0.5"
    )
    argv = ["producer", "serve", "--site", "server", "--source-dir", str(source)]
    serve = scraped(argv, serve_env)
    serve.wait_for(lambda s: ("objstream_resent_chunks_total", frozenset()) in s)
    retrieve = subprocess.Popen(
        ["objstream", "consumer", "retrieve-file", "--site", "site-1", "--from", "server",
         "big.bin", "--dest", str(tmp_path / "got"), "--json"],
        env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _scrape_during(serve, retrieve)
        retrieve.send_signal(signal.SIGSTOP)
        time.sleep(2.5)
        stopped = serve.samples()
        retrieve.send_signal(signal.SIGCONT)
        out, err = retrieve.communicate(timeout=120)
    finally:
        retrieve.kill()
    assert retrieve.returncode == 0, err
    assert json.loads(out)["sha256"] == digest
    assert stopped[("objstream_resent_chunks_total", frozenset())] >= 1
    after = serve.wait_for(lambda s: _streams(s, "ok") == 1)
    assert after[("objstream_sent_bytes_total", frozenset())] > size  # the resends, too
    serve.stop()


# -- --progress json ------------------------------------------------------------------------------


def _ticks(stderr: str) -> list[dict[str, object]]:
    """The JSON progress lines among what a command wrote to stderr (log lines are not JSON)."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _check_ticks(ticks: list[dict[str, object]], site: str, size: int) -> None:
    """One stream's ticks: well formed, growing, at most ~10 a second, the last one complete."""
    assert ticks, "no progress line"
    assert {t["event"] for t in ticks} == {"progress"}
    assert {t["site"] for t in ticks} == {site}
    assert len({t["stream_id"] for t in ticks}) == 1
    assert {t["total"] for t in ticks} == {size}
    done = [int(t["done"]) for t in ticks]  # type: ignore[call-overload]
    assert done == sorted(done)
    assert len(set(done)) == len(done)
    assert done[-1] == size
    times = [float(t["time"]) for t in ticks]  # type: ignore[arg-type]
    assert all(abs(t - time.time()) < 600 for t in times)  # the wall clock, in seconds
    gaps = [b - a for a, b in itertools.pairwise(times[:-1])]  # the last one: always
    assert all(gap >= 0.095 for gap in gaps), gaps


def test_progress_json_on_send_file_and_listen(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    env = _env(settings)
    size = 3 * MiB + 5
    src = tmp_path / "big.bin"
    random_file(src, size)
    listen = subprocess.Popen(
        ["objstream", "consumer", "listen", "--site", "site-1", "--dest", str(tmp_path / "in"),
         "--count", "1", "--json", "--progress", "json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        sent = _objstream(
            "producer", "send-file", "--site", "server", "--to", "site-1", "--chunk-size",
            "16KiB", "--window", "2", "--rate-limit", "6MiB", "--json", "--progress", "json",
            str(src), env=env,
        )  # fmt: skip
        out, err = listen.communicate(timeout=120)
    finally:
        listen.kill()
    assert sent.returncode == 0, sent.stderr
    assert listen.returncode == 0, err
    result = json.loads(sent.stdout)  # stdout: the --json result alone
    assert result["ok"] is True
    sent_ticks = _ticks(sent.stderr)
    _check_ticks(sent_ticks, "site-1", size)
    assert sent_ticks[0]["stream_id"] == result["targets"][0]["stream_id"]
    # A few ticks of a transfer, not only its end (its rate limit makes it last about half a
    # second: unlimited, 3 MiB on loopback can take less than two tick intervals).
    assert len(sent_ticks) >= 3
    received_ticks = _ticks(err)
    _check_ticks(received_ticks, "server", size)
    assert received_ticks[0]["done"] == 0  # the first tick: the stream began
    assert json.loads(out)["stream_id"] == received_ticks[0]["stream_id"]


def test_progress_json_on_send_container_and_retrievals(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    np = pytest.importorskip("numpy")
    declared.sites.update({"server", "site-1"})
    env = _env(settings)
    source = tmp_path / "src"
    source.mkdir()
    random_file(source / "big.bin", 2 * MiB)
    np.savez(source / "model.npz", w=np.arange(256 * 1024, dtype=np.float32))
    listen = subprocess.Popen(
        ["objstream", "consumer", "listen", "--site", "site-1", "--dest", str(tmp_path / "in"),
         "--count", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pushed = _objstream(
            "producer", "send-container", "--site", "server", "--to", "site-1", "--chunk-size",
            "64KiB", "--progress", "json", str(source / "model.npz"), env=env,
        )  # fmt: skip
        listen.communicate(timeout=120)
    finally:
        listen.kill()
    assert pushed.returncode == 0, pushed.stderr
    [sent_line] = pushed.stdout.splitlines()  # stdout as without the option
    assert sent_line.startswith("sent container")
    container_ticks = _ticks(pushed.stderr)
    assert container_ticks[-1]["done"] == container_ticks[-1]["total"]

    serve = subprocess.Popen(
        ["objstream", "producer", "serve", "--site", "server", "--source-dir", str(source),
         "--container", f"model={source / 'model.npz'}"],
        env=_env(settings, OBJSTREAM_CHUNK_SIZE="64KiB"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        got = tmp_path / "got"
        file = _objstream(
            "consumer", "retrieve-file", "--site", "site-1", "--from", "server", "big.bin",
            "--dest", str(got), "--progress", "json", env=env,
        )  # fmt: skip
        container = _objstream(
            "consumer", "retrieve-container", "--site", "site-1", "--from", "server", "model",
            "--out", str(got / "model.npz"), "--progress", "json", env=env,
        )  # fmt: skip
        quiet = _objstream(
            "consumer", "retrieve-file", "--site", "site-1", "--from", "server", "big.bin",
            "--dest", str(tmp_path / "quiet"), "--progress", "none", env=env,
        )  # fmt: skip
    finally:
        serve.terminate()
        serve.communicate(timeout=60)
    assert file.returncode == 0, file.stderr
    assert file.stdout.splitlines() == [str(got / "big.bin")]  # the path alone, as always
    _check_ticks(_ticks(file.stderr), "server", 2 * MiB)
    assert container.returncode == 0, container.stderr
    container_ticks = _ticks(container.stderr)
    assert container_ticks[-1]["done"] == container_ticks[-1]["total"]
    assert {t["site"] for t in container_ticks} == {"server"}
    assert quiet.returncode == 0, quiet.stderr
    assert _ticks(quiet.stderr) == []


def test_progress_takes_only_its_choices(tmp_path: Path, settings: Settings) -> None:
    run = _objstream(
        "producer", "send-file", "--site", "server", "--to", "site-1", "--progress", "yes",
        str(tmp_path / "x"), env=_env(settings),
    )  # fmt: skip
    assert run.returncode == EXIT_USAGE
    assert "argument --progress: invalid choice: 'yes'" in run.stderr.splitlines()[-1]
