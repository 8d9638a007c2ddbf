"""graphopt.allocator: freed training memory stays in the process (no page faults for the next step's tensors)."""
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.fast

CHILD = """
import resource, sys, numpy as np
from graphopt.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()        # idempotent
n = 64 * 2 ** 20 // 8                                            # 64 MB: above glibc's largest mmap threshold
def step():
    a = np.ones(n)
    return float(a[::512].sum())
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_blocks_are_reused_without_page_faults():
    plain, kept = _faults("plain"), _faults("keep")
    assert plain > 1000 and kept * 20 < plain, (plain, kept)
