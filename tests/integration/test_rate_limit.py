"""``--rate-limit RATE`` (issue 24, item 5): a cap on the bytes one transfer publishes, as users
run it (separate processes, the real broker).

What matters is the upper bound: the data never goes more than 5 % faster than RATE. It is
measured on the data phase, from the progress ticks (``--progress json``) once a tenth of the
object is stored to the last one, so that connecting, the offer and the verdict do not dilute
it. The lower bound (the cap is not far below RATE) is looser, over the whole command, for a
loaded 2-core machine.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from objstream.common.settings import MiB, Settings
from objstream.producer import FileStreamer
from tests.conftest import random_file, sha256_of, stored_path
from tests.integration.conftest import Declared, StartReceiver
from tests.integration.test_cli import _env, _listener, _objstream

RATE = 8 * MiB
"""``--rate-limit 8MiB``."""
AT_MOST = 1.05
AT_LEAST = 0.75


def _data_rate(stderr: str) -> float:
    """Bytes a second over the data phase of the stream: the least-squares slope of the bytes
    stored against time, over the progress ticks from a tenth of the object to the end (one
    tick printed late on a busy machine moves it little). A broadcast's ticks all count: its
    targets share one stream, and ``--progress json`` gives its last tick once."""
    ticks = [
        tick
        for line in stderr.splitlines()
        if line.startswith("{") and (tick := json.loads(line)).get("event") == "progress"
    ]
    total = ticks[-1]["total"]
    assert ticks[-1]["done"] == total, ticks[-1]
    points = [(float(t["time"]), float(t["done"])) for t in ticks if t["done"] >= total / 10]
    assert len(points) >= 5, f"too few ticks to measure the data phase: {points}"
    times, done = zip(*points, strict=True)
    return statistics.linear_regression(times, done).slope


def test_send_file_keeps_to_the_rate_limit(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    size = 40 * MiB
    src = tmp_path / "big.bin"
    digest = random_file(src, size)
    env = _env(settings)
    listener = _listener(env, "site-1", tmp_path / "in", "--count", "1")
    try:
        sent = _objstream(
            "producer", "send-file", "--site", "server", "--to", "site-1",
            "--rate-limit", "8MiB", "--json", "--progress", "json", str(src),
            env=env,
        )  # fmt: skip
        listener.communicate(timeout=60)
    finally:
        listener.kill()
    assert sent.returncode == 0, sent.stderr
    assert sha256_of(tmp_path / "in" / "big.bin") == digest
    result = json.loads(sent.stdout)
    assert result["ok"]
    assert result["bytes"] == size
    data = _data_rate(sent.stderr)
    assert RATE * AT_LEAST <= data <= RATE * AT_MOST, f"data phase at {data / MiB:.2f} MiB/s"
    overall = result["bytes"] / result["seconds"]  # connecting, offer and verdict included
    assert RATE * AT_LEAST <= overall <= RATE * AT_MOST, overall / MiB


def test_a_broadcast_is_one_transfer_each_chunk_counted_once(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.update({"site-1", "site-2"})
    size = 24 * MiB
    src = tmp_path / "big.bin"
    digest = random_file(src, size)
    env = _env(settings)
    listeners = [
        _listener(env, site, tmp_path / site, "--count", "1", quiet=True)
        for site in ("site-1", "site-2")
    ]
    try:
        sent = _objstream(
            "producer", "send-file", "--site", "server", "--to", "site-1,site-2",
            "--rate-limit", "64mbit", "--json", "--progress", "json", str(src),
            env=env,
        )  # fmt: skip
        for listener in listeners:
            listener.wait(timeout=60)
    finally:
        for listener in listeners:
            listener.kill()
    assert sent.returncode == 0, sent.stderr
    result = json.loads(sent.stdout)
    rate = 64_000_000 / 8
    for site in ("site-1", "site-2"):
        assert sha256_of(tmp_path / site / "big.bin") == digest
    data = _data_rate(sent.stderr)
    # Each chunk published once for both: the whole takes size / RATE, not twice that.
    assert rate * AT_LEAST <= data <= rate * AT_MOST, f"data phase at {data / MiB:.2f} MiB/s"
    assert rate * AT_LEAST <= size / result["seconds"] <= rate * AT_MOST


@pytest.fixture
def limited_server(tmp_path: Path, settings: Settings, declared: Declared) -> Iterator[str]:
    """``serve --rate-limit 8MiB`` of a 32 MiB file; yields its SHA-256."""
    declared.sites.add("server")
    src = tmp_path / "src"
    src.mkdir()
    digest = random_file(src / "big.bin", 32 * MiB)
    server = subprocess.Popen(
        ["objstream", "producer", "serve", "--site", "server", "--source-dir", str(src),
         "--rate-limit", "8MiB"],
        env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.5)
    assert server.poll() is None, server.communicate()
    yield digest
    server.send_signal(signal.SIGTERM)
    _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err


def test_serve_keeps_each_stream_to_the_rate_limit(
    tmp_path: Path, settings: Settings, limited_server: str
) -> None:
    out = tmp_path / "out"
    started = time.monotonic()
    got = _objstream(
        "consumer", "retrieve-file", "--site", "site-1", "--from", "server", "big.bin",
        "--dest", str(out), "--progress", "json",
        env=_env(settings),
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert got.returncode == 0, got.stderr
    assert sha256_of(out / "big.bin") == limited_server
    data = _data_rate(got.stderr)
    assert RATE * AT_LEAST <= data <= RATE * AT_MOST, f"data phase at {data / MiB:.2f} MiB/s"
    # The whole command: start-up, the request and the server's connection for the stream too.
    assert seconds <= 32 * MiB / RATE / AT_LEAST + 2, seconds


def test_the_python_keyword_limits_one_call(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    src = tmp_path / "src.bin"
    digest = random_file(src, 6 * MiB)
    receiver = start_receiver("site-1", tmp_path / "in")
    with FileStreamer("server", settings) as streamer:
        started = time.monotonic()
        [result] = streamer.stream_file("site-1", src, rate_limit="16mbit")  # 2 MB/s
        seconds = time.monotonic() - started
    [received] = receiver.wait_for(1)
    assert result.ok
    assert sha256_of(stored_path(received)) == digest
    assert 6 * MiB / 2_000_000 / AT_MOST <= seconds <= 6 * MiB / 2_000_000 / AT_LEAST
