"""The bytes of a ``.npz`` written member by member at known offsets, without zipfile's writer.

A received container saved as ``.npz`` is written as it arrives (:mod:`objstream.consumer.
container_sink`): each entry is one zip member ``KEY.npy``, stored (not compressed), whose size
is known when the entry's structure arrives; its CRC-32 only when its last byte has. So each
member is: a local header (zip64, its CRC written in place once known), the ``.npy`` header,
the array's bytes; after the last member, the central directory. numpy reads it with
``np.load`` as any ``.npz`` (``zipfile``).

Pure: bytes in, bytes out.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ZIP64 = 45  # the version a zip64 member needs
UTF8_NAME = 0x0800  # general purpose flag: the name is UTF-8
_FF32 = 0xFFFFFFFF
# A fixed DOS time and date (1980-01-01 00:00): the file's own mtime says when it was saved.
_DOS_TIME, _DOS_DATE = 0, (0 << 9) | (1 << 5) | 1

LOCAL_CRC_OFFSET = 14
"""Where a local header holds its member's CRC-32, from the header's first byte."""


def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...], fortran: bool) -> bytes:
    """The ``.npy`` header of an array (format 1.0, or 2.0 when the header needs it)."""
    fields = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": fortran,
        "shape": shape,
    }
    out = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(out, fields)
    except ValueError:  # a header over 64 KiB (a great many dimensions)
        out = io.BytesIO()
        np.lib.format.write_array_header_2_0(out, fields)
    return out.getvalue()


def local_header(name: str, size: int, crc: int = 0) -> bytes:
    """A member's local header: stored, zip64 sizes, ``crc`` (0 until the member is whole)."""
    raw = name.encode("utf-8")
    extra = struct.pack("<HHQQ", 0x0001, 16, size, size)
    return (
        struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            ZIP64,
            UTF8_NAME,
            0,  # stored
            _DOS_TIME,
            _DOS_DATE,
            crc,
            _FF32,
            _FF32,
            len(raw),
            len(extra),
        )
        + raw
        + extra
    )


@dataclass(frozen=True)
class Member:
    """A member written: its name, where its local header starts, its size and CRC-32."""

    name: str
    offset: int
    size: int
    crc: int


def central_directory(members: Sequence[Member], start: int) -> bytes:
    """The central directory of ``members`` written at ``start``, and the zip64 and classic
    end records after it."""
    records = []
    for member in members:
        raw = member.name.encode("utf-8")
        extra = struct.pack("<HHQQQ", 0x0001, 24, member.size, member.size, member.offset)
        records.append(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                (3 << 8) | ZIP64,  # made by: unix
                ZIP64,
                UTF8_NAME,
                0,
                _DOS_TIME,
                _DOS_DATE,
                member.crc,
                _FF32,
                _FF32,
                len(raw),
                len(extra),
                0,  # comment
                0,  # disk
                0,  # internal attributes
                0o100644 << 16,  # external: a regular file, rw-r--r--
                _FF32,
            )
            + raw
            + extra
        )
    if not members:  # the plain end record alone: what numpy takes for an empty .npz
        return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0, 0, 0, start, 0)
    directory = b"".join(records)
    end64 = start + len(directory)
    count = len(members)
    return (
        directory
        + struct.pack(
            "<IQHHIIQQQQ",
            0x06064B50,
            44,  # the size of what follows in this record
            (3 << 8) | ZIP64,
            ZIP64,
            0,
            0,
            count,
            count,
            len(directory),
            start,
        )
        + struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
        + struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), _FF32, _FF32, 0
        )
    )
