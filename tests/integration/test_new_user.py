"""What a new user hits with ``listen`` and ``send-file`` (issue 14, items 5, 6, 7 and 10), run
as users run them: separate processes, real broker."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from objstream.common.cli import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT
from objstream.common.settings import KiB, MiB, Settings
from objstream.consumer import Receiver
from tests.conftest import random_file, stored_names
from tests.integration.conftest import Declared, wait_for_partial
from tests.integration.test_cli import _env, _listener, _objstream


def _stop(process: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[str, str]:
    process.send_signal(sig)
    try:
        return process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()


def _ready(listener: subprocess.Popen[str]) -> None:
    """Wait for ``listen``'s "listening for site" line (it logs at info)."""
    assert listener.stderr is not None
    for line in listener.stderr:
        if "listening for site" in line:
            return
    raise AssertionError(f"listen exited with {listener.wait()}")


def test_listen_without_count_exits_0_on_sigterm_after_a_failed_stream(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    src = tmp_path / "big.bin"
    random_file(src, 100 * KiB)
    env = _env(settings)
    small = {**env, "OBJSTREAM_MAX_OBJECT_SIZE": "10KiB", "OBJSTREAM_LOG_LEVEL": "info"}
    listener = _listener(small, "site-1", tmp_path / "in", "--json")
    try:
        _ready(listener)
        send = _objstream("producer", "send-file", "--site", "server", "--to", "site-1",
                          str(src), env=env, timeout=60)  # fmt: skip
        assert send.returncode == EXIT_FAILED
        assert "too_large" in send.stderr
    finally:
        out, err = _stop(listener)
    assert listener.returncode == EXIT_OK, err  # was 1: a remote party failed the service
    record = json.loads(out.strip().splitlines()[-1])
    assert (record["ok"], record["code"], record["sender"]) == (False, "too_large", "server")
    assert "too_large" in err
    assert "Traceback" not in err


def test_a_restarted_listen_count_1_does_not_count_a_stream_whose_sender_is_gone(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    src = tmp_path / "big.bin"
    random_file(src, 64 * MiB)
    dest = tmp_path / "in"
    env = _env(settings)
    first = _listener(env, "site-1", dest, "--count", "1")
    sender = subprocess.Popen(
        ["objstream", "producer", "send-file", "--site", "server", "--to", "site-1",
         "--window", "1", "--chunk-size", "64KiB", "--timeout", "3", str(src)],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_partial(dest, 2 * MiB, sender)
        _stop(first, signal.SIGINT)  # checkpoints the stream for a successor
        _, err = sender.communicate(timeout=60)  # gives up after 3 s of silence
        assert sender.returncode == EXIT_TIMEOUT, err
    finally:
        for process in (first, sender):
            if process.poll() is None:
                process.kill()
    assert list(dest.glob(".objstream-*.state"))  # left for the next listener
    # The next listener takes the stale stream over, finds its sender gone: not an object.
    listen = ["consumer", "listen", "--site", "site-1", "--dest", str(dest)]
    second = _objstream(*listen, "--count", "1", "--timeout", "4", "--json", env=env, timeout=60)
    assert second.returncode == EXIT_TIMEOUT, second.stderr  # was 1, at once
    assert "nothing arrived" in second.stderr
    record = json.loads(second.stdout.strip().splitlines()[0])
    assert (record["ok"], record["sender_gone"], record["code"]) == (False, True, "aborted")
    assert list(dest.glob(".objstream-*.part"))  # the verified prefix, kept for a retrieval
    assert not (dest / "big.bin").exists()


def _send_json(*args: str, env: dict[str, str]) -> tuple[int, dict[str, object], str]:
    run = _objstream("producer", "send-file", "--site", "server", "--json", *args, env=env,
                     timeout=90)  # fmt: skip
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1, run.stdout  # one object, always
    outcome: dict[str, object] = json.loads(lines[0])
    return run.returncode, outcome, run.stderr


def test_send_file_json_always_prints_every_targets_outcome(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.update({"site-1", "site-9"})
    src = tmp_path / "x.bin"
    random_file(src, 100 * KiB)
    env = _env(settings)
    listener = _listener(env, "site-1", tmp_path / "in", "--count", "2", quiet=True)
    try:
        # partial failure: site-1 stores it, nobody listens for site-9
        code, outcome, err = _send_json("--to", "site-1,site-9", "--timeout", "3", str(src),
                                        env=env)  # fmt: skip
        assert code == EXIT_TIMEOUT, err
        assert outcome["ok"] is False
        targets = {t["site"]: t for t in outcome["targets"]}  # type: ignore[attr-defined]
        assert targets["site-1"]["ok"] is True
        assert targets["site-1"]["stored_as"] == "x.bin"
        assert targets["site-9"]["ok"] is False
        assert targets["site-9"]["code"] == "timeout"
        assert outcome["bytes"] == 100 * KiB
        assert outcome["mib_per_s"] == 0.0  # no rate for what did not arrive everywhere
        assert err.strip().splitlines()[-1].startswith("objstream: error: ")
        # success
        code, outcome, err = _send_json("--to", "site-1", str(src), env=env)
        assert code == EXIT_OK, err
        assert outcome["ok"] is True
        assert outcome["targets"] == [
            {"site": "site-1", "ok": True, "stream_id": outcome["targets"][0]["stream_id"],  # type: ignore[index]
             "stored_as": "x-1.bin", "bytes_reused": 100 * KiB}
        ]  # fmt: skip
        assert outcome["bytes_reused"] == 100 * KiB  # site-1 held it all: a delta
        listener.wait(30)
    finally:
        if listener.poll() is None:
            listener.kill()
    # failure before anything was sent
    code, outcome, err = _send_json("--to", "site-1,site-9", str(tmp_path / "missing.bin"),
                                    env=env)  # fmt: skip
    assert code == EXIT_FAILED
    assert outcome["ok"] is False
    assert [(t["site"], t["ok"]) for t in outcome["targets"]] == [  # type: ignore[attr-defined]
        ("site-1", False),
        ("site-9", False),
    ]
    assert "missing.bin" in str(outcome["error"])
    assert outcome["sha256"] is None
    assert len(err.strip().splitlines()) == 1


def test_retrieve_json_prints_one_object_on_failure_too(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """Nobody serves: the retrieval times out, and ``--json`` says so on stdout as a send does
    (the error line and exit code as without it)."""
    declared.sites.add("server")
    run = _objstream("consumer", "retrieve-file", "--site", "site-1", "--from", "server",
                     "--dest", str(tmp_path / "in"), "--timeout", "2", "--json", "f.bin",
                     env=_env(settings), timeout=60)  # fmt: skip
    assert run.returncode == EXIT_TIMEOUT, run.stderr
    [line] = run.stdout.strip().splitlines()
    record = json.loads(line)
    assert (record["ok"], record["code"], record["name"], record["from"]) == (
        False,
        "timeout",
        "f.bin",
        "server",
    )
    assert run.stderr.strip().splitlines()[-1].startswith("objstream: error: ")


def test_listen_warns_when_the_site_already_has_a_receiver(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    env = _env(settings)
    with Receiver("site-1", tmp_path / "forgotten", settings):
        run = _objstream("consumer", "listen", "--site", "site-1", "--dest", str(tmp_path / "in"),
                         "--count", "1", "--timeout", "1", env=env, timeout=60)  # fmt: skip
    assert run.returncode == EXIT_TIMEOUT
    warnings = [line for line in run.stderr.splitlines() if "already has" in line]
    assert len(warnings) == 1, run.stderr
    assert "WARNING" in warnings[0]
    assert "already has 1 consumer(s)" in warnings[0]
    # alone, it says nothing of the kind
    alone = _objstream("consumer", "listen", "--site", "site-1", "--dest", str(tmp_path / "in"),
                       "--count", "1", "--timeout", "1", env=env, timeout=60)  # fmt: skip
    assert "already has" not in alone.stderr


def test_jobs_remove_their_data_unless_kept(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.update({"server", "site-1", "site-2"})
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**_env(settings), "TMPDIR": str(tmp)}
    jobs = [
        ["file_streaming", "--size", "1MiB"],
        ["file_streaming", "--size", "1MiB", "--clients", "2"],
        ["dict_streaming", "--entries", "2", "--entry-size", "64KiB"],
        ["file_streaming", "--size", "1MiB", "--role", "producer", "--timeout", "1"],
    ]
    for job in jobs:
        run = _objstream("job", *job, env=env)
        assert run.returncode in (EXIT_OK, EXIT_TIMEOUT), run.stderr
        assert list(tmp.iterdir()) == [], job  # nothing left behind, not even empty dirs
    mine = tmp_path / "mine"
    run = _objstream("job", "file_streaming", "--size", "1MiB", "--dest", str(mine), env=env)
    assert run.returncode == EXIT_OK, run.stderr
    assert [(mine / n).stat().st_size for n in stored_names(mine)] == [MiB]  # asked for: stays
    run = _objstream("job", "file_streaming", "--size", "1MiB", "--keep", env=env)
    assert run.returncode == EXIT_OK, run.stderr
    [kept] = tmp.iterdir()
    assert f"kept what arrived in {kept}" in run.stderr
    assert [(kept / n).stat().st_size for n in stored_names(kept)] == [MiB]
