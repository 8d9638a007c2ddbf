"""Hypothesis: prune-channels on generated conv chains (1x1 / 3x3 convs, BatchNormalization, Relu / Sigmoid,
residual adds, max pooling, then global pooling and a classifier).

* any removal the pass chooses satisfies its own oracle (pruned graph == original with the removed channels
  zeroed at their consumers, checked in onnxruntime by the pass; a violation is a CheckFailed);
* criterion=dead on a chain with some channels made dead is exact (the PassManager compares the outputs with the
  input graph's) and idempotent (a second run finds nothing left to remove)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from onnx import helper

import graphopt
import onnx_builders as ob
from graphopt import PassManager

pytestmark = pytest.mark.fast

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
LAYER = st.fixed_dictionaries({"width": st.integers(2, 6), "kernel": st.sampled_from([1, 3]), "bn": st.booleans(),
                               "act": st.sampled_from(["Relu", "Sigmoid", None]), "residual": st.booleans(),
                               "pool": st.booleans()})


def conv_chain(layers: list[dict], seed: int, dead: dict[int, list[int]] | None = None):
    """x [1, 3, 8, 8] -> per layer: Conv (bias) [-> BN] [-> act] [+ the layer's input when it is no graph input,
    the widths match and residual] [-> MaxPool 2x2 stride 1] -> GlobalAveragePool -> Flatten -> Gemm (3 classes)
    -> y. Every layer's channels reach only convs and the classifier, so each chain has prunable channels.
    dead: {layer: channels} whose weights and bias are zero (those layers get no BN)."""
    rng = np.random.default_rng(seed)
    dead = dead or {}
    nodes, inits, cur, width = [], [], "x", 3
    for i, lay in enumerate(layers):
        w = rng.standard_normal((lay["width"], width, lay["kernel"], lay["kernel"])).astype(np.float32)
        b = rng.standard_normal(lay["width"]).astype(np.float32)
        w[dead.get(i, [])], b[dead.get(i, [])] = 0, 0
        inits += [(f"w{i}", w), (f"b{i}", b)]
        pad = lay["kernel"] // 2
        nodes.append(helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], pads=[pad] * 4))
        out = f"c{i}"
        if lay["bn"] and i not in dead:
            inits += ob.bn_params(f"bn{i}", lay["width"], seed=seed + i)
            nodes.append(ob.bn_node(out, f"n{i}", f"bn{i}"))
            out = f"n{i}"
        if lay["act"]:
            nodes.append(helper.make_node(lay["act"], [out], [f"a{i}"]))
            out = f"a{i}"
        if lay["residual"] and i > 0 and lay["width"] == width and i not in dead:
            nodes.append(helper.make_node("Add", [out, cur], [f"r{i}"]))
            out = f"r{i}"
        if lay["pool"]:
            nodes.append(helper.make_node("MaxPool", [out], [f"p{i}"], kernel_shape=[2, 2]))
            out = f"p{i}"
        cur, width = out, lay["width"]
    inits += [("fc_w", rng.standard_normal((3, width)).astype(np.float32)), ("fc_b", np.zeros(3, np.float32))]
    nodes += [helper.make_node("GlobalAveragePool", [cur], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1)]
    return ob.model(nodes, [ob.vi("x", [1, 3, 8, 8])], [ob.vi("y", [1, 3])], inits)


@SETTINGS
@given(layers=st.lists(LAYER, min_size=1, max_size=4), seed=st.integers(0, 2 ** 16),
       criterion=st.sampled_from(["l1", "l2", "random"]), ratio=st.sampled_from([0.25, 0.5]))
def test_every_removal_satisfies_the_oracle(layers, seed, criterion, ratio):
    graph = graphopt.load(conv_chain(layers, seed))
    res = PassManager.parse(f"prune-channels{{criterion={criterion},ratio={ratio},round_to=1}}").run(graph)
    info = res.records[0]["info"]
    assert info["units"]["prunable"] > 0 and res.modified, info      # the budget removed some channels
    assert info["units"]["removed"] > 0 and "oracle_max_error" in info
    assert info["params"]["after"] < info["params"]["before"]


@SETTINGS
@given(layers=st.lists(LAYER, min_size=1, max_size=4), seed=st.integers(0, 2 ** 16), data=st.data())
def test_dead_channels_go_exactly_and_once(layers, seed, data):
    dead = {}
    for i, lay in enumerate(layers):
        chosen = data.draw(st.lists(st.integers(0, lay["width"] - 1), max_size=lay["width"], unique=True))
        if chosen:
            dead[i] = chosen
    graph = graphopt.load(conv_chain(layers, seed, dead))
    first = PassManager.parse("prune-channels{criterion=dead,round_to=1}").run(graph)   # exact: outputs compared
    assert first.records[0]["exact"] and (not first.modified or "max_error" in first.records[0])

    def summed_later(i):
        return i + 1 < len(layers) and layers[i + 1]["residual"] and layers[i + 1]["width"] == layers[i]["width"]
    # a layer with some (not all) channels zero, then Relu or nothing, and no residual add on its output: those
    # channels are provably zero where the next layer reads them, so something must go
    plain = [i for i, d in dead.items()
             if len(d) < layers[i]["width"] and layers[i]["act"] != "Sigmoid" and not summed_later(i)]
    event("some channels removed" if first.modified else "nothing removed")
    if plain:
        assert first.modified, (dead, first.records[0]["info"])
    again = PassManager.parse("prune-channels{criterion=dead,round_to=1}").run(first.graph)
    assert not again.modified, again.records[0]["info"]
