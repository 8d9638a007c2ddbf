"""The C allocator while training: keep freed memory for the next step instead of handing it back to the kernel.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it on free.
A training step allocates and frees the same large activations and gradients every time, so every step faults all
of them in again: on magika's batch of 64 (tensors of 67 MB) that was 3.3 million page faults and 43% of the
process's CPU time in the kernel (5.3 s sys beside 7.0 s user for 4 steps; 0.0 s sys with this). Setting
M_MMAP_MAX to 0 serves large blocks from the heap too, and a large M_TRIM_THRESHOLD keeps the heap's top, so the
second step reuses the first step's memory. The peak stays what the step needs; it is simply not given back until
the process ends. Elsewhere than glibc (musl, macOS) this does nothing."""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_done = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in the process (once per process). True when it took effect."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _done
