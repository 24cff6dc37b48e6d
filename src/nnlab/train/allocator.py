"""Keep freed tensor memory in the process instead of handing it back to the OS after every step.

glibc's malloc serves large blocks (above a threshold of 128 KiB that adapts upward only up to
32 MiB) with fresh mmap()s and trims the heap top back to the OS when it exceeds twice that, so
every step that allocates and frees the same activations faults the same pages in again. For the
article's CNN in bf16 (batch 64) that was ~2,500 page faults per step, and the ReLU, max-pool
and zero-fill of the 64x32x28x28 activations ran 3-10x slower than on warm memory; a step took
17-21 ms against 11-12 ms with the two settings below (AMX Xeon, 2 cores). This is the problem
that jemalloc or tcmalloc fixes when preloaded; mallopt() gets the same effect from inside the
process, with no extra library and no environment variable to set before Python starts.

The cost: memory freed by one step stays reserved for the next, so the resident size stays at its
peak instead of shrinking between steps (the peak itself is unchanged). It changes no result.
A block freed and asked for again can take a few rounds to be reused: with nnlab's modules loaded,
a 64 MB alloc-fill-free cycle grew the heap in up to 8 of its first 9 rounds, then never (measured).
Each new block sat 64 MB + 128 bytes above the last, so, we think, a small allocation just past a
freed block pins its hole and posix_memalign asks for a little more than the hole holds, until
freed holes coalesce.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # mallopt() parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap, which is reused
TRIM_THRESHOLD = 1 << 31  # never return less than 2 GiB of free heap top to the OS

_state: dict = {}


def tune_allocator() -> tuple[bool, str]:
    """Apply the settings once per process; returns (applied, why) for the run's summary."""
    if "result" not in _state:
        _state["result"] = _apply()
    return _state["result"]


def _apply() -> tuple[bool, str]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False, f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'}): left as is"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as e:
        return False, f"mallopt unavailable ({e}): left as is"
    if not ok:
        return False, "mallopt refused the thresholds: left as is"
    return True, "glibc malloc: mmap threshold 1 GiB, trim threshold 2 GiB (freed memory is reused, not re-faulted)"
