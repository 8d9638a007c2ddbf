"""graphopt.latency: the per-layer latency table (measured, cached, verified), its curves and the snapping rule.
Timings are never asserted: the measuring tests only check that tables are built, cached and verified."""
import json

import onnx
import pytest
from onnx import helper

import graphopt
import onnx_builders as ob
from graphopt import api, cli, latency
from graphopt.latency import Curve, Kernel, kernel_of, sample_counts


# ---------------------------------------------------------------------------------------------------- curves

@pytest.mark.fast
def test_sample_counts_hold_step_multiples_and_the_counts_around_one():
    assert sample_counts(64, 16) == [16, 31, 32, 33, 48, 64]
    assert sample_counts(512, 16) == [48, 128, 255, 256, 257, 272, 384, 512]
    assert sample_counts(16, 16) == [2, 4, 8, 12, 16]          # narrow layers: plain fractions
    assert sample_counts(1, 16) == [1]


@pytest.mark.fast
def test_a_count_not_faster_than_a_larger_one_is_never_chosen():
    step = Curve([(64, 4.0), (48, 3.0), (33, 3.0), (32, 2.0), (31, 2.0), (16, 1.0)], 64, 16)   # padded to 16
    assert step.penalty == pytest.approx(3.0 / 2.0625)          # the worst measured off-step count
    assert step.fast_counts([64, 48, 33, 32, 31, 16]) == [64, 48, 32, 16]
    assert step.at(40) == pytest.approx(2.5 * step.penalty)      # unmeasured off-step counts: the line, penalized
    linear = Curve([(k, k / 16) for k in (64, 48, 33, 32, 31, 16)], 64, 16)
    assert linear.penalty == 1.0 and linear.fast_counts([64, 48, 33, 32, 31, 16]) == [64, 48, 33, 32, 31, 16]
    flat = Curve([(64, 4.0), (48, 4.0), (33, 3.0), (32, 2.0), (31, 2.0), (16, 1.0)], 64, 16)   # 48 pays nothing
    assert 48 not in flat.fast_counts([64, 48, 32, 16])


@pytest.mark.fast
def test_kernels_of_every_op_build_valid_one_node_graphs():
    cases = [(Kernel("Conv", (1, 8, 6, 6), (16, 8, 3, 3), (16,), (("pads", [1, 1, 1, 1]),)), (5, 3), [1, 5, 6, 6]),
             (Kernel("Conv", (1, 8, 6, 6), (16, 1, 3, 3), (16,), (("group", 8), ("pads", [1, 1, 1, 1])), True),
              (6, 3), [1, 6, 6, 6]),                                     # depthwise, multiplier 2: 3 groups
             (Kernel("ConvTranspose", (1, 8, 4, 4), (8, 6, 2, 2), None, (("strides", [2, 2]),)), (5, 3),
              [1, 5, 8, 8]),
             (Kernel("Gemm", (2, 8), (16, 8), (16,), (("transB", 1),)), (5, 3), [2, 5]),
             (Kernel("MatMul", (1, 4, 8), (8, 16), None, ()), (5, 3), [1, 4, 5])]
    for k, (ko, ki), want in cases:
        m = k.model(ko, ki)
        onnx.checker.check_model(m, full_check=True)
        assert [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim] == want, k.op


@pytest.mark.fast
def test_kernel_of_reads_the_graph_and_skips_what_it_cannot_measure():
    g = graphopt.load(ob.two_branches())
    from graphopt.analyses import shapes
    sh = shapes(g, None)
    ks = {n.name: kernel_of(n, sh) for n in g.nodes}
    assert (ks["p"].n_out, ks["p"].n_in, ks["q"].n_in) == (64, 8, 64)
    assert [ks[n.name] for n in g.nodes if n.op == "Relu"] == [None, None]
    grouped = helper.make_node("Conv", ["x", "w"], ["y"], group=2)
    m = ob.model([grouped], [ob.vi("x", [1, 8, 4, 4])], [ob.vi("y", None)], [("w", ob.rnd(8, 4, 1, 1))])
    gg = graphopt.load(m)
    assert kernel_of(gg.nodes[0], shapes(gg, None)) is None     # grouped (not depthwise): not modelled


# ---------------------------------------------------------------------------------------------------- measuring

def tiny_kernel():
    return Kernel("Conv", (1, 4, 8, 8), (8, 4, 3, 3), (8,), (("pads", [1, 1, 1, 1]),))


@pytest.mark.fast
def test_the_table_is_measured_once_cached_and_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    p = latency.Profiler("cpu", cache_root=tmp_path)
    full, co, ci = p.curves(tiny_kernel(), True, False)
    assert ci is None and [k for k, _ in co.points] == sample_counts(8, p.step) and full > 0
    doc = json.loads(p.cache.path.read_text())["body"]
    assert doc["machine"]["cpu_flags"] and len(doc["kernels"]) == 1 and str(1) in doc["overhead"]

    def no_compile(*a, **k):
        raise AssertionError("compiled although the table is cached")
    monkeypatch.setattr(latency, "_compile", no_compile)
    again = latency.Profiler("cpu", cache_root=tmp_path).curves(tiny_kernel(), True, False)
    assert again[0] == full and again[1].points == co.points          # read back, nothing measured

    sha = json.loads(p.cache.path.read_text())["sha256"]
    doc["kernels"][next(iter(doc["kernels"]))]["ms"]["8,4"] = 1e-9    # tampered: the sha256 no longer matches
    p.cache.path.write_text(json.dumps({"body": doc, "sha256": sha}))
    with pytest.warns(UserWarning, match="not trusted .*does not match its sha256"):
        fresh = latency.Profiler("cpu", cache_root=tmp_path)
    assert fresh.cache.kernels == {}
    body = dict(doc, machine=dict(doc["machine"], cpu="another CPU"))           # consistent, but not this machine
    p.cache.path.write_text(json.dumps({"body": body, "sha256": latency._digest(body)}))
    with pytest.warns(UserWarning, match="another machine"):
        latency.Profiler("cpu", cache_root=tmp_path)
    p.cache.path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        latency.Profiler("cpu", cache_root=tmp_path)


@pytest.mark.fast
def test_threads_are_part_of_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    p1 = latency.Profiler("cpu", cache_root=tmp_path)
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    p2 = latency.Profiler("cpu", cache_root=tmp_path)
    k = tiny_kernel()
    assert latency._key(k.signature, p1.threads) != latency._key(k.signature, p2.threads)


def test_cli_profile_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    nodes = [ob.named_conv("x", "wa", "a"), helper.make_node("Relu", ["a"], ["ar"]), ob.named_conv("ar", "wb", "y", 0)]
    m = ob.model(nodes, [ob.vi("x", [1, 4, 8, 8])], [ob.vi("y", None)],
                 [("wa", ob.rnd(8, 4, 3, 3)), ("wa_b", ob.rnd(8)), ("wb", ob.rnd(4, 8, 1, 1)), ("wb_b", ob.rnd(4))])
    path = ob.save(m, tmp_path / "m.onnx")
    assert cli.main(["profile", str(path), "--threads", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {(r["layer"], r["axis"]) for r in res["layers"]} == {("a", "out"), ("b", "in")}
    assert all([c for c, _, _ in r["ms"]] == sorted(sample_counts(8, res["step"]), reverse=True)
               for r in res["layers"])
    assert res["model_ms"] > 0 and (tmp_path / "cache" / "latency").is_dir()
    assert cli.main(["profile", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such model file" in err


def test_compile_reports_the_budget_beside_the_measured_latency(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    art = api.compile(ob.two_branches(16), "cpu", tmp_path / "a", threads=1,
                      pipeline="cleanup,prune-channels{latency=0.6,calibrate=1}")
    lat = art.report["latency"]
    budget = lat["budget"][0]
    assert budget["target"] == 0.6 and 0 < budget["achieved"] and budget["achieved"] == lat["achieved_fraction"]
    pruning = art.report["pruning"][0]["latency"]
    assert pruning["target"] == 0.6 and len(pruning["calibration"]) == 1 and pruning["kernels"] == 4


@pytest.mark.fast
def test_two_runs_filling_one_table_lose_nothing(tmp_path):
    t = api.get_target("cpu", mcpu="cooperlake")
    a, b = latency.Cache(t, tmp_path), latency.Cache(t, tmp_path)     # both opened before either saved
    for cache, name in ((a, "a"), (b, "b")):
        sig = {"op": name}
        cache.kernels[latency._key(sig, 1)] = {"signature": sig, "threads": 1, "ms": {"1,1": 1.0}}
        cache.save()
    assert {e["signature"]["op"] for e in latency.Cache(t, tmp_path).kernels.values()} == {"a", "b"}


@pytest.mark.fast
def test_the_report_lists_budgets_not_mere_predictions():
    recs = [{"pass": "prune-channels{predict_latency=true}", "info": {"latency": {"target": 1.0, "predicted": 0.9}}},
            {"pass": "prune-channels{latency=0.5}", "info": {"latency": {"target": 0.5, "predicted": 0.49}}},
            {"pass": "x", "info": {}}]
    assert api.latency_budgets(recs) == [{"pass": "prune-channels{latency=0.5}", "target": 0.5, "predicted": 0.49}]
