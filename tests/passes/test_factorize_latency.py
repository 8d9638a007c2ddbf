"""factorize-lowrank{latency=...}: ranks chosen against measured layer latencies (factorize_latency.py). Selection
tests read latencies from a formula over the chain each configuration builds; one test measures for real (tiny
layers) and checks only that the table is built and reported."""
import numpy as np
import pytest
from onnx import helper

import graphopt
import onnx_builders as ob
from graphopt import PassContext, PassManager, latency, ort
from graphopt.analyses import flops
from graphopt.errors import BadInput
from graphopt.graph import from_onnx
from graphopt.passes import factorize_latency as fla


def mlp(wide=256, narrow=32):
    """fc1 (wide -> wide) and fc2 (wide -> narrow) Gemms with a Relu between."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"], transB=1, name="fc2")]
    return ob.model(nodes, [ob.vi("x", [8, wide])], [ob.vi("y", None)],
                    [("w1", ob.rnd(wide, wide)), ("b1", ob.rnd(wide)), ("w2", ob.rnd(narrow, wide)),
                     ("b2", ob.rnd(narrow))])


class ChainProfiler:
    """ms of a variant = its MACs / 1e5 + `per_node` ms per node: a factorized chain pays per extra kernel."""

    def __init__(self, per_node=0.0):
        self.per_node, self.threads, self.target_name = per_node, 1, "cpu"
        self.cache = type("C", (), {"path": "formula"})()
        self.total = 0.0

    def ms(self, model):
        g = from_onnx(model)
        return flops(g, None)["macs"] / 1e5 + self.per_node * len(g.nodes)

    def variants_table(self, signature, variants, full):
        out = {label: self.ms(make()) for label, make in variants.items()}
        self.total += out[full]
        return out

    def model_ms(self, model):
        return self.total


def _run(text, monkeypatch, per_node=0.0, model=None):
    prof = ChainProfiler(per_node)
    monkeypatch.setattr(latency, "Profiler", lambda *a, **k: prof)
    return PassManager.parse(text).run(graphopt.load(model or mlp()), PassContext()).records[0]


def test_the_predicted_latency_meets_the_budget(monkeypatch):
    rec = _run("factorize-lowrank{latency=0.7}", monkeypatch)
    lat = rec["info"]["latency"]
    assert rec["info"]["selection"] == "latency" and lat["predicted"] <= 0.7 and lat["target"] == 0.7
    assert rec["info"]["factorized"] >= 1 and lat["layers"]["fc1"]["chosen"].startswith("ranks ")
    assert set(lat["layers"]["fc1"]["measured"]) and lat["remainder_ms"] == 0.0


def test_a_factorization_that_is_not_faster_is_never_chosen(monkeypatch):
    """With a large cost per kernel, factorizing the small fc2 never pays (its chains are slower than the layer),
    so the budget is met on fc1 alone."""
    rec = _run("factorize-lowrank{latency=0.8}", monkeypatch, per_node=1.0)
    layers = rec["info"]["latency"]["layers"]
    assert layers["fc2"]["chosen"] == "layer" and all(ms >= layers["fc2"]["layer_ms"]
                                                      for ms in layers["fc2"]["measured"].values())
    assert layers["fc1"]["chosen"] != "layer" and rec["info"]["latency"]["predicted"] <= 0.8


def test_an_unreachable_latency_budget_is_refused(monkeypatch):
    from graphopt.errors import CheckFailed
    with pytest.raises(CheckFailed, match="latency=0.05 cannot be met: .*the original.s predicted latency"):
        _run("factorize-lowrank{latency=0.05}", monkeypatch)


def test_chain_models_compute_what_the_layer_computes_at_full_rank():
    g = graphopt.load(mlp(64, 16))
    from graphopt.passes import factorize_lowrank as fl
    from graphopt.passes.factorize_math import analyze
    from graphopt.analyses import shapes
    sh = shapes(g, None)
    lay, _ = fl._layer(g.nodes[0], sh, set(fl.OPS))
    analyze(lay)
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    ref = ort.run(fla.chain_model(lay, None, sh), {"x": x})["y"]
    full = ort.run(fla.chain_model(lay, (64,), sh), {"x": x})["y"]
    assert len(from_onnx(fla.chain_model(lay, (16,), sh)).nodes) == 2
    np.testing.assert_allclose(full, ref, rtol=1e-4, atol=1e-4)


def test_latency_and_another_selector_are_refused():
    with pytest.raises(BadInput, match="both select ranks"):
        PassManager.parse("factorize-lowrank{latency=0.5,flops=0.5}")
    with pytest.raises(BadInput, match=r"latency=1.5 must be in \(0, 1\]"):
        PassManager.parse("factorize-lowrank{latency=1.5}")


def test_measured_for_real_and_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    rec = PassManager.parse("factorize-lowrank{latency=0.9}").run(graphopt.load(mlp(128, 16)),
                                                                  PassContext(target="cpu")).records[0]
    lat = rec["info"]["latency"]
    assert lat["clock"] == "process CPU time (1 thread)" and lat["model_ms"] > 0
    assert lat["layers"]["fc1"]["layer_ms"] > 0 and lat["layers"]["fc1"]["measured"]
    assert (tmp_path / "latency").is_dir()
