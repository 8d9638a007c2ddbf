"""Kernels whose padding reads a clamped index under a condition must not touch memory outside their buffers
(guarded_kernels.py runs each against inaccessible pages, in its own process). Winograd's input transform and the
strided int8 depthwise conv used tirx.Select there: the simplifier dropped the clamp under the Select's condition and
the unconditional load read the row above the image, which killed a ResNet-50 block's compile (its self-check run)
with SIGSEGV when that input was a fresh mapping. The VNNI int8 and the paired bf16 depthwise convs' loads carry no clamp at all: each is
executed only where its row and column lie inside the input (if_then_else), which this checks too."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from graphopt.targets.x86_isa import host_flags
from targets.guarded_kernels import CASES

SCRIPT = Path(__file__).with_name("guarded_kernels.py")


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_stays_inside_its_buffers(case):
    missing = [f for f in CASES[case][1] if f not in host_flags()]
    if missing:
        pytest.skip(f"the {case} kernel needs {', '.join(missing)}")
    r = subprocess.run([sys.executable, str(SCRIPT), case], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{case}: exit {r.returncode} ({'SIGSEGV' if r.returncode in (-11, 139) else ''})\n" \
                              f"{r.stdout[-2000:]}{r.stderr[-2000:]}"
    assert f"{case}: ok" in r.stdout
