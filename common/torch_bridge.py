"""PyTorch tensors to and from numpy arrays, bit-exact, without copies where possible, no pickle.

Needs the optional extra ``objstream[torch]``; nothing here imports torch until it is called
(the codec calls :func:`to_numpy` only for a value whose type comes from torch). A tensor and its
array share memory: the tensor's bytes are reinterpreted (``view(torch.uint8)``), then viewed as
the numpy (or ml_dtypes) type of the same name, so bfloat16 and float8 never pass through a
float conversion.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from objstream.common import dtypes
from objstream.common.errors import ObjstreamError

TORCH_TO_WIRE: dict[str, str] = {
    "bool": "|b1",
    "uint8": "|u1",
    "int8": "|i1",
    "int16": "<i2",
    "uint16": "<u2",
    "int32": "<i4",
    "uint32": "<u4",
    "int64": "<i8",
    "uint64": "<u8",
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
    "complex64": "<c8",
    "complex128": "<c16",
    "bfloat16": "bfloat16",
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2",
    "float8_e4m3fnuz": "float8_e4m3fnuz",
    "float8_e5m2fnuz": "float8_e5m2fnuz",
    "float8_e8m0fnu": "float8_e8m0fnu",
}
"""torch dtype name (``str(dtype)`` without ``torch.``) -> wire dtype code."""
WIRE_TO_TORCH = {code: name for name, code in TORCH_TO_WIRE.items()}


def torch_module() -> Any:
    """The torch module.

    Raises:
        ObjstreamError: torch is not installed.
    """
    try:
        return importlib.import_module("torch")
    except ImportError:
        raise ObjstreamError("torch tensors need PyTorch: pip install 'objstream[torch]'") from None


def to_numpy(tensor: Any, where: str = "value") -> np.ndarray[Any, Any]:
    """The numpy array holding ``tensor``'s elements (a view of its memory when contiguous).

    Raises:
        EncodeError: not a dense CPU tensor, or a dtype without a wire equivalent.
    """
    from objstream.common.codec import EncodeError

    torch = torch_module()
    if not isinstance(tensor, torch.Tensor):
        raise EncodeError(f"{where}: cannot encode a {type(tensor).__qualname__} from torch")
    name = str(tensor.dtype).removeprefix("torch.")
    code = TORCH_TO_WIRE.get(name)
    if code is None:
        raise EncodeError(f"{where}: torch dtype {name} has no wire equivalent")
    if tensor.device.type != "cpu":
        raise EncodeError(f"{where}: tensor on {tensor.device}; move it to the CPU first")
    if tensor.layout != torch.strided:
        raise EncodeError(f"{where}: a {tensor.layout} tensor; make it dense first")
    try:
        dtype = dtypes.numpy_dtype(code)
    except dtypes.DtypeUnavailable as e:
        raise EncodeError(f"{where}: {e}") from None
    flat: np.ndarray[Any, Any] = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return flat.view(dtype).reshape(tuple(tensor.shape))


def to_torch(array: np.ndarray[Any, Any]) -> Any:
    """A torch tensor sharing ``array``'s memory (made C-contiguous first if it is not).

    Raises:
        ObjstreamError: the dtype has no torch equivalent (str, bytes, datetime arrays...).
    """
    torch = torch_module()
    code = dtypes.wire_code(array.dtype)
    if code is not None and code[0] == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
        code = "<" + code[1:]
    name = WIRE_TO_TORCH.get(code or "")
    if name is None or not hasattr(torch, name):
        raise ObjstreamError(f"numpy dtype {array.dtype} has no torch equivalent")
    contiguous = np.ascontiguousarray(array)
    flat = torch.from_numpy(contiguous.reshape(-1).view(np.uint8))
    return flat.view(getattr(torch, name)).reshape(array.shape)


def as_torch(value: Any) -> Any:
    """``value`` with every numpy array in it (in dicts, lists, tuples) made a torch tensor.

    Other values are returned as they are; nothing is unpickled.
    """
    if isinstance(value, np.ndarray):
        return to_torch(value)
    if isinstance(value, dict):
        return {k: as_torch(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_torch(v) for v in value]
    if isinstance(value, tuple):
        return tuple(as_torch(v) for v in value)
    return value
