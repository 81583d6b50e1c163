"""How the process allocates chunk buffers: glibc's malloc tuned for many 1 MiB buffers.

Called by :func:`objstream.common.amqp.connect` before the first connection.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# A chunk is a fresh 1 MiB bytes (pika takes only bytes), and pika cuts it into frames of
# 128 KiB. glibc's malloc gives the pages of such buffers back to the kernel when they are freed
# at the top of the heap (or serves them by mmap), so every chunk faults its pages in again:
# measured 140,000 page faults and +60 % sender CPU for 256 MiB. Buffers of up to 16 MiB from
# the heap, and up to 64 MiB of free heap kept, take that to nearly none (the sender's CPU for
# 256 MiB fell from 0.6-0.95 s to 0.5 s on this machine). Linux with glibc only; elsewhere a no-op.
MALLOC_MMAP_THRESHOLD = 16 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@functools.cache
def tune_malloc() -> bool:
    """Keep chunk-sized buffers in the heap (see above); True if glibc took both settings."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1
    trim_set = mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1
    return bool(mmap_set and trim_set)
