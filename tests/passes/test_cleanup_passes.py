"""Cleanup passes: exact (outputs equal onnxruntime on the input graph), idempotent, and clear on bad input."""
import numpy as np
import pytest

import graphopt
import onnx_builders as ob
from graphopt import PassContext, PassManager
from graphopt.errors import BadInput
from graphopt.verify import equivalent

pytestmark = pytest.mark.fast

ZOO_FOR_CLEANUP = ["resnet", "mobilenet_v3", "densenet", "inception", "resnext", "shufflenet", "vit", "convnext",
                   "yolo", "unet", "lstm", "gru", "mlp_digits", "cnn_digits"]
CLEANUP_PASSES = ["fold-constants", "eliminate-dead-code", "remove-identity", "fold-batchnorm", "infer-shapes", "cleanup"]


def _load(model):
    return graphopt.load(model)


@pytest.mark.parametrize("name", ZOO_FOR_CLEANUP)
def test_cleanup_is_exact_on_zoo(zoo_onnx, name):
    g = _load(zoo_onnx(name))
    before = graphopt.graph.copy(g)
    res = PassManager.parse("cleanup").run(g)          # the manager itself checks exactness after each pass
    ok, err, _ = equivalent(before, res.graph)
    assert ok, err
    assert len(res.graph.nodes) <= len(before.nodes)
    if name in ("resnet", "cnn_digits", "unet", "densenet", "inception", "yolo"):
        assert not any(n.op == "BatchNormalization" for n in res.graph.nodes if n.inputs[0].inputs and
                       n.inputs[0].inputs[0].op in ("Conv", "ConvTranspose")
                       and len(n.inputs[0].outputs) == 1), "BN after a single-use conv left unfolded"


@pytest.mark.parametrize("pass_name", CLEANUP_PASSES)
def test_each_cleanup_pass_is_idempotent(zoo_onnx, pass_name):
    g = _load(zoo_onnx("yolo"))
    first = PassManager.parse(pass_name).run(g).graph
    second = PassManager.parse(pass_name).run(first)
    assert not second.modified, second.records


@pytest.mark.parametrize("build", [ob.convtranspose_bn, lambda: ob.convtranspose_bn(group=2), ob.gemm_bn,
                                   lambda: ob.gemm_bn(trans_b=0, with_c=False), ob.matmul_bn])
def test_fold_batchnorm_into_convtranspose_gemm_matmul(build):
    g = _load(build())
    res = PassManager.parse("fold-batchnorm").run(g)
    assert res.records[0]["info"]["folded"] == 1
    assert all(n.op != "BatchNormalization" for n in res.graph.nodes)
    assert res.records[0]["max_error"] < 1e-4


def test_remove_identity_keeps_output_names():
    g = _load(ob.identity_chain())
    res = PassManager.parse("remove-identity").run(g)
    ops = [n.op for n in res.graph.nodes]
    assert "Cast" not in ops and ops.count("Identity") == 1   # x -> z must stay: an output fed by an input
    assert [t.name for t in res.graph.outputs] == ["y", "z"]


def test_fold_constants_folds_shape_subgraph_after_binding():
    g = graphopt.load(ob.dynamic_reshape(), input_shapes={"x": (5, 2, 3)}, fold_constants=False)
    assert any(n.op == "Shape" for n in g.nodes)
    res = PassManager.parse("fold-constants").run(g)
    assert [n.op for n in res.graph.nodes] == ["Reshape", "MatMul"]


def test_eliminate_dead_code_keeps_graph_inputs(zoo_onnx):
    g = _load(zoo_onnx("mlp_digits"))
    # add an unused branch
    import onnx_graphsurgeon as gs
    dead = gs.Variable("dead", dtype=np.float32)
    g.nodes.append(gs.Node("Relu", "dead_relu", inputs=[g.inputs[0]], outputs=[dead]))
    res = PassManager.parse("eliminate-dead-code").run(g)
    assert res.records[0]["info"]["removed_nodes"] == 1 and [t.name for t in res.graph.inputs] == ["x"]


@pytest.mark.parametrize("text,needle", [("cleanup{max_iterations=-1}", "at least 1"),
                                         ("fold-constants{max_rounds=1.5}", "integer"),
                                         ("infer-shapes{x=1}", "no option 'x'")])
def test_bad_options(text, needle):
    with pytest.raises(BadInput, match=needle):
        PassManager.parse(text)


def test_structural_only_mode_skips_numeric_check(zoo_onnx):
    g = _load(zoo_onnx("resnet"))
    res = PassManager.parse("cleanup").run(g, PassContext(verify="structural"))
    assert "max_error" not in res.records[0]


@pytest.mark.parametrize("op", ["ConstantOfShape", "Expand", "Tile"])
def test_folding_leaves_constants_over_the_size_cap_to_run_time(op):
    from graphopt.folding import fold
    from graphopt.graph import from_onnx
    m = ob.growing_constant(op, 1024)                     # a 4 kB constant
    capped, _ = fold(from_onnx(m), max_bytes=4095)
    assert [n.op for n in capped.nodes] == [op, "ReduceSum", "Add"]
    ok, err, _ = equivalent(from_onnx(m), capped)
    assert ok, err
    folded, _ = fold(from_onnx(m), max_bytes=4096)
    assert [n.op for n in folded.nodes] == ["Add"]


def test_fold_batchnorm_leaves_a_shared_weight_shared():
    """Two Convs share one weight, each followed by its own BatchNormalization: folding would need two different
    weights (it wrote both as '<w>_bnfolded', one name for two tensors). The shared weight stays one initializer."""
    from onnx import helper
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             ob.bn_node("c1", "y1", "bn1"), ob.bn_node("c2", "y2", "bn2")]
    m = ob.model(nodes, [ob.vi("x", [1, 3, 8, 8])], [ob.vi("y1", [1, 4, 8, 8]), ob.vi("y2", [1, 4, 8, 8])],
                 [("w", ob.rnd(4, 3, 3, 3))] + ob.bn_params("bn1", 4, seed=1) + ob.bn_params("bn2", 4, seed=2))
    res = PassManager.parse("cleanup").run(_load(m))                 # exactness checked by the manager
    convs = [n for n in res.graph.nodes if n.op == "Conv"]
    assert len(convs) == 2 and convs[0].inputs[1] is convs[1].inputs[1]
    names = [i.name for i in graphopt.to_onnx(res.graph).graph.initializer]
    assert len(names) == len(set(names))


def test_cleanup_repeats_its_pipeline_to_a_fixed_point_within_the_cap():
    """cleanup runs its passes as a nested pipeline until the graph stops changing: the BN folds in round 1 and
    round 2 changes nothing; max_iterations caps the rounds; a clean graph takes one round and is not modified."""
    res = PassManager.parse("cleanup").run(_load(ob.gemm_bn()))
    assert res.records[0]["info"] == {"rounds": 2, "changed_by": {"fold-batchnorm": 1}} and res.modified
    again = PassManager.parse("cleanup").run(res.graph)
    assert again.records[0]["info"] == {"rounds": 1, "changed_by": {}} and not again.modified
    capped = PassManager.parse("cleanup{max_iterations=1}").run(_load(ob.gemm_bn()))
    assert capped.records[0]["info"] == {"rounds": 1, "changed_by": {"fold-batchnorm": 1}} and capped.modified


def _conv_add_bn(op: str, add_shape, bias: bool, swap: bool = False, group: int = 1):
    """x [1, 4, 6, 6] -> op (Conv 3x3 pad 1, or ConvTranspose 2x2 stride 2) [+ bias input] -> Add(constant of
    add_shape, operands swapped when swap) -> BatchNormalization -> y: paddle2onnx's ConvTranspose + Add + BN."""
    from onnx import helper
    cout = 6
    if op == "Conv":
        w, attrs, out_hw = ob.rnd(cout, 4 // group, 3, 3), {"pads": [1, 1, 1, 1], "group": group}, 6
    else:
        w, attrs, out_hw = ob.rnd(4, cout // group, 2, 2), {"strides": [2, 2], "group": group}, 12
    ins = ["x", "w"] + (["b"] if bias else [])
    add_in = ["k", "t"] if swap else ["t", "k"]
    nodes = [helper.make_node(op, ins, ["t"], name="conv", **attrs),
             helper.make_node("Add", add_in, ["a"], name="bias_add"), ob.bn_node("a", "y", "bn")]
    inits = [("w", w), ("k", ob.rnd(*add_shape, seed=3))] + ([("b", ob.rnd(cout, seed=1))] if bias else [])
    return ob.model(nodes, [ob.vi("x", [1, 4, 6, 6])], [ob.vi("y", [1, cout, out_hw, out_hw])],
                    inits + ob.bn_params("bn", cout))


@pytest.mark.parametrize("op,add_shape,bias,swap,group", [
    ("ConvTranspose", (1, 6, 1, 1), False, False, 1), ("ConvTranspose", (6, 1, 1), True, True, 1),
    ("ConvTranspose", (1, 6, 1, 1), True, False, 2), ("Conv", (1, 6, 1, 1), True, False, 1),
    ("Conv", (1,), False, True, 2), ("Conv", (), True, False, 1)])
def test_fold_batchnorm_folds_a_bias_add_then_the_bn_after_it(op, add_shape, bias, swap, group):
    """A per-channel constant Add after a Conv / ConvTranspose (either operand order, any broadcastable channel
    shape, with or without the conv's own bias) folds into the conv's bias; the BN after it then folds too. Exact
    (the manager compares with onnxruntime on the input graph) and idempotent."""
    res = PassManager.parse("fold-batchnorm").run(_load(_conv_add_bn(op, add_shape, bias, swap, group)))
    assert res.records[0]["info"] == {"folded": 1, "bias_adds": 1, "scale_muls": 0}
    assert [n.op for n in res.graph.nodes] == [op] and len(res.graph.nodes[0].inputs) == 3
    assert res.records[0]["max_error"] < 1e-4
    assert not PassManager.parse("fold-batchnorm").run(res.graph).modified


@pytest.mark.parametrize("add_shape", [(1, 6, 6, 1), (1, 1, 1, 6), (6, 6, 6)])
def test_fold_batchnorm_leaves_adds_that_are_not_per_channel(add_shape):
    """An Add that varies along a spatial axis (or broadcasts along the wrong one) is not a bias: it stays, and so
    does the BN after it."""
    res = PassManager.parse("fold-batchnorm").run(_load(_conv_add_bn("Conv", add_shape, True)))
    assert [n.op for n in res.graph.nodes] == ["Conv", "Add", "BatchNormalization"]
    assert not res.modified


def test_fold_batchnorm_leaves_a_bias_add_whose_conv_output_has_other_readers():
    from onnx import helper
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["t", "k"], ["y"], name="bias_add"),
             helper.make_node("Relu", ["t"], ["z"], name="relu")]
    m = ob.model(nodes, [ob.vi("x", [1, 4, 6, 6])], [ob.vi("y", [1, 6, 6, 6]), ob.vi("z", [1, 6, 6, 6])],
                 [("w", ob.rnd(6, 4, 3, 3)), ("k", ob.rnd(1, 6, 1, 1, seed=3))])
    res = PassManager.parse("fold-batchnorm").run(_load(m))
    assert sorted(n.op for n in res.graph.nodes) == ["Add", "Conv", "Relu"] and not res.modified


@pytest.mark.parametrize("op,group", [("Conv", 1), ("Conv", 2), ("ConvTranspose", 1), ("ConvTranspose", 2)])
def test_fold_batchnorm_folds_a_batchnorm_exported_as_mul_and_add(op, group):
    """Conv -> Mul(per-channel scale) -> Add(per-channel shift) -> Relu (a BatchNormalization written out as its
    arithmetic: a torch.export CRNN) becomes Conv -> Relu; exact, idempotent."""
    from onnx import helper
    cout = 6
    if op == "Conv":
        w, attrs, hw = ob.rnd(cout, 4 // group, 3, 3), {"pads": [1, 1, 1, 1], "group": group}, 6
    else:
        w, attrs, hw = ob.rnd(4, cout // group, 2, 2), {"strides": [2, 2], "group": group}, 12
    nodes = [helper.make_node(op, ["x", "w", "b"], ["t"], name="conv", **attrs),
             helper.make_node("Mul", ["t", "s"], ["m"], name="scale"),
             helper.make_node("Add", ["sh", "m"], ["a"], name="shift"),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    m = ob.model(nodes, [ob.vi("x", [1, 4, 6, 6])], [ob.vi("y", [1, cout, hw, hw])],
                 [("w", w), ("b", ob.rnd(cout, seed=1)), ("s", ob.rnd(1, cout, 1, 1, seed=2)),
                  ("sh", ob.rnd(cout, 1, 1, seed=3))])
    res = PassManager.parse("fold-batchnorm").run(_load(m))
    assert res.records[0]["info"] == {"folded": 0, "bias_adds": 1, "scale_muls": 1}
    assert [n.op for n in res.graph.nodes] == [op, "Relu"] and res.records[0]["max_error"] < 1e-4
    assert not PassManager.parse("fold-batchnorm").run(res.graph).modified


def test_fold_batchnorm_leaves_a_scale_on_a_shared_weight():
    """Scaling a weight two convs share would change the other conv: the Mul stays (a bias Add would not need to
    touch the weight and folds)."""
    from onnx import helper
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c1", "s"], ["y1"], name="scale"),
             helper.make_node("Add", ["c2", "s"], ["y2"], name="shift")]
    m = ob.model(nodes, [ob.vi("x", [1, 3, 8, 8])], [ob.vi("y1", [1, 4, 8, 8]), ob.vi("y2", [1, 4, 8, 8])],
                 [("w", ob.rnd(4, 3, 3, 3)), ("s", ob.rnd(1, 4, 1, 1, seed=2))])
    res = PassManager.parse("fold-batchnorm").run(_load(m))
    assert res.records[0]["info"] == {"folded": 0, "bias_adds": 1, "scale_muls": 0}
    assert sorted(n.op for n in res.graph.nodes) == ["Conv", "Conv", "Mul"]
