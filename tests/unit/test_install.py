"""objstream installs under one name: nothing generic (``common``, ``jobs``...) in site-packages."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with a non-editable install of this checkout, as users install it."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         str(REPO)],
        check=True, cwd=env_dir,
    )  # fmt: skip
    return env_dir


def _run(env_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Run outside the checkout, so only the installed package can be found.
    return subprocess.run(
        [*args], cwd=env_dir, capture_output=True, text=True, check=False, env={"PATH": ""}
    )


def test_only_objstream_is_installed(installed: Path) -> None:
    python = str(installed / "bin" / "python")
    for generic in ("common", "producer", "consumer", "jobs"):
        result = _run(installed, python, "-c", f"import {generic}")
        assert result.returncode != 0
        assert f"ModuleNotFoundError: No module named '{generic}'" in result.stderr


def test_the_installed_package_works(installed: Path) -> None:
    python = str(installed / "bin" / "python")
    version = _run(installed, str(installed / "bin" / "objstream"), "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("objstream ")
    api = _run(
        installed,
        python,
        "-c",
        "from objstream.producer import FileStreamer, ContainerStreamer, RetrievalServer\n"
        "from objstream.consumer import Receiver, Retriever\n"
        "import objstream.producer.sender as s; print(s.__file__)",
    )
    assert api.returncode == 0, api.stderr
    assert str(REPO) not in api.stdout  # the installed copy, not the checkout
