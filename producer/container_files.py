"""Loading a container from a file for ``objstream producer send-container``.

``.npz`` (a dict of arrays, loaded with ``allow_pickle=False``, one array at a time),
``.safetensors`` (a dict of tensors, read with the safetensors package's numpy API, tensor by
tensor) and ``.json`` (a dict or a list).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from objstream.common.errors import ObjstreamError

SUFFIXES = (".npz", ".safetensors", ".json")


def load_container(path: Path) -> dict[str, Any] | list[Any]:
    """Read the container stored at ``path``; its format is told by the suffix.

    Raises:
        ObjstreamError: unknown suffix or unreadable content.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as tensors:
                return {key: tensors.get_tensor(key) for key in tensors.keys()}
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
    raise ObjstreamError(f"{path}: unknown container format (use {', '.join(SUFFIXES)})")
