"""Channels-last transposed convolutions (graphopt/targets/cpu_conv_transpose.py): a ConvTranspose whose kernel equals
its stride becomes an NHWC 1x1 conv and a depth-to-space copy, so its model runs channels-last; a model with any
other ConvTranspose stays NCHW."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_builders import model, rnd, vi

import graphopt
from graphopt import ort

tvm = pytest.importorskip("tvm")

from graphopt.targets.cpu import CpuTarget  # noqa: E402
from graphopt.targets.cpu_conv_transpose import is_depth_to_space  # noqa: E402
from targets.test_cpu_schedules import _rules, scheduled  # noqa: E402


def _compile_and_compare(m, tmp_path):
    """The model compiled for cpu (layout nhwc, the default) and its {function: rule} with direct convs
    (winograd=off, whose rules the tests read); the library matches
    onnxruntime (compile's own check, then once more on another input)."""
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    art = graphopt.compile(str(path), out=tmp_path / "art", measure=False, target_options={"layout": "nhwc"})
    assert art.report["check"]["ok"], art.report["check"]
    feeds = ort.random_inputs([("x", tuple(art.inputs[0]["shape"]), np.float32)], seed=7)
    ref = ort.run(path.read_bytes(), feeds)
    for (name, r), g in zip(ref.items(), art.run(feeds).values()):
        assert g.shape == r.shape, name
        assert np.abs(g - r).max() <= 1e-4 * max(1.0, float(np.abs(r).max())), name
    return _rules(scheduled(path, CpuTarget(layout="nhwc", winograd="off")))     # the direct convs' rules


def test_conv_transpose_with_kernel_equal_to_stride_goes_channels_last(tmp_path):
    """A U-Net / DBNet decoder: ConvTranspose 2x2 stride 2 with bias, then conv + relu, then a ConvTranspose 1x2
    stride 1x2 to 3 channels (a 1x1 conv to 6 channels: computed at 8, the copy reads 6). Every conv runs
    channels-last, no conv2d_transpose is left, and the library matches onnxruntime. Before, the whole model stayed
    NCHW (TVM 0.27 legalizes conv2d_transpose only in NCHW)."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("ConvTranspose", ["r1", "wt1", "bt1"], ["t1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["t1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("ConvTranspose", ["r2", "wt2", "bt2"], ["y"], kernel_shape=[1, 2], strides=[1, 2])]
    m = model(nodes, [vi("x", [1, 8, 6, 10])], [vi("y", None)],
              [("w1", rnd(16, 8, 3, 3)), ("b1", rnd(16, seed=1)), ("wt1", rnd(16, 16, 2, 2, seed=2)),
               ("bt1", rnd(16, seed=3)), ("w2", rnd(16, 16, 3, 3, seed=4)), ("b2", rnd(16, seed=5)),
               ("wt2", rnd(16, 3, 1, 2, seed=6)), ("bt2", rnd(3, seed=7))])
    rules = _compile_and_compare(m, tmp_path)
    convs = {n: r for n, r in rules.items() if "conv2d" in n}
    assert len(convs) == 4 and set(convs.values()) == {"conv2d_nhwc"}, rules
    assert not any("conv2d_transpose" in n for n in rules) and any("depth_to_space" in n for n in rules), rules


def test_other_conv_transposes_keep_the_model_nchw(tmp_path):
    """ConvTransposes with padding (kernel 4, stride 2, pads 1) or a kernel larger than the stride (3, stride 2)
    keep TVM's NCHW conv2d_transpose, and with them the whole model, the kernel-equals-stride one included, stays
    NCHW and matches onnxruntime."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["c1", "wt1", "bt1"], ["t1"], kernel_shape=[4, 4], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["t1"], ["r1"]),
             helper.make_node("ConvTranspose", ["r1", "wt2"], ["t2"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("ConvTranspose", ["t2", "wt3"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    m = model(nodes, [vi("x", [1, 8, 5, 6])], [vi("y", None)],
              [("w1", rnd(16, 8, 3, 3)), ("b1", rnd(16, seed=1)), ("wt1", rnd(16, 16, 4, 4, seed=2)),
               ("bt1", rnd(16, seed=3)), ("wt2", rnd(16, 8, 3, 3, seed=4)), ("wt3", rnd(8, 8, 2, 2, seed=5))])
    rules = _compile_and_compare(m, tmp_path)
    assert "conv2d_nhwc" not in rules.values() and "conv2d" in rules.values(), rules
    assert sum("conv2d_transpose" in n for n in rules) == 3, rules


@pytest.mark.parametrize("kw,ok", [
    ({}, True),
    ({"strides": (1, 2)}, False),                        # kernel 2x2, stride 1x2: outputs overlap
    ({"padding": (1, 1, 1, 1)}, False),
    ({"output_padding": (1, 1), "strides": (2, 2)}, False),
    ({"dilation": (2, 2)}, False),
    ({"groups": 2}, False),
])
def test_which_conv_transposes_are_depth_to_space(kw, ok):
    from tvm import relax
    x = relax.Var("x", relax.TensorType((1, 4, 5, 5), "float32"))
    w = relax.Var("w", relax.TensorType((4, 2, 2, 2), "float32"))
    call = relax.BlockBuilder().normalize(relax.op.nn.conv2d_transpose(x, w, **{"strides": (2, 2), **kw}))
    assert is_depth_to_space(call) is ok
