"""glibc malloc thresholds for the daemon: reuse freed memory instead of faulting it back.

glibc returns freed memory to the kernel once the free space at the top of a heap exceeds its trim
threshold, and serves allocations above its mmap threshold with a fresh ``mmap``. Both thresholds
start at 128 KiB and only grow as large blocks get freed, so in a fresh daemon whose learner runs in
a worker thread they stay near the size of one request batch: every batch, the tensors of the
forward and backward pass (hundreds of KiB each for the MLPs) go back to the kernel and come back
as zero-filled pages, 600–800 page faults per batch of 200 on ``mlp4`` (``bench.daemon_overhead``
counts them). Fixed thresholds stop that: the process then keeps up to ``retain_bytes`` of freed
memory for the next batch. Its resident size stays what its peak was, not more.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc caps M_MMAP_THRESHOLD at HEAP_MAX_SIZE / 2 (32 MiB on 64-bit); larger values are refused.
MMAP_THRESHOLD_MAX = 32 << 20
#: Environment variables with which an operator sets these thresholds themselves.
OPERATOR_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def operator_tuned(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment already sets glibc's trim or mmap threshold."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(v in environ for v in OPERATOR_VARIABLES) or any(
        name in tunables for name in ("glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold")
    )


def retain_freed_memory(retain_bytes: int) -> bool:
    """Fix glibc's thresholds so that up to ``retain_bytes`` of freed memory is kept for reuse.

    Returns whether they were set: not with ``retain_bytes == 0``, not when the environment sets
    them already (the operator's choice wins), and not where the C library has no ``mallopt``
    (musl, macOS), where this is left to that allocator.
    """
    if retain_bytes <= 0:
        return False
    if operator_tuned():
        log.info("malloc thresholds left as the environment sets them")
        return False
    libc = _libc()
    # The parameter numbers are glibc's: another C library's mallopt may read them differently.
    if libc is None or not is_glibc(libc) or not hasattr(libc, "mallopt"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 on success, 0 on a refused value.
    return bool(mallopt(M_MMAP_THRESHOLD, min(retain_bytes, MMAP_THRESHOLD_MAX))) and bool(
        mallopt(M_TRIM_THRESHOLD, min(retain_bytes, 2**31 - 1))
    )


def is_glibc(libc: object | None = None) -> bool:
    """Whether ``libc`` (default: this process's C library) is glibc."""
    libc = _libc() if libc is None else libc
    return libc is not None and hasattr(libc, "gnu_get_libc_version")


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else ctypes.CDLL(None)
    except OSError:
        return None
