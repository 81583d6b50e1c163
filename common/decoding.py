"""Decoding what a peer sent: an entry's structure, and the buffers its payload fills.

Two-step, so big payloads are never copied twice: :func:`decode_structure` parses the msgpack
structure and preallocates every array and bytes buffer it announces, returning
:class:`Decoded` with the writable regions to fill; once they are filled,
:meth:`Decoded.value` gives the value. :func:`describe_structure` parses the same structure
without allocating anything: it says what the payload holds (:class:`ArraySpec`,
:class:`BytesSpec`), for a receiver that puts the payload straight into a file.

Never pickle, never a class named by the peer (see :mod:`objstream.common.codec`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import numpy as np

from objstream.common import dtypes
from objstream.common.codec import (
    EXT_ARRAY,
    EXT_BIGINT,
    EXT_BYTEARRAY,
    EXT_BYTES,
    EXT_COMPLEX,
    EXT_FROZENSET,
    EXT_NP_SCALAR,
    EXT_SET,
    EXT_TUPLE,
    MAX_DIMS,
)
from objstream.common.errors import ProtocolError


class _BytesBox:
    """Stands for a bytes value while its bytes arrive (bytes objects are immutable)."""

    __slots__ = ("buffer",)

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)


@dataclass
class Decoded:
    """A parsed structure whose buffers wait to be filled."""

    raw: Any
    regions: list[memoryview]
    """Writable byte regions, in the order their bytes follow the structure."""
    patches: list[tuple[Any, Any, _BytesBox]]

    @property
    def payload_size(self) -> int:
        return sum(r.nbytes for r in self.regions)

    def value(self) -> Any:
        """The value, once every region is filled (bytes values are made bytes here)."""
        for parent, key, box in self.patches:
            parent[key] = bytes(box.buffer)
        self.patches.clear()
        if isinstance(self.raw, _BytesBox):
            self.raw = bytes(self.raw.buffer)
        return self.raw


def decode_structure(structure: bytes, *, max_payload: int) -> Decoded:
    """Parse ``structure`` from a peer and preallocate its buffers (at most ``max_payload`` bytes).

    Raises:
        ProtocolError: malformed structure, an unsupported dtype, a bad shape, a buffer index out
            of order, or announced buffers larger than ``max_payload``.
    """
    decoder = _Decoder(max_payload)
    try:
        value = _unpack(decoder, structure)
    finally:
        # Hand the buffers over and empty the decoder: on an error, a traceback kept by the
        # caller still refers to it, and must not keep the preallocated buffers alive.
        regions, patches = decoder.take()
    return Decoded(value, regions, patches)


class _Decoder:
    """The msgpack hooks of one :func:`decode_structure` call, and the buffers they allocate."""

    def __init__(self, max_payload: int) -> None:
        self.regions: list[memoryview] = []
        self.patches: list[tuple[Any, Any, _BytesBox]] = []
        self.budget = max_payload

    def take(self) -> tuple[list[memoryview], list[tuple[Any, Any, _BytesBox]]]:
        """The regions and patches so far; the decoder keeps none of them."""
        regions, patches = list(self.regions), list(self.patches)
        self.regions.clear()
        self.patches.clear()
        return regions, patches

    def unpack(self, data: bytes) -> Any:
        return msgpack.unpackb(
            data,
            ext_hook=self.ext_hook,
            list_hook=self.list_hook,
            object_hook=self.object_hook,
            raw=False,
            strict_map_key=False,
        )

    @property
    def claimed(self) -> int:
        """Buffers claimed so far."""
        return len(self.regions)

    def claim(self, index: Any, size: Any) -> None:
        if index != self.claimed:
            raise ProtocolError(f"buffer index {index!r} out of order (expected {self.claimed})")
        if type(size) is not int or size < 0:
            raise ProtocolError(f"malformed buffer length {size!r}")
        if size > self.budget:
            raise ProtocolError(
                f"value claims {size} more payload bytes than the entry carries "
                f"({self.budget} left)"
            )
        self.budget -= size

    def list_hook(self, items: list[Any]) -> list[Any]:
        for i, item in enumerate(items):
            if isinstance(item, _BytesBox):
                self.patches.append((items, i, item))
        return items

    def object_hook(self, mapping: dict[Any, Any]) -> dict[Any, Any]:
        for key, item in mapping.items():
            if isinstance(item, _BytesBox):
                self.patches.append((mapping, key, item))
        return mapping

    def ext_hook(self, code: int, data: bytes) -> Any:
        name = _EXT_DECODERS.get(code)
        if name is None:
            raise ProtocolError(f"unknown ext type {code}")
        handler: Callable[[int, bytes], Any] = getattr(self, name)
        return handler(code, data)

    def _array(self, code: int, data: bytes) -> Any:
        index, dtype_code, shape_list, fortran = _fields(self.unpack(data), 4, "array")
        dtype = _parse_dtype(dtype_code)
        shape = _parse_shape(shape_list)
        nbytes = math.prod(shape) * dtype.itemsize
        self.claim(index, nbytes)
        flat = np.empty(nbytes, dtype=np.uint8)
        self.regions.append(flat.data)
        order: Literal["C", "F"] = "F" if fortran is True else "C"
        if dtype.itemsize == 0 or nbytes == 0:
            return np.empty(shape, dtype=dtype, order=order)
        return flat.view(dtype).reshape(shape, order=order)

    def _bytes(self, code: int, data: bytes) -> Any:
        index, length = _fields(self.unpack(data), 2, "bytes")
        self.claim(index, length)
        if code == EXT_BYTEARRAY:
            array = bytearray(length)
            self.regions.append(memoryview(array))
            return array
        box = _BytesBox(length)
        self.regions.append(memoryview(box.buffer))
        return box

    def _sequence(self, code: int, data: bytes) -> Any:
        items = _list(self.unpack(data), "sequence")
        if any(isinstance(v, _BytesBox) for v in items):
            raise ProtocolError("out-of-band bytes inside a tuple or set")
        maker = {EXT_TUPLE: tuple, EXT_SET: set, EXT_FROZENSET: frozenset}[code]
        try:
            return maker(items)
        except TypeError as e:  # an unhashable member of a set
            raise ProtocolError(f"malformed set: {e}") from None

    def _bigint(self, code: int, data: bytes) -> Any:
        text = data.decode("ascii", errors="replace")
        if len(text) > 10_000 or not text.removeprefix("-").isdigit():
            raise ProtocolError("malformed big integer")
        return int(text)

    def _complex(self, code: int, data: bytes) -> Any:
        real, imag = _fields(self.unpack(data), 2, "complex")
        if type(real) is not float or type(imag) is not float:
            raise ProtocolError("malformed complex")
        return complex(real, imag)

    def _np_scalar(self, code: int, data: bytes) -> Any:
        dtype_code, raw = _fields(self.unpack(data), 2, "numpy scalar")
        dtype = _parse_dtype(dtype_code)
        if type(raw) is not bytes or len(raw) != dtype.itemsize:
            raise ProtocolError("malformed numpy scalar")
        return np.frombuffer(raw, dtype=dtype, count=1)[0] if dtype.itemsize else dtype.type()


_EXT_DECODERS: dict[int, str] = {
    EXT_ARRAY: "_array",
    EXT_BYTES: "_bytes",
    EXT_BYTEARRAY: "_bytes",
    EXT_TUPLE: "_sequence",
    EXT_SET: "_sequence",
    EXT_FROZENSET: "_sequence",
    EXT_BIGINT: "_bigint",
    EXT_COMPLEX: "_complex",
    EXT_NP_SCALAR: "_np_scalar",
}
"""The method of the decoder that decodes each ext type (a describer overrides two)."""


# -- describing, without allocating ---------------------------------------------------------------


@dataclass(frozen=True)
class ArraySpec:
    """An array a structure announces: its payload buffer's number, wire dtype, shape and
    order, and its item size (known without building the dtype: an ml_dtypes one needs a
    second-long import)."""

    index: int
    dtype_code: str
    shape: tuple[int, ...]
    fortran: bool
    itemsize: int

    @property
    def dtype(self) -> np.dtype[Any]:
        """The numpy dtype (built on first use)."""
        return dtypes.numpy_dtype(self.dtype_code)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


@dataclass(frozen=True)
class BytesSpec:
    """Bytes (or a bytearray) a structure announces out of band: its buffer and length."""

    index: int
    length: int
    mutable: bool


@dataclass(frozen=True)
class Described:
    """A parsed structure: the value with :class:`ArraySpec` / :class:`BytesSpec` where its
    buffers go, and every buffer's length, in payload order."""

    raw: Any
    buffers: list[int]

    @property
    def payload_size(self) -> int:
        return sum(self.buffers)


class _Describer(_Decoder):
    """The decoder's walk, allocating nothing: buffers become specs."""

    def __init__(self, max_payload: int) -> None:
        super().__init__(max_payload)
        self.sizes: list[int] = []

    @property
    def claimed(self) -> int:
        return len(self.sizes)

    def claim(self, index: Any, size: Any) -> None:
        super().claim(index, size)
        self.sizes.append(size)

    def _array(self, code: int, data: bytes) -> Any:
        index, dtype_code, shape_list, fortran = _fields(self.unpack(data), 4, "array")
        if not isinstance(dtype_code, str):
            raise ProtocolError(f"malformed dtype {dtype_code!r}")
        itemsize = dtypes.itemsize(dtype_code)  # checks it, builds nothing
        spec = ArraySpec(index, dtype_code, _parse_shape(shape_list), fortran is True, itemsize)
        self.claim(index, spec.nbytes)
        return spec

    def _bytes(self, code: int, data: bytes) -> Any:
        index, length = _fields(self.unpack(data), 2, "bytes")
        self.claim(index, length)
        return BytesSpec(index, length, code == EXT_BYTEARRAY)

    def _sequence(self, code: int, data: bytes) -> Any:
        items = _list(self.unpack(data), "sequence")
        if any(isinstance(v, ArraySpec | BytesSpec) for v in items):
            raise ProtocolError("out-of-band buffer inside a tuple or set")
        return super()._sequence(code, data)


def describe_structure(structure: bytes, *, max_payload: int) -> Described:
    """Parse ``structure`` from a peer without allocating its buffers.

    Raises:
        ProtocolError: as :func:`decode_structure`.
    """
    describer = _Describer(max_payload)
    value = _unpack(describer, structure)
    return Described(value, describer.sizes)


def _unpack(unpacker: _Decoder | _Describer, structure: bytes) -> Any:
    """``unpacker.unpack(structure)``, whatever msgpack raises on garbage a ProtocolError."""
    try:
        return unpacker.unpack(structure)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises assorted errors on garbage
        raise ProtocolError(f"malformed value structure: {e}") from None


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ProtocolError(f"malformed {what}")
    return value


def _fields(value: Any, count: int, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) != count:
        raise ProtocolError(f"malformed {what} header")
    return value


def _parse_dtype(code: Any) -> np.dtype[Any]:
    return dtypes.numpy_dtype(code)


def _parse_shape(shape: Any) -> tuple[int, ...]:
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(n) is int and 0 <= n < 2**62 for n in shape)
    ):
        raise ProtocolError(f"malformed shape {shape!r}")
    return tuple(shape)
