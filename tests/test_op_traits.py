"""The op-traits table: its invariants, and the analyses and passes that read it agree with it."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import graphopt
import onnx_builders as ob
from graphopt import PassContext, PassManager, ort
from graphopt.op_traits import FAMILIES, TABLE, OpTraits, ops, traits, weight_out_axis
from graphopt.prune_rules.elementwise import UNARY_VALUES
from graphopt.trainable import parameter_names

pytestmark = pytest.mark.fast


def test_table_invariants():
    for op, t in TABLE.items():
        assert t.family in FAMILIES, op
        if t.weight is not None:
            assert t.out_axis is not None and t.weight in t.params and t.family in ("conv", "linear"), op
        if t.bias is not None:
            assert t.weight is not None and t.bias in t.params, op
        assert not set(t.params) & set(t.fixed), op
        if t.zero_preserving or t.neutral is not None:
            assert t.family in ("unary", "elementwise", "reduce"), op
        if t.int8_passthrough:       # only moves or selects values
            assert t.layout or t.family == "pool", op
        assert not (t.layout and t.opaque_layout), op
    assert ops(family="conv") | ops(family="linear") == {op for op, t in TABLE.items() if t.weight is not None}
    assert all(traits(op).opaque_layout and traits(op).fixed == (1,) for op in ops(family="reduce"))
    assert traits("NoSuchOp") == OpTraits() and traits("NoSuchOp").family == "other"
    with pytest.raises(ValueError):
        OpTraits(family="activation")
    with pytest.raises(TypeError, match="no op trait colour"):
        ops(colour="red")


def test_gemm_weight_axis_follows_trans_b():
    assert weight_out_axis(gs.Node("Gemm", attrs={"transB": 1})) == 0
    assert weight_out_axis(gs.Node("Gemm")) == 1
    assert weight_out_axis(gs.Node("Conv")) == 0 and weight_out_axis(gs.Node("ConvTranspose")) == 1
    assert weight_out_axis(gs.Node("Relu")) is None


def test_channel_values_agree_with_zero_preserving():
    """channel-groups' provable channel values: f(0) = 0 exactly for the unary ops the table calls zero-preserving."""
    assert set(UNARY_VALUES) <= ops(family="unary")
    for op, fn in UNARY_VALUES.items():
        got = fn(np.zeros(3), gs.Node(op))
        assert bool(np.all(got == 0)) == traits(op).zero_preserving, op


def _layer(op, **attrs):
    if op in ("Conv", "ConvTranspose"):
        w = ob.rnd(4, 3, 3, 3) if op == "Conv" else ob.rnd(3, 4, 3, 3)
        node = helper.make_node(op, ["x", "w", "b"], ["y"], name="layer", **attrs)
        return ob.model([node], [ob.vi("x", [1, 3, 8, 8])], [ob.vi("y", None)], [("w", w), ("b", ob.rnd(4))])
    w = ob.rnd(5, 6) if attrs.get("transB") else ob.rnd(6, 5)
    inputs = ["x", "w", "b"] if op == "Gemm" else ["x", "w"]
    node = helper.make_node(op, inputs, ["y"], name="layer", **attrs)
    return ob.model([node], [ob.vi("x", [2, 6])], [ob.vi("y", None)], [("w", w), ("b", ob.rnd(5))][:len(inputs) - 1])


@pytest.mark.parametrize("op,attrs", [("Conv", {}), ("ConvTranspose", {}), ("Gemm", {}), ("Gemm", {"transB": 1}),
                                      ("MatMul", {})])
def test_channel_groups_and_trainable_view_agree_on_weights(op, attrs):
    g = graphopt.load(_layer(op, **attrs))
    groups = PassContext().analyses.get("channel-groups", g)
    node = g.nodes[0]
    t = traits(op)
    ndim = node.inputs[t.weight].values.ndim
    assert [s.weight for s in groups.sources] == [(t.weight, weight_out_axis(node) % ndim)]
    biases = [p.input for p in groups.params if p.role == "bias"]
    assert biases == ([t.bias] if t.bias is not None else [])
    assert [k.node for k in groups.kernels()] == [0]
    assert parameter_names(g) == [node.inputs[i].name for i in t.params if i < len(node.inputs)
                                  and isinstance(node.inputs[i], gs.Constant)]


def test_trainable_view_leaves_fixed_inputs_alone():
    """A float constant of several elements is a parameter unless the table calls that input fixed."""
    nodes = [helper.make_node("Mul", ["x", "scale"], ["m"], name="mul"),
             helper.make_node("Pow", ["m", "exponent"], ["y"], name="pow")]
    m = ob.model(nodes, [ob.vi("x", [2, 4])], [ob.vi("y", None)],
                 [("scale", ob.rnd(4)), ("exponent", np.full(4, 2.0, np.float32))])
    assert traits("Pow").fixed == (1,) and 1 not in traits("Mul").fixed
    assert parameter_names(graphopt.load(m)) == ["scale"]


@pytest.mark.parametrize("op", sorted(ops(neutral=0.0) | ops(neutral=1.0)))
def test_neutral_elements_hold_in_onnxruntime_and_remove_identity_uses_them(op):
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)

    def graph(c):
        nodes = [helper.make_node(op, ["x", "c"], ["y"], name="op"), helper.make_node("Neg", ["y"], ["z"], name="neg")]
        return ob.model(nodes, [ob.vi("x", [2, 4])], [ob.vi("z", [2, 4])], [("c", np.full(4, c, np.float32))])
    neutral = traits(op).neutral
    assert np.array_equal(ort.run(graph(neutral), {"x": x})["z"], -x)
    run = PassManager.parse("remove-identity").run
    assert [n.op for n in run(graphopt.load(graph(neutral))).graph.nodes] == ["Neg"]
    assert [n.op for n in run(graphopt.load(graph(neutral + 1))).graph.nodes] == [op, "Neg"]


@pytest.mark.parametrize("op", sorted(ops(family="reduce")))
def test_insert_adapters_gives_reductions_no_layout(op):
    """Every reduction is opaque_layout: its output (here [batch, 1]) is not taken for a feature vector."""
    from graphopt.passes.insert_adapters import tensor_layouts
    node = helper.make_node(op, ["x", "axes"], ["y"], name="reduce", keepdims=1)
    g = graphopt.load(ob.model([node], [ob.vi("x", [2, 8])], [ob.vi("y", None)], [("axes", np.array([1]))], opset=18))
    assert tensor_layouts(g).get("y") is None and tensor_layouts(g)["x"] == "vec"
