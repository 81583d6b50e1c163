"""Fixtures and helpers shared by every test."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from objstream.common.errors import TransferFailed
from objstream.consumer import Received
from objstream.consumer.held import INDEX_NAME
from objstream.jobs.data import write_random_file

BROKER_FOLDERS = frozenset({"integration", "adversarial"})
"""Test folders whose tests talk to a real RabbitMQ: each of their tests is marked
``integration`` (``-m "not integration"`` runs what needs no broker)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if BROKER_FOLDERS & set(item.path.parts):
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


def final_files(dest: Path) -> list[Path]:
    """What is in ``dest`` under a final name (partial and state files, and the index of what
    it holds for delta transfers, left out)."""
    return sorted(p for p in dest.iterdir() if not p.name.startswith(".objstream"))


def stored_names(dest: Path) -> list[str]:
    """The names in ``dest``, sorted, but the index of what it holds (delta transfers), which
    a receiver keeps next to what it stored."""
    return sorted(p.name for p in dest.iterdir() if p.name != INDEX_NAME)


def kept_bytes(dest: Path) -> dict[str, bytes]:
    """Partial files kept in ``dest`` (by name), with their content; each has a state file."""
    kept = {p.name: p.read_bytes() for p in dest.glob(".objstream-*.part")}
    for name in kept:
        assert (dest / name.replace(".part", ".state")).is_file(), f"{name} has no state"
    return kept


def as_received(outcome: Received | TransferFailed) -> Received:
    """``outcome`` as an object that arrived; fails the test, showing the failure, otherwise."""
    assert isinstance(outcome, Received), outcome
    return outcome


def stored_path(outcome: Received | TransferFailed) -> Path:
    """Where the file ``outcome`` reports was stored; fails the test if it is not a stored file."""
    path = as_received(outcome).path
    assert path is not None, outcome
    return path
