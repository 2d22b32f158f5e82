"""Tell glibc's malloc to keep freed memory in CPU training processes (a no-op off glibc).

By default glibc returns big freed buffers to the kernel (mmap'd blocks over the dynamic mmap threshold, heap tops
over the trim threshold), and the next step page-faults them back in: bench/README.md measured 10-25% of a tiny
CPU step spent so, varying from process to process. Setting the thresholds (what MALLOC_MMAP_THRESHOLD_=32 MiB and
a huge MALLOC_TRIM_THRESHOLD_ do from the environment) keeps those buffers in the process for reuse; results do not
change. Called from the training setup, so every torchrun worker does it too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: about 2 GiB of free heap top before trimming

_applied: bool | None = None


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has mallopt as a stub)
        return libc
    except (OSError, AttributeError):
        return None


def set_mallopt(mmap_threshold: int | None, trim_threshold: int | None) -> bool:
    """Set glibc's mmap and trim thresholds (None leaves one as it is); False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    ok = True
    for param, value in ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold)):
        if value is not None:
            ok &= bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    return ok


def keep_freed_memory() -> bool:
    """Apply the training process's malloc settings once; True when glibc took them."""
    global _applied
    if _applied is None:
        _applied = set_mallopt(MMAP_THRESHOLD, TRIM_THRESHOLD)
    return _applied
