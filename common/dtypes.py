"""Array dtypes on the wire: numpy's own by ``dtype.str``, the ``ml_dtypes`` ones by name.

numpy describes its own types exactly with ``dtype.str`` (``"<f4"``, ``"|b1"``), which is what a
v1 peer sends and decodes. The machine-learning types of the ``ml_dtypes`` package (bfloat16, the
float8 family...) are numpy *extension* types: their ``dtype.str`` is a meaningless ``"<V2"``
(or even ``"<f1"`` for float8_e5m2), so they travel under their ml_dtypes name instead, always
little-endian. Knowing a wire code's item size never needs ml_dtypes (a sender of a
``.safetensors`` reads and sends bfloat16 without it); building an array of it does.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import numpy as np

from objstream.common.errors import ProtocolError

ARRAY_KINDS = frozenset("biufcSUMm")
"""numpy dtype kinds carried by ``dtype.str``: bool, int, uint, float, complex, bytes, str,
datetime, timedelta."""

ML_DTYPES: dict[str, int] = {
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e8m0fnu": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e4m3": 1,
    "float8_e3m4": 1,
    "float8_e4m3b11fnuz": 1,
    "float6_e2m3fn": 1,
    "float6_e3m2fn": 1,
    "float4_e2m1fn": 1,
    "int4": 1,
    "uint4": 1,
    "int2": 1,
    "uint2": 1,
}
"""The ml_dtypes types carried, by wire name, with their item size (one element per byte even
for the 4- and 6-bit ones: that is how ml_dtypes stores them)."""


class DtypeUnavailable(ProtocolError):
    """A wire dtype this process cannot build an array of (``"bfloat16 needs ml_dtypes"``)."""


@functools.cache
def ml_dtypes_module() -> ModuleType | None:
    """The ``ml_dtypes`` module, or None where it is not installed."""
    try:
        return importlib.import_module("ml_dtypes")
    except ImportError:
        return None


def ml_name(dtype: np.dtype[Any]) -> str | None:
    """The wire name of an ml_dtypes dtype, or None for any other dtype."""
    if dtype.type.__module__.partition(".")[0] != "ml_dtypes" or dtype.name not in ML_DTYPES:
        return None
    return str(dtype.name)


def wire_code(dtype: np.dtype[Any]) -> str | None:
    """How ``dtype`` is named on the wire, or None if it is not carried (see :func:`refusal`)."""
    name = ml_name(dtype)
    if name is not None:
        return name
    if dtype.kind not in ARRAY_KINDS or dtype.hasobject or dtype.fields is not None:
        return None
    return str(dtype.str)


def refusal(dtype: np.dtype[Any]) -> str:
    """Why ``dtype`` is not carried, in a few words naming it."""
    if dtype.hasobject:
        return f"numpy dtype {dtype} is not supported (object arrays would need pickle)"
    if dtype.fields is not None:
        return f"numpy dtype {dtype} is structured; send each field as its own array"
    if dtype.kind == "V":
        return (
            f"numpy dtype {dtype} ({dtype.type.__module__}.{dtype.type.__name__}) is not one "
            f"the codec carries (numeric, bool, bytes, str, datetime and the ml_dtypes types "
            f"{', '.join(ML_DTYPES)})"
        )
    return f"numpy dtype {dtype} (kind {dtype.kind!r}) is not supported"


def itemsize(code: str) -> int:
    """The item size of a wire dtype, without building it (ml_dtypes need not be installed).

    Raises:
        ProtocolError: ``code`` is not a dtype the codec carries.
    """
    size = ML_DTYPES.get(code)
    if size is not None:
        return size
    return numpy_dtype(code).itemsize


def little_code(code: Any) -> str:
    """The wire code of ``code``'s little-endian twin (itself unless it is a big-endian numpy
    code), checked, without building an ml_dtypes type (importing ml_dtypes takes a second).

    Raises:
        ProtocolError: ``code`` is not a dtype the codec carries.
    """
    if isinstance(code, str) and code in ML_DTYPES:
        return code
    dtype = numpy_dtype(code)
    return str(dtype.newbyteorder("<").str) if dtype.byteorder == ">" else str(dtype.str)


def numpy_dtype(code: Any) -> np.dtype[Any]:
    """The numpy dtype a peer names ``code``.

    Raises:
        DtypeUnavailable: an ml_dtypes type where ml_dtypes is not installed.
        ProtocolError: malformed, unknown or refused (object, structured) dtype.
    """
    if not isinstance(code, str) or len(code) > 32:
        raise ProtocolError(f"malformed dtype {code!r}")
    if code in ML_DTYPES:
        module = ml_dtypes_module()
        kind = getattr(module, code, None) if module is not None else None
        if kind is None:
            raise DtypeUnavailable(f"{code} needs ml_dtypes (pip install 'ml_dtypes>=0.5')")
        ml_dtype: np.dtype[Any] = np.dtype(kind)
        return ml_dtype
    try:
        dtype = np.dtype(code)
    except TypeError:
        raise ProtocolError(f"unknown dtype {code!r}") from None
    if wire_code(dtype) is None or dtype.kind == "V":
        raise ProtocolError(f"dtype {code!r} is not allowed")
    return dtype
