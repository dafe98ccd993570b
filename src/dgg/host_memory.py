"""Give freed host memory back to the operating system (glibc on Linux).

glibc serves a large allocation with its own ``mmap`` only while the request is above a threshold that it raises
each time such a block is freed (up to 32 MiB on 64-bit). After the first update has freed its activations and
gradients, later blocks of that size come from the heap instead, and what the heap frees is kept by the process,
not returned: on a SmolLM2 batch (benchmarks/memory_phases.py) about 0.5 GB stayed resident between batches for
no tensor, and the batch's peak was 0.55 GB higher. Pinning the threshold (and the heap's trim threshold) at
glibc's default 128 KiB turns that off, at a price: every large block is then mapped and zeroed afresh (about a
quarter more wall-clock on that batch). The arithmetic is untouched; only where the allocator finds memory
changes. Elsewhere (macOS, musl) this is a no-op that says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # mallopt parameters, glibc's malloc.h
M_MMAP_THRESHOLD = -3
PINNED_THRESHOLD = 128 * 1024  # glibc's default before it starts adjusting


@functools.cache
def return_freed_memory() -> str | None:
    """Pin glibc's mmap and trim thresholds, once per process; None when done, else why it could not be."""
    name = ctypes.util.find_library("c")
    if name is None:
        return "no C library found"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return f"{name} has no mallopt (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, PINNED_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, PINNED_THRESHOLD)):
        return f"{name}'s mallopt refused the thresholds"
    return None
