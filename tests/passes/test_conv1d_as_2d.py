"""conv1d-as-2d: 1-D Convs and 2-D Convs down a width-1 column become 2-D Convs along a row, exactly (the pass manager compares each result with
onnxruntime on the input graph; here also by hand), idempotent, and the cpu target then schedules them."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
import onnx_builders as ob
from graphopt import PassManager, api, ort

pytestmark = pytest.mark.fast


def conv1d_model(opset=17, shared=False):
    """x [1, 2, 64] -> Conv1d (4 taps, stride 2, pads 1/2, dilation 1, groups 1) -> Relu -> Conv1d (depthwise, 3 taps)
    [-> the first conv's weight again when shared]."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 2, 4)).astype(np.float32)
    w2 = rng.standard_normal((6, 1, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv_a", strides=[2], pads=[1, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv_b", group=6, pads=[1, 1])]
    outs = [ob.vi("y", [1, 6, 32])]
    if shared:
        nodes.append(helper.make_node("Conv", ["x", "w1"], ["z"], name="conv_c", strides=[2], pads=[1, 2]))
        outs.append(ob.vi("z", [1, 6, 32]))
    return ob.model(nodes, [ob.vi("x", [1, 2, 64])], outs,
                    [("w1", w1), ("b1", rng.standard_normal(6).astype(np.float32)), ("w2", w2)], opset=opset)


def column_model():
    """(magika, a jax2tf export) x [1, 3, 40, 1] -> Conv with a [5, 1] kernel, stride 2 and padding down the column
    -> y [1, 8, 19, 1]."""
    w = np.random.default_rng(2).standard_normal((8, 3, 5, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="column", strides=[2, 1], pads=[1, 0, 0, 0])]
    return ob.model(nodes, [ob.vi("x", [1, 3, 40, 1])], [ob.vi("y", [1, 8, 19, 1])], [("w", w)])


@pytest.mark.parametrize("build,rewritten", [(lambda: conv1d_model(17), 2), (lambda: conv1d_model(11), 2),
                                             (lambda: conv1d_model(17, shared=True), 3), (column_model, 1)])
def test_rewrite_is_exact_and_idempotent(build, rewritten):
    model = build()
    res = PassManager.parse("conv1d-as-2d").run(graphopt.load(model))
    assert res.records[-1]["info"]["rewritten"] == rewritten
    convs = [n for n in res.graph.nodes if n.op == "Conv"]
    assert all(n.inputs[1].values.ndim == 4 and n.inputs[1].values.shape[2] == 1 for n in convs)
    x = np.random.default_rng(1).standard_normal(
        [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    got = ort.run(graphopt.to_onnx(res.graph, check=True), {"x": x})
    for name, ref in ort.run(model, {"x": x}).items():
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-5)
    again = PassManager.parse("conv1d-as-2d").run(res.graph)
    assert again.records[-1]["info"]["rewritten"] == 0


def test_2d_convs_and_quantized_weights_are_left_alone(zoo_onnx):
    g = graphopt.load(str(zoo_onnx("cnn_digits")))
    res = PassManager.parse("conv1d-as-2d").run(g)
    assert res.records[-1]["info"]["rewritten"] == 0


def test_cpu_compiles_conv1d_through_the_scheduled_conv2d(tmp_path):
    model = conv1d_model()
    art = api.compile(model, "cpu", out=tmp_path / "a", measure=False)
    assert art.report["check"]["ok"]
    legal = [r for r in art.manifest["passes"] if r.get("legalize") and "conv1d-as-2d" in str(r)]
    assert len(legal) == 1 and "'rewritten': 2" in str(legal[0])
    # the library holds scheduled (prepacked) conv2d kernels, no conv1d
    kernels = art.report.get("ops") or {}
    assert "conv1d" not in str(kernels)


def point_model():
    """(PP-OCRv4's recognizer: squeeze-excite over a pooled [1, C, 1, 1]) x [1, 4, 1, 1] -> 1x1 Conv -> y
    [1, 6, 1, 1]: a column of height 1 is a row already, and the shape is what the pass's own output looks like."""
    w = np.random.default_rng(3).standard_normal((6, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="point", kernel_shape=[1, 1])]
    return ob.model(nodes, [ob.vi("x", [1, 4, 1, 1])], [ob.vi("y", [1, 6, 1, 1])], [("w", w)])


def unique_names(model: onnx.ModelProto) -> bool:
    made = [o for n in model.graph.node for o in n.output] + [t.name for t in model.graph.initializer]
    return len(made) == len(set(made)) and len({n.name for n in model.graph.node}) == len(model.graph.node)


@pytest.mark.parametrize("build", [conv1d_model, point_model])
def test_rewriting_its_own_output_again_is_a_no_op(build):
    """Compiling an artifact's model.onnx runs the pass on its own output: nothing left to rewrite, names unique."""
    first = graphopt.to_onnx(PassManager.parse("conv1d-as-2d").run(graphopt.load(build())).graph, check=True)
    again = PassManager.parse("conv1d-as-2d").run(graphopt.load(first))
    assert again.records[-1]["info"]["rewritten"] == 0
    assert unique_names(graphopt.to_onnx(again.graph, check=True))


def test_new_names_never_clash_with_the_graphs():
    """Tensors already named like the pass's new ones (conv_a_row_in, x_row, ...) keep their names; the new ones
    get others, and the result is still exact."""
    model = conv1d_model()
    clash = {"c1": "conv_a_row_in", "r1": "conv_a_row_out_shape", "w2": "w1_row"}
    for n in model.graph.node:
        n.input[:] = [clash.get(t, t) for t in n.input]
        n.output[:] = [clash.get(t, t) for t in n.output]
    for t in model.graph.initializer:
        t.name = clash.get(t.name, t.name)
    res = PassManager.parse("conv1d-as-2d").run(graphopt.load(model))
    assert res.records[-1]["info"]["rewritten"] == 2
    out = graphopt.to_onnx(res.graph, check=True)
    assert unique_names(out)
    x = np.random.default_rng(1).standard_normal((1, 2, 64)).astype(np.float32)
    np.testing.assert_allclose(ort.run(out, {"x": x})["y"], ort.run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_channel", [True, False])
def test_quantized_1d_convs_become_integer_row_convs(tmp_path, per_channel):
    """In a QDQ graph (an audio model's quantized STFT / encoder convs: silero-vad's ran as TVM's unscheduled fp32
    conv1d, 5.4 of 6.4 ms) the weight's integers are reshaped under the same per-channel DequantizeLinear and the
    activation on its integers, so the int8 lowering still sees DequantizeLinear -> Conv: every conv an integer
    kernel, the compiled library passing the int8 check. Exact (the manager checks it); idempotent."""
    from graphopt import PassContext
    calib = {"x": np.random.default_rng(4).standard_normal((8, 1, 2, 64)).astype(np.float32)}
    q = PassManager.parse(f"quantize{{calib_samples=8,per_channel={str(per_channel).lower()}}}").run(
        graphopt.load(conv1d_model()),
                                                             PassContext(data={"calib": calib})).graph
    res = PassManager.parse("conv1d-as-2d").run(q)
    assert res.records[-1]["info"]["rewritten"] == 2
    convs = [n for n in res.graph.nodes if n.op == "Conv"]
    for conv in convs:
        x_dq, w_dq = (t.inputs[0] for t in conv.inputs[:2])
        assert x_dq.op == w_dq.op == "DequantizeLinear" and w_dq.inputs[0].values.dtype == np.int8
        assert w_dq.inputs[0].values.ndim == 4 and w_dq.inputs[0].values.shape[2] == 1
    assert not PassManager.parse("conv1d-as-2d").run(res.graph).modified
    art = api.compile(q, "cpu", out=tmp_path / "a", measure=False)
    assert art.report["check"]["ok"]
    rep = art.report
    if rep["int8_dot"]:                  # a CPU with an integer dot product (VNNI, AVX2, usdot)
        assert rep["conv2d"] + rep["dwconv2d"] + rep["dwconv2d_vnni"] == 2 and rep["fp32_convs"] == 0, rep


def stft_model(bias=True):
    """(an audio front end: openWakeWord's melspectrogram) x [1, 1, 800] -> Conv1d over one channel, 96 taps,
    stride 40, 33 output channels [+ bias] -> Relu -> y [1, 33, 18]."""
    rng = np.random.default_rng(5)
    ins = ["x", "w"] + (["b"] if bias else [])
    nodes = [helper.make_node("Conv", ins, ["c"], name="stft", strides=[40], kernel_shape=[96]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    inits = [("w", rng.standard_normal((33, 1, 96)).astype(np.float32))] + \
        ([("b", rng.standard_normal(33).astype(np.float32))] if bias else [])
    return ob.model(nodes, [ob.vi("x", [1, 1, 800])], [ob.vi("y", [1, 33, 18])], inits)


@pytest.mark.parametrize("bias", [True, False])
def test_long_single_channel_conv_becomes_frames_and_a_matmul(bias, tmp_path):
    """A conv over one input channel with >= FRAMES_MIN_TAPS taps is a GEMM of overlapping frames: Gather of the
    frames, MatMul with the transposed weight, Transpose back. Exact (checked by the manager and here), idempotent,
    and the cpu target compiles it (the MatMul as a scheduled dense kernel)."""
    model = stft_model(bias)
    res = PassManager.parse("conv1d-as-2d").run(graphopt.load(model))
    assert res.records[-1]["info"] == {"rewritten": 1, "as_frames": 1}
    ops = [n.op for n in res.graph.nodes]
    assert "Conv" not in ops and {"Gather", "MatMul", "Transpose"} <= set(ops)
    x = np.random.default_rng(1).standard_normal((1, 1, 800)).astype(np.float32)
    got = ort.run(graphopt.to_onnx(res.graph, check=True), {"x": x})["y"]
    np.testing.assert_allclose(got, ort.run(model, {"x": x})["y"], rtol=1e-5, atol=1e-4)
    assert not PassManager.parse("conv1d-as-2d").run(res.graph).modified
    assert api.compile(model, "cpu", out=tmp_path / "a", measure=False).report["check"]["ok"]


def test_quantized_frames_conv_becomes_an_integer_dense_kernel(tmp_path):
    """Quantized, the frames are gathered on the integers and the transposed weight keeps its per-channel scales
    (axis 1 now), so the int8 lowering takes the MatMul as an integer dense kernel."""
    from graphopt import PassContext
    calib = {"x": np.random.default_rng(4).standard_normal((8, 1, 1, 800)).astype(np.float32)}
    q = PassManager.parse("quantize{calib_samples=8}").run(graphopt.load(stft_model()),
                                                             PassContext(data={"calib": calib})).graph
    res = PassManager.parse("conv1d-as-2d").run(q)
    assert res.records[-1]["info"]["as_frames"] == 1
    gather = next(n for n in res.graph.nodes if n.op == "Gather")
    assert gather.inputs[0].dtype == np.uint8
    art = api.compile(q, "cpu", out=tmp_path / "a", measure=False)
    rep = art.report
    assert rep["check"]["ok"]
    if rep["int8_dot"]:
        assert rep["dense"] == 1 and rep["fp32_matmuls"] == 0 and rep["fp32_convs"] == 0, rep
