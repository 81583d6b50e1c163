"""A safe value codec: msgpack for structure, raw out-of-band buffers for array and bytes payloads.

No pickle anywhere, and the decoder never instantiates a class named by the peer: the only
things it builds are None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict,
set, frozenset and numpy arrays / scalars of non-object dtypes (the ``ml_dtypes`` types,
bfloat16 and float8 among them, included: see :mod:`objstream.common.dtypes`).

Two value types exist for the sending side only: :class:`RawArray` (an array given by its wire
dtype, shape and bytes, so a ``.safetensors`` tensor is sent without numpy knowing its dtype) and
:class:`FileRange` (bytes of a file, read chunk by chunk as they are sent, never loaded whole).
A torch tensor (CPU) is carried as the numpy array it views (:mod:`objstream.common.torch_bridge`).

Encoding a value gives a small *structure* (msgpack bytes) plus a list of *buffers* (memoryviews
of the original arrays and bytes, not copies, wherever the memory layout allows). Decoding is
the other half, :mod:`objstream.common.decoding`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from objstream.common import dtypes
from objstream.common.errors import ObjstreamError, ProtocolError

# msgpack ext type codes
EXT_ARRAY = 1  # [buffer index, dtype str, shape, fortran]
EXT_BYTES = 2  # [buffer index, length] (out of band; only as a list item or dict value)
EXT_BYTEARRAY = 3  # [buffer index, length] (out of band, filled in place)
EXT_TUPLE = 4  # msgpack list
EXT_SET = 5
EXT_FROZENSET = 6
EXT_BIGINT = 7  # decimal text
EXT_COMPLEX = 8  # [real, imag]
EXT_NP_SCALAR = 9  # [dtype str, raw bytes]

# bytes values at least this long travel out of band (raw, no msgpack copy)
OUT_OF_BAND_BYTES = 4096
ARRAY_KINDS = dtypes.ARRAY_KINDS
MAX_DIMS = 64


class EncodeError(ObjstreamError):
    """A value cannot be encoded (it is refused before anything is sent)."""


@dataclass(frozen=True)
class FileRange:
    """``nbytes`` bytes of the file at ``path`` from ``offset``, read only when sent.

    As a value it is sent as ``bytes`` (received as bytes); as :attr:`RawArray.data`, as an
    array's payload. The file must not change while it is being sent.
    """

    path: str
    offset: int
    nbytes: int

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``start:end`` of the range (one ``pread``; no read ahead kept in memory)."""
        with open(self.path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), end - start, self.offset + start)
        if len(data) != end - start:
            raise ObjstreamError(
                f"{self.path}: {len(data)} bytes at {self.offset + start}, expected "
                f"{end - start} (the file shrank while being sent)"
            )
        return data


@dataclass(frozen=True)
class RawArray:
    """An array given by its wire dtype code (numpy ``dtype.str`` or an ml_dtypes name), shape
    and C-ordered bytes; received as the numpy array it describes."""

    dtype: str
    shape: tuple[int, ...]
    data: FileRange | memoryview

    def check(self, where: str) -> None:
        """Raises EncodeError unless the dtype is carried and the bytes fit the shape."""
        try:
            size = dtypes.itemsize(self.dtype)
        except ProtocolError as e:
            raise EncodeError(f"{where}: {e}") from None
        expected = math.prod(self.shape) * size
        if self.data.nbytes != expected:
            raise EncodeError(
                f"{where}: {self.data.nbytes} bytes for a {self.dtype} array of shape "
                f"{list(self.shape)} (expected {expected})"
            )


Buffer = memoryview | FileRange
"""An out-of-band buffer: a view of memory, or a range of a file read when it is sent."""


@dataclass
class Encoded:
    """A value as structure bytes plus raw buffers (views of the original where possible)."""

    structure: bytes
    buffers: list[Buffer]

    @property
    def size(self) -> int:
        return len(self.structure) + sum(b.nbytes for b in self.buffers)


def _dtype_code(dtype: np.dtype[Any], where: str) -> str:
    code = dtypes.wire_code(dtype)
    if code is None:
        raise EncodeError(f"{where}: {dtypes.refusal(dtype)}")
    return code


def _array_bytes(array: np.ndarray[Any, Any]) -> tuple[memoryview, bool]:
    """A flat byte view of ``array``'s data, and whether it is laid out in Fortran order.

    C- and Fortran-contiguous arrays are not copied; other views (slices with steps...) are made
    contiguous first, a copy of that one array.
    """
    fortran = bool(array.flags.f_contiguous and not array.flags.c_contiguous)
    flat = array.T if fortran else np.ascontiguousarray(array)
    if flat.dtype.itemsize == 0 or flat.size == 0:
        return memoryview(b""), fortran
    return flat.reshape(-1).view(np.uint8).data, fortran


@dataclass(frozen=True)
class ArrayFacts:
    """What a receiver lays out for an array before its bytes arrive."""

    dtype: str
    """The wire dtype code."""
    shape: tuple[int, ...]
    nbytes: int


def array_facts(value: Any) -> ArrayFacts | None:
    """The facts of ``value`` if it is one array (sent as a single payload buffer), else None.
    Only looks at its type and attributes: call it on values :func:`encode` takes."""
    kind = type(value)
    code: str | None
    if isinstance(value, np.ndarray):  # np.memmap too (what a receiver hands out as_memmap)
        code = dtypes.wire_code(value.dtype)
        return None if code is None else ArrayFacts(code, value.shape, value.nbytes)
    if kind is RawArray:
        return ArrayFacts(str(value.dtype), value.shape, value.data.nbytes)
    if kind.__module__.partition(".")[0] == "torch" and kind.__name__ == "Tensor":
        from objstream.common.torch_bridge import TORCH_TO_WIRE

        code = TORCH_TO_WIRE.get(str(value.dtype).removeprefix("torch."))
        nbytes = value.numel() * value.element_size()
        return None if code is None else ArrayFacts(code, tuple(value.shape), nbytes)
    return None


def encode(value: Any, where: str = "value") -> Encoded:
    """Encode ``value``; ``where`` names it in errors (for example ``"key 'w1'"``).

    Raises:
        EncodeError: a part of the value has a type the codec does not carry; the message names
            ``where`` and the type.
    """
    encoder = _Encoder(where)
    return Encoded(_packb(encoder.route(value, True), where), encoder.buffers)


class _Encoder:
    """One depth-first, in-order walk that turns everything msgpack does not carry natively into
    ext markers, so buffers are numbered in the order the decoder meets them.

    Big bytes go out of band only as list items or dict values (mutable parents the decoder
    patches once the bytes have arrived); elsewhere they stay inline.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.buffers: list[Buffer] = []

    def route(self, obj: Any, patchable: bool) -> Any:
        # By exact type: subclasses (numpy's float64 is a float) take the numpy branches or
        # are refused, as they would not come back as what was sent.
        kind = type(obj)
        if obj is None or kind in _NATIVE:  # the common case first, and cheap
            return obj
        handler = _ENCODERS.get(kind)
        if handler is not None:
            return handler(self, obj, patchable)
        if isinstance(obj, np.ndarray):
            code = _dtype_code(obj.dtype, self.where)
            view, fortran = _array_bytes(obj)
            return self._ext(EXT_ARRAY, [self._out_of_band(view), code, list(obj.shape), fortran])
        if isinstance(obj, np.generic):
            code = _dtype_code(obj.dtype, self.where)
            return self._ext(EXT_NP_SCALAR, [code, np.asarray(obj).tobytes()])
        if kind.__module__.partition(".")[0] == "torch":
            from objstream.common.torch_bridge import to_numpy  # only once torch is in use

            return self.route(to_numpy(obj, self.where), patchable)
        raise EncodeError(
            f"{self.where}: cannot encode a value of type {kind.__module__}.{kind.__qualname__} "
            "(supported: None, bool, int, float, complex, str, bytes, bytearray, list, tuple, "
            "dict, set, frozenset, numpy arrays and scalars of non-object dtypes, CPU torch "
            "tensors)"
        )

    def _out_of_band(self, view: Buffer) -> int:
        self.buffers.append(view)
        return len(self.buffers) - 1

    def _ext(self, code: int, obj: Any) -> msgpack.ExtType:
        return msgpack.ExtType(code, _packb(obj, self.where))

    def _int(self, obj: int, patchable: bool) -> Any:
        if -(2**63) <= obj < 2**64:
            return obj
        return msgpack.ExtType(EXT_BIGINT, str(obj).encode())

    def _bytes(self, obj: bytes, patchable: bool) -> Any:
        if patchable and len(obj) >= OUT_OF_BAND_BYTES:
            return self._ext(EXT_BYTES, [self._out_of_band(memoryview(obj)), len(obj)])
        return obj

    def _bytearray(self, obj: bytearray, patchable: bool) -> Any:
        return self._ext(EXT_BYTEARRAY, [self._out_of_band(memoryview(obj)), len(obj)])

    def _list(self, obj: list[Any], patchable: bool) -> Any:
        return [self.route(v, True) for v in obj]

    def _dict(self, obj: dict[Any, Any], patchable: bool) -> Any:
        return {self.route(k, False): self.route(v, True) for k, v in obj.items()}

    def _sequence(self, obj: tuple[Any, ...] | set[Any] | frozenset[Any], patchable: bool) -> Any:
        return self._ext(_SEQUENCE_CODES[type(obj)], [self.route(v, False) for v in obj])

    def _complex(self, obj: complex, patchable: bool) -> Any:
        return self._ext(EXT_COMPLEX, [obj.real, obj.imag])

    def _raw_array(self, obj: RawArray, patchable: bool) -> Any:
        obj.check(self.where)
        index = self._out_of_band(obj.data)
        return self._ext(EXT_ARRAY, [index, obj.dtype, list(obj.shape), False])

    def _file_range(self, obj: FileRange, patchable: bool) -> Any:
        if patchable:
            return self._ext(EXT_BYTES, [self._out_of_band(obj), obj.nbytes])
        return obj.read(0, obj.nbytes)


_ENCODERS: dict[type[Any], Callable[[_Encoder, Any, bool], Any]] = {
    int: _Encoder._int,
    bytes: _Encoder._bytes,
    bytearray: _Encoder._bytearray,
    list: _Encoder._list,
    dict: _Encoder._dict,
    tuple: _Encoder._sequence,
    set: _Encoder._sequence,
    frozenset: _Encoder._sequence,
    complex: _Encoder._complex,
    RawArray: _Encoder._raw_array,
    FileRange: _Encoder._file_range,
}
"""How each type msgpack does not carry as is gets encoded, by exact type."""
_NATIVE = frozenset({bool, float, str})
"""Types msgpack carries as they are (and None)."""


def _packb(obj: Any, where: str) -> bytes:
    try:
        return bytes(msgpack.packb(obj, strict_types=True, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as e:
        raise EncodeError(f"{where}: cannot encode: {e}") from None


_SEQUENCE_CODES: dict[type[Any], int] = {tuple: EXT_TUPLE, set: EXT_SET, frozenset: EXT_FROZENSET}


def decode(encoded: Encoded) -> Any:
    """Decode an :class:`Encoded` in one go (tests, small values)."""
    from objstream.common.decoding import decode_structure

    decoded = decode_structure(encoded.structure, max_payload=encoded.size)
    if len(decoded.regions) != len(encoded.buffers):
        raise ProtocolError("buffer count mismatch")
    for region, buffer in zip(decoded.regions, encoded.buffers, strict=True):
        if region.nbytes != buffer.nbytes:
            raise ProtocolError("buffer length mismatch")
        if isinstance(buffer, FileRange):
            region[:] = buffer.read(0, buffer.nbytes)
        else:
            region[:] = buffer.cast("B") if buffer.format != "B" else buffer
    return decoded.value()
