"""graphopt.allocator: while training, large blocks come from the heap and stay there for the next step (glibc
serves them with mmap otherwise, returned on free and faulted in again); afterwards glibc's defaults are back. Seen
through mallinfo2's count of mmapped blocks (page-fault counts depend on transparent huge pages)."""
import ctypes
import ctypes.util
import platform

import pytest

from graphopt.allocator import kept_freed_memory

pytestmark = pytest.mark.fast
BLOCK = 64 * 2 ** 20              # above glibc's largest mmap threshold (32 MB)


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2 (< 2.33)")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def _mapped_while_held(libc) -> int:
    """mmapped blocks while one BLOCK is allocated."""
    p = libc.malloc(BLOCK)
    try:
        return libc.mallinfo2().hblks
    finally:
        libc.free(p)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_blocks_come_from_the_heap_while_training_only():
    libc = _libc()
    base = libc.mallinfo2().hblks
    assert _mapped_while_held(libc) == base + 1          # glibc's default: a block this large is mmapped
    with kept_freed_memory() as ok:
        assert ok and _mapped_while_held(libc) == base    # from the heap, kept after free
    assert _mapped_while_held(libc) == base + 1          # defaults restored
