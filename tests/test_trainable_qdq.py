"""The trainable view runs QuantizeLinear / DequantizeLinear exactly as onnxruntime does (round half to even,
saturation, per-tensor and per-axis scales and zero points, int8 and uint8), with straight-through gradients."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import digits
import graphopt
from graphopt import PassContext, PassManager, ort
from graphopt.graph import from_onnx, to_onnx
from graphopt.quant_check import check_criterion
from graphopt.trainable import TrainableGraph, parameter_names

pytestmark = pytest.mark.fast

SHAPE = [2, 5, 4, 3]


def _qdq_model(scale, zp, axis):
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z"),
             numpy_helper.from_array(np.ones(SHAPE[-1:] * 2, np.float32), "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=axis),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], axis=axis),
             helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["d", "w"], ["y"])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, SHAPE) for n in ("d", "qf", "y")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)], outs,
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _case(dtype, axis, rng):
    """(scale, zero point, input): normal values, exact .5 ties of x / scale, and values far out of range."""
    lo = 0 if dtype == np.uint8 else -60
    if axis is None:
        scale, zp = np.array(0.05, np.float32), np.array(lo + 70, dtype)
        s = scale
    else:
        n = SHAPE[axis]
        scale = (rng.random(n) * 0.1 + 0.01).astype(np.float32)
        zp = rng.integers(lo, lo + 120, n).astype(dtype)
        shape = [1] * len(SHAPE)
        shape[axis] = n
        s = scale.reshape(shape)
    x = rng.standard_normal(SHAPE) * 4
    ties = (rng.integers(-200, 200, SHAPE) + 0.5) * s
    x = np.where(rng.random(SHAPE) < 0.5, ties, x)
    x.flat[:3] = [1e6, -1e6, 0.0]
    return scale, zp, x.astype(np.float32)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("axis", [None, 1, 0, -1])
def test_qdq_ops_equal_onnxruntime(dtype, axis):
    rng = np.random.default_rng(7)
    scale, zp, x = _case(dtype, axis, rng)
    model = _qdq_model(scale, zp, 1 if axis is None else axis)
    ref = ort.run(model, {"x": x})
    view = TrainableGraph(from_onnx(model))
    assert parameter_names(view.graph) == ["w"]        # scales and zero points are not trained
    with torch.no_grad():
        got = dict(zip(view.output_names, view(x)))
    for name in ("qf", "d", "y"):
        np.testing.assert_array_equal(got[name].numpy(), ref[name], err_msg=name)
    assert np.any(ref["qf"] == (0 if dtype == np.uint8 else -128)) and np.any(ref["qf"] == (255 if dtype == np.uint8
                                                                                             else 127))


def test_straight_through_gradient():
    """d DQ(Q(x)) / dx is 1 inside the representable range and 0 where the value saturates; the float weight after
    the QDQ pair trains."""
    scale, zp = np.array(0.1, np.float32), np.array(0, np.int8)
    model = _qdq_model(scale, zp, 1)
    view = TrainableGraph(from_onnx(model))
    x = torch.tensor(np.linspace(-20, 20, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE), requires_grad=True)
    d, _, y = view(x)
    d.sum().backward()
    inside = (x.detach() / 0.1 >= -128) & (x.detach() / 0.1 <= 127)
    assert torch.equal(x.grad, inside.float()) and 0 < int(inside.sum()) < x.numel()
    x.grad = None
    view(x)[2].sum().backward()
    w = view.graph_parameters()["w"]
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


def test_quantized_digits_cnn_equals_onnxruntime():
    """A whole int8 QDQ model (per-channel int8 weights, int32 biases, uint8 activations) from the quantize pass:
    the view equals onnxruntime on the QDQ model within one output quantization step (exactly, in practice)."""
    x_tr, _, x_te, _ = digits.load_digits_split()
    res = PassManager.parse("quantize").run(graphopt.load(str(digits.teacher_path())),
                                            PassContext(data={"calib": {"x": x_tr[:64]}}))
    q = to_onnx(res.graph)
    step = check_criterion(q)["steps"]["y"]
    sess = ort.session(q)
    x = x_te[:48]
    ref = np.concatenate([sess.run(None, {"x": xi[None]})[0] for xi in x])
    with torch.no_grad():
        got = TrainableGraph(res.graph)(x).numpy()      # batch 48 on a batch-1 export: vmapped groups
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref)) <= step * (1 + 1e-6)
    assert np.mean(got == ref) >= 0.99


def test_unsupported_quantized_type_is_one_line():
    model = _qdq_model(np.array(0.1, np.float32), np.array(0, np.int8), 1)
    for init in model.graph.initializer:
        if init.name == "z":
            init.CopyFrom(numpy_helper.from_array(np.array(0, np.int32), "z"))
    with pytest.raises(graphopt.errors.UnsupportedModel, match=r"QuantizeLinear.*not supported"):
        TrainableGraph(from_onnx(model))(np.zeros(SHAPE, np.float32))


def _pair_model(scale, zp, axis, batch=1):
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul: a pair whose quantized tensor only the DequantizeLinear
    reads, which the view runs fused (one FakeQuant op)."""
    shape = [batch] + SHAPE[1:]
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z"),
             numpy_helper.from_array(np.linspace(-1, 1, SHAPE[-1] ** 2, dtype=np.float32).reshape(SHAPE[-1:] * 2),
                                     "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=axis),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], axis=axis),
             helper.make_node("MatMul", ["d", "w"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("axis", [None, 1, -1])
def test_fused_pair_equals_onnxruntime_and_the_node_by_node_gradients(dtype, axis):
    """The fused pair computes onnxruntime's values bit for bit (its dequantized tensor, taken through torch's own
    MatMul: torch's and onnxruntime's sgemm round differently on some CPUs, 6 of 120 outputs 1 ulp apart on an AMD
    EPYC), and its input gradient (and the weight's) is the node-by-node plan's (asked for the quantized tensor as a
    feature, the view runs the pair unfused)."""
    rng = np.random.default_rng(3)
    scale, zp, x = _case(dtype, axis, rng)
    model = _pair_model(scale, zp, 1 if axis is None else axis, batch=SHAPE[0])
    view = TrainableGraph(from_onnx(model))
    fused = [op.op for op in view._plans[True][0]]
    assert "QuantizeLinear" not in fused and "FakeQuant" in fused and "q" in view._fused_away
    with_d = onnx.ModelProto()
    with_d.CopyFrom(model)
    with_d.graph.output.append(helper.make_tensor_value_info("d", TensorProto.FLOAT, None))
    ref = ort.run(with_d, {"x": x})
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    xt = torch.tensor(x, requires_grad=True)
    y = view(xt)
    np.testing.assert_array_equal(y.detach().numpy(), (torch.tensor(ref["d"]) @ torch.tensor(w)).numpy())
    np.testing.assert_allclose(y.detach().numpy(), ref["y"], rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    gx, gw = xt.grad.clone(), view.graph_parameters()["w"].grad.clone()
    xt.grad = None
    view.zero_grad()
    y2, _ = view(xt, features=["q"])                # the unfused plan
    assert torch.equal(y, y2)
    y2.square().sum().backward()
    assert torch.allclose(xt.grad, gx, rtol=1e-5, atol=1e-5)
    assert torch.allclose(view.graph_parameters()["w"].grad, gw, rtol=1e-5, atol=1e-5)


def test_fused_pair_trains_a_learned_scale_as_the_pair_does_under_vmap():
    """A scale trained as a parameter (quantize{qat_scales=learned}) gets the pair's gradient from the fused op:
    batch 6 on a batch-1 export runs through torch.vmap, whose rule the fused op generates."""
    scale, zp = np.array(0.05, np.float32), np.array(3, np.int8)
    view = TrainableGraph(from_onnx(_pair_model(scale, zp, 1)), trainable=["w", "s"])
    x = torch.tensor(np.random.default_rng(5).standard_normal([6] + SHAPE[1:]).astype(np.float32) * 3)
    grads = []
    for feats in (None, ["q"]):
        view.zero_grad()
        out = view(x) if feats is None else view(x, features=feats)[0]
        out.square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in view.graph_parameters().items()})
    assert float(grads[0]["s"].abs()) > 0
    for k in ("w", "s"):
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-4), (k, grads[0][k], grads[1][k])
