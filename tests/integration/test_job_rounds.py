"""``objstream job rounds``: the federated-learning loop, with delta transfers (the default)
and without (``--full``)."""

from __future__ import annotations

import json
from typing import Any

from objstream.common.settings import Settings
from tests.integration.conftest import Declared
from tests.integration.test_cli import _env, _objstream

ROUNDS = ("--clients", "2", "--rounds", "3", "--size", "8MiB", "--change", "0.1", "--json")


def _run(settings: Settings, *extra: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    run = _objstream("job", "rounds", *ROUNDS, *extra, env=_env(settings), timeout=120)
    assert run.returncode == 0, run.stderr
    *rows, summary = [json.loads(line) for line in run.stdout.strip().splitlines()]
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert all(row["ok"] and row["checksum_verified"] for row in rows)
    assert summary["ok"] is True
    assert summary["checksum_verified"] is True
    assert summary["rounds"] == 3
    assert set(summary["peak_rss_mib"]) == {"server", "site-1", "site-2"}
    return rows, summary


def test_later_rounds_move_only_what_changed(settings: Settings, declared: Declared) -> None:
    declared.sites.update({"server", "site-1", "site-2"})
    rows, summary = _run(settings)
    first = rows[0]
    size = first["model_bytes"]
    assert isinstance(size, int)
    assert size > 8_000_000
    # Round 1: the model down once (one broadcast to both clients), every update up. The server
    # may hold one client's update when the other's comes (all sites are one broker user here):
    # the tensors they share need not move again.
    assert first["down_published"] == size
    assert size <= first["up_published"] <= 2 * size
    for row in rows[1:]:
        # 4 of 40 tensors changed: about 10 % moves, the rest is copied from what each held.
        assert 0 < row["moved"] < 0.3 * first["moved"]
        assert row["moved"] < 0.15 * 3 * size  # of what a round moves without deltas
        assert row["reused"] > 0.85 * 3 * size
    assert summary["delta"] is True
    assert 0 < summary["later_of_round_1"] < 0.3


def test_full_moves_everything_every_round(settings: Settings, declared: Declared) -> None:
    declared.sites.update({"server", "site-1", "site-2"})
    rows, summary = _run(settings, "--full")
    for row in rows:
        assert row["moved"] == rows[0]["moved"] == 3 * row["model_bytes"]
        assert row["reused"] == 0
    assert summary["delta"] is False
    assert summary["later_of_round_1"] == 1.0


def test_text_lines_and_a_usage_error(settings: Settings, declared: Declared) -> None:
    declared.sites.update({"server", "site-1"})
    one = "--clients 1 --rounds 2 --size 1MiB --change 0.5 --tensors 8".split()
    run = _objstream("job", "rounds", *one, env=_env(settings))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["round 1/2", "round 2/2"]
    assert lines[1].endswith("checksum verified")
    assert lines[2].startswith("rounds (both, 1 clients, 2 rounds): model 1.0 MiB (8 tensors")
    small = _objstream("job", "rounds", "--size", "1KiB", env=_env(settings))
    assert small.returncode == 2
    assert small.stderr.startswith("objstream: error: --size 1024 is too small")
    assert len(small.stderr.strip().splitlines()) == 1
