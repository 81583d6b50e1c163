"""``objstream job file_streaming|dict_streaming --clients N``: N client sites at once."""

from __future__ import annotations

import json

from objstream.common.settings import Settings
from tests.integration.conftest import Declared
from tests.integration.test_cli import _env, _objstream


def test_file_streaming_to_three_clients(settings: Settings, declared: Declared) -> None:
    declared.sites.update({"server", "site-1", "site-2", "site-3"})
    run = _objstream(
        "job", "file_streaming", "--clients", "3", "--size", "4MiB", "--chunk-size", "256KiB",
        "--timeout", "60", env=_env(settings),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    [line] = run.stdout.strip().splitlines()
    assert line.startswith("file_streaming (both, 3 clients): 4194304 bytes each in ")
    assert "3 of 3 verified" in line


def test_dict_streaming_three_clients_at_once_json(settings: Settings, declared: Declared) -> None:
    declared.sites.update({"server", "c-1", "c-2", "c-3"})
    run = _objstream(
        "job", "dict_streaming", "--clients", "3", "--consumer-site", "c", "--entries", "3",
        "--entry-size", "512KiB", "--timeout", "60", "--json", env=_env(settings),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["ok"] is True
    assert summary["clients"] == 3
    assert {site: o["ok"] for site, o in summary["outcomes"].items()} == {
        "c-1": True, "c-2": True, "c-3": True,
    }  # fmt: skip
    assert all(o["entries"] == 3 for o in summary["outcomes"].values())
