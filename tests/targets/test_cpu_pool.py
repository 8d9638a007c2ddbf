"""targets/cpu_pool: fp32 channels-last max pooling with clamped window indices matches onnxruntime's MaxPool over
the forms conv nets use, is exact alone against numpy, and takes only pools whose every window holds input."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_builders import model, rnd, vi

import graphopt
from graphopt import ort

tvm = pytest.importorskip("tvm")

from graphopt.targets import cpu_pool  # noqa: E402

POOLS = [  # C, H, W, kernel, stride, pads (top, left, bottom, right), ceil_mode
    (64, 24, 24, 3, 2, (1, 1, 1, 1), 0),          # ResNet's stem pool
    (32, 10, 10, 5, 1, (2, 2, 2, 2), 0),          # YOLO's SPPF
    (24, 9, 7, 2, 2, (0, 0, 0, 0), 1),            # ceil mode: the last window hangs over the edge
    (12, 8, 11, 3, 2, (0, 1, 1, 0), 0),           # asymmetric pads, channels not a multiple of the vector width
]


@pytest.mark.parametrize("case", POOLS, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-k{c[3]}s{c[4]}")
def test_nhwc_max_pool_matches_onnxruntime(case, tmp_path):
    C, H, W, k, s, pads, ceil = case
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[k, k], strides=[s, s],
                              pads=[pads[0], pads[1], pads[2], pads[3]], ceil_mode=ceil),
             helper.make_node("Conv", ["p", "w2"], ["y"])]
    m = model(nodes, [vi("x", [1, 8, H, W])], [vi("p", None), vi("y", None)],
              [("w", rnd(C, 8, 3, 3)), ("w2", rnd(16, C, 1, 1, seed=1))])
    path = tmp_path / "pool.onnx"
    onnx.save(m, str(path))
    art = graphopt.compile(str(path), out=tmp_path / "art", measure=False)
    assert art.report["fp32_maxpool_nhwc"] == 1, art.report
    x = np.random.default_rng(C).standard_normal((1, 8, H, W)).astype(np.float32)
    ref, got = ort.run(m, {"x": x}), art.run({"x": x})
    # the conv before the pool sums in another order than onnxruntime's: equal within fp32 rounding (the kernel
    # alone is exact, below)
    assert got["p"].shape == ref["p"].shape
    np.testing.assert_allclose(got["p"], ref["p"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-4, atol=1e-4)


def test_kernel_alone_is_exact():
    """The kernel by itself against numpy's max over -inf-padded windows (no conv around it to blur a wrong tap)."""
    from graphopt.targets.cpu import CpuTarget
    N, H, W, C, k, s, p = 2, 9, 8, 16, 3, 2, 1
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    x = np.random.default_rng(0).standard_normal((N, H, W, C)).astype(np.float32)
    f = cpu_pool.maxpool_nhwc(N, H, W, C, OH, OW, (k, k), (s, s), (p, p, p, p), lanes=16)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=CpuTarget().tvm_target())
    y = tvm.runtime.tensor(np.zeros((N, OH, OW, C), np.float32))
    lib["main"](tvm.runtime.tensor(x), y)
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-np.inf)
    ref = np.stack([xp[:, i:i + s * OH:s, j:j + s * OW:s] for i in range(k) for j in range(k)]).max(0)
    assert np.array_equal(y.numpy(), ref)


def test_windows_hold_input():
    assert cpu_pool.windows_hold_input(112, 56, 3, 2, 1)
    assert not cpu_pool.windows_hold_input(4, 4, 2, 2, 2)           # the first window covers rows -2, -1 only
    assert cpu_pool.windows_hold_input(9, 5, 2, 2, 0)               # ceil mode's last window: row 8 alone
