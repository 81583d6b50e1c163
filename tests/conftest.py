"""Fixtures and helpers shared by every test."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from jobs.data import write_random_file


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` (block by block); returns their SHA-256."""
    return write_random_file(path, size, seed=int.from_bytes(os.urandom(8), "little"))


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            sha.update(block)
    return sha.hexdigest()
