"""Keep freed tensor memory in the process instead of handing it back to the OS after every step.

glibc's malloc serves large blocks with fresh mmap()s and trims the heap top back to the OS, so
every step that allocates and frees the same activations faults the same pages in again, and the
memory-bound ops around a small CNN's convolutions then run on cold pages. jemalloc or tcmalloc
fix this when preloaded; mallopt() gets the same effect from inside the process, with no extra
library and no environment variable to set before Python starts.

The cost: memory freed by one step stays reserved for the next, so the resident size stays at its
peak instead of shrinking between steps (the peak itself is unchanged). It changes no result.
A freed block can take a few rounds of the same allocation to be reused before the heap settles
(its test measures after a warm-up for that reason); benchmarks/README.md has the figures.
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
