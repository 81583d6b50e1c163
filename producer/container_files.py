"""Loading a container from a file or directory for ``objstream producer send-container``.

- ``.npz``: a dict of arrays, loaded with ``allow_pickle=False``, one array at a time.
- ``.safetensors``: read by its JSON header; each tensor is a range of the file, read chunk by
  chunk as it is sent (memory stays flat for multi-GiB files; any dtype safetensors names,
  bfloat16 and float8 included); its ``__metadata__`` travels as the first entry.
- a directory (a sharded checkpoint such as ``model-00001-of-00002.safetensors`` ... with its
  ``model.safetensors.index.json``, and subdirectories such as a ``tokenizer/``): see
  :func:`load_directory`.
- ``.pt`` / ``.bin``: a PyTorch state dict, only through ``torch.load(weights_only=True)``
  (needs ``objstream[torch]``); anything that needs full unpickling is refused.
- ``.json``: a dict or a list.
"""

from __future__ import annotations

import errno
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from objstream.common import safetensors_format
from objstream.common.codec import FileRange
from objstream.common.errors import ObjstreamError
from objstream.common.safetensors_format import SAFETENSORS_SUFFIX

SUFFIXES = (".npz", ".safetensors", ".json", ".pt", ".bin")
DIRECTORY_MARK = "/"
"""A container whose name ends with this is a directory of files (see :func:`load_directory`)."""
MAX_DEPTH = 16
"""Deepest subdirectory of a directory container (as the receiver allows)."""


class DirectoryContainer(dict[str, Any]):
    """A directory's files as a dict (:func:`load_directory`): sent or served under any name,
    it is offered as a directory, and a receiver saves it as one."""


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
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            return _load_npz(path)
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


def compressed_size(path: Path) -> tuple[int, int] | None:
    """For a compressed ``.npz`` (``np.savez_compressed``): its size in the file and its
    arrays' size once inflated, which is what a container carries; ``None`` otherwise."""
    if path.suffix.lower() != ".npz" or not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
    if all(m.compress_type == zipfile.ZIP_STORED for m in members):
        return None
    return path.stat().st_size, sum(m.file_size for m in members)


def _load_npz(path: Path) -> dict[str, Any]:
    """A ``.npz``'s arrays, never unpickled; what numpy says of a file that is not one (use
    ``allow_pickle``...) is put in our words."""
    if not zipfile.is_zipfile(path):
        raise ObjstreamError(f"cannot read {path} as .npz: it is not a zip archive of arrays")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ValueError as e:
        if "pickle" not in str(e):
            raise
        raise ObjstreamError(
            f"cannot read {path} as .npz: it holds pickled objects (object arrays), which "
            "objstream never loads"
        ) from None
    except zipfile.BadZipFile as e:
        raise ObjstreamError(f"cannot read {path} as .npz: a damaged zip archive ({e})") from None


def load_directory(path: Path) -> DirectoryContainer:
    """A directory's regular files, subdirectories included, as one flat dict, streamed from
    disk when sent.

    Each file is named by its path in the directory, ``/``-separated (``config.json``,
    ``tokenizer/vocab.txt``). A ``.safetensors`` file ``F`` gives the entries
    ``"F/__metadata__"`` (if it has one) and ``"F/<tensor>"``; every other file (the
    ``model.safetensors.index.json``, ``config.json``...) one entry ``"F"`` of its raw bytes
    (see :func:`~objstream.common.safetensors_format.split_directory_key`). Files come in path
    order. Hidden files and directories are left out; a link to a file is read as that file, a
    link to a directory is not followed.

    Raises:
        ObjstreamError: no file; a non-safetensors file above :data:`MAX_SIDE_FILE`; a tree
            deeper than :data:`MAX_DEPTH`; a file under a directory named ``*.safetensors``
            (it would read as a tensor).
    """
    container = DirectoryContainer()
    files = list(_files_under(path))
    if not files:
        raise ObjstreamError(f"{path}: no file to send in this directory")
    for relative in files:
        file = path.joinpath(*relative.split("/"))
        if file.suffix.lower() == SAFETENSORS_SUFFIX:
            for key, value in safetensors_format.load(file).items():
                container[f"{relative}/{key}"] = value
            continue
        size = file.stat().st_size
        if size > MAX_SIDE_FILE:
            raise ObjstreamError(
                f"{file}: {size} bytes; a directory's non-safetensors files are limited to "
                f"{MAX_SIDE_FILE} (send it with send-file)"
            )
        container[relative] = FileRange(str(file), 0, size)
    return container


def _files_under(root: Path) -> list[str]:
    """The paths (``/``-separated, relative to ``root``) of the regular files under ``root``,
    sorted; hidden names left out, links to directories not followed."""
    found: list[str] = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder).relative_to(root).parts
        if len(here) > MAX_DEPTH:
            raise ObjstreamError(f"{folder}: deeper than {MAX_DEPTH} directories")
        if any(part.lower().endswith(SAFETENSORS_SUFFIX) for part in here):
            if names:
                raise ObjstreamError(
                    f"{folder}: a directory named like a .safetensors file cannot be sent in a "
                    "directory container (its files would read as tensors)"
                )
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if not name.startswith(".") and (Path(folder) / name).is_file():
                found.append("/".join((*here, name)))
    return sorted(found)


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
