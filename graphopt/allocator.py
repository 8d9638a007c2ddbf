"""The C allocator while training: keep freed memory for the next step instead of handing it back to the kernel.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it on free.
A training step allocates and frees the same large activations and gradients every time, so every step faults all
of them in again: on magika's batch of 64 (tensors of 67 MB) that was 3.3 million page faults and 43% of the
process's CPU time in the kernel (5.3 s sys beside 7.0 s user for 4 steps; 0.0 s sys with this). Setting
M_MMAP_MAX to 0 serves large blocks from the heap too, and a large M_TRIM_THRESHOLD keeps the heap's top, so the
second step reuses the first step's memory. The peak stays what the step needs; it is given back (glibc's defaults
restored, malloc_trim) when training ends, so the rest of a process (a notebook, a test run) keeps the usual
behaviour. Elsewhere than glibc (musl, macOS) this does nothing."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024      # glibc's defaults
DEFAULT_MMAP_MAX = 65536


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return mallopt, trim


@contextlib.contextmanager
def kept_freed_memory():
    """While inside, glibc's malloc keeps freed memory in the process (no mmap for large blocks, no trimming); on
    leaving, its defaults come back and the kept memory is returned. Yields whether it took effect."""
    fns = _libc()
    ok = fns is not None and bool(fns[0](M_MMAP_MAX, 0)) and bool(fns[0](M_TRIM_THRESHOLD, 2 ** 31 - 1))
    try:
        yield ok
    finally:
        if fns is not None:
            fns[0](M_MMAP_MAX, DEFAULT_MMAP_MAX)
            fns[0](M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            fns[1](0)
