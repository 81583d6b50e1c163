"""What the command line writes on stderr (issue 22, items 7, 8 and 12): one line per failure,
no log noise by default, ``-q``, ``--log-format json``, and names that cannot break a line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from objstream.common.cli import EXIT_BROKER, EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT
from objstream.common.settings import KiB, Settings
from tests.conftest import random_file
from tests.integration.conftest import Declared
from tests.integration.test_cli import _listener, _objstream


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    """As a user runs it: no OBJSTREAM_LOG_LEVEL, so the command line's default applies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBJSTREAM_")}
    env.update(
        OBJSTREAM_URL=settings.url,
        OBJSTREAM_NAMESPACE=settings.namespace,
        OBJSTREAM_STREAM_TTL="120",
        **extra,
    )
    return env


def _ready(listener: subprocess.Popen[str], mark: str = "listening for site") -> str:
    assert listener.stderr is not None
    for line in listener.stderr:
        if mark in line:
            return line
    raise AssertionError(f"listen exited with {listener.wait()}")


def _stop(listener: subprocess.Popen[str]) -> tuple[str, str]:
    listener.send_signal(signal.SIGTERM)
    try:
        return listener.communicate(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()


def test_a_refused_send_is_one_line_on_each_side(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    src = tmp_path / "big.bin"
    random_file(src, 100 * KiB)
    env = _env(settings)
    listener = _listener(
        _env(settings, OBJSTREAM_MAX_OBJECT_SIZE="10KiB"), "site-1", tmp_path / "in"
    )
    try:
        start = _ready(listener)
        send = _objstream(
            "producer", "send-file", "--site", "server", "--to", "site-1", str(src), env=env
        )
    finally:
        _out, err = _stop(listener)
    assert start.startswith("objstream: listening for site site-1 on "), start
    assert send.returncode == EXIT_FAILED
    assert send.stdout == ""
    lines = send.stderr.splitlines()
    assert len(lines) == 1, send.stderr  # was a WARNING log line, then the same words again
    assert lines[0].startswith("objstream: error: ")
    assert "too_large" in lines[0]
    assert [line for line in err.splitlines() if "too_large" in line] == [
        line for line in err.splitlines() if line.startswith("objstream: error: ")
    ], err
    assert len(err.splitlines()) == 1, err  # the error; no INFO or WARNING lines
    assert listener.returncode == EXIT_OK


def test_quiet_leaves_only_the_results(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    src = tmp_path / "a.bin"
    random_file(src, 300 * KiB)
    env = _env(settings)
    listener = _listener(env, "site-1", tmp_path / "in", "-q", "--count", "1")
    try:
        send = _objstream(
            "producer", "send-file", "-q", "--site", "server", "--to", "site-1", str(src),
            env=env,
        )  # fmt: skip
        out, err = listener.communicate(timeout=60)
    finally:
        if listener.poll() is None:
            listener.kill()
    assert send.returncode == EXIT_OK, send.stderr
    assert send.stderr == ""
    assert send.stdout.startswith("sent file ")
    assert listener.returncode == EXIT_OK
    assert err == ""  # not even the "listening" note
    assert out.startswith("received file a.bin from server")


def test_log_format_json_makes_every_stderr_line_an_object(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    src = tmp_path / "big.bin"
    random_file(src, 100 * KiB)
    small = _env(settings, OBJSTREAM_MAX_OBJECT_SIZE="10KiB", OBJSTREAM_LOG_LEVEL="info")
    listener = _listener(small, "site-1", tmp_path / "in", "--log-format", "json")
    try:
        first = json.loads(_ready(listener))
        send = _objstream(
            "producer", "send-file", "--log-format", "json", "--site", "server", "--to",
            "site-1", str(src), env=_env(settings),
        )  # fmt: skip
    finally:
        _, err = _stop(listener)
    assert first["level"] == "INFO"
    assert first["message"].startswith("listening for site site-1")
    records = [json.loads(line) for line in err.splitlines()]  # every line: one JSON object
    assert {r["level"] for r in records} >= {"INFO", "ERROR"}, err
    assert all({"time", "level", "name", "message"} <= r.keys() for r in records)
    stamps = [datetime.fromisoformat(r["time"]) for r in records]  # ISO 8601, every line
    assert all(stamp.tzinfo is not None for stamp in stamps)
    assert send.returncode == EXIT_FAILED
    (error,) = [json.loads(line) for line in send.stderr.splitlines()]
    assert error["level"] == "ERROR"
    assert "too_large" in error["message"]


def test_a_name_with_a_newline_stays_on_one_line(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    src = tmp_path / "two\nlines\x1b[31m.bin"
    random_file(src, 10 * KiB)
    env = _env(settings)
    listener = _listener(env, "site-1", tmp_path / "in", "--count", "1")
    try:
        send = _objstream(
            "producer", "send-file", "--site", "server", "--to", "site-1", str(src), env=env
        )
        out, _ = listener.communicate(timeout=60)
    finally:
        if listener.poll() is None:
            listener.kill()
    assert send.returncode == EXIT_OK, send.stderr
    assert len(send.stdout.splitlines()) == 1, send.stdout
    assert "\x1b" not in send.stdout
    assert "two\\nlines\\x1b[31m" in send.stdout
    assert len(out.splitlines()) == 1, out
    assert "\x1b" not in out


def test_refused_credentials_name_where_they_came_from(settings: Settings) -> None:
    env = _env(settings, OBJSTREAM_USER="guest", OBJSTREAM_PASSWORD="not-the-password")
    done = _objstream("producer", "send-file", "--site", "server", "--to", "x", __file__, env=env)
    assert done.returncode == EXIT_BROKER
    (line,) = done.stderr.splitlines()
    assert "refused the credentials" in line
    assert "OBJSTREAM_USER / OBJSTREAM_PASSWORD" in line  # was: "... in --url / OBJSTREAM_URL"
    assert "not-the-password" not in line


def test_a_compressed_npz_says_what_moves(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    src = tmp_path / "comp.npz"
    np.savez_compressed(src, zeros=np.zeros(250_000, np.float32))
    env = _env(settings)
    listener = _listener(env, "site-1", tmp_path / "in", "--count", "1", "-q")
    try:
        sent = _objstream(
            "producer", "send-container", "--site", "server", "--to", "site-1", str(src), env=env
        )
        listener.communicate(timeout=60)
    finally:
        if listener.poll() is None:
            listener.kill()
    assert sent.returncode == EXIT_OK, sent.stderr
    (note,) = sent.stderr.splitlines()
    assert note.startswith(f"objstream: {src} is compressed: ")
    assert "1000128 bytes of arrays, which is what moves" in note  # the .npy headers too
    assert "send-file moves the file as it is" in note


def test_a_vhost_that_is_not_there_is_not_called_wrong_credentials(settings: Settings) -> None:
    url = settings.url.rsplit("/", 1)[0] + "/no-such-vhost"
    env = {**_env(settings), "OBJSTREAM_URL": url}
    done = _objstream("producer", "send-file", "--site", "server", "--to", "x", __file__, env=env)
    assert done.returncode == EXIT_BROKER
    (line,) = done.stderr.splitlines()
    assert "refused virtual host 'no-such-vhost'" in line
    assert "vhost no-such-vhost not found" in line
    assert "credentials" not in line


def test_a_partly_failed_broadcast_still_says_who_stored_it(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.update({"site-1", "nobody"})
    src = tmp_path / "a.bin"
    random_file(src, 50 * KiB)
    env = _env(settings)
    listener = _listener(env, "site-1", tmp_path / "in", "--count", "1", "-q")
    try:
        sent = _objstream(
            "producer", "send-file", "--site", "server", "--to", "site-1,nobody",
            "--timeout", "3", str(src), env=env,
        )  # fmt: skip
        listener.communicate(timeout=60)
    finally:
        if listener.poll() is None:
            listener.kill()
    assert sent.returncode == EXIT_TIMEOUT
    (stored,) = sent.stdout.splitlines()  # was: nothing on stdout
    assert stored.startswith(f"sent file {src} to site-1 as a.bin: ")
    (error,) = sent.stderr.splitlines()
    assert "site 'nobody' never took the offer" in error


def test_a_missing_file_in_json_has_a_code_and_the_error_line_s_words(
    tmp_path: Path, settings: Settings
) -> None:
    missing = tmp_path / "nosuch.bin"
    done = _objstream(
        "producer", "send-file", "--site", "server", "--to", "x", "--json", str(missing),
        env=_env(settings),
    )  # fmt: skip
    assert done.returncode == EXIT_FAILED
    outcome = json.loads(done.stdout)
    assert outcome["code"] == "io"  # was: no code
    assert outcome["error"] == f"{missing}: No such file or directory"  # was: a Python repr
    assert done.stderr == f"objstream: error: {missing}: No such file or directory\n"


def test_a_job_whose_site_is_taken_says_so_at_once(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.add("site-1")
    env = _env(settings)
    listener = _listener(env, "site-1", tmp_path / "in", "-q")  # left from the tour
    try:
        time.sleep(2)  # its consumer is on the inbox
        started = time.monotonic()
        job = _objstream("job", "file_streaming", "--size", "1MiB", env=env, timeout=60)
        took = time.monotonic() - started
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.communicate(timeout=30)
    assert job.returncode == EXIT_FAILED
    assert took < 30  # was: 2 minutes, then "no file arrived in 120 s"
    (line,) = job.stderr.splitlines()
    assert line.startswith("objstream: error: site 'site-1' is already served in namespace")
    assert "--consumer-site" in line
