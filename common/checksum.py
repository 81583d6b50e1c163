"""The per-chunk checksum: CRC-32 with zlib's polynomial, the values of ``zlib.crc32``.

Computed with zlib-ng's vectorized code (PCLMULQDQ/VPCLMULQDQ where the CPU has them): on the
development machine 0.013 s per GiB against 0.19 s for the standard library's zlib, on each side
of every stream.
"""

from __future__ import annotations

from zlib_ng.zlib_ng import crc32

__all__ = ["crc32"]
