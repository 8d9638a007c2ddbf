"""Hypothesis: cleanup on generated chains (Identity, x + 0, x * 1, Dropout, Conv, BatchNormalization, Relu,
x + c, a dead side branch) is exact (the PassManager compares its outputs with onnxruntime's on the input graph),
reaches a fixed point (a second cleanup changes nothing: idempotence), and leaves none of the no-ops behind."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import graphopt
import onnx_builders as ob
from graph_compare import canonical
from graphopt import PassManager

pytestmark = pytest.mark.fast

NO_OPS = ("identity", "add_zero", "mul_one", "dropout")
OPS = NO_OPS + ("conv", "bn", "relu", "add_const", "dead_branch")
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))


def chain_model(ops: list[str], channels: int, seed: int):
    """x [1, C, 4, 4] -> ops in order -> y; weights drawn from seed."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i, op in enumerate(ops):
        out = f"t{i}"
        if op == "identity":
            nodes.append(helper.make_node("Identity", [cur], [out]))
        elif op in ("add_zero", "mul_one", "add_const"):
            value = {"add_zero": 0.0, "mul_one": 1.0}.get(op)
            c = np.full((channels, 1, 1), value, np.float32) if value is not None else \
                rng.standard_normal((channels, 1, 1)).astype(np.float32)
            inits.append((f"c{i}", c))
            nodes.append(helper.make_node("Mul" if op == "mul_one" else "Add", [cur, f"c{i}"], [out]))
        elif op == "dropout":
            nodes.append(helper.make_node("Dropout", [cur], [out]))
        elif op == "conv":
            inits += [(f"w{i}", rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.3),
                      (f"b{i}", rng.standard_normal(channels).astype(np.float32))]
            nodes.append(helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [out], pads=[1, 1, 1, 1]))
        elif op == "bn":
            inits += ob.bn_params(f"bn{i}", channels, seed=seed + i)
            nodes.append(ob.bn_node(cur, out, f"bn{i}"))
        elif op == "relu":
            nodes.append(helper.make_node("Relu", [cur], [out]))
        else:  # dead_branch: a node nothing reads; the chain goes on from its input
            nodes.append(helper.make_node("Sigmoid", [cur], [f"dead{i}"]))
            out = cur
        cur = out
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    shape = [1, channels, 4, 4]
    return ob.model(nodes, [ob.vi("x", shape)], [ob.vi("y", shape)], inits)


@SETTINGS
@given(ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=7), channels=st.integers(1, 3),
       seed=st.integers(0, 2 ** 16))
def test_cleanup_is_exact_and_idempotent_on_generated_chains(ops, channels, seed):
    graph = graphopt.load(chain_model(ops, channels, seed), fold_constants=False)
    first = PassManager.parse("cleanup").run(graph)           # exactness checked by the manager
    once = canonical(graphopt.to_onnx(first.graph))
    second = PassManager.parse("cleanup").run(first.graph)
    assert not second.modified, second.records[0]["info"]
    assert canonical(graphopt.to_onnx(second.graph)) == once
    left = [n.op for n in second.graph.nodes]
    assert "Dropout" not in left and "Sigmoid" not in left
    if any(op not in NO_OPS + ("dead_branch",) for op in ops):    # some real op: no Identity is needed
        assert "Identity" not in left, once
    assert not any(n.op in ("Add", "Mul") and isinstance(n.inputs[1], gs.Constant)
                   and np.all(n.inputs[1].values == (0 if n.op == "Add" else 1)) for n in second.graph.nodes), once
