"""Saving received containers entry by entry: ``.npz``, ``.safetensors`` or ``.json``.

Used by ``objstream consumer listen`` (and ``retrieve-container``): each entry is written as it
arrives and then dropped, so memory stays flat for ``.npz`` and ``.safetensors``; JSON needs the
whole document and keeps the (small, non-array) entries until the end. Everything goes to a
partial file first and is committed like a received file: fsync, then a link to a free final name
(never overwriting).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from objstream.common.errors import ObjstreamError
from objstream.common.naming import partial_name, safe_basename
from objstream.consumer.container_assembler import ContainerEntry
from objstream.consumer.file_sink import ReadBehind, WriteBehindFile, commit_partial
from objstream.consumer.streams import Received

# numpy dtype -> safetensors dtype name (little-endian data only)
SAFETENSORS_DTYPES = {
    "b1": "BOOL", "u1": "U8", "i1": "I8", "u2": "U16", "i2": "I16", "f2": "F16", "u4": "U32",
    "i4": "I32", "f4": "F32", "u8": "U64", "i8": "I64", "f8": "F64",
}  # fmt: skip


class SaveError(ObjstreamError):
    """A received container cannot be saved in the chosen format."""


def final_name(name: str) -> str:
    """The file name a container named ``name`` is saved under (``.npz`` unless it says)."""
    base = safe_basename(name)
    if not base.lower().endswith((".npz", ".safetensors", ".json")):
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
        self._file: BinaryIO = _write_behind(self.path)
        self._zip: zipfile.ZipFile | None = None
        self._json: Any = None
        self._tensors: list[tuple[str, str, list[int], int, int]] = []
        self._data_path = self.dest / partial_name(f"{stream_id}-data")
        self._data: BinaryIO | None = None
        if self.format == ".npz":
            self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)
        elif self.format == ".safetensors":
            self._data = _write_behind(self._data_path)

    def add(self, entry: ContainerEntry) -> None:
        """Write one entry."""
        if self.format == ".json":
            self._add_json(entry)
            return
        if entry.container_type == "set":
            raise SaveError(f"a set cannot be saved as {self.format}; name it .json")
        key = str(entry.key) if entry.container_type == "dict" else f"arr_{entry.key}"
        array = _as_array(entry.value, key, self.format)
        if self._zip is not None:
            with self._zip.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
        else:
            self._add_tensor(key, array)

    def _add_json(self, entry: ContainerEntry) -> None:
        value = _jsonable(entry.value, entry.key)
        if self._json is None:
            self._json = {} if entry.container_type == "dict" else []
        if isinstance(self._json, dict):
            self._json[str(entry.key)] = value
        else:
            self._json.append(value)

    def _add_tensor(self, key: str, array: np.ndarray[Any, Any]) -> None:
        code = SAFETENSORS_DTYPES.get(array.dtype.str[1:])
        if code is None:
            raise SaveError(f"entry {key!r}: dtype {array.dtype} has no safetensors equivalent")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        assert self._data is not None
        start = self._data.tell()
        self._data.write(np.ascontiguousarray(array).data)
        self._tensors.append((key, code, list(array.shape), start, self._data.tell()))

    def commit(self, container_type: str) -> Path:
        """Finish the file and give it its final name; returns the final path."""
        if self._zip is not None:
            self._zip.close()
        elif self.format == ".json":
            empty: Any = {} if container_type == "dict" else []
            self._file.write(json.dumps(self._json if self._json is not None else empty).encode())
        else:
            self._write_safetensors()
        self._file.flush()
        raw = self._file.raw  # type: ignore[attr-defined]
        raw.behind.wait()
        fd = self._file.fileno()
        try:
            return commit_partial(fd, self.path, self.dest, self.name)
        finally:
            self._file.close()

    def _write_safetensors(self) -> None:
        assert self._data is not None
        header = {
            key: {"dtype": code, "shape": shape, "data_offsets": [start, end]}
            for key, code, shape, start, end in self._tensors
        }
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the spec pads the header to 8 bytes
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._data.close()
        with ReadBehind(self._data_path) as data:
            while block := data.read(4 << 20):
                self._file.write(block)
        os.unlink(self._data_path)
        self._data = None

    def discard(self) -> None:
        for handle in (self._zip, self._data, self._file):
            try:
                if handle is not None:
                    handle.close()
            except (OSError, ValueError):
                pass
        for path in (self.path, self._data_path):
            path.unlink(missing_ok=True)


def _write_behind(path: Path) -> BinaryIO:
    """A new file, buffered, that writes itself back and out of the page cache as it grows."""
    return io.BufferedWriter(WriteBehindFile(path, "xb"), buffer_size=1 << 20)


def _as_array(value: Any, key: str, fmt: str) -> np.ndarray[Any, Any]:
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if array.dtype.hasobject:
        raise SaveError(
            f"entry {key!r} ({type(value).__name__}) cannot be saved as {fmt}; name it .json"
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
        self.open: dict[str, ContainerFile] = {}

    def on_entry(self, entry: ContainerEntry) -> None:
        writer = self.open.get(entry.stream_id)
        if writer is None:
            writer = self.open[entry.stream_id] = ContainerFile(
                self.dest, entry.stream_id, self.name or entry.name
            )
        writer.add(entry)

    def commit(self, item: Received) -> Received:
        """Finish the file of a received container; the result names its path."""
        writer = self.open.pop(item.stream_id, None) or ContainerFile(
            self.dest, item.stream_id, self.name or item.name
        )
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
