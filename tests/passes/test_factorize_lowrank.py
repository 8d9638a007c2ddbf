"""factorize-lowrank: the full-rank oracle is exact, rank selection meets its budgets, EVBMF finds a planted rank,
grouped/depthwise convs are skipped, the pass is idempotent, bad options fail clearly, the result compiles."""
import numpy as np
import pytest
from onnx import helper

import graphopt
import onnx_builders as ob
from node_lookup import node_of
from graphopt import PassContext, PassManager, ort
from graphopt.analyses import flops
from graphopt.errors import BadInput, CheckFailed
from graphopt.hardware import HardwareInfo, Structure
from graphopt.graph import to_onnx
from graphopt.pipeline_text import format_value

ZOO = ["resnet", "mobilenet_v3", "densenet", "inception", "resnext", "shufflenet", "vit", "convnext", "yolo", "unet",
       "lstm", "gru", "mlp_digits", "cnn_digits"]
ORACLE = "factorize-lowrank{energy=1.0,always=true}"
SKIPS = {"mobilenet_v3": "depthwise", "shufflenet": "depthwise", "convnext": "depthwise", "resnext": "grouped"}


def _record(res):
    return res.records[-1]


def _layers(res):
    return {e["node"]: e for e in _record(res)["info"]["layers"]}


# ---------------------------------------------------------------------------------------------------------------
# exactness and idempotence
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ZOO)
def test_full_rank_oracle_is_exact_and_idempotent_on_zoo(zoo_onnx, name):
    g = graphopt.load(zoo_onnx(name))
    res = PassManager.parse(ORACLE).run(g)           # the manager compares outputs with onnxruntime (exact pass)
    rec = _record(res)
    assert rec["exact"] is True and res.modified and rec["info"]["factorized"] >= 1
    assert rec["max_error"] is not None
    assert all(e["rel_error"] < 1e-6 for e in rec["info"]["layers"]), rec["info"]["layers"]
    assert any(n.name.endswith("/lowrank_in") for n in res.graph.nodes)
    if name in SKIPS:
        assert any(s["reason"].startswith(SKIPS[name]) for s in rec["info"]["skipped"]), rec["info"]["skipped"]
    again = PassManager.parse(ORACLE).run(res.graph)
    assert not again.modified, _record(again)
    assert _record(again)["info"]["already_factorized"] >= 2 * rec["info"]["factorized"]


def test_default_is_full_rank_exact_and_changes_nothing(zoo_onnx):
    g = graphopt.load(zoo_onnx("cnn_digits"))
    res = PassManager.parse("factorize-lowrank").run(g)
    rec = _record(res)
    assert rec["exact"] is True and not res.modified and rec["info"]["selection"] == "full"
    assert all("MACs would not drop" in s["reason"] for s in rec["info"]["skipped"])


def _w(*shape, seed=0):
    """Weights scaled like a trained layer's (std 1/sqrt(fan_in)): outputs stay O(1), as in the zoo. The exact
    check's absolute tolerance (1e-6) is at float32's summation noise for outputs of magnitude ~5 and more."""
    fan_in = int(np.prod(shape[1:]))
    return ob.rnd(*shape, seed=seed, scale=1.0 / np.sqrt(fan_in))


def _gemm(trans_a=0, trans_b=1, alpha=1.0, beta=1.0, with_c=True, m=6, k=40, n=48):
    w = _w(n, k) if trans_b else _w(k, n)
    ins = ["x", "w"] + (["c"] if with_c else [])
    node = helper.make_node("Gemm", ins, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    inits = [("w", w)] + ([("c", ob.rnd(n, seed=3))] if with_c else [])
    return ob.model([node], [ob.vi("x", [k, m] if trans_a else [m, k])], [ob.vi("y", [m, n])], inits)


def _matmul3d():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"], name="mm"),
             helper.make_node("Add", ["t", "b"], ["y"], name="bias")]
    return ob.model(nodes, [ob.vi("x", [2, 5, 24])], [ob.vi("y", None)], [("w", _w(24, 40)), ("b", ob.rnd(40))])


def _conv(shape=(1, 12, 9, 9), cout=20, k=(3, 3), group=1, bias=True, **attrs):
    cin = shape[1]
    w = _w(cout, cin // group, *k)
    ins = ["x", "w"] + (["b"] if bias else [])
    nodes = [helper.make_node("Conv", ins, ["y"], name="conv", group=group, **attrs)]
    inits = [("w", w)] + ([("b", ob.rnd(cout, seed=5))] if bias else [])
    return ob.model(nodes, [ob.vi("x", list(shape))], [ob.vi("y", None)], inits)


HANDBUILT = {
    "gemm": lambda: _gemm(),
    "gemm_transA_alpha_beta": lambda: _gemm(trans_a=1, trans_b=0, alpha=0.7, beta=1.3),
    "gemm_no_bias": lambda: _gemm(with_c=False, k=20, n=64),
    "matmul_3d": _matmul3d,
    "conv_stride_pad_dilation": lambda: _conv(strides=[2, 2], pads=[2, 1, 2, 1], dilations=[2, 1]),
    "conv_same_upper": lambda: _conv(auto_pad="SAME_UPPER", strides=[2, 2], bias=False),
    "conv1d": lambda: _conv(shape=(2, 12, 15), k=(5,), pads=[2, 2]),
    "conv_pointwise_stride": lambda: _conv(k=(1, 1), strides=[2, 2]),
}


@pytest.mark.parametrize("name", sorted(HANDBUILT))
@pytest.mark.parametrize("pipeline", [ORACLE, "factorize-lowrank{rank=4,round_to=1,always=true}",
                                      "factorize-lowrank{energy=0.8,round_to=2,hooi_iters=2}"])
def test_handbuilt_layers_factorize(name, pipeline):
    g = graphopt.load(HANDBUILT[name]())
    res = PassManager.parse(pipeline).run(g)     # exact: checked in onnxruntime; lossy: structurally checked + drift
    rec = _record(res)
    if pipeline == ORACLE:
        assert rec["exact"] and res.modified and rec["max_error"] is not None
    elif res.modified:
        assert not rec["exact"] and "drift" in rec
        assert rec["info"]["macs_after"] < rec["info"]["macs_before"] or "always=true" in pipeline
    assert [t.name for t in res.graph.outputs] == ["y"]


# ---------------------------------------------------------------------------------------------------------------
# rank selection
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet", "vit", "cnn_digits"])
def test_flops_budget_is_met(zoo_onnx, name):
    g = PassManager.parse("cleanup").run(graphopt.load(zoo_onnx(name))).graph
    before = flops(g, None)
    res = PassManager.parse("factorize-lowrank{flops=0.6,round_to=4}").run(g)
    after = flops(res.graph, None)
    rec = _record(res)
    assert after["macs"] <= 0.6 * before["macs"]
    assert rec["info"]["macs_after"] == after["macs"] and rec["info"]["macs_ratio"] <= 0.6
    assert not rec["exact"] and rec["drift"]["y"]["cosine"] > 0
    for e in rec["info"]["layers"]:
        assert e["macs_after"] < e["macs_before"]
        for r, full, top in zip(e["ranks"], e["full_ranks"], e.get("max_ranks", e["full_ranks"])):
            assert 0 < r <= full and (r % 4 == 0 or r in (full, top))   # rounded up to round_to, or clipped
        assert 0 <= e["rel_error"] < 1


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_params_budget_is_met(zoo_onnx, name):
    g = PassManager.parse("cleanup").run(graphopt.load(zoo_onnx(name))).graph
    before = flops(g, None)
    res = PassManager.parse("factorize-lowrank{params=0.5,round_to=4}").run(g)
    after = flops(res.graph, None)
    assert after["params"] <= 0.5 * before["params"]
    assert _record(res)["info"]["params_after"] == after["params"]
    assert after["macs"] < before["macs"]


def test_budget_prefers_cheap_error(zoo_onnx):
    """A tighter budget never gives less error than a looser one, and the looser one keeps more MACs."""
    g = PassManager.parse("cleanup").run(graphopt.load(zoo_onnx("resnet"))).graph
    loose = _record(PassManager.parse("factorize-lowrank{flops=0.8,round_to=4}").run(graphopt.graph.copy(g)))
    tight = _record(PassManager.parse("factorize-lowrank{flops=0.5,round_to=4}").run(g))
    assert tight["info"]["macs_ratio"] <= 0.5 and loose["info"]["macs_ratio"] <= 0.8
    assert loose["info"]["macs_ratio"] > tight["info"]["macs_ratio"]
    assert tight["drift"]["y"]["mean_abs"] > loose["drift"]["y"]["mean_abs"]


def test_unreachable_budget_fails_clearly(zoo_onnx):
    g = graphopt.load(zoo_onnx("vit"))        # 32-wide layers: rank 16 saves nothing
    with pytest.raises(CheckFailed, match=r"flops=0.6 cannot be met.*round_to=16.*0\.\d+x"):
        PassManager.parse("factorize-lowrank{flops=0.6}").run(g)


def test_round_to_comes_from_the_target_hw(zoo_onnx):
    g = graphopt.load(zoo_onnx("resnet"))
    res = PassManager.parse("factorize-lowrank{energy=0.5}").run(g, PassContext(hw=HardwareInfo(fp32_lanes=8, structure=Structure(channels=8))))
    rec = _record(res)
    assert rec["info"]["round_to"] == 8 and rec["info"]["factorized"] >= 1
    assert all(r % 8 == 0 or r in (f, m) for e in rec["info"]["layers"]
               for r, f, m in zip(e["ranks"], e["full_ranks"], e.get("max_ranks", e["full_ranks"])))


def test_energy_and_rank_selection_per_layer():
    g = graphopt.load(_gemm(k=64, n=96))
    res = PassManager.parse("factorize-lowrank{energy=0.5,round_to=1}").run(graphopt.graph.copy(g))
    e = _layers(res)["gemm"]
    # the kept rank is the smallest keeping half the energy: its error^2 is at most 0.5, one rank less is above
    assert e["rel_error"] ** 2 <= 0.5 + 1e-6 and 1 <= e["ranks"][0] < 64
    w = _w(96, 64).astype(np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    r = e["ranks"][0]
    assert np.sum(s[:r - 1] ** 2) < 0.5 * np.sum(s ** 2) <= np.sum(s[:r] ** 2)
    fixed = _layers(PassManager.parse("factorize-lowrank{rank=10,round_to=4}").run(graphopt.graph.copy(g)))["gemm"]
    assert fixed["ranks"] == [12]                           # 10 rounded up to 4's multiple
    frac = _layers(PassManager.parse("factorize-lowrank{rank=0.25,round_to=1}").run(graphopt.graph.copy(g)))["gemm"]
    assert frac["ranks"] == [16]                            # a quarter of full rank 64


def _planted_gemm(rank=8, k=64, n=96, noise=0.01, seed=0):
    """A Gemm whose weight is a rank-`rank` matrix plus Gaussian noise; also the noise's share of the weight."""
    rng = np.random.default_rng(seed)
    low = 0.3 * rng.standard_normal((n, rank)) @ rng.standard_normal((rank, k))
    w = (low + noise * rng.standard_normal((n, k))).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=1)
    m = ob.model([node], [ob.vi("x", [4, k])], [ob.vi("y", [4, n])],
                 [("w", w), ("c", rng.standard_normal(n).astype(np.float32))])
    return m, float(np.linalg.norm(w - low) / np.linalg.norm(w))


@pytest.mark.parametrize("planted,noise", [(8, 0.01), (5, 0.05)])
def test_evbmf_recovers_planted_rank(planted, noise):
    model, noise_share = _planted_gemm(planted, noise=noise)
    res = PassManager.parse("factorize-lowrank{evbmf=true,round_to=1}").run(graphopt.load(model))
    e = _layers(res)["gemm"]
    assert e["evbmf_ranks"] == [planted] and e["ranks"] == [planted]
    # Eckart-Young: the rank-r truncation is at least as close to W as the planted low-rank part is
    assert e["rel_error"] <= noise_share + 1e-4
    assert _record(res)["drift"]["y"]["cosine"] > 0.99
    rounded = _layers(PassManager.parse("factorize-lowrank{evbmf=true,round_to=16}").run(graphopt.load(model)))["gemm"]
    assert rounded["ranks"] == [16]


def test_evbmf_on_pure_noise_keeps_nothing():
    from graphopt.passes.factorize_math import evbmf
    rank, sigma2 = evbmf(np.random.default_rng(0).standard_normal((40, 70)))
    assert rank == 0 and 0.8 < sigma2 < 1.2


def test_hooi_does_not_increase_tucker_error():
    model = _conv(shape=(1, 16, 8, 8), cout=24)
    errs = []
    for it in (0, 4):
        res = PassManager.parse(f"factorize-lowrank{{rank=6,round_to=1,hooi_iters={it}}}").run(graphopt.load(model))
        e = _layers(res)["conv"]
        assert e["method"] == "tucker2" and e["ranks"] == [6, 6] and e["projections"] == [True, True]
        errs.append(e["rel_error"])
    assert errs[1] <= errs[0] + 1e-6


# ---------------------------------------------------------------------------------------------------------------
# what is left alone
# ---------------------------------------------------------------------------------------------------------------

def _grouped_and_depthwise():
    nodes = [helper.make_node("Conv", ["x", "wg"], ["a"], name="grouped", group=4, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "wd"], ["b"], name="depthwise", group=16, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "wp"], ["y"], name="plain", pads=[1, 1, 1, 1])]
    inits = [("wg", ob.rnd(16, 4, 3, 3)), ("wd", ob.rnd(16, 1, 3, 3, seed=1)), ("wp", ob.rnd(32, 16, 3, 3, seed=2))]
    return ob.model(nodes, [ob.vi("x", [1, 16, 10, 10])], [ob.vi("y", None)], inits)


def test_grouped_and_depthwise_convs_are_skipped_with_reason():
    g = graphopt.load(_grouped_and_depthwise())
    res = PassManager.parse("factorize-lowrank{rank=8,round_to=4}").run(g)
    rec = _record(res)
    reasons = {s["node"]: s["reason"] for s in rec["info"]["skipped"]}
    assert reasons["grouped"].startswith("grouped conv (group=4)")
    assert reasons["depthwise"].startswith("depthwise conv (group=16)")
    assert list(_layers(res)) == ["plain"]
    ops = {n.name: n for n in res.graph.nodes}
    assert ops["grouped"].attrs["group"] == 4 and ops["depthwise"].attrs["group"] == 16


def test_ignore_ops_and_min_macs(zoo_onnx):
    g = graphopt.load(zoo_onnx("vit"))
    head, embed = node_of(g, "head").name, node_of(g, "patch_embed").name
    mlps = {node_of(g, f"layers.{i}.mlp.{j}").name for i in (0, 1) for j in (0, 2)}
    base = "factorize-lowrank{rank=4,round_to=4"
    res = PassManager.parse(base + f",ignore={format_value([head, embed])}}}").run(graphopt.graph.copy(g))
    done = _layers(res)
    assert head not in done and embed not in done and len(done) == 12
    assert {head, embed} <= {s["node"] for s in _record(res)["info"]["skipped"] if s["reason"] == "named in ignore"}
    only_conv = _layers(PassManager.parse(base + ",ops=[conv]}").run(graphopt.graph.copy(g)))
    assert list(only_conv) == [embed]
    big = _layers(PassManager.parse(base + ",min_macs=20000}").run(g))
    assert set(big) == {embed} | mlps


def test_lossy_second_run_leaves_factors_alone(zoo_onnx):
    g = graphopt.load(zoo_onnx("cnn_digits"))
    first = PassManager.parse("factorize-lowrank{flops=0.6}").run(g)
    second = PassManager.parse("factorize-lowrank{rank=4,round_to=4,ops=[conv]}").run(first.graph)
    assert _record(second)["info"]["already_factorized"] >= 2 * _record(first)["info"]["factorized"]
    assert all(not e["node"].endswith(("/lowrank_in", "/lowrank_core", "/lowrank_out")) for e in _record(second)["info"]["layers"])


# ---------------------------------------------------------------------------------------------------------------
# options, drift budget, pipeline text
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,match", [
    ("factorize-lowrank{energies=0.9}", "has no option 'energies'"),
    ("factorize-lowrank{energy=1.5}", r"energy=1.5 must be in \(0, 1\]"),
    ("factorize-lowrank{energy=0}", r"energy=0.0 must be in \(0, 1\]"),
    ("factorize-lowrank{flops=0}", r"flops=0.0 must be in \(0, 1\]"),
    ("factorize-lowrank{flops=-0.5}", r"flops=-0.5 must be in \(0, 1\]"),
    ("factorize-lowrank{params=0}", r"params=0.0 must be in \(0, 1\]"),
    ("factorize-lowrank{rank=1.5}", "rank=1.5 must be an integer >= 1 or a fraction"),
    ("factorize-lowrank{rank=0}", "rank=0 must be an integer"),
    ("factorize-lowrank{rank=lots}", "rank=lots must be an integer"),
    ("factorize-lowrank{rank=inf}", "rank=inf must be an integer"),         # was an OverflowError (fuzzer)
    ("factorize-lowrank{ops=[conv,lstm]}", "must list some of: gemm, matmul, conv"),
    ("factorize-lowrank{energy=0.9,flops=0.5}", "energy and flops both select ranks"),
    ("factorize-lowrank{round_to=-1}", "round_to=-1 must be at least 0"),
    ("factorize-lowrank{evbmf=yes}", "evbmf=yes must be true or false"),
])
def test_bad_options_fail_at_parse_time(text, match):
    with pytest.raises(BadInput, match=match):
        PassManager.parse(text)


def test_ignore_of_a_missing_node_is_bad_input(zoo_onnx):
    g = graphopt.load(zoo_onnx("mlp_digits"))
    with pytest.raises(BadInput, match="ignore names node 'nope', which is not in the graph"):
        PassManager.parse("factorize-lowrank{rank=4,ignore=[nope]}").run(g)


def test_min_cosine_turns_drift_into_a_budget(zoo_onnx):
    g = graphopt.load(zoo_onnx("cnn_digits"))
    with pytest.raises(CheckFailed, match=r"exceeded its budget: output 'y' cosine similarity .* min_cosine=0.9999"):
        PassManager.parse("factorize-lowrank{rank=1,round_to=1,min_cosine=0.9999}").run(graphopt.graph.copy(g))
    ok = PassManager.parse("factorize-lowrank{flops=0.8,round_to=4,min_cosine=0.5}").run(g)
    assert _record(ok)["drift"]["y"]["cosine"] >= 0.5


def test_exactness_follows_the_selection():
    assert PassManager.parse(ORACLE).passes[0].exact is True
    for opt in ("energy=0.9", "rank=8", "evbmf=true", "flops=0.5", "params=0.5"):
        assert PassManager.parse(f"factorize-lowrank{{{opt}}}").passes[0].exact is False, opt


def test_pipeline_text_round_trips():
    pm = PassManager.parse("cleanup,factorize-lowrank{flops=0.6,ignore=[a,b],ops=[conv,gemm],rank=full}")
    assert PassManager.parse(pm.resolved()) == pm
    assert PassManager.parse(str(pm)) == pm
    assert PassManager.from_toml(pm.to_toml()) == pm


def test_dynamic_batch_graph_factorizes(zoo_onnx):
    g = graphopt.load(zoo_onnx("cnn_digits", dynamic_batch=True), require_static=False)
    before = graphopt.graph.copy(g)
    res = PassManager.parse(ORACLE).run(g, PassContext(verify="structural"))
    assert res.modified
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    want = ort.run(to_onnx(before), {"x": x})["y"]
    got = ort.run(to_onnx(res.graph), {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------------

def test_factorized_cnn_compiles_on_cpu(zoo_onnx, tmp_path):
    art = graphopt.compile(zoo_onnx("cnn_digits"), target="cpu", out=tmp_path / "a",
                           pipeline="cleanup,factorize-lowrank{flops=0.6}", measure=False)
    rep = art.report
    assert rep["check"]["ok"]                               # the library matches onnxruntime on its model.onnx
    assert rep["macs_after"] <= 0.6 * rep["macs_before"]
    rec = [p for p in art.manifest["passes"] if p["pass"].startswith("factorize-lowrank")][0]
    assert rec["info"]["factorized"] >= 1 and rec["info"]["round_to"] == art.manifest["target"]["fp32_lanes"]
