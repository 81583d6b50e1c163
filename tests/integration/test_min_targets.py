"""k of N (issue 23, item 2): a send with ``--min-targets K`` (``min_targets=K``) succeeds as
soon as K targets verified; the others (stragglers) go on until they end, each reported as it
does, or are told to stop (``--stragglers cancel``); a send where fewer than K can still verify
fails. Against the real broker; site-3 never listens.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from objstream.common.errors import FailureCode, SendFailed
from objstream.common.settings import MiB, Settings
from objstream.producer import FileStreamer
from objstream.producer.sender import TargetResult
from tests.conftest import random_file, sha256_of
from tests.integration.conftest import Declared, StartReceiver
from tests.integration.test_cli import _env, _listener

TIMEOUT = 8.0
"""The sends' --timeout: site-3, which never answers, fails this long after its offer."""


def test_send_file_min_targets_succeeds_once_two_verified_and_reports_the_third_later(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.update({"site-1", "site-2", "site-3"})
    src = tmp_path / "big.bin"
    digest = random_file(src, 4 * MiB)
    env = _env(settings)
    listeners = [
        _listener(env, site, tmp_path / site, "--count", "1") for site in ("site-1", "site-2")
    ]
    try:
        started = time.monotonic()
        send = subprocess.Popen(
            ["objstream", "producer", "send-file", "--site", "server",
             "--to", "site-1,site-2,site-3", "--min-targets", "2",
             "--timeout", str(TIMEOUT), "--json", str(src)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert send.stdout is not None
        first = json.loads(send.stdout.readline())
        first_at = time.monotonic() - started
        out, err = send.communicate(timeout=60)
        for listener in listeners:
            listener.communicate(timeout=30)
    finally:
        for process in [*listeners, send]:
            process.kill()
    assert send.returncode == 0, err
    # The send's own report: two verified, site-3 still going, well before site-3's timeout.
    assert first["ok"], first
    assert first_at < TIMEOUT, first_at
    targets = {t["site"]: t for t in first["targets"]}
    assert targets["site-1"]["ok"]
    assert targets["site-2"]["ok"]
    assert targets["site-3"] == {"site": "site-3", "pending": True}
    # Then site-3's outcome, when it came: its timeout.
    [late] = [json.loads(line) for line in out.splitlines()]
    assert late["straggler"] is True
    assert late["site"] == "site-3"
    assert late["ok"] is False
    assert late["code"] == "timeout"
    for site in ("site-1", "site-2"):
        assert sha256_of(tmp_path / site / "big.bin") == digest


def test_min_targets_in_python_waits_for_a_straggler_that_verifies(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    """A straggler that does verify: its result comes from stragglers() and on_straggler."""
    src = tmp_path / "big.bin"
    digest = random_file(src, 2 * MiB)
    receivers = [start_receiver(site, tmp_path / site) for site in ("site-1", "site-2")]
    reported: list[TargetResult] = []
    with FileStreamer("server", settings, on_straggler=reported.append) as streamer:
        results = streamer.stream_file(
            ["site-1", "site-2", "site-3"], src, min_targets=1, timeout=TIMEOUT
        )
        assert results
        assert all(r.ok for r in results)
        receiver = start_receiver("site-3", tmp_path / "site-3")  # late, within its timeout
        late = streamer.stragglers()
    for r in [*receivers, receiver]:
        r.wait_for(1)
    assert {r.site for r in results} | {r.site for r in late} == {"site-1", "site-2", "site-3"}
    assert all(r.ok for r in late), late
    assert sorted(r.site for r in reported) == sorted(r.site for r in late)
    assert sha256_of(tmp_path / "site-3" / "big.bin") == digest


def test_stragglers_cancel_tells_them_to_stop_and_returns_every_result(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver
) -> None:
    src = tmp_path / "big.bin"
    random_file(src, 2 * MiB)
    for site in ("site-1", "site-2"):
        start_receiver(site, tmp_path / site)
    started = time.monotonic()
    with FileStreamer("server", settings) as streamer:
        results = streamer.stream_file(
            ["site-1", "site-2", "site-3"], src, min_targets=2, stragglers="cancel",
            timeout=TIMEOUT,
        )  # fmt: skip
        assert streamer.stragglers() == []
    assert time.monotonic() - started < TIMEOUT
    outcome = {r.site: r for r in results}
    assert outcome["site-1"].ok
    assert outcome["site-2"].ok
    error = outcome["site-3"].error
    assert error is not None
    assert error.code is FailureCode.ABORTED
    assert "had the 2 targets it needed" in str(error)


def test_too_few_left_to_verify_fails_the_send(
    tmp_path: Path, settings: Settings, start_receiver: StartReceiver, declared: Declared
) -> None:
    """Two of three required, two never answer: once they timed out the send fails."""
    declared.sites.update({"site-2", "site-3"})
    src = tmp_path / "big.bin"
    random_file(src, MiB)
    start_receiver("site-1", tmp_path / "site-1")
    with FileStreamer("server", settings) as streamer, pytest.raises(SendFailed) as failed:
        streamer.stream_file(["site-1", "site-2", "site-3"], src, min_targets=2, timeout=3)
    results = [r for r in failed.value.results if isinstance(r, TargetResult)]
    codes = {r.site: r.error.code for r in results if r.error is not None}
    assert codes == {"site-2": FailureCode.TIMEOUT, "site-3": FailureCode.TIMEOUT}


def test_min_targets_beyond_the_targets_is_a_usage_error(
    tmp_path: Path, settings: Settings
) -> None:
    src = tmp_path / "x.bin"
    random_file(src, 10)
    sent = subprocess.run(
        ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1,site-2",
         "--min-targets", "3", str(src)],
        env=_env(settings), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert sent.returncode == 2, sent.stderr
    assert (
        sent.stderr.strip()
        .splitlines()[-1]
        .endswith("--min-targets 3 is more than the 2 targets of --to")
    ), sent.stderr


def test_send_file_stragglers_cancel_prints_one_object_with_the_straggler_aborted(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.update({"site-1", "site-2", "site-3"})
    src = tmp_path / "big.bin"
    random_file(src, MiB)
    env = _env(settings)
    listeners = [
        _listener(env, site, tmp_path / site, "--count", "1") for site in ("site-1", "site-2")
    ]
    try:
        sent = subprocess.run(
            ["objstream", "producer", "send-file", "--site", "server",
             "--to", "site-1,site-2,site-3", "--min-targets", "2", "--stragglers", "cancel",
             "--timeout", str(TIMEOUT), "--json", str(src)],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        for listener in listeners:
            listener.communicate(timeout=30)
    finally:
        for listener in listeners:
            listener.kill()
    assert sent.returncode == 0, sent.stderr
    [outcome] = [json.loads(line) for line in sent.stdout.splitlines()]
    assert outcome["ok"] is True  # two verified: the send succeeded
    assert outcome["mib_per_s"] > 0
    targets = {t["site"]: t for t in outcome["targets"]}
    assert targets["site-1"]["ok"]
    assert targets["site-2"]["ok"]
    assert targets["site-3"]["ok"] is False
    assert targets["site-3"]["code"] == "aborted"
