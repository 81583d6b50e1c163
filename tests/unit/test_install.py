"""objstream installs under one name: nothing generic (``common``, ``jobs``...) in site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOT_COPIED = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", ".venv"
)
"""What a build or a test run leaves in a checkout: no part of the package."""


@pytest.fixture(scope="module")
def checkout_before() -> set[str]:
    """The checkout's top-level entries before the install below."""
    return {p.name for p in REPO.iterdir()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, checkout_before: set[str]) -> Path:
    """A fresh venv with a non-editable install of this checkout, as users install it.

    Installed from a copy: pip builds in the source tree, and setuptools leaves ``build/`` and
    ``objstream.egg-info`` there.
    """
    source = tmp_path_factory.mktemp("source") / "objstream"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_COPIED)
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         str(source)],
        check=True, cwd=env_dir,
    )  # fmt: skip
    return env_dir


def test_installing_leaves_nothing_in_the_checkout(
    installed: Path, checkout_before: set[str]
) -> None:
    assert {p.name for p in REPO.iterdir()} - checkout_before == set()


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
