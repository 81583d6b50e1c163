"""The example jobs, and the very commands the docker compose workers run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from objstream.common.settings import Settings
from tests.integration.conftest import Declared
from tests.integration.test_cli import _env, _objstream

ROOT = Path(__file__).resolve().parents[2]


def test_file_streaming_job(settings: Settings, declared: Declared) -> None:
    declared.sites.update({"server", "site-1"})
    run = _objstream(
        "job", "file_streaming", "--size", "8MiB", "--chunk-size", "256KiB", env=_env(settings)
    )
    assert run.returncode == 0, run.stderr
    [line] = run.stdout.strip().splitlines()
    assert line.startswith("file_streaming (both): 8388608 bytes in ")
    assert "checksum verified; peak RSS producer" in line


def test_dict_streaming_job_json(settings: Settings, declared: Declared) -> None:
    declared.sites.update({"server", "site-1"})
    run = _objstream(
        "job",
        "dict_streaming",
        "--entries",
        "4",
        "--entry-size",
        "1MiB",
        "--json",
        env=_env(settings),
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["job"] == "dict_streaming"
    assert result["ok"] is True
    assert result["checksum_verified"] is True
    assert result["bytes"] == 4 * 1024 * 1024
    assert set(result["peak_rss_mib"]) == {"producer", "consumer"}


def test_a_job_fails_loudly_when_a_side_fails(settings: Settings, declared: Declared) -> None:
    """A consumer that never gets its file: exit non-zero, one error line, no traceback."""
    declared.sites.update({"site-1"})
    run = _objstream(
        "job", "file_streaming", "--role", "consumer", "--timeout", "1", env=_env(settings)
    )
    assert run.returncode != 0
    assert "no file arrived" in run.stderr
    assert "Traceback" not in run.stderr


def test_the_compose_workers_commands_run_end_to_end(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    declared.sites.update({"server", "site-1"})
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    env = _env(settings)
    consumer = subprocess.Popen(
        services["consumer"]["command"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    producer = subprocess.Popen(
        services["producer"]["command"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    p_out, p_err = producer.communicate(timeout=300)
    c_out, c_err = consumer.communicate(timeout=300)
    assert producer.returncode == 0, p_err
    assert consumer.returncode == 0, c_err
    for out, role in ((p_out, "producer"), (c_out, "consumer")):
        lines = out.strip().splitlines()
        assert lines[0].startswith(f"file_streaming ({role}): 104857600 bytes")
        assert lines[1].startswith(f"dict_streaming ({role}): 167772160 bytes")
    # --dest is the user's: what arrives there stays (only a job's own temp dir is removed).
    assert (tmp_path / "file_streaming-104857600.bin").stat().st_size == 104857600
