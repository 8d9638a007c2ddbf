"""graphopt sensitivity and prune-channels{allocation=sensitivity} on the digits CNN (trained teacher fixture)."""
import json

import numpy as np
import pytest

import digits
import graphopt
from graphopt import PassContext, PassManager, cli, sensitivity
from graphopt.errors import BadInput
from node_lookup import node_of

pytestmark = pytest.mark.fast

TEACHER = str(digits.TEACHER_ONNX)
SAMPLES = 200


@pytest.fixture(scope="module")
def eval_data():
    _, _, x, y = digits.load_digits_split()
    return {"x": x, "labels": y}


@pytest.fixture(scope="module")
def results(eval_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return sensitivity.analyze(TEACHER, eval_data, samples=SAMPLES, cache_root=root), root


def test_the_table_has_every_group_at_every_level_and_every_layer_quantized(results):
    res, _ = results
    assert res["metric"] == "top1" and res["baseline"] > 0.9 and res["samples"] == SAMPLES
    g = graphopt.load(TEACHER)
    weighted = [n.name for n in g.nodes if n.op in ("Conv", "Gemm")]
    assert [q["node"] for q in res["quantize"]] == weighted             # every weighted layer, alone in int8
    assert len(res["groups"]) == 3                                       # conv outputs: 16, 32, 32 channels
    for grp in res["groups"]:
        assert [x["level"] for x in grp["levels"]] == [0.25, 0.5, 0.75]
        assert [x["kept"] for x in grp["levels"]] == [round(grp["prunable"] * (1 - v)) for v in (0.25, 0.5, 0.75)]
        for x in grp["levels"]:
            assert x["drop"] == pytest.approx(res["baseline"] - x["value"], abs=1e-6) and 0 < x["macs"] < 1
    assert not res["cached"]


def test_results_are_cached_and_a_tampered_file_is_measured_again(results, eval_data, monkeypatch):
    res, root = results
    from graphopt import distill
    calls = []
    real = distill.evaluate
    monkeypatch.setattr(distill, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = sensitivity.analyze(TEACHER, eval_data, samples=SAMPLES, cache_root=root)
    assert again["cached"] and not calls and again["groups"] == res["groups"]
    path = next((root / "sensitivity").glob("*.json"))
    doc = json.loads(path.read_text())
    doc["body"]["result"]["baseline"] = 0.1                                 # edited: the sha256 no longer matches
    path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="not trusted .*does not match its sha256"):
        fresh = sensitivity.analyze(TEACHER, eval_data, samples=SAMPLES, cache_root=root)
    assert not fresh["cached"] and calls and fresh["baseline"] == res["baseline"]


def test_without_labels_the_score_is_agreement_with_the_original(eval_data, tmp_path):
    res = sensitivity.analyze(TEACHER, {"x": eval_data["x"]}, samples=64, levels=(0.5,), quantize=False,
                              cache_root=tmp_path)
    assert res["metric"] == "top1_agreement" and res["baseline"] == 1.0
    assert all(0 <= x["value"] <= 1 for g in res["groups"] for x in g["levels"])


def _kept_fraction(rec, node):
    before, after = rec["info"]["layers"][node]
    return after / before


def test_allocation_by_sensitivity_meets_the_budget_and_spares_the_sensitive_layers(results, tmp_path):
    res, _ = results
    path = tmp_path / "s.json"
    path.write_text(json.dumps(res))
    g = graphopt.load(TEACHER)
    out = PassManager.parse(f"cleanup,prune-channels{{allocation=sensitivity,sensitivity={json.dumps(str(path))},"
                            f"flops=0.7,round_to=4}}").run(g, PassContext())
    rec = out.records[-1]
    assert rec["info"]["budget"]["flops"]["met"] and rec["info"]["macs"]["ratio"] <= 0.7
    worst = {grp["node"]: max(x["drop"] for x in grp["levels"][:2]) for grp in res["groups"]}
    order = sorted(worst, key=worst.get)                     # least sensitive first
    kept = [_kept_fraction(rec, n) for n in order]
    assert kept == sorted(kept)                               # the more sensitive, the more it keeps
    assert kept[0] < kept[-1]


def test_allocation_follows_an_injected_ordering(tmp_path):
    """A synthetic table: the same graph, opposite orderings, opposite allocations."""
    g0 = graphopt.load(TEACHER)
    res = PassManager.parse("cleanup").run(g0, PassContext())
    nodes = [n.name for n in res.graph.nodes if n.op == "Conv"]

    def table(drops):
        return {"metric": "top1", "groups": [{"node": n, "levels": [{"level": 0.5, "drop": d}]}
                                             for n, d in zip(nodes, drops)]}
    kept = {}
    for name, drops in (("up", [0.01, 0.1, 0.5]), ("down", [0.5, 0.1, 0.01])):
        rec = PassManager.parse("cleanup,prune-channels{allocation=sensitivity,params=0.8,round_to=4}").run(
            graphopt.load(TEACHER), PassContext(data={"sensitivity": table(drops)})).records[-1]
        assert rec["info"]["budget"]["params"]["met"]
        kept[name] = [_kept_fraction(rec, n) for n in nodes]
    assert kept["up"][0] < kept["up"][2] and kept["down"][0] > kept["down"][2]


@pytest.mark.parametrize("opts,data,needle", [
    ("allocation=sensitivity,flops=0.5", None, "needs the results of `graphopt sensitivity`"),
    ("allocation=sensitivity,flops=0.5", {"groups": [{"node": "nope", "levels": []}]}, "no channel group"),
    ("allocation=sensitivity,flops=0.5", {"groups": "x"}, "hold no groups"),
    ("allocation=sensitivity,flops=0.5,sensitivity=/no/such.json", None, "cannot read it"),
    ("allocation=sensitivity,scope=local,flops=0.5", None, "does not go with scope=local"),
    ("only=[nope],ratio=0.5", None, "only names node 'nope'"),
])
def test_bad_sensitivity_input_is_one_clear_error(opts, data, needle):
    with pytest.raises(BadInput) as e:
        PassManager.parse(f"prune-channels{{{opts}}}").run(graphopt.load(TEACHER),
                                                           PassContext(data={"sensitivity": data} if data else None))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_quantize_excludes_takes_the_costly_layers(results):
    res, _ = results
    fake = dict(res, quantize=[{"node": "a", "op": "Conv", "value": 0.9, "drop": 0.02},
                               {"node": "b", "op": "Conv", "value": 0.98, "drop": 0.001},
                               {"node": "c", "op": "Gemm", "error": "onnxruntime refused it"}])
    assert sensitivity.quantize_excludes(fake, 0.005) == ["a", "c"]


def test_quantize_exclude_auto_leaves_the_sensitive_layers_in_fp32(eval_data, tmp_path):
    """quantize{exclude=auto} keeps exactly the layers the results call costly in fp32, and quantizes the rest."""
    g = PassManager.parse("cleanup").run(graphopt.load(TEACHER), PassContext()).graph
    weighted = [n.name for n in g.nodes if n.op in ("Conv", "Gemm")]
    table = {"metric": "top1", "groups": [], "quantize": [{"node": weighted[0], "op": "Conv", "drop": 0.03},
                                                           {"node": weighted[1], "op": "Conv", "drop": 0.0},
                                                           {"node": "gone", "op": "Conv", "drop": 0.5}]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(table))
    calib = {"calib": {"x": eval_data["x"][:32]}}
    rec = PassManager.parse(f"cleanup,quantize{{exclude=auto,sensitivity={json.dumps(str(path))}}}").run(
        graphopt.load(TEACHER), PassContext(data=calib)).records[-1]
    info = rec["info"]
    assert info["sensitivity_excluded"] == [weighted[0]]              # 'gone' is not in this graph: skipped
    assert weighted[0] in info["fp32_nodes"] and weighted[1] in info["quantized"]
    plain = PassManager.parse("cleanup,quantize").run(graphopt.load(TEACHER), PassContext(data=calib)).records[-1]
    assert weighted[0] in plain["info"]["quantized"] and "sensitivity_excluded" not in plain["info"]


@pytest.mark.parametrize("opts,needle", [
    ("exclude=auto", "exclude=auto needs the results of `graphopt sensitivity`"),
    ("exclude=auto,sensitivity=/no/such.json", "cannot read it"),
    ("scheme=weight_int8,exclude=auto", "applies to scheme=int8 only"),
])
def test_quantize_exclude_auto_bad_input(opts, needle, eval_data):
    with pytest.raises(BadInput) as e:
        PassManager.parse(f"quantize{{{opts}}}").run(graphopt.load(TEACHER),
                                                     PassContext(data={"calib": {"x": eval_data["x"][:8]}}))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_writes_table_json_plot_and_report(eval_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "eval.npz"
    np.savez(data, x=eval_data["x"][:64], labels=eval_data["labels"][:64])
    out = tmp_path / "digits.json"
    assert cli.main(["sensitivity", TEACHER, "--eval", str(data), "--levels", "0.5", "--no-quantize",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "top1 of the original" in text and node_of(graphopt.load(TEACHER), "features.0.0").name in text
    saved = json.loads(out.read_text())
    assert saved["levels"] == [0.5] and len(saved["groups"]) == 3
    assert (tmp_path / "digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (tmp_path / "digits.html").read_text()


def test_cli_quantize_only_with_the_calibration_the_int8_model_will_use(eval_data, tmp_path, monkeypatch, capsys):
    """--no-prune: only the per-layer int8 runs; --quantize: their quantize options (the calibration), which are
    part of the cache key, so another calibration is measured again."""
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "eval.npz"
    np.savez(data, x=eval_data["x"][:64], labels=eval_data["labels"][:64])
    calls, calibrations = [], []
    real = PassManager.from_steps
    monkeypatch.setattr(PassManager, "from_steps", staticmethod(lambda steps: calls.append(steps) or real(steps)))
    from graphopt.passes import quantize as qp
    real_reader = qp._reader
    monkeypatch.setattr(qp, "_reader", lambda *a, **k: calibrations.append(1) or real_reader(*a, **k))
    out = tmp_path / "q.json"
    argv = ["sensitivity", TEACHER, "--eval", str(data), "--no-prune", "--out", str(out), "--quantize",
            "calibration=percentile,percentile=99.9"]
    assert cli.main(argv) == 0
    saved = json.loads(out.read_text())
    assert saved["levels"] == [] and all(not g["levels"] for g in saved["groups"]) and len(saved["quantize"]) == 4
    assert all(s[0]["name"] == "quantize" and s[0]["calibration"] == "percentile" and s[0]["percentile"] == 99.9
               for s in calls) and len(calls) == 4
    assert len(calibrations) == 1                          # the four layers' runs share one calibration
    capsys.readouterr()
    assert cli.main(argv[:-1] + ["calibration=minmax"]) == 0 and len(calls) == 8      # not the cached results
    assert cli.main(argv) == 0 and len(calls) == 8                                    # these are cached


@pytest.mark.parametrize("args,needle", [
    (["--levels", "0.5,1.5"], "--levels 0.5,1.5: give fractions"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--no-prune", "--no-quantize"], "leaves nothing to measure"),
    (["--quantize", "exclude_nodes=[a]"], "'exclude_nodes' is chosen per layer"),
    (["--quantize", "calibration=nonsense"], "calibration"),
    (["--eval", "WRONG"], "lacks input(s) x"),
])
def test_cli_bad_input_is_one_line_exit_2(args, needle, eval_data, tmp_path, capsys):
    data = tmp_path / "eval.npz"
    np.savez(data, x=eval_data["x"][:8])
    np.savez(tmp_path / "wrong.npz", y=eval_data["x"][:8])
    argv = ["sensitivity", TEACHER, "--eval", str(data), "--out", str(tmp_path / "o.json")] + args
    if "WRONG" in args:
        argv[argv.index("WRONG")] = str(tmp_path / "wrong.npz")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
