"""What a container sink and the outputs it writes into say to each other: where an entry's
payload bytes go (:class:`Destination`), the :class:`Output` protocol every format follows, and
where a finished file's arrays are (:class:`StoredArray`, for memory maps)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from objstream.common.decoding import Described


@dataclass
class Crc:
    """A running CRC-32 (a ``.npz`` member's)."""

    value: int = 0


@dataclass(frozen=True)
class Destination:
    """Where one payload buffer of an entry goes: ``size`` bytes at ``offset`` of ``fd``.

    ``swap``: the (big-endian) dtype of an array whose bytes are byte-swapped on the way into
    a little-endian format, None for none. ``crc``: a CRC-32 the bytes feed.
    """

    fd: int
    offset: int
    size: int
    swap: np.dtype[Any] | None = None
    crc: Crc | None = None


@dataclass(frozen=True)
class StoredArray:
    """An array of a finished file, where a memory map finds it."""

    name: str
    offset: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    fortran: bool = False


class Output(Protocol):
    """One format a container can be saved as."""

    def begin(
        self, index: int, described: Described, header: int | None = None
    ) -> list[Destination]:
        """Entry ``index`` is described (its structure arrived): check that it fits the format
        and lay it out; one destination per payload buffer, in order. ``header``: the length
        of the ``.safetensors`` header this entry's first chunk announced (the first entry of
        a file), if it did.

        Raises:
            SaveError: the format cannot hold it.
        """

    def end(self, index: int) -> None:
        """Every payload byte of entry ``index`` is written."""

    def finish(self) -> Path:
        """Write what only the end knows, sync, give it its final name; return that path."""

    def close(self) -> None:
        """Close the files, keeping them (a successor takes the stream over)."""

    def discard(self) -> None:
        """Close and remove everything written."""


def open_output(path: Path) -> int:
    """The file, created if new (also when a stream is taken over: it may not exist yet)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
