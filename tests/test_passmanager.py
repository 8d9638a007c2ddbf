import numpy as np
import onnx_graphsurgeon as gs
import pytest

import graphopt
from graphopt import Pass, PassContext, PassManager, PassResult
from graphopt.errors import CheckFailed
from graphopt.passmanager import REGISTRY, register


@pytest.fixture
def scratch_pass():
    """Register a pass for one test only."""
    added = []

    def add(cls):
        register(cls)
        added.append(cls.name)
        return cls
    yield add
    for name in added:
        REGISTRY.pop(name, None)


class _ScaleWeights(Pass):
    """Deliberately wrong 'exact' pass: doubles every Conv weight."""
    name = "test-break-weights"
    exact = True

    def run(self, graph, ctx):
        for n in graph.nodes:
            if n.op == "Conv":
                w = n.inputs[1]
                n.inputs[1] = gs.Constant(w.name + "_x2", w.values * 2)
        return PassResult(graph, True)


class _Dangle(Pass):
    name = "test-dangle"
    exact = True

    def run(self, graph, ctx):
        n = graph.nodes[1]
        n.inputs[0] = gs.Variable("nowhere", dtype=np.float32, shape=n.inputs[0].shape)
        return PassResult(graph, True)


def test_exact_pass_breaking_outputs_is_named_with_position_and_prefix(zoo_onnx, scratch_pass):
    scratch_pass(_ScaleWeights)
    g = graphopt.load(zoo_onnx("cnn_digits"))
    pm = PassManager.parse("remove-identity,test-break-weights,cleanup")
    with pytest.raises(CheckFailed) as e:
        pm.run(g)
    msg = str(e.value)
    assert "pass 'test-break-weights' (#2 in the pipeline" in msg
    assert "--pipeline 'remove-identity,test-break-weights'" in msg
    assert "max abs error" in msg


def test_structural_check_catches_dangling_tensor(zoo_onnx, scratch_pass):
    scratch_pass(_Dangle)
    g = graphopt.load(zoo_onnx("cnn_digits"))
    with pytest.raises(CheckFailed, match="test-dangle.*nothing produces"):
        PassManager.parse("test-dangle").run(g, PassContext(verify="structural"))


def test_analysis_cache_reused_until_invalidated(zoo_onnx):
    g = graphopt.load(zoo_onnx("resnet"))
    ctx = PassContext()
    a = ctx.analyses.get("flops", g)
    assert ctx.analyses.get("flops", g) is a
    assert a["macs"] > 0 and a["params"] > 0
    res = PassManager.parse("cleanup").run(g, ctx)
    assert res.modified
    assert "flops" not in ctx.analyses.cached()
    b = ctx.analyses.get("flops", res.graph)
    assert b["macs"] == a["macs"]          # BN folding changes no MACs in our count
    assert b["params"] < a["params"]       # but removes BN parameters


def test_records_describe_each_pass(zoo_onnx):
    g = graphopt.load(zoo_onnx("resnet"))
    res = PassManager.parse("fold-batchnorm,eliminate-dead-code").run(g)
    assert [r["pass"] for r in res.records] == ["fold-batchnorm", "eliminate-dead-code"]
    assert res.records[0]["folded"] == 8 and res.records[0]["max_error"] < 1e-5
