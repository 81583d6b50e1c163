"""The ``.safetensors`` format, read and written by hand: a JSON header, then contiguous tensors.

Layout: an unsigned little-endian 64-bit header length ``n``, ``n`` bytes of JSON (an object
mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``, plus an
optional ``"__metadata__"`` object of str to str), padded with spaces to a multiple of 8, then
the tensors' bytes, little-endian, C order, offsets counted from the end of the header.

Reading needs no numpy dtype: a tensor is a :class:`~objstream.common.codec.RawArray` whose
bytes are a :class:`~objstream.common.codec.FileRange`, read chunk by chunk as it is sent, so a
multi-GiB file costs no memory. Writing keeps the order it is given and the ``__metadata__``,
and formats the header as the safetensors package does (compact JSON, ``__metadata__`` first),
so a file it wrote comes back byte for byte.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from objstream.common.codec import FileRange, RawArray, array_facts
from objstream.common.dtypes import itemsize
from objstream.common.errors import ObjstreamError

METADATA_KEY = "__metadata__"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors package's own limit

ST_TO_WIRE: dict[str, str] = {
    "BOOL": "|b1",
    "U8": "|u1",
    "I8": "|i1",
    "U16": "<u2",
    "I16": "<i2",
    "U32": "<u4",
    "I32": "<i4",
    "U64": "<u8",
    "I64": "<i8",
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
    "C64": "<c8",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
"""safetensors dtype name -> wire dtype code (numpy ``dtype.str`` or ml_dtypes name)."""
WIRE_TO_ST = {code: name for name, code in ST_TO_WIRE.items()}
PACKED = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
"""Sub-byte safetensors dtypes (bits per element): packed, which no numpy type can hold."""


class SafetensorsError(ObjstreamError):
    """A ``.safetensors`` file that cannot be read, or a value that cannot be written as one."""


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The parsed JSON header (in file order) and where the tensor data starts.

    Raises:
        SafetensorsError: not a safetensors file (bad length, not JSON, not an object).
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise SafetensorsError(f"{path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise SafetensorsError(f"{path}: header of {length} bytes > {MAX_HEADER}")
        text = f.read(length)
    if len(text) != length:
        raise SafetensorsError(f"{path}: header cut short ({len(text)} of {length} bytes)")
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    return header, 8 + length


def load(path: Path) -> dict[str, Any]:
    """A ``.safetensors`` as a dict: ``"__metadata__"`` first (if the file has one), then each
    tensor in header order as a :class:`RawArray` reading its bytes from the file when sent.

    Raises:
        SafetensorsError: malformed header, offsets outside the file, or a packed (F4, F6) dtype.
    """
    header, data_start = read_header(path)
    data_size = path.stat().st_size - data_start
    container: dict[str, Any] = {}
    metadata = header.pop(METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise SafetensorsError(f"{path}: __metadata__ must map str to str")
        container[METADATA_KEY] = metadata
    for name, info in header.items():
        container[name] = _tensor(path, name, info, data_start, data_size)
    return container


def _tensor(path: Path, name: str, info: Any, data_start: int, data_size: int) -> RawArray:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where}: not a tensor description")
    kind, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if kind in PACKED:
        raise SafetensorsError(
            f"{where}: dtype {kind} packs {PACKED[kind]}-bit elements, which numpy and "
            "ml_dtypes cannot hold bit-exact (send the file with send-file)"
        )
    code = ST_TO_WIRE.get(kind) if isinstance(kind, str) else None
    if code is None:
        raise SafetensorsError(f"{where}: unknown dtype {kind!r}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise SafetensorsError(f"{where}: bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(n) is int for n in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise SafetensorsError(f"{where}: bad data_offsets {offsets!r} ({data_size} data bytes)")
    begin, end = offsets
    if end - begin != math.prod(shape) * itemsize(code):
        raise SafetensorsError(f"{where}: {end - begin} bytes for {kind} of shape {shape}")
    return RawArray(code, tuple(shape), FileRange(str(path), data_start + begin, end - begin))


def header_bytes(
    metadata: dict[str, str] | None, tensors: list[tuple[str, str, list[int], int]]
) -> bytes:
    """The length prefix and padded JSON header for ``tensors`` (name, safetensors dtype,
    shape, size in bytes) laid out one after the other in the order given."""
    text = _header_json(metadata, tensors)
    text += b" " * (-len(text) % 8)  # the spec pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text


def padded_header(
    metadata: dict[str, str] | None, tensors: list[tuple[str, str, list[int], int]], total: int
) -> bytes | None:
    """:func:`header_bytes` padded with spaces to exactly ``total`` bytes (a multiple of 8,
    the length prefix included), for a file whose tensors were written after a header space
    reserved before the header was known; None if the header does not fit."""
    text = _header_json(metadata, tensors)
    if len(text) + 8 > total:
        return None
    text += b" " * (total - 8 - len(text))
    return struct.pack("<Q", len(text)) + text


RESERVE_PER_TENSOR = 256
"""Header bytes reserved per tensor still to come (a name of up to ~150 bytes, its dtype,
shape and offsets); a header that outgrows its reserve moves the tensors once."""


HEADER_META = "safetensors_header"
"""The key, in the meta of an entry's first chunk, announcing the header length of the
``.safetensors`` file whose first entry it is (see :func:`header_lengths`)."""


SAFETENSORS_SUFFIX = ".safetensors"


def split_directory_key(key: str) -> tuple[str, str | None]:
    """A directory container's entry name as ``(file, tensor)``: the file's path in the
    directory (``/``-separated), and the tensor's key for an entry of a ``.safetensors`` file,
    ``None`` for a whole file. The file ends at the first path component that ends in
    ``.safetensors`` (any case) and has more after it: ``shard-1.safetensors/w`` and
    ``text/enc.safetensors/layers/0/w`` are tensors (``w``, ``layers/0/w``),
    ``config.json`` and ``tokenizer/vocab.txt`` whole files."""
    parts = key.split("/")
    for index, part in enumerate(parts[:-1]):
        if part.lower().endswith(SAFETENSORS_SUFFIX):
            return "/".join(parts[: index + 1]), "/".join(parts[index + 1 :])
    return key, None


def header_lengths(container: Any, name: str, *, directory: bool = False) -> dict[int, int]:
    """The length (prefix included) of the header of each ``.safetensors`` file a receiver
    makes of ``container``, by the index of the file's first entry: the container saved as one
    file (entry 0), or each ``F`` of the ``F/<key>`` entries of a directory container (a name
    ending in ``/``, or ``directory``; see :func:`split_directory_key`). Announced with that
    entry, so that the receiver writes each tensor at its final offset and the file comes out
    byte for byte as the safetensors package writes it. Only for files that are all arrays of a
    dtype safetensors names (and ``__metadata__``)."""
    if not isinstance(container, dict):
        return {}
    files: dict[str, _Layout] = {}
    spoiled: set[str] = set()
    for index, (key, value) in enumerate(container.items()):
        if not isinstance(key, str):
            return {}
        file, rest = "", key
        if directory or name.endswith("/"):
            file, tensor = split_directory_key(key)
            if tensor is None:
                continue  # a plain file of the directory
            rest = tensor
        layout = files.setdefault(file, _Layout(index))
        if rest == METADATA_KEY and layout.empty and isinstance(value, dict):
            try:
                layout.metadata = check_metadata(value, METADATA_KEY)
            except SafetensorsError:
                spoiled.add(file)
            continue
        facts = array_facts(value)
        kind = None if facts is None else WIRE_TO_ST.get(facts.dtype.replace(">", "<", 1))
        if facts is None or kind is None:
            spoiled.add(file)
            continue
        layout.tensors.append((rest, kind, list(facts.shape), facts.nbytes))
    return {
        layout.first: len(header_bytes(layout.metadata, layout.tensors))
        for file, layout in files.items()
        if file not in spoiled
    }


@dataclass
class _Layout:
    first: int
    metadata: dict[str, str] | None = None
    tensors: list[tuple[str, str, list[int], int]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.metadata is None and not self.tensors


def announced_header(meta: Mapping[str, Any] | None) -> int | None:
    """The header length an entry's first chunk announces (:func:`header_lengths`), if it is
    one a header can have: a peer's word, a hint for the layout only (a wrong one costs a move
    of the tensors, or spaces of padding, at the end)."""
    value = (meta or {}).get(HEADER_META)
    if type(value) is int and 16 <= value <= MAX_HEADER and value % 8 == 0:
        return value
    return None


def header_reserve(metadata: dict[str, str] | None, tensors_to_come: int) -> int:
    """The header space to reserve, before the first tensor is written, for ``metadata`` and
    at most ``tensors_to_come`` tensors (at most 4096 counted: a file with more moves its
    tensors once at the end rather than waste megabytes)."""
    size = 8 + len(_header_json(metadata, [])) + RESERVE_PER_TENSOR * min(tensors_to_come, 4096)
    return size + (-size % 8)


def _header_json(
    metadata: dict[str, str] | None, tensors: list[tuple[str, str, list[int], int]]
) -> bytes:
    header: dict[str, Any] = {}
    if metadata is not None:
        header[METADATA_KEY] = metadata
    offset = 0
    for name, kind, shape, size in tensors:
        header[name] = {"dtype": kind, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()


def check_metadata(value: Any, where: str) -> dict[str, str]:
    """``value`` if it is a valid ``__metadata__`` (str to str).

    Raises:
        SafetensorsError: it is not.
    """
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise SafetensorsError(f"{where}: __metadata__ must be a dict of str to str")
    return value
