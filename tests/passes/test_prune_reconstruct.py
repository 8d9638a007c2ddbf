"""prune-channels reconstruct=bias|lsq (graphopt/passes/prune_reconstruct.py): the removed channels' contribution is
compensated on calibration data; measured here against the unpruned model on held-out inputs (onnxruntime)."""
import numpy as np
import pytest
from onnx import helper

import graphopt
import onnx_builders as ob
from graphopt import PassContext, PassManager, ort
from graphopt.errors import BadInput
from graphopt.graph import constant_value, to_onnx
from graphopt.metadata import pruned_widths
from graphopt.passes import prune_channels as pc

HELD = np.random.default_rng(2).normal(0, 1, (24, 1, 4, 12, 12)).astype(np.float32)


def _means_net():
    """Folded-BatchNorm-like conv net: conv a (3x3, 16 channels whose bias shifts of 2..6 give every channel a large
    mean; filters 8..15 are noisy copies of 0..7) -> Relu -> conv b (1x1) -> Relu -> conv c (3x3) -> Relu -> global
    pool -> Gemm d. Sinks: b (1x1), c (3x3), d (Gemm)."""
    rng = np.random.default_rng(0)
    wa = rng.normal(0, 0.5, (16, 4, 3, 3))
    wa[8:] = wa[:8] + rng.normal(0, 0.05, (8, 4, 3, 3))
    inits = [("wa", wa), ("ba", rng.uniform(2, 6, 16)), ("wb", rng.normal(0, 0.3, (12, 16, 1, 1))),
             ("bb", np.full(12, 0.1)), ("wc", rng.normal(0, 0.3, (8, 12, 3, 3))), ("bc", rng.uniform(1, 3, 8)),
             ("wd", rng.normal(0, 0.5, (5, 8))), ("bd", np.zeros(5))]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], "a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], "ra"),
             helper.make_node("Conv", ["ra", "wb", "bb"], ["b"], "b"),
             helper.make_node("Relu", ["b"], ["rb"], "rb"),
             helper.make_node("Conv", ["rb", "wc", "bc"], ["c"], "c", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["rc"], "rc"),
             helper.make_node("GlobalAveragePool", ["rc"], ["p"], "pool"),
             helper.make_node("Flatten", ["p"], ["f"], "flat"),
             helper.make_node("Gemm", ["f", "wd", "bd"], ["y"], "d", transB=1)]
    inits = [(k, v.astype(np.float32)) for k, v in inits]
    return graphopt.load(ob.model(nodes, [ob.vi("x", [1, 4, 12, 12])], [ob.vi("y", [1, 5])], inits))


def _calib(n=64, seed=1, shape=(1, 4, 12, 12)):
    return {"calib": {"x": np.random.default_rng(seed).normal(0, 1, (n,) + shape).astype(np.float32)}}


def _error(g0, g, held=HELD):
    """Relative RMS error of g's outputs against g0's on held-out inputs."""
    s0, s = ort.session(to_onnx(g0)), ort.session(to_onnx(g))
    ref = np.concatenate([s0.run(None, {"x": h})[0] for h in held])
    got = np.concatenate([s.run(None, {"x": h})[0] for h in held])
    return float(np.sqrt(((got - ref) ** 2).sum() / (ref ** 2).sum()))


def _prune(build, opts, data=None):
    res = PassManager.parse(f"prune-channels{{{opts}}}").run(build(), PassContext(data=data or _calib()))
    return res, res.records[-1]["info"]


def test_bias_cuts_the_error_and_lsq_cuts_it_further():
    """Same removal (l1 ranks the same whatever reconstruct says), three compensations."""
    errs, infos = {}, {}
    for mode in ("none", "bias", "lsq"):
        res, info = _prune(_means_net, f"criterion=l1,ratio=0.4,round_to=1,reconstruct={mode}")
        errs[mode], infos[mode] = _error(_means_net(), res.graph), info
        assert info["oracle_max_error"] < 1e-5                 # the oracle checked the plain removal
        assert info["layers"] == infos["none"]["layers"]
    assert errs["bias"] < 0.25 * errs["none"], errs
    assert errs["lsq"] < 0.7 * errs["bias"], errs
    assert "reconstruct" not in infos["none"]
    r = infos["lsq"]["reconstruct"]
    assert r["mode"] == "lsq" and r["sinks"] == {"lsq": 2, "bias": 1} and r["skipped"] == []   # c is 3x3: bias
    assert r["kept"] == "compensated" and r["output_error_after"] < r["output_error_before"]
    assert infos["bias"]["reconstruct"]["sinks"] == {"lsq": 0, "bias": 3}


@pytest.mark.parametrize("only,consumer", [("a", "b"), ("c", "d")])
def test_lsq_refits_a_1x1_conv_and_a_gemm(only, consumer):
    """Only one layer pruned: its consumer (1x1 conv b, or Gemm d behind the pool) is refitted; its weight shrinks to
    the kept channels and differs from the plain slice."""
    errs, graphs = {}, {}
    for mode in ("none", "bias", "lsq"):
        res, info = _prune(_means_net, f"criterion=l1,ratio=0.3,round_to=1,only=[{only}],reconstruct={mode}")
        errs[mode], graphs[mode] = _error(_means_net(), res.graph), res.graph
    assert errs["lsq"] < errs["bias"] < errs["none"], errs
    w = {m: constant_value(next(n for n in graphs[m].nodes if n.name == consumer).inputs[1]) for m in graphs}
    assert w["lsq"].shape == w["none"].shape and not np.allclose(w["lsq"], w["none"])
    np.testing.assert_array_equal(w["bias"], w["none"])      # bias compensation leaves the weight alone


def _constant_channel_net():
    """conv a (3x3): channel 0 has zero weights and bias 5 (a constant 5), the others vary -> Relu -> conv b (3x3,
    zero padding) -> GlobalAveragePool (the output). Over the output positions b's border taps read padding, so a
    fold of the whole kernel would be wrong at the borders; the mean over positions is exact."""
    wa = ob.rnd(4, 2, 3, 3)
    wa[0] = 0
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], "a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], "relu"),
             helper.make_node("Conv", ["r", "wb", "bb"], ["b"], "b", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["b"], ["y"], "pool")]
    inits = [("wa", wa), ("ba", np.array([5, 0, 0, 0], np.float32)), ("wb", ob.rnd(3, 4, 3, 3, seed=1)),
             ("bb", ob.rnd(3, seed=2))]
    return graphopt.load(ob.model(nodes, [ob.vi("x", [1, 2, 4, 4])], [ob.vi("y", [1, 3, 1, 1])], inits))


def test_activation_ranks_by_variance_and_the_constant_channel_is_restored_exactly():
    data = _calib(shape=(1, 2, 4, 4))
    held = np.random.default_rng(5).normal(0, 1, (8, 1, 2, 4, 4)).astype(np.float32)
    res, info = _prune(_constant_channel_net, "criterion=activation,ratio=0.25,round_to=1", data)
    assert 5.0 in constant_value(next(n for n in res.graph.nodes if n.name == "a").inputs[2]).tolist()
    res, info = _prune(_constant_channel_net, "criterion=activation,ratio=0.25,round_to=1,reconstruct=bias", data)
    assert 5.0 not in constant_value(next(n for n in res.graph.nodes if n.name == "a").inputs[2]).tolist()
    assert info["notes"][0].startswith("activation (variance)")
    assert _error(_constant_channel_net(), res.graph, held) < 1e-5     # the constant's mean, border taps included


def test_grouped_conv_and_matmul_consumers():
    """A grouped (not depthwise) conv reads only its group's channels; a MatMul gets its bias as an Add."""
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], "a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], "ra"),
             helper.make_node("Conv", ["ra", "wg", "bg"], ["gc"], "grouped", group=2),
             helper.make_node("Relu", ["gc"], ["rg"], "rg"),
             helper.make_node("GlobalAveragePool", ["rg"], ["p"], "pool"),
             helper.make_node("Flatten", ["p"], ["f"], "flat"),
             helper.make_node("MatMul", ["f", "wm"], ["y"], "mm")]
    ba = np.random.default_rng(3).uniform(2, 6, 16).astype(np.float32)
    inits = [("wa", ob.rnd(16, 4, 3, 3)), ("ba", ba), ("wg", ob.rnd(8, 8, 1, 1, seed=1, scale=0.3)),
             ("bg", np.full(8, 1.0, np.float32)), ("wm", ob.rnd(8, 5, seed=2))]

    def build():
        return graphopt.load(ob.model(nodes, [ob.vi("x", [1, 4, 12, 12])], [ob.vi("y", [1, 5])], inits))
    errs = {}
    for mode in ("none", "bias", "lsq"):
        res, info = _prune(build, f"criterion=l1,ratio=0.4,round_to=1,reconstruct={mode}")
        errs[mode] = _error(build(), res.graph)
        if mode != "none":
            assert [n.op for n in res.graph.nodes][-2:] == ["MatMul", "Add"]
            assert info["reconstruct"]["sinks"]["lsq" if mode == "lsq" else "bias"] >= 1
    assert errs["bias"] < 0.3 * errs["none"], errs
    assert errs["lsq"] < 0.8 * errs["bias"], errs


def test_a_shared_weight_stays_shared_under_lsq():
    """R is read by Gemm and MatMul steps of an unrolled recurrence: refitting it per reader would unshare it, so
    its readers get bias compensation and R stays one initializer. A MatMul step's compensation goes into the
    constant of the Add after it (no new node)."""
    def build():
        return graphopt.load(ob.shared_weight_chain())
    data = {"calib": {"x": np.random.default_rng(0).normal(0, 1, (64, 4, 16)).astype(np.float32)}}
    plain, _ = _prune(build, "criterion=l1,ratio=0.3,round_to=1", data)
    res, info = _prune(build, "criterion=l1,ratio=0.3,round_to=1,reconstruct=lsq", data)
    steps = [n for n in res.graph.nodes if n.name in {f"step{t}" for t in range(4)}]
    assert len({id(n.inputs[1]) for n in steps}) == 1
    assert [n.op for n in res.graph.nodes] == [n.op for n in plain.graph.nodes]
    r = info["reconstruct"]
    assert r["sinks"] == {"lsq": 1, "bias": 4} and r["kept"] == "compensated"       # 'out' is refitted
    held = np.random.default_rng(9).normal(0, 1, (16, 4, 16)).astype(np.float32)
    assert _error(build(), res.graph, held) < 0.7 * _error(build(), plain.graph, held)


def test_a_compensation_that_makes_things_worse_is_not_kept():
    """Statistics from the first half of the calibration data, the check on the second: here the halves differ
    (shifted inputs), the means measured on the first are wrong for the second, and the plain removal is kept."""
    a = np.random.default_rng(1).normal(4, 1, (16, 1, 4, 12, 12))
    b = np.random.default_rng(2).normal(-4, 1, (16, 1, 4, 12, 12))
    data = {"calib": {"x": np.concatenate([a, b]).astype(np.float32)}}
    plain, _ = _prune(_means_net, "criterion=l1,ratio=0.4,round_to=1", data)
    res, info = _prune(_means_net, "criterion=l1,ratio=0.4,round_to=1,reconstruct=bias", data)
    r = info["reconstruct"]
    assert r["kept"] == "uncompensated" and r["output_error_after"] > r["output_error_before"]
    assert "raised the output error" in r["note"]
    assert _error(plain.graph, res.graph) == 0.0
    assert pruned_widths(res.graph)                   # the pruned graph's metadata is the plain removal's


def test_report_line_and_metadata():
    res = PassManager.parse("prune-channels{criterion=l1,ratio=0.4,round_to=1,reconstruct=lsq}").run(
        _means_net(), PassContext(data=_calib()))
    rec = res.records[-1]
    text = pc.PruneChannels.report_text({k: v for k, v in rec["info"].items() if k in pc.PruneChannels.REPORTED})
    assert "reconstruct=lsq: 2 sink(s) refitted, 1 bias-compensated, 0 skipped; output error vs original" in text
    assert "(compensated kept)" in text
    assert pruned_widths(res.graph) == {"a": 16, "b": 12, "c": 8, "d": 5}


def test_nothing_removed_nothing_compensated():
    res, info = _prune(_means_net, "ratio=0.5,max_layer_ratio=0,reconstruct=bias")
    assert not res.records[-1]["modified"] and "reconstruct" not in info


@pytest.mark.parametrize("text,needle", [
    ("prune-channels{flops=0.5,reconstruct=bad}", "option reconstruct=bad must be one of: none, bias, lsq"),
    ("prune-channels{criterion=dead,reconstruct=bias}", "leaves nothing to compensate; drop reconstruct=bias"),
])
def test_bad_options(text, needle):
    with pytest.raises(BadInput) as e:
        PassManager.parse(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("data", [None, {"calib": {"other": np.zeros((4, 1, 4, 12, 12), np.float32)}}])
def test_reconstruct_without_calibration_data_is_refused(data):
    with pytest.raises(BadInput) as e:
        PassManager.parse("prune-channels{flops=0.5,reconstruct=lsq}").run(_means_net(), PassContext(data=data))
    msg = str(e.value)
    assert "reconstruct=lsq needs calibration data" in msg and "--calib" in msg and "\n" not in msg


def test_a_convtranspose_consumer_is_skipped_and_named(pm_onnx):
    """Linear -> view -> ConvTranspose: the transposed conv's input channels lose their contribution with no bias
    to fold it into (its taps overlap per output): the report names it."""
    g = graphopt.load(pm_onnx("linear_to_deconv"))
    x = g.inputs[0]
    data = {"calib": {x.name: np.random.default_rng(0).normal(0, 1, (16,) + tuple(x.shape)).astype(np.float32)}}
    res = PassManager.parse("prune-channels{criterion=l1,ratio=0.5,round_to=1,reconstruct=bias}").run(
        g, PassContext(data=data))
    r = res.records[-1]["info"]["reconstruct"]
    assert r["skipped_count"] == 1 and r["skipped"][0]["op"] == "ConvTranspose"
    assert "taps overlap" in r["skipped"][0]["why"]
    text = pc.PruneChannels.report_text({k: v for k, v in res.records[-1]["info"].items()
                                         if k in pc.PruneChannels.REPORTED})
    assert f", 1 skipped ({r['skipped'][0]['node']}: ConvTranspose (taps overlap per output))" in text
