"""glibc malloc's settings for a worker process that runs the engine on the CPU.

Every loss evaluation allocates and frees the same activations and gradients again: at
512 px about a hundred tensors of 1 to 50 MB. glibc hands blocks above its mmap threshold
(which it raises by itself to 32 MB at most) straight to ``mmap`` and unmaps them on
``free``, so each evaluation faulted its memory in anew: 25,000 to 42,000 page faults per
evaluation at 512 px, a tenth of its time (docs/benchmarks.md). With the thresholds raised,
freed blocks stay in the heap and the next evaluation reuses them; after each job,
:func:`release_free_memory` gives the free pages back to the system, so that an idle worker
holds only what it uses.

Elsewhere than glibc (musl, macOS) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt's parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap, not from mmap: a 1024 px job's largest.
MMAP_THRESHOLD_BYTES = 1 << 30
#: Free memory at the top of the heap is kept up to this size until the job ends.
TRIM_THRESHOLD_BYTES = (1 << 31) - 1


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory() -> bool:
    """Keep freed blocks in the heap for reuse; True where glibc took the settings."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (after a job)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
