"""Loading a container from a file or directory for ``objstream producer send-container``.

- ``.npz``: a dict of arrays, loaded with ``allow_pickle=False``, one array at a time.
- ``.safetensors``: read by its JSON header; each tensor is a range of the file, read chunk by
  chunk as it is sent (memory stays flat for multi-GiB files; any dtype safetensors names,
  bfloat16 and float8 included); its ``__metadata__`` travels as the first entry.
- a directory (a sharded checkpoint such as ``model-00001-of-00002.safetensors`` ... with its
  ``model.safetensors.index.json``): see :func:`load_directory`.
- ``.pt`` / ``.bin``: a PyTorch state dict, only through ``torch.load(weights_only=True)``
  (needs ``objstream[torch]``); anything that needs full unpickling is refused.
- ``.json``: a dict or a list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from objstream.common import safetensors_format
from objstream.common.codec import FileRange
from objstream.common.errors import ObjstreamError

SUFFIXES = (".npz", ".safetensors", ".json", ".pt", ".bin")
DIRECTORY_MARK = "/"
"""A container whose name ends with this is a directory of files (see :func:`load_directory`)."""
MAX_SIDE_FILE = 256 * 1024 * 1024
"""Largest non-safetensors file of a directory container (it is received in memory)."""


def container_name(path: Path) -> str:
    """The name a container loaded from ``path`` is sent under (a directory's ends with ``/``)."""
    return path.name + DIRECTORY_MARK if path.is_dir() else path.name


def load_container(path: Path) -> dict[str, Any] | list[Any]:
    """Read the container stored at ``path``; its format is told by the suffix.

    Raises:
        ObjstreamError: unknown suffix or unreadable content.
    """
    if path.is_dir():
        return load_directory(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        if suffix == ".safetensors":
            return safetensors_format.load(path)
        if suffix in (".pt", ".bin"):
            return load_state_dict(path)
        if suffix == ".json":
            with open(path, encoding="utf-8") as f:
                value = json.load(f)
            if not isinstance(value, dict | list):
                raise ObjstreamError(f"{path}: a JSON container must be an object or an array")
            return value
    except (ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ObjstreamError(f"cannot read {path} as {suffix}: {e}") from e
    raise ObjstreamError(
        f"{path}: unknown container format (use {', '.join(SUFFIXES)} or a directory)"
    )


def load_directory(path: Path) -> dict[str, Any]:
    """A directory's regular files as one flat dict, streamed from disk when sent.

    Each ``.safetensors`` file ``F`` gives the entries ``"F/__metadata__"`` (if it has one) and
    ``"F/<tensor>"`` (split at the first ``/``: file names hold none); every other file (the
    ``model.safetensors.index.json``, ``config.json``...) one entry ``"F"`` of its raw bytes.
    Files come in name order; hidden files and subdirectories are left out.

    Raises:
        ObjstreamError: no file, or a non-safetensors file above :data:`MAX_SIDE_FILE`.
    """
    container: dict[str, Any] = {}
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ObjstreamError(f"{path}: no file to send in this directory")
    for file in files:
        if file.suffix.lower() == ".safetensors":
            for key, value in safetensors_format.load(file).items():
                container[f"{file.name}/{key}"] = value
            continue
        size = file.stat().st_size
        if size > MAX_SIDE_FILE:
            raise ObjstreamError(
                f"{file}: {size} bytes; a directory's non-safetensors files are limited to "
                f"{MAX_SIDE_FILE} (send it with send-file)"
            )
        container[file.name] = FileRange(str(file), 0, size)
    return container


def load_state_dict(path: Path) -> dict[str, Any]:
    """A PyTorch state dict, through ``torch.load(weights_only=True)`` only (no full unpickling).

    Raises:
        ObjstreamError: torch is missing, the file needs full unpickling, or it is not a flat
            dict of str to tensors.
    """
    from objstream.common.torch_bridge import torch_module

    torch = torch_module()
    try:
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError... on what it refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ObjstreamError(
            f"{path}: refused: torch.load(weights_only=True) cannot load it ({first}); "
            "objstream never unpickles arbitrary objects"
        ) from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ObjstreamError(f"{path}: not a state dict (a dict of str to tensors)")
    return dict(value)
