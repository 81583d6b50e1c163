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
two-step, so big payloads are never copied twice: :func:`decode_structure` parses the structure
and preallocates every array and bytes buffer it announces, returning :class:`Decoded` with the
writable regions to fill; once they are filled, :meth:`Decoded.value` gives the value.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

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
        value = decoder.unpack(structure)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises assorted errors on garbage
        raise ProtocolError(f"malformed value structure: {e}") from None
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

    def claim(self, index: Any, size: Any) -> None:
        if index != len(self.regions):
            raise ProtocolError(
                f"buffer index {index!r} out of order (expected {len(self.regions)})"
            )
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
        handler = _EXT_DECODERS.get(code)
        if handler is None:
            raise ProtocolError(f"unknown ext type {code}")
        return handler(self, code, data)

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


_EXT_DECODERS: dict[int, Callable[[_Decoder, int, bytes], Any]] = {
    EXT_ARRAY: _Decoder._array,
    EXT_BYTES: _Decoder._bytes,
    EXT_BYTEARRAY: _Decoder._bytes,
    EXT_TUPLE: _Decoder._sequence,
    EXT_SET: _Decoder._sequence,
    EXT_FROZENSET: _Decoder._sequence,
    EXT_BIGINT: _Decoder._bigint,
    EXT_COMPLEX: _Decoder._complex,
    EXT_NP_SCALAR: _Decoder._np_scalar,
}
"""How each ext type is decoded."""


def decode(encoded: Encoded) -> Any:
    """Decode an :class:`Encoded` in one go (tests, small values)."""
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
