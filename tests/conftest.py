"""Fixtures and helpers shared by every test."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


def random_file(path: Path, size: int, block: int = 4 * 1024 * 1024) -> str:
    """Write ``size`` random bytes to ``path`` (block by block); returns their SHA-256."""
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            data = os.urandom(min(block, left))
            f.write(data)
            sha.update(data)
            left -= len(data)
    return sha.hexdigest()


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            sha.update(block)
    return sha.hexdigest()
