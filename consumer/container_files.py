"""Saving received containers entry by entry: ``.npz``, ``.safetensors``, ``.json`` or a directory.

Used by ``objstream consumer listen`` (and ``retrieve-container``): each entry is written as it
arrives and then dropped, so memory stays flat for ``.npz`` and ``.safetensors``; JSON needs the
whole document and keeps the (small, non-array) entries until the end. Everything goes to a
partial file first and is committed like a received file: fsync, then a link to a free final name
(never overwriting). A container whose name ends with ``/`` is a directory of files (a sharded
checkpoint): see :mod:`objstream.consumer.container_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from objstream.common import dtypes
from objstream.common.naming import partial_name, safe_basename
from objstream.common.safetensors_format import METADATA_KEY
from objstream.consumer.container_assembler import ContainerEntry
from objstream.consumer.container_dir import ContainerDir
from objstream.consumer.file_sink import commit_partial
from objstream.consumer.safetensors_writer import SafetensorsWriter, SaveError, write_behind
from objstream.consumer.streams import Received

__all__ = ["ContainerFile", "ContainerFiles", "SaveError", "final_name", "npz_member"]

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
"""Containers named like a PyTorch file are saved as ``.safetensors`` (never pickled here)."""


def final_name(name: str) -> str:
    """The file name a container named ``name`` is saved under (``.npz`` unless it says;
    ``.safetensors`` for a ``.pt``/``.pth``/``.bin`` name)."""
    base = safe_basename(name)
    lower = base.lower()
    if lower.endswith(TORCH_SUFFIXES):
        return base.rpartition(".")[0] + ".safetensors"
    if not lower.endswith((".npz", ".safetensors", ".json")):
        base += ".npz"
    return base


class ContainerFile:
    """Writes one container's entries into ``DEST/<partial>``, then commits it."""

    def __init__(self, dest: Path, stream_id: str, name: str) -> None:
        self.dest = dest.resolve()
        self.name = final_name(name)
        # Not the stream's own partial name: a spooled stream (consumer.container_spool) holds it.
        self.path = self.dest / partial_name(f"{stream_id}-out")
        self.format = Path(self.name).suffix.lower()
        self._file: BinaryIO = write_behind(self.path)
        self._zip: zipfile.ZipFile | None = None
        self._json: Any = None
        self._tensors: SafetensorsWriter | None = None
        if self.format == ".npz":
            self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)
        elif self.format == ".safetensors":
            self._tensors = SafetensorsWriter(self.dest / partial_name(f"{stream_id}-data"))

    def add(self, entry: ContainerEntry) -> None:
        """Write one entry."""
        if self.format == ".json":
            self._add_json(entry)
            return
        if entry.container_type == "set":
            raise SaveError(f"a set cannot be saved as {self.format}; name it .json")
        key = str(entry.key) if entry.container_type == "dict" else f"arr_{entry.key}"
        if self._tensors is not None:
            self._tensors.add(key, entry.value)
            return
        if key == METADATA_KEY and isinstance(entry.value, dict):
            log.warning("%s: .npz has no place for safetensors __metadata__; dropped", self.name)
            return
        array = _as_array(entry.value, key, self.format)
        assert self._zip is not None
        with self._zip.open(npz_member(key), "w", force_zip64=True) as member:
            np.lib.format.write_array(member, array, allow_pickle=False)

    def _add_json(self, entry: ContainerEntry) -> None:
        value = _jsonable(entry.value, entry.key)
        if self._json is None:
            self._json = {} if entry.container_type == "dict" else []
        if isinstance(self._json, dict):
            self._json[str(entry.key)] = value
        else:
            self._json.append(value)

    def commit(self, container_type: str) -> Path:
        """Finish the file and give it its final name; returns the final path."""
        if self._zip is not None:
            self._zip.close()
        elif self._tensors is not None:
            self._tensors.finish(self._file)
        else:
            empty: Any = {} if container_type == "dict" else []
            self._file.write(json.dumps(self._json if self._json is not None else empty).encode())
        self._file.flush()
        raw = self._file.raw  # type: ignore[attr-defined]
        raw.behind.wait()
        fd = self._file.fileno()
        try:
            return commit_partial(fd, self.path, self.dest, self.name)
        finally:
            self._file.close()

    def discard(self) -> None:
        for handle in (self._zip, self._file):
            try:
                if handle is not None:
                    handle.close()
            except (OSError, ValueError):
                pass
        if self._tensors is not None:
            self._tensors.discard()
        self.path.unlink(missing_ok=True)


_SEPARATORS = re.compile(r"[/\\]")
_DRIVE = re.compile(r"[A-Za-z]:")


def npz_member(key: str) -> str:
    """The zip member an entry is stored as in a ``.npz``: numpy's ``KEY.npy``, so that
    ``np.load`` gives the same keys back (``encoder/layer0/w`` included).

    A peer chooses the key, and whoever unzips the file extracts each member as a path:
    ``../../etc/x`` or ``/etc/x`` would land outside (a zip slip). So a key must be a plain
    relative path: split at ``/`` and ``\\`` (a separator to Windows tools), no part empty,
    ``.`` or ``..``; no drive (``C:``) in front; no NUL (zipfile cuts a name there). Anything
    else is refused, not rewritten: a renamed key would no longer be the sender's.

    Raises:
        SaveError: the key is not such a path (``.safetensors`` and ``.json`` keep any key).
    """
    if not _plain_relative(key):
        raise SaveError(
            f"entry {key!r} cannot be saved as .npz: its member name would not be a plain "
            "relative path (no absolute path, '.', '..', empty part, drive or NUL); name the "
            "container .safetensors or .json to keep such keys"
        )
    return f"{key}.npy"


def _plain_relative(key: str) -> bool:
    parts = _SEPARATORS.split(key)
    if "\0" in key or _DRIVE.match(parts[0]) or any(p in {"", ".", ".."} for p in parts):
        return False
    try:
        key.encode("utf-8")  # what zipfile writes; a lone surrogate cannot be
    except UnicodeEncodeError:
        return False
    return True


def _as_array(value: Any, key: str, fmt: str) -> np.ndarray[Any, Any]:
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if array.dtype.hasobject:
        raise SaveError(
            f"entry {key!r} ({type(value).__name__}) cannot be saved as {fmt}; name it .json"
        )
    name = dtypes.ml_name(array.dtype)
    if name is not None:
        raise SaveError(
            f"entry {key!r}: {name} cannot be saved as {fmt} (numpy would read it back as raw "
            "bytes); name it .safetensors"
        )
    return array


def _jsonable(value: Any, key: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        raise SaveError(f"entry {key!r} is a numpy array; name the container .npz to save it")
    if isinstance(value, set | frozenset | tuple):
        return [_jsonable(v, key) for v in value]
    if isinstance(value, list):
        return [_jsonable(v, key) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, key) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise SaveError(f"entry {key!r}: a {type(value).__name__} cannot be saved as .json")


class ContainerFiles:
    """Writes received containers into ``dest``, entry by entry, one file per stream.

    Pass :meth:`on_entry` as the receiver's ``on_entry``; call :meth:`commit` with each received
    container (its file gets its final name) and :meth:`discard` with each failed stream id.
    Files are named after the container, or ``name`` when given.
    """

    def __init__(self, dest: Path, name: str | None = None) -> None:
        self.dest = dest
        self.name = name
        self.open: dict[str, ContainerFile | ContainerDir] = {}

    def _writer(self, stream_id: str, name: str) -> ContainerFile | ContainerDir:
        # A directory container (its name ends with "/") stays one, whatever name it is saved
        # under.
        if name.endswith("/"):
            return ContainerDir(self.dest, stream_id, self.name or name)
        return ContainerFile(self.dest, stream_id, self.name or name)

    def on_entry(self, entry: ContainerEntry) -> None:
        writer = self.open.get(entry.stream_id)
        if writer is None:
            writer = self.open[entry.stream_id] = self._writer(entry.stream_id, entry.name)
        writer.add(entry)

    def commit(self, item: Received) -> Received:
        """Finish the file of a received container; the result names its path."""
        writer = self.open.pop(item.stream_id, None) or self._writer(item.stream_id, item.name)
        try:
            path = writer.commit(item.container_type or "dict")
        except BaseException:
            writer.discard()
            raise
        return dataclasses.replace(item, path=path)

    def save(self, item: Received) -> Received:
        """A receiver's ``save``: commit containers, leave other objects as they are."""
        return self.commit(item) if item.kind == "container" else item

    def discard(self, stream_id: str) -> None:
        writer = self.open.pop(stream_id, None)
        if writer is not None:
            writer.discard()
