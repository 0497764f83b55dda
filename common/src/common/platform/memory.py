"""glibc malloc settings for servers that stream large buffers from many threads.

glibc's defaults suit neither: each thread that allocates may get its own arena (up to 8 per
core), and after a large buffer is freed the mmap threshold rises to its size, so later
multi-MiB buffers (request chunks, object-store parts) come from arenas that keep their pages.
A worker's resident size then grows with every upload and never shrinks. Two arenas and a fixed
512 KiB mmap threshold (larger buffers are mapped and returned to the system when freed) keep it
flat; the request body's chunks (granian's, up to 408 KiB) stay below it, as a mapping each
would cost its pages' faults again. A variable set in the environment (``MALLOC_ARENA_MAX``,
``MALLOC_MMAP_THRESHOLD_``) is glibc's own and wins: that parameter is left alone.
"""

from __future__ import annotations

import ctypes
import gc
import os

from common.settings import glibc_malloc_overrides

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD = 512 * 1024

_tuned = False


def tune_malloc() -> bool:
    """Apply the settings once per process; False where the C library is not glibc."""
    global _tuned
    if _tuned:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname; elsewhere there is nothing to tune
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    overridden = glibc_malloc_overrides()
    if "MALLOC_ARENA_MAX" not in overridden:
        mallopt(_M_ARENA_MAX, ARENA_MAX)
    if "MALLOC_MMAP_THRESHOLD_" not in overridden:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    # A forked process shares its parent's imported modules until it writes to them; a
    # garbage collection writes to every object it visits. Objects that exist at fork time
    # are moved out of the collector's reach, so those pages stay shared. (Server workers
    # also freeze what they import themselves: common.platform.serve.settle.)
    os.register_at_fork(before=gc.freeze)
    _tuned = True
    return True
