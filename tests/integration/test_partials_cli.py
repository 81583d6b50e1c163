"""``objstream consumer partials`` on what real, interrupted transfers left: a stream a
running listener holds is listed as held and never deleted; once that listener is killed the
same stream is resumable and ``--clean`` deletes it; a stream its sender aborted keeps its
prefix (kept), which ``--clean`` deletes even while the listener runs."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from objstream.common.cli import EXIT_FAILED, EXIT_OK
from objstream.common.settings import KiB, Settings
from tests.integration.conftest import Declared, MakeRawPeer, wait_for_partial
from tests.integration.test_cli import _env, _listener, _objstream

CHUNK = 64 * KiB


def _partials(env: dict[str, str], dest: Path, *extra: str) -> tuple[int, str, str]:
    done = _objstream("consumer", "partials", "--dest", str(dest), *extra, env=env)
    return done.returncode, done.stdout, done.stderr


def _rows(env: dict[str, str], dest: Path) -> dict[str, dict[str, object]]:
    code, out, err = _partials(env, dest, "--json")
    assert code == EXIT_OK, err
    return {str(row["name"]): row for row in map(json.loads, out.splitlines())}


def _wait_status(env: dict[str, str], dest: Path, name: str, status: str) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while True:
        row = _rows(env, dest).get(name)
        if row is not None and row["status"] == status:
            return row
        assert time.monotonic() < deadline, (name, row)
        time.sleep(0.2)


def test_held_partials_stay_and_left_ones_go(
    tmp_path: Path, settings: Settings, declared: Declared, raw_peer: MakeRawPeer
) -> None:
    declared.sites.add("site-1")
    dest = tmp_path / "in"
    env = _env(settings)
    listener = _listener(env, "site-1", dest, quiet=True)
    try:
        # Stream 1: half of it sent, then the sender pauses; the listener holds it.
        held = raw_peer("site-1")
        held.offer("big.bin", 4 * CHUNK, CHUNK, window=2)
        held.chunk(0, b"a" * CHUNK)
        held.chunk(1, b"b" * CHUNK)
        wait_for_partial(dest, 2 * CHUNK, listener)
        row = _wait_status(env, dest, "big.bin", "held")
        assert (row["sender"], row["total_bytes"], row["kind"]) == ("raw", 4 * CHUNK, "file")

        # Stream 2: a chunk, then its sender aborts: the listener keeps the prefix, marked ended.
        gone = raw_peer("site-1")
        gone.offer("gone.bin", 3 * CHUNK, CHUNK, window=2)
        gone.chunk(0, b"c" * CHUNK)
        time.sleep(0.5)
        gone.abort("the operator stopped it")
        _wait_status(env, dest, "gone.bin", "kept")

        code, out, err = _partials(env, dest, "--clean")
        assert code == EXIT_FAILED, (out, err)
        assert err.count("\n") == 1
        assert err.startswith("objstream: error: 1 partial object left in place, a running")
        assert "big.bin" in err
        assert "deleted gone.bin" in out
        assert set(_rows(env, dest)) == {"big.bin"}  # the held one is all there

        listener.send_signal(signal.SIGKILL)
        listener.wait(10)
        row = _rows(env, dest)["big.bin"]
        assert row["status"] == "resumable"
        assert row["stored_bytes"] in (0, CHUNK, 2 * CHUNK)

        code, out, _ = _partials(env, dest, "--clean", "--older-than", "1h")
        assert (code, out) == (EXIT_OK, f"nothing to clean in {dest}\n")
        assert set(_rows(env, dest)) == {"big.bin"}

        code, out, err = _partials(env, dest, "--clean")
        assert (code, err) == (EXIT_OK, "")
        assert out.startswith("deleted big.bin")
        assert os.listdir(dest) == []
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(10)
