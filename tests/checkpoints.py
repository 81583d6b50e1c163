"""Checkpoints made at test time: every safetensors dtype, written by the safetensors package or
(for the float8 types) with a header built by hand, independently of objstream's own writer."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

PACKAGE_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16,
    "F32": np.float32, "F64": np.float64, "C64": np.complex64, "BF16": ml_dtypes.bfloat16,
}  # fmt: skip
"""What the safetensors package writes from numpy / ml_dtypes arrays."""
HAND_DTYPES: dict[str, Any] = {
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu, "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
    "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
}  # fmt: skip
"""The float8 types, written with a hand-built header."""
METADATA = {"format": "pt", "note": "made at test time, ünïcode"}


def random_array(dtype: Any, shape: tuple[int, ...], seed: int) -> np.ndarray[Any, Any]:
    """Random bits of ``dtype`` (NaNs and all: comparisons are bitwise); bools are 0 or 1."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    raw = rng.integers(0, 256, int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    out: np.ndarray[Any, Any] = raw.view(dt).reshape(shape)
    return out


def every_dtype(shape: tuple[int, ...] = (3, 5)) -> dict[str, np.ndarray[Any, Any]]:
    """One array per safetensors dtype, keyed ``t_<DTYPE>``."""
    kinds = {**PACKAGE_DTYPES, **HAND_DTYPES}
    return {
        f"t_{name}": random_array(kind, shape, i) for i, (name, kind) in enumerate(kinds.items())
    }


def same_bits(a: Any, b: Any) -> bool:
    """Same dtype, shape and bytes."""
    return (
        isinstance(a, np.ndarray)
        and isinstance(b, np.ndarray)
        and a.dtype == b.dtype
        and a.shape == b.shape
        and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    )


def write_by_hand(
    path: Path, tensors: dict[str, tuple[str, np.ndarray[Any, Any]]], metadata: dict[str, str]
) -> None:
    """A safetensors file from (safetensors dtype, array) pairs, header built here."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (kind, array) in tensors.items():
        size = array.nbytes
        header[name] = {
            "dtype": kind,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def write_every_dtype(directory: Path) -> tuple[Path, Path, dict[str, np.ndarray[Any, Any]]]:
    """Two files in ``directory``: the package's (``package.safetensors``) and the hand-built
    float8 one (``float8.safetensors``), both with :data:`METADATA`; and all arrays by key."""
    arrays = every_dtype()
    package = {k: v for k, v in arrays.items() if k[2:] in PACKAGE_DTYPES}
    hand = {k: (k[2:], v) for k, v in arrays.items() if k[2:] in HAND_DTYPES}
    first, second = directory / "package.safetensors", directory / "float8.safetensors"
    save_file(package, str(first), metadata=METADATA)
    write_by_hand(second, hand, METADATA)
    return first, second, arrays


def write_sharded(directory: Path, shards: int = 3) -> Path:
    """A sharded checkpoint as Hugging Face writes one: ``model-0000i-of-0000n.safetensors``,
    ``model.safetensors.index.json`` (indent 2, sorted keys) and a ``config.json``."""
    directory.mkdir()
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"layers.{i}.w": random_array(ml_dtypes.bfloat16, (64, 48), 10 + i),
            f"layers.{i}.b": random_array(np.float32, (48,), 20 + i),
        }
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        for key, value in tensors.items():
            weight_map[key] = name
            total += value.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n"
    )
    (directory / "config.json").write_text('{"model_type": "test"}\n')
    return directory
