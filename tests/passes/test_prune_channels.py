"""prune-channels: the oracle (zeroed original == pruned) on every model and criterion, budgets, exactness of
criterion=dead, idempotence, option handling and bad input."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest

import graphopt
import onnx_builders as ob
import prune_models as pm
from node_lookup import after, before, node_of
from graphopt import PassContext, PassManager
from graphopt.errors import BadInput, CheckFailed
from graphopt.hardware import GENERIC, HardwareInfo, Structure
from graphopt.graph import constant_value, copy as copy_graph
from graphopt.passes import prune_channels as pc
from graphopt.passes import prune_cost, prune_importance, prune_oracle, prune_removal
from graphopt.pipeline_text import format_value

ZOO = ["resnet", "mobilenet_v3", "densenet", "inception", "resnext", "shufflenet", "vit", "convnext", "yolo",
       "unet", "lstm", "gru", "mlp_digits", "cnn_digits"]
RECURRENT = ("lstm", "gru")          # an LSTM/GRU op is opaque: its hidden units need decompose-rnn first
EXTRA = ["cat_twice", "one_channel", "depthwise_residual", "linear_to_deconv", "bare_params", "se_block",
         "dead_channels", "unknown_op", "squeeze_gate", "split_branches", "group_norm"]


def _model(zoo_onnx, pm_onnx, name):
    return graphopt.load(pm_onnx(name) if name in pm.MODELS else zoo_onnx(name))


def _run(g, text, ctx=None):
    res = PassManager.parse(text).run(g, ctx)      # structural check (checker + full shape inference) inside
    return res, res.records[-1]


def _node(g, name):
    return next(n for n in g.nodes if n.name == name)


def _names(g, *module_paths):
    """The names of the nodes applying these torch modules, taken before a pass renames their weights."""
    return [node_of(g, m).name for m in module_paths]


# ---------------------------------------------------------------------------------------------------------- zoo

@pytest.mark.parametrize("name", ZOO)
def test_flops_half_on_the_zoo(zoo_onnx, name):
    g = graphopt.load(zoo_onnx(name))
    res, rec = _run(g, "prune-channels{flops=0.5}")
    if name in RECURRENT:
        assert not res.modified and not rec["info"]["budget_met"]
        assert any("decompose-rnn" in why for f in rec["info"]["frozen"] for why in f["why"]), rec["info"]["frozen"]
        return
    assert res.modified and rec["info"]["budget_met"], rec["info"].get("limits")
    assert rec["info"]["macs"]["ratio"] <= 0.5 + 1e-6
    assert rec["info"]["oracle_max_error"] < 1e-5
    assert rec["info"]["macs"]["after"] == graphopt.analyses.flops(res.graph, None)["macs"]
    for before, after in rec["info"]["layers"].values():
        assert 1 <= after <= before


@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_models_prune_after_decompose_rnn(zoo_onnx, name):
    g = graphopt.load(zoo_onnx(name))
    res, rec = _run(g, "decompose-rnn,cleanup,prune-channels{flops=0.5}")
    assert rec["info"]["budget_met"] and rec["info"]["macs"]["ratio"] <= 0.6
    assert rec["info"]["oracle_max_error"] < 1e-5


@pytest.mark.parametrize("criterion", ["l2", "bn_scale", "random", "taylor", "activation"])
@pytest.mark.parametrize("name", ["resnet", "mobilenet_v3", "densenet", "inception", "resnext", "shufflenet",
                                  "vit", "convnext", "yolo", "unet", "cnn_digits", "mlp_digits"])
def test_oracle_for_every_criterion(zoo_onnx, name, criterion):
    g = graphopt.load(zoo_onnx(name))
    # verify=structural: the PassManager skips its drift run; the pass's own oracle still runs
    res, rec = _run(g, f"prune-channels{{criterion={criterion},flops=0.6,samples=1}}", PassContext(verify="structural"))
    assert res.modified and rec["info"]["oracle_max_error"] < 1e-5
    assert rec["info"]["macs"]["ratio"] <= 0.6 + 1e-6


@pytest.mark.parametrize("name", EXTRA)
@pytest.mark.parametrize("criterion", ["l1", "taylor", "activation"])
def test_oracle_on_structural_cases(zoo_onnx, pm_onnx, name, criterion):
    g = _model(zoo_onnx, pm_onnx, name)
    res, rec = _run(g, f"prune-channels{{criterion={criterion},flops=0.6,samples=1}}", PassContext(verify="structural"))
    assert res.modified and rec["info"]["oracle_max_error"] < 1e-5


# -------------------------------------------------------------------------------------------- structural cases

def test_cat_twice_removes_both_copies(pm_onnx):
    g = graphopt.load(pm_onnx("cat_twice"))
    a_name, b_name = _names(g, "a", "b")
    res, rec = _run(g, "prune-channels{ratio=0.5}")
    a = _node(res.graph, a_name).inputs[1].values.shape[0]
    b_in = _node(res.graph, b_name).inputs[1].values.shape[1]
    assert a == 16 and b_in == 2 * a


def test_one_output_channel_is_never_removed(pm_onnx):
    g = graphopt.load(pm_onnx("one_channel"))
    a, b = _names(g, "a", "b")
    res, rec = _run(g, "prune-channels{ratio=0.8,round_to=1,max_layer_ratio=1}")
    assert _node(res.graph, a).inputs[1].values.shape[0] == 1
    assert _node(res.graph, b).inputs[1].values.shape[0] >= 1
    assert any("single channel" in why for f in rec["info"]["frozen"] for why in f["why"])


def test_depthwise_in_a_residual(pm_onnx):
    g = graphopt.load(pm_onnx("depthwise_residual"))
    a, dw_name, dw2_name = _names(g, "a", "dw", "dw2")
    res, rec = _run(g, "prune-channels{ratio=0.5}")
    g = res.graph
    kept = _node(g, a).inputs[1].values.shape[0]
    assert kept == 16
    dw, dw2 = _node(g, dw_name), _node(g, dw2_name)
    assert dw.attrs["group"] == kept and dw.inputs[1].values.shape == (kept, 1, 3, 3)
    assert dw2.attrs["group"] == kept and dw2.inputs[1].values.shape[0] == 2 * kept


def test_linear_view_convtranspose(pm_onnx):
    res, rec = _run(graphopt.load(pm_onnx("linear_to_deconv")), "prune-channels{flops=0.5}")
    g = res.graph
    deconv = next(n for n in g.nodes if n.op == "ConvTranspose")
    ch = deconv.inputs[1].values.shape[0]
    assert ch < 256 and ch % 16 == 0                            # round_to 16 on a 256-channel layer
    fc = next(n for n in g.nodes if n.op == "Gemm")
    assert fc.inputs[1].values.shape[0] == 16 * ch              # a channel is a block of 16 features
    reshape = next(n for n in g.nodes if n.op == "Reshape")
    assert constant_value(reshape.inputs[1]).tolist()[1] == ch


def test_bare_parameters_shrink_with_the_stream(pm_onnx):
    g = graphopt.load(pm_onnx("bare_params"))
    embed, = _names(g, "embed")
    res, rec = _run(g, "prune-channels{ratio=0.5}")
    g = res.graph
    dim = _node(g, embed).inputs[1].values.shape[0]
    assert dim == 16
    data = [t.values.shape for n in g.nodes if n.op in ("Concat", "Add", "Mul") for t in n.inputs
            if isinstance(t, gs.Constant) and t.values.size > 1]
    assert (1, 1, dim) in data and (1, 17, dim) in data and (dim,) in data     # class token, pos embed, scales
    assert rec["info"]["oracle_max_error"] < 1e-5


def test_attention_heads_are_removed_whole(zoo_onnx):
    g = graphopt.load(zoo_onnx("vit"))
    q_node = node_of(g, "layers.0.attn.q")
    q_name = q_node.name
    split_name = after(q_node, "Reshape").name                                # [B, T, heads, head_dim]
    merge_name = before(node_of(g, "layers.0.attn.proj"), "Reshape").name   # back to [B, T, heads * head_dim]
    res, rec = _run(g, "prune-channels{flops=0.5}")
    g = res.graph
    q = _node(g, q_name).inputs[1].values.shape[1]
    reshape = _node(g, split_name)
    heads = constant_value(reshape.inputs[1]).tolist()
    assert q % 8 == 0 and heads[2] * 8 == q and heads[2] < 4 and heads[3] == 8
    merge = constant_value(_node(g, merge_name).inputs[1]).tolist()
    assert merge[2] == q


def test_yolo_chunk_bounds_follow_the_channels(zoo_onnx):
    res, rec = _run(graphopt.load(zoo_onnx("yolo")), "prune-channels{flops=0.5}")
    chunks = [n for n in res.graph.nodes if n.op == "Slice"]      # the model's only slices: C2f's chunk(2, 1)
    assert chunks
    for n in chunks:
        st, en = int(constant_value(n.inputs[1])[0]), int(constant_value(n.inputs[2])[0])
        c = n.inputs[0].shape[1]
        assert 0 <= st < en <= c and n.outputs[0].shape[1] == en - st


def test_unet_and_shufflenet_structures(zoo_onnx):
    for name in ("unet", "shufflenet"):
        res, rec = _run(graphopt.load(zoo_onnx(name)), "prune-channels{flops=0.5,criterion=l2}")
        assert rec["info"]["oracle_max_error"] < 1e-5 and rec["info"]["macs"]["ratio"] <= 0.5


def test_pruning_twice_in_a_row(zoo_onnx, pm_onnx):
    for g in (graphopt.load(zoo_onnx("resnet")), graphopt.load(zoo_onnx("vit")),
              graphopt.load(pm_onnx("bare_params"))):
        res = PassManager.parse("prune-channels{flops=0.8},prune-channels{flops=0.8}").run(g)
        first, second = res.records
        assert first["modified"] and second["modified"]
        assert second["info"]["macs"]["before"] == first["info"]["macs"]["after"]
        assert second["info"]["macs"]["after"] < first["info"]["macs"]["after"]
        assert first["info"]["oracle_max_error"] < 1e-5 and second["info"]["oracle_max_error"] < 1e-5


# ---------------------------------------------------------------------------------------------- exact: dead

def test_dead_channels_are_removed_exactly_and_idempotently(pm_onnx):
    g = graphopt.load(pm_onnx("dead_channels"))
    a, b = _names(g, "a", "b")
    res, rec = _run(g, "prune-channels{criterion=dead,round_to=1}")
    assert rec["exact"] and rec["max_error"] <= 1e-6          # the PassManager's exact check ran
    assert rec["info"]["units"]["removed"] == len(pm.DeadChannels.DEAD_A + pm.DeadChannels.DEAD_B + pm.DeadChannels.DEAD_H)
    out = res.graph
    assert _node(out, a).inputs[1].values.shape[0] == 32 - len(pm.DeadChannels.DEAD_A)
    assert _node(out, b).inputs[1].values.shape[0] == 16 - len(pm.DeadChannels.DEAD_B)
    again = PassManager.parse("prune-channels{criterion=dead,round_to=1}").run(out)
    assert not again.modified


def test_dead_ignores_rounding_and_on_the_zoo(pm_onnx, zoo_onnx):
    g = graphopt.load(pm_onnx("dead_channels"))
    res, rec = _run(g, "prune-channels{criterion=dead,round_to=16}")
    # exact removal takes every dead channel: conv a (32 wide, 4 dead) and fc1 (64 wide, 5 dead) end up at widths
    # that are no multiple of 16 (alignment is the target's business)
    assert rec["info"]["units"]["removed"] == len(pm.DeadChannels.DEAD_A + pm.DeadChannels.DEAD_B + pm.DeadChannels.DEAD_H)
    assert rec["max_error"] <= 1e-6 and rec["info"]["held"] == []
    res, rec = _run(graphopt.load(zoo_onnx("resnet")), "prune-channels{criterion=dead}")
    assert not res.modified and rec["info"]["units"]["removed"] == 0


def _dead_convs(n=20, dead=(2, 7, 11), all_dead_width=6):
    """x -> conv1 (n channels, `dead` with zero weights and bias) -> Relu -> conv2 (every channel zero) -> Relu
    -> conv3 -> y. n is no multiple of 16 and len(dead) < n % 16: rounding to 16 could remove none of them."""
    from onnx import helper
    import onnx_builders as ob
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((n, 3, 3, 3)).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    w1[list(dead)], b1[list(dead)] = 0, 0
    w2, b2 = np.zeros((all_dead_width, n, 1, 1), np.float32), np.zeros(all_dead_width, np.float32)
    w3 = rng.standard_normal((4, all_dead_width, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    return ob.model(nodes, [ob.vi("x", [1, 3, 8, 8])], [ob.vi("y", [1, 4, 8, 8])],
                    [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3)])


def test_dead_channels_go_whatever_round_to_and_what_stays_is_said():
    g = graphopt.load(_dead_convs())
    res, rec = _run(g, "prune-channels{criterion=dead}", PassContext(hw=GENERIC))
    assert rec["info"]["round_to"] == 16 and rec["max_error"] <= 1e-6
    assert _node(res.graph, "conv1").inputs[1].values.shape[0] == 17           # all 3 dead channels removed
    assert _node(res.graph, "conv2").inputs[1].values.shape[0] == 1            # all dead: one channel stays
    assert rec["info"]["units"]["removed"] == 3 + 5
    assert rec["info"]["held"] == [{"channels": 1, "why": "dead, but a layer keeps at least one channel"}]
    # the user freezes conv1: nothing of it goes, and the record says how many dead channels stayed and why
    res, rec = _run(graphopt.load(_dead_convs()), "prune-channels{criterion=dead,ignore=[conv1]}")
    assert _node(res.graph, "conv1").inputs[1].values.shape[0] == 20
    assert {"channels": 3, "why": "dead but ignored by the user"} in rec["info"]["held"]


def test_a_budget_that_constraints_block_says_what_kept_the_channels():
    g = graphopt.load(_dead_convs(all_dead_width=6))
    res, rec = _run(g, "prune-channels{ratio=0.5,round_to=16,max_layer_ratio=0.5}")
    assert not rec["info"]["budget_met"] and "limits" in rec["info"]
    held = {h["why"]: h["channels"] for h in rec["info"]["held"]}
    # at the narrowest: conv1 (20 wide) keeps 1 + 9 for max_layer_ratio + 6 for round_to (16 is the only narrower
    # multiple of 16), conv2 (6 wide, no rounding) 1 + 2; conv3's 4 outputs are the graph's output (frozen)
    assert held == {"frozen (see 'frozen')": 4, "max_layer_ratio=0.5": 9 + 2, "round_to=16": 6,
                    "a layer keeps at least one channel": 2}
    assert sum(held.values()) - 4 == rec["info"]["units"]["prunable"] - rec["info"]["units"]["removed"]


def test_pruning_that_removed_nothing_is_in_report_json_and_on_the_terminal(tmp_path):
    from graphopt.cli import _report_texts
    art = graphopt.compile(_dead_convs(), "cpu", tmp_path / "a", measure=False,
                           pipeline="prune-channels{criterion=dead,ignore=[conv1,conv2]}")
    (p,) = art.report["pruning"]
    assert p["units"]["removed"] == 0
    assert p["held"] == [{"channels": 3 + 6, "why": "dead but ignored by the user"}]
    (text,) = _report_texts(art.report)
    assert "channels: removed 0 of" in text and "kept 9 channel(s): dead but ignored by the user" in text


def test_exact_depends_on_the_criterion():
    assert graphopt.passmanager.make_pass("prune-channels", criterion="dead").exact
    assert not graphopt.passmanager.make_pass("prune-channels", flops=0.5).exact
    assert not graphopt.passmanager.make_pass("prune-channels", criterion="taylor", ratio=0.2).exact


# ------------------------------------------------------------------------------------------------- options

def test_budgets_combined_and_params(zoo_onnx):
    g = graphopt.load(zoo_onnx("mobilenet_v3"))
    res, rec = _run(g, "prune-channels{flops=0.6,params=0.3}")
    assert rec["info"]["budget"]["flops"]["met"] and rec["info"]["budget"]["params"]["met"]
    assert rec["info"]["params"]["ratio"] <= 0.3 and rec["info"]["macs"]["ratio"] <= 0.6
    res, rec = _run(graphopt.load(zoo_onnx("resnet")), "prune-channels{ratio=0.4,scope=local,criterion=l2}")
    assert rec["info"]["budget"]["ratio"]["met"] and rec["info"]["units"]["removed"] >= 0.4 * rec["info"]["units"]["prunable"]


def test_round_to_and_max_layer_ratio(zoo_onnx):
    g = graphopt.load(zoo_onnx("mobilenet_v3"))
    res, rec = _run(g, "prune-channels{flops=0.3,max_layer_ratio=0.5}")
    for name, (before, after) in rec["info"]["layers"].items():
        assert after >= before * 0.5 - 1e-9, name
        if before > 16 and after != before:
            assert after % 16 == 0, (name, before, after)
    ctx = PassContext(hw=HardwareInfo(fp32_lanes=8, structure=Structure(channels=8)))
    res, rec = _run(graphopt.load(zoo_onnx("mobilenet_v3")), "prune-channels{flops=0.5}", ctx)
    assert rec["info"]["round_to"] == 8
    assert all(a % 8 == 0 for b, a in rec["info"]["layers"].values() if b > 8 and a != b)


def test_ignore_keeps_named_layers(zoo_onnx):
    g = graphopt.load(zoo_onnx("resnet"))
    keep, = _names(g, "layer1.conv1")
    res, rec = _run(g, f"prune-channels{{flops=0.5,ignore={format_value([keep])}}}")
    assert rec["info"]["layers"][keep] == [16, 16]
    assert any("ignored" in why for f in rec["info"]["frozen"] for why in f["why"])


def _bias_channel_graph():
    """conv a (4 channels) -> Relu -> conv b: channel 0 of a has tiny weights but a large bias (a folded
    BatchNorm's shift), so it carries a large constant that b reads with small weights; channels 1-3 have larger
    weights and no bias but see an input of small amplitude."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    wa = rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32)
    wa[0] *= 0.01
    ba = np.array([5.0, 0, 0, 0], np.float32)
    wb = rng.normal(0, 0.5, (2, 4, 1, 1)).astype(np.float32)
    wb[:, 0] = 0.05
    inits = [numpy_helper.from_array(v, n) for v, n in ((wa, "wa"), (ba, "ba"), (wb, "wb"))]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], "a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], "relu"),
             helper.make_node("Conv", ["r", "wb"], ["y"], "b")]
    graph = helper.make_graph(nodes, "bias_channel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], inits)
    return graphopt.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_activation_keeps_the_channel_that_carries_a_large_constant():
    x = np.random.default_rng(1).normal(0, 0.1, (16, 1, 1, 8, 8)).astype(np.float32)
    kept = {}
    for crit in ("l1", "activation"):
        res, rec = _run(_bias_channel_graph(), f"prune-channels{{criterion={crit},ratio=0.25,round_to=1}}",
                        PassContext(data={"calib": {"x": x}}))
        kept[crit] = constant_value(_node(res.graph, "a").inputs[2]).tolist()
        assert rec["info"]["oracle_max_error"] < 1e-5
    assert 5.0 not in kept["l1"]              # l1 sees only the small weights and drops the constant channel
    assert 5.0 in kept["activation"]          # activation measures what the channel feeds b: the largest
    assert rec["info"]["notes"][0].startswith("activation: 16 sample")


def test_min_widths_gives_each_layer_its_own_step(zoo_onnx):
    """min_widths=8: a layer's step is the largest power of two <= round_to leaving it 8 widths (96 channels: 8,
    16 channels: 2), so wide layers land on vector multiples and narrow ones still have choices."""
    assert [pc.PruneChannels._layer_step(n, 16, 8) for n in (8, 16, 24, 48, 96, 240)] == [1, 2, 2, 4, 8, 16]
    assert pc.PruneChannels._layer_step(240, 16, 0) == 16
    res, rec = _run(graphopt.load(zoo_onnx("mobilenet_v3")), "prune-channels{flops=0.5,min_widths=8}")
    assert rec["info"]["oracle_max_error"] < 1e-5 and rec["info"]["budget_met"]
    changed = [(b, a) for b, a in rec["info"]["layers"].values() if a != b]
    assert changed
    for b, a in changed:
        assert a % pc.PruneChannels._layer_step(b, 16, 8) == 0, (b, a)
    assert any(a % 16 for b, a in changed), "narrow layers keep finer steps than round_to"


def test_taylor_uses_given_data(zoo_onnx):
    g = graphopt.load(zoo_onnx("cnn_digits"))
    x = np.random.default_rng(0).random((6, 1, 8, 8)).astype(np.float32)
    res, rec = _run(g, "prune-channels{criterion=taylor,flops=0.5}", PassContext(data={"calib": {"x": x}}))
    assert rec["info"]["notes"] and rec["info"]["notes"][0].startswith("taylor") and "random" not in rec["info"]["notes"][0]
    res, rec = _run(graphopt.load(zoo_onnx("cnn_digits")), "prune-channels{criterion=taylor,flops=0.5}")
    assert "random inputs" in rec["info"]["notes"][0]


def test_taylor_finite_differences_agree_with_autograd(zoo_onnx):
    g = graphopt.load(zoo_onnx("mlp_digits"))
    groups = PassContext().analyses.get("channel-groups", g)
    runs, _ = pc._feeds_list(g, None, 0, limit=1)
    units = [u.id for u in groups.units if not u.frozen]
    fd = prune_importance._taylor_fd(g, groups, units, runs, 1e-3)
    try:
        ag = prune_importance._taylor_autograd(g, groups, runs)
    except Exception:            # the trainable view is optional
        pytest.skip("graphopt.trainable cannot run this graph")
    assert np.allclose(fd[units], ag[units], rtol=2e-2, atol=1e-4)


def test_random_is_seeded(zoo_onnx):
    a = _run(graphopt.load(zoo_onnx("resnet")), "prune-channels{criterion=random,flops=0.6,seed=3}")[1]["info"]
    b = _run(graphopt.load(zoo_onnx("resnet")), "prune-channels{criterion=random,flops=0.6,seed=3}")[1]["info"]
    assert a["layers"] == b["layers"] and a["units"] == b["units"]


def test_resolved_pipeline_round_trips():
    pm_ = PassManager.parse("prune-channels{flops=0.5,criterion=bn_scale}")
    again = PassManager.parse(pm_.resolved())
    assert again.passes[0].opts == pm_.passes[0].opts


def test_strict_fails_when_the_budget_cannot_be_met(zoo_onnx):
    with pytest.raises(CheckFailed, match="budget"):
        PassManager.parse("prune-channels{flops=0.5,strict=true}").run(graphopt.load(zoo_onnx("lstm")))


# ------------------------------------------------------------------------------------------------ the oracle

def test_oracle_detects_a_wrong_removal(zoo_onnx):
    g = graphopt.load(zoo_onnx("resnet"))
    ctx = PassContext()
    groups = ctx.analyses.get("channel-groups", g)
    removed = np.zeros(groups.n_units, dtype=bool)
    conv1, bn1 = _names(g, "layer1.conv1", "layer1.bn1")
    inner = groups.classes(next(s for s in groups.sources if groups.nodes[s.node].name == conv1).slots)
    removed[inner[:8]] = True
    plan = prune_removal.Plan(groups, removed)
    original = copy_graph(g)
    assert prune_oracle.oracle_check(original, plan) < 1e-5
    pruned = prune_removal.apply_removal(copy_graph(original), plan)
    bn = next(n for n in pruned.nodes if n.name == bn1)
    shift = bn.inputs[2].values.copy()
    shift[0] += 1.0                              # a kept channel gets a wrong parameter
    bn.inputs[2] = gs.Constant("wrong_shift", shift)
    assert prune_oracle.oracle_check(original, plan, pruned=pruned) > 1e-3
    # removing a residual summand's channels without its partners is also caught
    plan2 = prune_removal.Plan(groups, removed.copy())
    stem_name, conv2 = _names(g, "stem.0", "layer1.conv2")
    stem = groups.classes(next(s for s in groups.sources if groups.nodes[s.node].name == stem_name).slots)
    plan2.removed[stem[:4]] = True
    bad = prune_removal.apply_removal(copy_graph(original), plan2)
    c2 = next(n for n in bad.nodes if n.name == conv2)
    w = c2.inputs[1].values.copy()
    w[0] += 0.5
    c2.inputs[1] = gs.Constant("wrong_w", w)
    assert prune_oracle.oracle_check(original, plan2, pruned=bad) > 1e-3


def test_float64_oracle_tells_rounding_from_a_wrong_removal(zoo_onnx):
    """The fallback for graphs that amplify float32 rounding: in float64 a correct removal agrees to ~1e-12, a
    wrong one keeps its error and the pass fails naming the analysis."""
    g = graphopt.load(zoo_onnx("resnet"))
    groups = PassContext().analyses.get("channel-groups", g)
    removed = np.zeros(groups.n_units, dtype=bool)
    conv1, bn1 = _names(g, "layer1.conv1", "layer1.bn1")
    inner = groups.classes(next(s for s in groups.sources if groups.nodes[s.node].name == conv1).slots)
    removed[inner[:8]] = True
    plan = prune_removal.Plan(groups, removed)
    feeds = graphopt.verify.seeded_inputs(g, 0)
    pruned = prune_removal.apply_removal(copy_graph(g), plan)
    err, scale = prune_oracle.oracle_fp64(g, plan, pruned, feeds)
    assert err <= 1e-9 * max(1.0, scale) and scale > 0
    info = {}
    prune_oracle.fp64_verdict(g, plan, pruned, feeds, 1e-3, info)    # as if float32 had disagreed
    assert info["oracle_fp64_max_error"] == err
    bn = next(n for n in pruned.nodes if n.name == bn1)
    shift = bn.inputs[2].values.copy()
    shift[0] += 1e-4                             # a small but real mistake on a kept channel
    bn.inputs[2] = gs.Constant("wrong_shift", shift)
    assert prune_oracle.oracle_fp64(g, plan, pruned, feeds)[0] > 1e-7
    with pytest.raises(CheckFailed, match="in float64 they differ by .*bug in the channel analysis"):
        prune_oracle.fp64_verdict(g, plan, pruned, feeds, 1e-3, {})


def test_oracle_compares_the_logits_under_a_saturating_output():
    """A sigmoid output pinned at 0 hides any difference; the oracle also compares the tensor the sigmoid reads."""
    x = gs.Variable("x", np.float32, (1, 4))
    w = gs.Constant("w", np.full((4, 3), 1.0, np.float32))
    logits = gs.Variable("logits", np.float32, (1, 3))
    y = gs.Variable("y", np.float32, (1, 3))
    g = gs.Graph(nodes=[gs.Node("MatMul", "mm", inputs=[x, w], outputs=[logits]),
                        gs.Node("Sigmoid", "sig", inputs=[logits], outputs=[y])], inputs=[x], outputs=[y], opset=17)
    a, b = prune_oracle.with_pre_activations(g, copy_graph(g))
    assert [t.name for t in a.outputs] == ["y", "logits"] == [t.name for t in b.outputs]
    assert [t.name for t in g.outputs] == ["y"]          # the graphs given are left alone


def test_oracle_can_be_disabled(zoo_onnx):
    res, rec = _run(graphopt.load(zoo_onnx("cnn_digits")), "prune-channels{flops=0.5,verify_oracle=false}")
    assert res.modified and "oracle_max_error" not in rec["info"]


def test_pruned_model_compiles_on_cpu(zoo_onnx, tmp_path):
    g = graphopt.load(zoo_onnx("cnn_digits"))
    pruned = PassManager.parse("prune-channels{flops=0.5}").run(g).graph
    art = graphopt.compile(pruned, target="cpu", out=tmp_path / "art")
    x = np.random.default_rng(0).random((1, 1, 8, 8)).astype(np.float32)
    got = art.run({"x": x})
    ref = graphopt.ort.run(graphopt.to_onnx(pruned), {"x": x})
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-4)


def test_pruning_report_in_report_json_and_on_the_terminal(zoo_onnx, tmp_path):
    """report.json: channels per layer, MAC/param ratios, frozen layers and why, the oracle's error and the measured
    latency against the unpruned model compiled the same way; the terminal gets the same summary."""
    import json
    import subprocess
    import sys
    out = tmp_path / "art"
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "compile", str(zoo_onnx("vit")), "-o", str(out),
                           "--pipeline", "cleanup,prune-channels{flops=0.5}", "--threads", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((out / "report.json").read_text())
    (p,) = rep["pruning"]
    assert p["macs"]["ratio"] <= 0.5 and p["params"]["ratio"] < 1 and p["oracle_max_error"] < 1e-5
    assert any(after < before for before, after in p["layers"].values())
    assert p["frozen"] and all(f["why"] for f in p["frozen"])    # the classifier head feeds the output
    lat = rep["latency"]
    assert lat["original_graphopt_ms"] > 0 and lat["speedup_vs_original"] == \
        pytest.approx(lat["original_graphopt_ms"] / lat["graphopt_ms"], rel=1e-2)
    text = proc.stdout
    assert "prune-channels (l1): MACs x" in text and "layers narrowed" in text
    assert "frozen: " in text and "oracle (zeroed original == pruned, onnxruntime): max error" in text
    assert "latency ms before the passes" in text


# ------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("text,needle", [
    ("prune-channels{criterion=magic,flops=0.5}", "must be one of"),
    ("prune-channels{flops=0}", "(0, 1]"),
    ("prune-channels{flops=1.5}", "(0, 1]"),
    ("prune-channels{params=0}", "(0, 1]"),
    ("prune-channels{ratio=1}", "[0, 1)"),
    ("prune-channels", "needs a budget"),
    ("prune-channels{criterion=dead,flops=0.5}", "criterion=dead"),
    ("prune-channels{flops=0.5,scope=everywhere}", "must be one of"),
    ("prune-channels{flops=0.5,colour=red}", "no option 'colour'"),
])
def test_bad_options(text, needle):
    with pytest.raises(BadInput, match=None) as e:
        PassManager.parse(text)
    assert needle in str(e.value)


def test_ignore_naming_a_missing_node(zoo_onnx):
    g = graphopt.load(zoo_onnx("cnn_digits"))
    with pytest.raises(BadInput, match="ignore names node 'nope'"):
        PassManager.parse("prune-channels{flops=0.5,ignore=[nope]}").run(g)


def _deconv_model(group, w_shape, out_ch):
    from onnx import helper
    import onnx_builders as ob
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["a"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu0"),
             helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["t"], name="deconv", strides=[2, 2], group=group),
             ob.bn_node("t", "tb", "bn"),
             helper.make_node("Relu", ["tb"], ["r2"], name="relu1"),
             helper.make_node("Conv", ["r2", "w2"], ["y"], name="conv2")]
    cin = w_shape[0]
    inits = [("w0", ob.rnd(cin, 3, 3, 3)), ("b0", ob.rnd(cin, seed=1)), ("wt", ob.rnd(*w_shape, seed=2)),
             ("bt", ob.rnd(out_ch, seed=3)), ("w2", ob.rnd(2, out_ch, 1, 1, seed=4))] + ob.bn_params("bn", out_ch)
    return ob.model(nodes, [ob.vi("x", [1, 3, 5, 5])], [ob.vi("y", None)], inits)


@pytest.mark.parametrize("group,w_shape,out_ch", [(1, (8, 6, 3, 3), 6), (2, (8, 3, 3, 3), 6), (8, (8, 2, 2, 2), 16)])
def test_grouped_and_depthwise_convtranspose(group, w_shape, out_ch):
    g = graphopt.load(_deconv_model(group, w_shape, out_ch))
    res, rec = _run(g, "prune-channels{ratio=0.5,round_to=1}")
    assert res.modified and rec["info"]["oracle_max_error"] < 1e-5
    d = _node(res.graph, "deconv")
    cin = _node(res.graph, "conv0").inputs[1].values.shape[0]
    assert d.inputs[1].values.shape[0] == cin
    if group == 8:                       # depthwise: group follows the channels
        assert d.attrs["group"] == cin
    else:
        assert d.attrs.get("group", 1) == group


def test_split_sizes_follow_the_channels(pm_onnx):
    g = graphopt.load(pm_onnx("split_branches"))
    a, = _names(g, "a")
    res, rec = _run(g, "prune-channels{ratio=0.5,round_to=1}")
    split = next(n for n in res.graph.nodes if n.op == "Split")
    sizes = constant_value(split.inputs[1]).tolist()
    assert sum(sizes) == _node(res.graph, a).inputs[1].values.shape[0] and sizes != [16, 32]
    assert rec["info"]["oracle_max_error"] < 1e-5


@pytest.mark.parametrize("opset,per_channel", [(21, True)])     # opset 18-20 (per-group scale) is deprecated
def test_native_group_normalization_prunes_whole_groups(opset, per_channel):
    from onnx import helper
    import onnx_builders as ob
    G, C = 4, 32
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["a"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("GroupNormalization", ["a", "s", "b"], ["n"], name="gn", num_groups=G),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w1"], ["y"], name="conv1")]
    k = C if per_channel else G
    inits = [("w0", ob.rnd(C, 3, 3, 3)), ("b0", ob.rnd(C, seed=1)), ("s", 0.5 + np.abs(ob.rnd(k, seed=2))),
             ("b", ob.rnd(k, seed=3)), ("w1", ob.rnd(2, C, 1, 1, seed=4))]
    g = graphopt.load(ob.model(nodes, [ob.vi("x", [1, 3, 4, 4])], [ob.vi("y", [1, 2, 4, 4])], inits, opset=opset))
    res, rec = _run(g, "prune-channels{ratio=0.5,round_to=1}")
    gn = _node(res.graph, "gn")
    kept = _node(res.graph, "conv0").inputs[1].values.shape[0]
    assert kept % (C // G) == 0 and gn.attrs["num_groups"] == kept // (C // G) < G
    assert gn.inputs[1].values.shape[0] == (kept if per_channel else kept // (C // G))
    assert rec["info"]["oracle_max_error"] < 1e-5


# ---------------------------------------------------------------------------------------------- shared weights

def _shared_conv():
    """conv0 -> Relu -> (Conv(Ws, bs) -> Relu) twice with one shared weight -> head conv."""
    from onnx import helper
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["a0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a0"], ["r0"], name="relu0")]
    for t in (1, 2):
        nodes += [helper.make_node("Conv", [f"r{t - 1}", "ws", "bs"], [f"a{t}"], name=f"shared{t}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"a{t}"], [f"r{t}"], name=f"relu{t}")]
    nodes.append(helper.make_node("Conv", ["r2", "wh"], ["y"], name="head"))
    inits = [("w0", ob.rnd(32, 3, 3, 3)), ("b0", ob.rnd(32, seed=1)), ("ws", ob.rnd(32, 32, 3, 3, seed=2, scale=0.1)),
             ("bs", ob.rnd(32, seed=3)), ("wh", ob.rnd(4, 32, 1, 1, seed=4))]
    return ob.model(nodes, [ob.vi("x", [1, 3, 8, 8])], [ob.vi("y", [1, 4, 8, 8])], inits)


def _readers(g, names):
    """The distinct constants that the named nodes read as their weight (input 1)."""
    return {id(n.inputs[1]) for n in g.nodes if n.name in names}


@pytest.mark.parametrize("build,shared", [(ob.shared_weight_chain, [f"step{t}" for t in range(4)]),
                                          (_shared_conv, ["shared1", "shared2"])])
def test_a_shared_weight_is_pruned_once_and_stays_shared(build, shared):
    """A weight read by several Gemm/MatMul (unrolled recurrence) or Conv nodes: before, every reader got its own
    pruned copy (params and model.onnx grew while MACs fell); now the readers' channels are one unit each, the
    weight is sliced once and every reader keeps reading the one initializer."""
    from graphopt.graph import to_onnx
    g = graphopt.load(build())
    size0, params0 = len(to_onnx(g).SerializeToString()), graphopt.analyses.flops(g, None)["params"]
    res, rec = _run(g, "prune-channels{flops=0.5,round_to=1}")
    assert res.modified and rec["info"]["budget_met"] and rec["info"]["oracle_max_error"] < 1e-5
    assert len(_readers(res.graph, shared)) == 1
    kept = _node(res.graph, shared[0]).inputs[1].values.shape
    assert kept[0] < 32 and kept[1] < 32                # in and out channels of the shared weight both narrowed
    params = graphopt.analyses.flops(res.graph, None)["params"]
    assert params < params0 and rec["info"]["params"]["after"] == params
    assert len(to_onnx(res.graph).SerializeToString()) < size0


def test_shared_weight_read_whole_by_an_unpruned_path_freezes_and_says_so():
    """W [16, 8] is read by 'a' (its input comes from a prunable layer) and by 'b' (its input is a graph input, so W's
    input axis cannot shrink there): slicing W's rows for 'a' alone would need a second copy. The rows freeze with
    the reason; W's columns (output channels of both) still prune together, and W stays one initializer."""
    from onnx import helper
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g"], name="pre"),
             helper.make_node("Relu", ["g"], ["h"], name="relu"),
             helper.make_node("Gemm", ["h", "W"], ["ya"], name="a"),
             helper.make_node("Gemm", ["x2", "W"], ["yb"], name="b"),
             helper.make_node("Add", ["ya", "yb"], ["s"], name="sum"),
             helper.make_node("Relu", ["s"], ["r"], name="relu2"),
             helper.make_node("Gemm", ["r", "wo"], ["y"], name="out")]
    inits = [("w1", ob.rnd(16, 16)), ("b1", ob.rnd(16, seed=1)), ("W", ob.rnd(16, 32, seed=2)),
             ("wo", ob.rnd(32, 4, seed=3))]
    g = graphopt.load(ob.model(nodes, [ob.vi("x", [2, 16]), ob.vi("x2", [2, 16])], [ob.vi("y", [2, 4])], inits))
    res, rec = _run(g, "prune-channels{ratio=0.5,round_to=1}")
    why = [w for f in rec["info"]["frozen"] for w in f["why"]]
    assert any("weight 'W' is shared by 2 nodes" in w and "node 'b' (Gemm) reads it whole along axis 0" in w
               for w in why), why
    assert res.modified and rec["info"]["oracle_max_error"] < 1e-5
    assert len(_readers(res.graph, ["a", "b"])) == 1
    assert _node(res.graph, "a").inputs[1].values.shape[0] == 16 > 0     # rows kept, columns pruned
    assert _node(res.graph, "a").inputs[1].values.shape[1] < 32
    assert _node(res.graph, "pre").inputs[1].values.shape[1] == 16


def test_weight_tied_along_different_axes_prunes_consistently():
    """W [16, 16] read as x @ W by 'a' and as z @ W^T by 'b' (tied weights): W's axis 0 is a's input channels and
    b's output channels, so those are one unit; removing it slices W once for both."""
    from onnx import helper
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["g"], name="pre"),
             helper.make_node("Relu", ["g"], ["h"], name="relu"),
             helper.make_node("Gemm", ["h", "W"], ["ya"], name="a"),
             helper.make_node("Relu", ["ya"], ["ra"], name="relu_a"),
             helper.make_node("Gemm", ["ra", "W"], ["yb"], name="b", transB=1),
             helper.make_node("Relu", ["yb"], ["rb"], name="relu_b"),
             helper.make_node("Gemm", ["rb", "wo"], ["y"], name="out")]
    inits = [("w1", ob.rnd(8, 16)), ("W", ob.rnd(16, 16, seed=2)), ("wo", ob.rnd(16, 4, seed=3))]
    g = graphopt.load(ob.model(nodes, [ob.vi("x", [2, 8])], [ob.vi("y", [2, 4])], inits))
    res, rec = _run(g, "prune-channels{ratio=0.5,round_to=1}")
    assert res.modified and rec["info"]["oracle_max_error"] < 1e-5
    assert len(_readers(res.graph, ["a", "b"])) == 1
    assert _node(res.graph, "a").inputs[1].values.shape == (8, 8)


def test_a_quantized_graph_is_refused_with_the_reason(tmp_path, capsys):
    """An already quantized (QDQ) model used to pass through prune-channels unchanged with exit 0: the weights sit
    behind DequantizeLinear, so every channel froze and nothing said why. Now: one line, exit 2."""
    from graphopt.cli import main
    q = _run(graphopt.load(ob.shared_weight_chain(2)), "quantize{scheme=weight_int8}")[0].graph
    with pytest.raises(BadInput, match=r"already quantized .*prune the float model before quantize"):
        _run(q, "prune-channels{flops=0.5}")
    path = ob.save(graphopt.graph.to_onnx(q), tmp_path / "q.onnx")
    code = main(["compile", str(path), "-o", str(tmp_path / "out"), "--pipeline", "prune-channels{flops=0.5}",
                 "--no-bench"])
    err = capsys.readouterr().err
    assert code == 2 and "already quantized" in err and len(err.strip().splitlines()) == 1, err


def test_cost_model_counts_a_shared_weight_once():
    """The params budget is steered by CostModel.params: a weight read by four steps must count once (as the flops
    analysis counts it), or the pass would believe it removes four times the weights it does."""
    g = graphopt.load(ob.shared_weight_chain(4))
    ctx = PassContext(hw=GENERIC)
    groups = ctx.analyses.get("channel-groups", g)
    cost = prune_cost.CostModel(g, groups, ctx)
    removed = np.zeros(groups.n_units, dtype=bool)
    step = next(s for s in groups.sources if groups.nodes[s.node].name == "step0")
    removed[groups.classes(step.slots)[:8]] = True
    pruned = prune_removal.apply_removal(copy_graph(g), prune_removal.Plan(groups, removed))
    assert cost.params0 == graphopt.analyses.flops(g, None)["params"]
    assert cost.params(removed) == graphopt.analyses.flops(pruned, None)["params"] < cost.params0


def test_max_layer_ratio_counts_from_the_width_before_the_first_prune(zoo_onnx):
    """compress prunes in steps; each step used to apply max_layer_ratio to the layer's current width, so five
    steps took a 480-channel block of PP-OCRv4's recognizer down to 18 (4%). The widths before the first run are
    recorded in the graph (graphopt.metadata pruned_widths) and the cap counts from them."""
    from graphopt.metadata import pruned_widths
    g = graphopt.load(zoo_onnx("mobilenet_v3"))
    first, rec1 = _run(g, "prune-channels{flops=0.6,max_layer_ratio=0.5,round_to=1}")
    widths0 = pruned_widths(first.graph)
    assert widths0 and all(widths0[k] == before for k, (before, _) in rec1["info"]["layers"].items() if k in widths0)
    second, rec2 = _run(first.graph, "prune-channels{flops=0.5,max_layer_ratio=0.5,round_to=1}")
    assert pruned_widths(second.graph) == widths0          # the first run's widths stay
    for name, (_, after) in rec2["info"]["layers"].items():
        assert after >= widths0.get(name, 0) * 0.5 - 1e-9, (name, widths0.get(name), after)
    import math
    assert any(after == math.ceil(widths0[name] * 0.5) for name, (_, after) in rec2["info"]["layers"].items()
               if name in widths0)                     # the cap binds (per step, these layers would go below it)
