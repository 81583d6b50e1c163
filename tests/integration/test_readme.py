"""Every README code block marked ``<!-- runnable -->`` runs as written against the test broker:
the Python blocks in this process, the shell block (the tour) in bash, from an empty directory."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from objstream.common.settings import Settings
from tests.integration.conftest import Declared

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"<!-- runnable -->\s*```python\n(.*?)```", re.DOTALL)
SHELL_BLOCK = re.compile(r"<!-- runnable -->\s*```bash\n(.*?)```", re.DOTALL)


def _blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_the_readme_has_runnable_blocks() -> None:
    assert len(_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_block_runs(
    index: int,
    tmp_path: Path,
    settings: Settings,
    declared: Declared,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    declared.sites.update({"server", "site-1"})
    monkeypatch.setenv("OBJSTREAM_URL", settings.url)
    monkeypatch.setenv("OBJSTREAM_NAMESPACE", settings.namespace)
    monkeypatch.setenv("OBJSTREAM_STREAM_TTL", "120")
    monkeypatch.chdir(tmp_path)
    code = compile(_blocks()[index], f"README.md block {index}", "exec")
    exec(code, {"__name__": f"readme_block_{index}"})
    assert capsys.readouterr().out  # each block reports what it did


def test_the_readme_tour_runs_as_written_from_an_empty_directory(
    tmp_path: Path, settings: Settings, declared: Declared
) -> None:
    """The tour's shell block, in order, in bash -e (a failing command fails the test), with a
    namespace of its own and this interpreter's ``python`` and ``objstream`` first on PATH."""
    [tour] = SHELL_BLOCK.findall(README.read_text(encoding="utf-8"))
    declared.sites.update({"server", "site-1"})
    shims = tmp_path.parent / f"{tmp_path.name}-bin"  # `python` is this interpreter, as in a venv
    shims.mkdir()
    shim = shims / "python"  # a script, not a link: a venv's python finds its venv by its path
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    path = os.pathsep.join([str(shims), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {
        **os.environ,
        "PATH": path,
        "OBJSTREAM_URL": settings.url,
        "OBJSTREAM_NAMESPACE": settings.namespace,
        "OBJSTREAM_STREAM_TTL": "120",
        "OBJSTREAM_TIMEOUT": "60",
    }
    shell = subprocess.Popen(
        ["bash", "-e", "-u", "-o", "pipefail", "-c", tour], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = shell.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a listener or server left running
            os.killpg(shell.pid, signal.SIGKILL)
    assert shell.returncode == 0, f"{out}\n{err}"
    assert "Traceback" not in err
    assert (tmp_path / "in" / "big.bin").read_bytes() == (
        tmp_path / "data" / "big.bin"
    ).read_bytes()
    assert (tmp_path / "retrieved" / "big.bin").stat().st_size == 64 * 1024 * 1024
    assert (tmp_path / "in" / "model.npz").is_file()
    assert (tmp_path / "retrieved" / "model.npz").is_file()
    assert out.count("checksum verified") == 2  # the two jobs
