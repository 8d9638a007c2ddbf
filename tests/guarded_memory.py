"""Arrays placed against an inaccessible page, to catch kernels that read or write outside their buffers.

A kernel that loads one row before its input (a padding test the simplifier proved away, so the load runs
unconditionally and its result is discarded) is harmless while the buffer sits inside a larger allocation and fatal
when the buffer starts a fresh mapping: glibc serves every buffer over 128 KB with its own mmap, so the same library
runs in one process and dies of SIGSEGV in another. guarded(a, "before") puts a's first byte right after a PROT_NONE
page; guarded(a, "after") ends a within 64 bytes of one (buffers stay 64-byte aligned, as TVM assumes), so any
access below the start or past the end of the buffer faults at once.
"""
from __future__ import annotations

import ctypes
import mmap

import numpy as np

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_keep: list = []   # the mappings stay alive as long as the process (arrays only hold a buffer view)


def guarded(a: np.ndarray, side: str) -> np.ndarray:
    """A copy of a whose first byte follows (side "before") or whose end precedes (side "after") an inaccessible
    page."""
    a = np.ascontiguousarray(a)
    data_pages = -(-max(a.nbytes, 1) // PAGE) + 1
    mm = mmap.mmap(-1, (data_pages + 2) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    for page in (0, data_pages + 1):
        if _libc.mprotect(base + page * PAGE, PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
    off = PAGE if side == "before" else ((data_pages + 1) * PAGE - a.nbytes) // 64 * 64
    out = np.frombuffer(mm, dtype=a.dtype, count=a.size, offset=off).reshape(a.shape)
    out[...] = a
    _keep.append(mm)
    return out


def run_guarded(func, args: list, out_shape: tuple, out_dtype: str, side: str) -> np.ndarray:
    """Call the compiled function func(*args, out) with every argument and the output placed on `side` of an
    inaccessible page (zero-copy: TVM tensors over the guarded memory); returns a copy of the output."""
    import tvm
    ins = [guarded(a, side) for a in args]
    out = guarded(np.zeros(out_shape, out_dtype), side)
    func(*[tvm.runtime.from_dlpack(a) for a in ins], tvm.runtime.from_dlpack(out))
    return out.copy()
