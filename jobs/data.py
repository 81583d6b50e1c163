"""Deterministic test data: both sides derive the same bytes from a seed, so the consumer can
verify without the producer sending anything but the stream itself."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

BLOCK = 4 * 1024 * 1024


def write_random_file(path: Path, size: int, seed: int) -> str:
    """Write ``size`` pseudo-random bytes (from ``seed``) to ``path``; returns their SHA-256."""
    rng = np.random.default_rng(seed)
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = rng.bytes(min(BLOCK, left))
            f.write(block)
            sha.update(block)
            left -= len(block)
    return sha.hexdigest()


def layer(index: int, entry_size: int, seed: int) -> np.ndarray:
    """Entry ``layer-{index}`` of the demo model: float32 values, ``entry_size`` bytes."""
    rng = np.random.default_rng([seed, index])
    return rng.standard_normal(entry_size // 4, dtype=np.float32)


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            sha.update(block)
    return sha.hexdigest()
