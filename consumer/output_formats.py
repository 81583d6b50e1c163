"""What each format a received container is saved as can hold, and the names it gets.

A container is saved as ``.npz`` (numpy arrays and plain numbers; not the ml_dtypes types,
which numpy would read back as raw bytes), ``.safetensors`` (arrays of the dtypes safetensors
names, and ``__metadata__``), ``.json`` (no arrays), or a directory (a sharded checkpoint). A
container is checked against its format twice: at its offer (:func:`check_offer`, from what
the sender says it holds) and entry by entry as it arrives
(:mod:`objstream.consumer.container_outputs`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from objstream.common import dtypes
from objstream.common.decoding import ArraySpec, BytesSpec
from objstream.common.errors import ProtocolError, SaveError
from objstream.common.naming import safe_basename
from objstream.common.protocol import DIRECTORY_LAYOUT, LAYOUT_INFO, Offer
from objstream.common.safetensors_format import WIRE_TO_ST

FORMATS = (".npz", ".safetensors", ".json")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
"""Containers named like a PyTorch file are saved as ``.safetensors`` (never pickled here)."""


def is_directory(offer: Offer) -> bool:
    """Whether ``offer`` is of a directory container: its name ends in ``/``, or its ``info``
    says ``layout: directory``."""
    return offer.name.endswith("/") or (offer.info or {}).get(LAYOUT_INFO) == DIRECTORY_LAYOUT


def final_name(name: str, *, directory: bool = False) -> str:
    """The name a container named ``name`` is saved under: a directory for a name ending in
    ``/``, or for a ``directory`` container named without a format's suffix; else a file,
    ``.npz`` unless the name says ``.safetensors`` or ``.json``, and ``.safetensors`` for a
    ``.pt``/``.pth``/``.bin`` name. Always a plain base name."""
    if name.endswith("/"):
        return safe_basename(name.rstrip("/")) + "/"
    base = safe_basename(name)
    lower = base.lower()
    if directory and not lower.endswith((*FORMATS, *TORCH_SUFFIXES)):
        return base + "/"
    if lower.endswith(TORCH_SUFFIXES):
        return base.rpartition(".")[0] + ".safetensors"
    if not lower.endswith(FORMATS):
        base += ".npz"
    return base


def check_offer(offer: Offer, name: str, container_type: str) -> None:
    """Refuse, before anything moves, a container that cannot be stored as ``name`` says.

    Besides the container type, the offer's ``info`` may say (objstream senders do) the wire
    dtypes of the entries that are one array (``dtypes``, comma-separated) and how many
    entries are not one array (``non_arrays``); what it does not say is checked entry by
    entry as they arrive.

    Raises:
        SaveError: the format cannot hold it; the message says which to choose.
    """
    where = f"container {offer.name!r} cannot be stored as {name!r}"
    if name.endswith("/"):
        if container_type != "dict":
            raise SaveError(f"{where}: a directory container is a dict, not a {container_type}")
        return
    if is_directory(offer):
        raise SaveError(
            f"{where}: it is a directory of files; save it as a directory (a name without "
            "a suffix, or ending in /)"
        )
    fmt = Path(name).suffix.lower()
    if container_type == "set" and fmt != ".json":
        raise SaveError(f"{where}: a set is saved as .json")
    info = offer.info or {}
    codes = info.get("dtypes")
    listed = sorted(set(codes.split(",")) - {""}) if isinstance(codes, str) else []
    for code in listed:
        try:
            little = dtypes.little_code(code)
        except ProtocolError as e:
            raise SaveError(f"{where}: {e}") from None
        if fmt == ".json":
            raise SaveError(f"{where}: it holds arrays ({', '.join(listed)}); name it .npz")
        if fmt == ".npz" and code in dtypes.ML_DTYPES:
            raise SaveError(
                f"{where}: {code} cannot be saved as .npz (numpy would read it back as raw "
                "bytes); name it .safetensors"
            )
        if fmt == ".safetensors" and little not in WIRE_TO_ST:
            raise SaveError(f"{where}: dtype {code} has no safetensors equivalent")
    others = info.get("non_arrays")
    allowed = 1 if container_type == "dict" else 0  # a dict may hold __metadata__
    if fmt == ".safetensors" and type(others) is int and others > allowed:
        raise SaveError(f"{where}: {others} of its entries are not arrays; name it .npz or .json")


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
        key.encode("utf-8")  # what a zip name is written as; a lone surrogate cannot be
    except UnicodeEncodeError:
        return False
    return True


def kind_of(value: Any) -> str:
    """What an entry's value is, in a user's words (never a class of ours)."""
    if isinstance(value, BytesSpec | bytes | bytearray):
        return "bytes"
    if isinstance(value, ArraySpec | np.ndarray):
        return "an array"
    return type(value).__name__


def unsaveable(name: object, value: Any, fmt: str) -> SaveError:
    """Why entry ``name`` cannot be saved as ``fmt``, advising a format that can hold it."""
    kind = kind_of(value)
    if kind == "bytes":
        advice = "raw bytes fit none of .npz, .safetensors and .json (a directory container "
        advice += "holds files)"
    elif kind == "an array":
        advice = "name it .npz or .safetensors"
    else:
        advice = "name it .json" if fmt == ".safetensors" and kind in {"str", "dict"} else ""
        advice = advice or "name it .npz or .json"
    return SaveError(f"entry {name!r} ({kind}) cannot be saved as {fmt}; {advice}")


def small_array(value: Any, name: str) -> np.ndarray[Any, Any]:
    """An entry without payload buffers (a number, a short list) as the array it makes."""
    array = np.asarray(value)
    if array.dtype.hasobject or array.dtype.kind in "SUV":
        raise unsaveable(name, value, ".npz")
    return array


def jsonable(value: Any, key: Any) -> Any:
    if isinstance(value, ArraySpec | BytesSpec | np.ndarray | np.generic | bytes | bytearray):
        raise unsaveable(key, value, ".json")
    if isinstance(value, set | frozenset | tuple | list):
        return [jsonable(v, key) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v, key) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise unsaveable(key, value, ".json")
