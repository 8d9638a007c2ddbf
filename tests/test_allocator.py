"""graphopt.allocator: while training, freed memory stays in the process (no page faults for the next step's
tensors); afterwards glibc's defaults are back."""
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.fast

CHILD = """
import resource, sys, numpy as np
from graphopt.allocator import kept_freed_memory
n = 64 * 2 ** 20 // 8                                            # 64 MB: above glibc's largest mmap threshold
def step():
    a = np.ones(n)
    return float(a[::512].sum())
def faults():
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
if sys.argv[1] == "keep":
    with kept_freed_memory() as ok:
        assert ok
        inside = faults()
    print(inside, faults())
else:
    print(faults(), 0)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_blocks_are_reused_while_training_and_returned_after():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
        return [int(v) for v in out.stdout.split()]
    plain, _ = run("plain")
    inside, after = run("keep")
    assert plain > 1000 and inside * 20 < plain, (plain, inside)
    assert after > plain // 2                                   # the defaults are back: blocks are mapped again
