"""The cpu target's channels-last conversion (graphopt/targets/cpu_layout.py, `--target-option layout=nhwc`) on forms
that real models feed it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_builders import model, rnd, vi

import graphopt

tvm = pytest.importorskip("tvm")

from graphopt.targets import cpu_layout  # noqa: E402
from graphopt.targets.cpu import CpuTarget  # noqa: E402


def _squeeze_module(axis):
    """relu(x: [1, 16, 1]) squeezed on `axis`, as Relax."""
    from tvm import relax
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 1), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(x))
            out = bb.emit_output(bb.emit(relax.op.squeeze(y, axis=axis)))
        bb.emit_func_output(out)
    return bb.get()


def _squeeze_axes(mod):
    return [[int(a) for a in c.attrs.axis] for c in cpu_layout.calls(mod) if c.op.name == "relax.squeeze"]


def test_squeeze_axes_are_made_non_negative():
    """TVM 0.27's squeeze layout rule dies with std::bad_alloc on a negative axis (whatever the layouts), so the
    conversion counts a squeeze's axes from the front before ConvertLayout sees them; axes already non-negative and
    a squeeze of every unit axis are left alone."""
    assert _squeeze_axes(cpu_layout._layout_ready_ops(_squeeze_module([-1]))) == [[2]]
    assert _squeeze_axes(cpu_layout._layout_ready_ops(_squeeze_module([0, -1]))) == [[0, 2]]
    assert _squeeze_axes(cpu_layout._layout_ready_ops(_squeeze_module([2]))) == [[2]]
    unit = [c for c in cpu_layout.calls(cpu_layout._layout_ready_ops(_squeeze_module(None)))
            if c.op.name == "relax.squeeze"]
    assert len(unit) == 1 and unit[0].attrs.axis is None


def test_conv1d_stack_squeezed_on_its_last_axis_builds_channels_last(tmp_path):
    """Silero VAD's encoder: 1-D convs (conv1d-as-2d makes them row convs, lowered NHWC) and a Squeeze(axes=[-1])
    of the length-1 time axis before its LSTM. With layout=nhwc the build died with std::bad_alloc in ConvertLayout;
    it now builds, the convs run channels-last, and the library matches onnxruntime."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1], strides=[2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1], strides=[2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Squeeze", ["r2", "axes"], ["y"])]
    m = model(nodes, [vi("x", [1, 16, 4])], [vi("y", None)],
              [("w1", rnd(32, 16, 3)), ("b1", rnd(32, seed=1)), ("w2", rnd(64, 32, 3, seed=2)),
               ("b2", rnd(64, seed=3)), ("axes", np.array([-1], np.int64))])
    onnx.save(m, str(tmp_path / "vad.onnx"))
    art = graphopt.compile(str(tmp_path / "vad.onnx"), out=tmp_path / "art", measure=False,
                           target_options={"layout": "nhwc"})
    assert art.report["check"]["ok"], art.report["check"]
    assert art.outputs[0]["shape"] == [1, 64]
    from targets.test_cpu_schedules import _rules, scheduled
    assert "conv2d_nhwc" in _rules(scheduled(art.path / "model.onnx", CpuTarget(layout="nhwc"))).values()


def test_stack_becomes_concat_of_expand_dims():
    """TVM 0.27's stack layout rule fails on any use of the stacked tensor ("Invalid SLayout", "Index -1 out of
    bounds"), whatever the layouts: stack([a, b], axis) is rewritten to concat([expand_dims(a, axis), ...], axis)."""
    from tvm import relax
    bb = relax.BlockBuilder()
    a, b = (relax.Var(n, relax.TensorType((1, 8), "float32")) for n in "ab")
    with bb.function("main", [a, b]):
        with bb.dataflow():
            s = bb.emit(relax.op.stack([a, b], axis=-1))
            out = bb.emit_output(bb.emit(relax.op.max(s, axis=[-1])))
        bb.emit_func_output(out)
    mod = cpu_layout._layout_ready_ops(bb.get())
    ops = [c.op.name for c in cpu_layout.calls(mod)]
    assert "relax.stack" not in ops and ops.count("relax.expand_dims") == 2 and "relax.concat" in ops, ops
    concat = next(c for c in cpu_layout.calls(mod) if c.op.name == "relax.concat")
    assert int(concat.attrs.axis) == 2
    relax.transform.ConvertLayout({}, lambda call: {})(mod)        # raised before the rewrite


def test_elementwise_max_of_conv_outputs_builds_channels_last(tmp_path):
    """ONNX Max of two tensors is imported as stack + max (DNSMOS, openWakeWord's embedding and Magika failed to
    build with layout=nhwc); with the stack rewritten it builds and matches onnxruntime."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Max", ["c1", "c2"], ["m"]),
             helper.make_node("Conv", ["m", "w3", "b3"], ["y"])]
    m = model(nodes, [vi("x", [1, 8, 6, 10])], [vi("y", None)],
              [("w1", rnd(16, 8, 3, 3)), ("b1", rnd(16, seed=1)), ("w2", rnd(16, 8, 3, 3, seed=2)),
               ("b2", rnd(16, seed=3)), ("w3", rnd(16, 16, 1, 1, seed=4)), ("b3", rnd(16, seed=5))])
    onnx.save(m, str(tmp_path / "max.onnx"))
    art = graphopt.compile(str(tmp_path / "max.onnx"), out=tmp_path / "art", measure=False,
                           target_options={"layout": "nhwc"})
    assert art.report["check"]["ok"], art.report["check"]
