"""channel-groups analysis: which channels are coupled, which are frozen and why."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import graphopt
import onnx_builders as ob
import prune_models as pm
from node_lookup import node_of
from graphopt import PassContext
from graphopt.analyses import ANALYSES
from graphopt.prune_rules import rules_for

pytestmark = pytest.mark.fast


def _groups(path_or_model, **kw):
    g = graphopt.load(path_or_model, **kw)
    ctx = PassContext()
    return g, ctx.analyses.get("channel-groups", g), ctx


def _source(groups, name):
    return next(s for s in groups.sources if groups.nodes[s.node].name == name)


def _units_of(groups, name):
    return groups.classes(_source(groups, name).slots)


def _module_units(g, groups, module_path):
    """The units of the output channels of torch module `module_path`."""
    return _units_of(groups, node_of(g, module_path).name)


def _module_sink(g, groups, module_path):
    """The sink (the input channels) of torch module `module_path`."""
    name = node_of(g, module_path).name
    return next(s for s in groups.sinks if groups.nodes[s.node].name == name)


def test_registered_and_cached(zoo_onnx):
    import graphopt.channel_groups  # noqa: F401 - registers the analysis
    assert "channel-groups" in ANALYSES
    g, groups, ctx = _groups(zoo_onnx("resnet"))
    assert ctx.analyses.get("channel-groups", g) is groups
    assert "channel-groups" in ctx.analyses.cached()


def test_residual_add_couples_its_summands(zoo_onnx):
    g, groups, _ = _groups(zoo_onnx("resnet"))
    # layer1 is an identity block: the stem's channels and layer1.conv2's channels are the same units
    stem = _module_units(g, groups, "stem.0")
    conv2 = _module_units(g, groups, "layer1.conv2")
    assert np.array_equal(stem, conv2)
    assert len(set(stem.tolist())) == 16
    # layer2 has a projection shortcut: its conv2 and the downsample conv share units, the stem does not
    assert np.array_equal(_module_units(g, groups, "layer2.conv2"), _module_units(g, groups, "layer2.downsample.0"))
    assert not set(stem.tolist()) & set(_module_units(g, groups, "layer2.conv2").tolist())
    # an inner conv is its own layer and prunable
    inner = _module_units(g, groups, "layer1.conv1")
    assert all(not groups.units[k].frozen for k in inner)


def test_se_gate_is_coupled_to_the_features(pm_onnx):
    g, groups, _ = _groups(pm_onnx("se_block"))
    assert np.array_equal(_module_units(g, groups, "a"), _module_units(g, groups, "fc2"))
    assert not set(_module_units(g, groups, "fc1").tolist()) & set(_module_units(g, groups, "a").tolist())


def test_attention_is_head_granular_and_layernorm_freezes_the_stream(zoo_onnx):
    g, groups, _ = _groups(zoo_onnx("vit"))
    q, k, v = (_module_units(g, groups, f"layers.0.attn.{m}") for m in "qkv")
    assert np.array_equal(q, k) and np.array_equal(q, v)
    heads = [q[i * 8:(i + 1) * 8] for i in range(4)]
    assert all(len(set(h.tolist())) == 1 for h in heads) and len(set(q.tolist())) == 4
    assert all(not groups.units[u].frozen for u in q)
    # the residual stream is normalized by LayerNorm: frozen, with the reason
    stream = _module_units(g, groups, "patch_embed")
    reasons = groups.units[stream[0]].frozen
    assert any("LayerNormalization" in r for r in reasons), reasons
    # the MLP hidden units are prunable
    assert all(not groups.units[u].frozen for u in _module_units(g, groups, "layers.0.mlp.0"))


def test_graph_outputs_are_frozen(zoo_onnx):
    g, groups, _ = _groups(zoo_onnx("yolo"))
    for module in ("head_p3.pred", "head_p4.pred"):
        u = _module_units(g, groups, module)
        assert all(any("graph output" in r for r in groups.units[k].frozen) for k in u)


def test_same_tensor_concatenated_twice(pm_onnx):
    g, groups, _ = _groups(pm_onnx("cat_twice"))
    cat = next(n for n in g.nodes if n.op == "Concat")
    c = groups.chan[cat.outputs[0].name]
    cls = groups.classes(c.slots)
    assert np.array_equal(cls[:32], cls[32:])
    sink = _module_sink(g, groups, "b")
    assert len(sink.slots) == 64


def test_grouped_conv_units_span_every_group(zoo_onnx):
    g, groups, _ = _groups(zoo_onnx("resnext"))
    u = _module_units(g, groups, "block1.conv2.0")           # 16 -> 16, group 4
    assert len(set(u.tolist())) == 4
    for k in set(u.tolist()):
        pos = np.flatnonzero(u == k)
        assert len(pos) == 4 and len({p // 4 for p in pos}) == 4     # one channel in each of the 4 groups


def test_depthwise_passes_channels_and_rewrites_group(pm_onnx):
    g, groups, _ = _groups(pm_onnx("depthwise_residual"))
    a = _module_units(g, groups, "a")
    assert np.array_equal(_module_units(g, groups, "dw"), a)          # depthwise out c == in c == residual
    assert np.array_equal(_module_units(g, groups, "dw2"), np.repeat(a, 2))    # multiplier 2
    conv = rules_for("Conv")
    rewritten = {groups.nodes[r.node].name for r in groups.rewrites if r.rule in conv}
    assert {node_of(g, "dw").name, node_of(g, "dw2").name} <= rewritten


def test_flatten_and_view_make_feature_blocks(pm_onnx):
    g, groups, _ = _groups(pm_onnx("linear_to_deconv"))
    fc = _module_units(g, groups, "fc")
    assert len(set(fc.tolist())) == 256
    assert all(len(set(fc[i * 16:(i + 1) * 16].tolist())) == 1 for i in range(256))
    assert any(r.rule in rules_for("Reshape") for r in groups.rewrites)


def test_channel_shuffle_keeps_small_units(zoo_onnx):
    g, groups, _ = _groups(zoo_onnx("shufflenet"))
    last_in = _module_sink(g, groups, "last.0")
    cls = groups.classes(last_in.slots)
    sizes = np.unique(cls, return_counts=True)[1]
    assert len(sizes) > 1 and sizes.max() <= 16          # not one frozen 48-channel blob
    assert all(not groups.units[k].frozen for k in set(cls.tolist()))


def test_unknown_op_freezes_what_it_touches(pm_onnx):
    g, groups, _ = _groups(pm_onnx("unknown_op"))
    a = _module_units(g, groups, "a")
    assert all(groups.units[k].frozen for k in a)
    assert all(not groups.units[k].frozen for k in _module_units(g, groups, "b"))


def test_bare_parameters_are_sliced_with_the_stream(pm_onnx):
    g, groups, _ = _groups(pm_onnx("bare_params"))
    stream = set(_module_units(g, groups, "embed").tolist())
    assert all(not groups.units[k].frozen for k in stream)
    data = [p for p in groups.params if p.role == "data"]
    shapes = {tuple(graphopt.graph.constant_value(groups.nodes[p.node].inputs[p.input]).shape) for p in data}
    assert {(1, 1, 32), (1, 17, 32), (32,)} <= shapes          # class token, position embedding, scales


def test_provably_zero_channels(pm_onnx):
    g, groups, _ = _groups(pm_onnx("dead_channels"))
    b_sink = _module_sink(g, groups, "b")
    cv = groups.chan[groups.nodes[b_sink.node].inputs[0].name].cval
    assert set(np.flatnonzero(cv == 0).tolist()) == set(pm.DeadChannels.DEAD_A)


def test_weights_in_constant_nodes():
    w1 = ob.rnd(8, 3, 3, 3)
    nodes = [helper.make_node("Constant", [], ["w1"], name="cw1", value=helper.make_tensor(
                 "w1v", 1, w1.shape, w1.ravel().tolist())),
             helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    m = ob.model(nodes, [ob.vi("x", [1, 3, 6, 6])], [ob.vi("y", None)], [("w2", ob.rnd(4, 8, 1, 1, seed=1))])
    g = graphopt.load(m, fold_constants=False)
    assert any(n.op == "Constant" for n in g.nodes)
    ctx = PassContext()
    groups = ctx.analyses.get("channel-groups", g)
    u = groups.classes(next(s for s in groups.sources if groups.nodes[s.node].name == "conv1").slots)
    assert all(not groups.units[k].frozen for k in u)
    res = graphopt.PassManager.parse("prune-channels{ratio=0.5,round_to=1}").run(g, ctx)
    conv1 = next(n for n in res.graph.nodes if n.name == "conv1")
    assert isinstance(conv1.inputs[1], gs.Constant) and conv1.inputs[1].values.shape[0] == 4
    assert res.records[0]["info"]["oracle_max_error"] < 1e-5


def test_readers_of_a_shared_weight_are_one_unit_per_slice():
    """Four steps of an unrolled recurrence read one R: the output channels of every step are the same units (and,
    since step t's output is step t+1's input, R's rows and columns are too)."""
    g, groups, _ = _groups(ob.shared_weight_chain(4))
    units = [_units_of(groups, f"step{t}") for t in range(4)]
    assert all(np.array_equal(units[0], u) for u in units[1:])
    assert len(set(units[0].tolist())) == 32 and not any(groups.units[k].frozen for k in units[0])
    rows = {tuple(groups.classes(p.slots).tolist()) for p in groups.params
            if groups.nodes[p.node].inputs[p.input].name == "R" and p.axis == 0}
    assert rows == {tuple(units[0].tolist())}
