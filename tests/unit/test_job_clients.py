"""``objstream job ... --clients N``: the clients' names and the result line, no broker."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from objstream.common.cli import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, build_parser
from objstream.jobs.clients import client_sites, report_clients


def test_client_sites() -> None:
    assert client_sites(None, 1) == ["site-1"]
    assert client_sites("here", 1) == ["here"]
    assert client_sites(None, 3) == ["site-1", "site-2", "site-3"]
    assert client_sites("c", 2) == ["c-1", "c-2"]


def args(role: str = "both", *, json_out: bool = False) -> argparse.Namespace:
    return argparse.Namespace(role=role, json=json_out)


OK = {"ok": True, "bytes": 100, "seconds": 1.0, "peak_rss_mib": 50.0}


def test_one_line_with_every_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    results: dict[str, dict[str, Any]] = {
        "site-1": OK,
        "site-2": {"ok": False, "error": "no file arrived in 2 s", "peak_rss_mib": 40.0},
        "producer": {"ok": True, "seconds": 2.0, "peak_rss_mib": 60.0},
    }
    code = report_clients(args(), "file_streaming", ["site-1", "site-2"], results)
    out, err = capsys.readouterr()
    assert code == EXIT_FAILED
    [line] = out.splitlines()
    assert line.startswith("file_streaming (both, 2 clients): 100 bytes each in 2.00 s")
    assert "1 of 2 verified; failed: site-2 (no file arrived in 2 s)" in line
    assert err == "objstream: error: file_streaming site-2: no file arrived in 2 s\n"


def test_json_has_every_clients_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    results = {"site-1": OK, "site-2": OK, "producer": {"ok": True, "peak_rss_mib": 60.0}}
    code = report_clients(args(json_out=True), "dict_streaming", ["site-1", "site-2"], results)
    summary = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK
    assert summary["ok"] is True
    assert summary["clients"] == 2
    assert set(summary["outcomes"]) == {"site-1", "site-2"}
    assert summary["outcomes"]["site-1"] == {"ok": True, "bytes": 100, "seconds": 1.0}
    assert summary["aggregate_mib_per_s"] == round(200 / 2**20 / 1.0, 1)


def test_the_producer_alone_reports_its_targets(capsys: pytest.CaptureFixture[str]) -> None:
    """``--role producer``: the sender's per-target verdicts are the clients' outcomes."""
    producer = {
        "ok": False, "seconds": 3.0, "error": "2 targets failed", "error_type": "TimedOut",
        "targets": {"site-1": {"ok": True, "bytes": 100},
                    "site-2": {"ok": False, "bytes": 100, "error": "timed out"}},
    }  # fmt: skip
    code = report_clients(args("producer"), "file_streaming", ["site-1", "site-2"],
                          {"producer": producer})  # fmt: skip
    line = capsys.readouterr().out.strip()
    assert code == EXIT_TIMEOUT
    assert "1 of 2 verified; failed: site-2 (timed out)" in line


def test_clients_option_is_positive() -> None:
    parser = build_parser()
    parsed = parser.parse_args(["job", "dict_streaming", "--clients", "4"])
    assert parsed.clients == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["job", "file_streaming", "--clients", "0"])


def test_demo_runs_one_client() -> None:
    """``job demo`` runs both jobs' handlers, which read ``clients``: it has one."""
    assert build_parser().parse_args(["job", "demo"]).clients == 1
