"""Writing a received ``.safetensors`` entry by entry, memory flat.

Tensors are appended to a spool file as they arrive (the header, which comes first in the file,
is only known at the end); :meth:`SafetensorsWriter.finish` writes the header, then copies the
spool after it. The header keeps the entries' order and the ``__metadata__`` entry, formatted as
the safetensors package formats it (:func:`objstream.common.safetensors_format.header_bytes`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from objstream.common import dtypes
from objstream.common.errors import ObjstreamError
from objstream.common.safetensors_format import (
    METADATA_KEY,
    WIRE_TO_ST,
    check_metadata,
    header_bytes,
)
from objstream.consumer.file_sink import ReadBehind, WriteBehindFile


class SaveError(ObjstreamError):
    """A received container cannot be saved in the chosen format."""


def write_behind(path: Path) -> BinaryIO:
    """A new file, buffered, that writes itself back and out of the page cache as it grows."""
    return io.BufferedWriter(WriteBehindFile(path, "xb"), buffer_size=1 << 20)


def safetensors_dtype(array: np.ndarray[Any, Any], key: str) -> tuple[str, np.ndarray[Any, Any]]:
    """The safetensors dtype name of ``array`` and the array in little-endian order.

    Raises:
        SaveError: a dtype safetensors has no name for (str, datetime, int4...).
    """
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    code = dtypes.wire_code(array.dtype)
    name = WIRE_TO_ST.get(code or "")
    if name is None:
        raise SaveError(f"entry {key!r}: dtype {array.dtype} has no safetensors equivalent")
    return name, array


class SafetensorsWriter:
    """Collects one ``.safetensors``: tensors spooled to ``spool``, the header kept in memory."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self._data: BinaryIO | None = write_behind(spool)
        self.metadata: dict[str, str] | None = None
        self._tensors: list[tuple[str, str, list[int], int]] = []

    def add(self, key: str, value: Any) -> None:
        """Add the entry ``key``: ``__metadata__`` (a dict of str) or an array.

        Raises:
            SaveError: anything else, or an array dtype safetensors cannot name.
        """
        if key == METADATA_KEY:
            try:
                self.metadata = check_metadata(value, f"entry {key!r}")
            except ObjstreamError as e:
                raise SaveError(str(e)) from None
            return
        if not isinstance(value, np.ndarray):
            raise SaveError(
                f"entry {key!r} ({type(value).__name__}) cannot be saved as .safetensors "
                "(arrays only); name it .json"
            )
        name, array = safetensors_dtype(value, key)
        assert self._data is not None
        contiguous = np.ascontiguousarray(array)
        if contiguous.nbytes:
            self._data.write(contiguous.reshape(-1).view(np.uint8).data)
        self._tensors.append((key, name, list(array.shape), contiguous.nbytes))

    def finish(self, out: BinaryIO) -> None:
        """Write the whole file to ``out`` (header, then the spooled tensors); drop the spool."""
        assert self._data is not None
        out.write(header_bytes(self.metadata, self._tensors))
        self._data.close()
        self._data = None
        with ReadBehind(self.spool) as data:
            while block := data.read(4 << 20):
                out.write(block)
        os.unlink(self.spool)

    def discard(self) -> None:
        """Close and remove the spool (never raises)."""
        try:
            if self._data is not None:
                self._data.close()
        except (OSError, ValueError):
            pass
        self._data = None
        self.spool.unlink(missing_ok=True)
