import numpy as np
import onnx_graphsurgeon as gs
import pytest

import graphopt
from graphopt import Pass, PassContext, PassManager, PassResult
from graphopt.errors import CheckFailed
from graphopt.passmanager import REGISTRY, register

pytestmark = pytest.mark.fast


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

    def run(self, graph, ctx):
        for n in graph.nodes:
            if n.op == "Conv":
                w = n.inputs[1]
                n.inputs[1] = gs.Constant(w.name + "_x2", w.values * 2)
        return PassResult(graph, True)


class _Dangle(Pass):
    name = "test-dangle"

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
    assert res.records[0]["info"]["folded"] == 8 and res.records[0]["max_error"] < 1e-5


def test_exactness_is_a_function_of_the_resolved_options():
    full = graphopt.passmanager.make_pass("factorize-lowrank")
    assert full.exact and not graphopt.passmanager.make_pass("factorize-lowrank", energy=0.9).exact
    assert PassManager.parse(full.text(resolved=True)).passes[0].exact     # the resolved text says the same
    assert type(full).lossy                       # `graphopt passes` lists it as not exact in general
    with pytest.raises(TypeError, match="exact_for"):
        class _Declared(Pass):                    # the old attribute would shadow the options' answer
            name = "test-declared-exact"
            exact = False


class _ReusesManagerKeys(Pass):
    """Reports info under the names of the manager's own record keys."""
    name = "test-reuses-manager-keys"

    def run(self, graph, ctx):
        return PassResult(graph, False, {"pass": "something else", "seconds": -1.0, "exact": False})


def test_pass_info_is_nested_under_the_pass_never_merged_over_the_managers_keys(zoo_onnx, scratch_pass):
    scratch_pass(_ReusesManagerKeys)
    rec = PassManager.parse("test-reuses-manager-keys").run(graphopt.load(zoo_onnx("cnn_digits"))).records[0]
    assert rec["pass"] == "test-reuses-manager-keys" and rec["exact"] is True and rec["seconds"] >= 0
    assert rec["info"] == {"pass": "something else", "seconds": -1.0, "exact": False}


class _Reports(Pass):
    """Fills a report section of its own."""
    name = "test-reports"
    report_name = "test-section"

    def run(self, graph, ctx):
        return PassResult(graph, False, {"seen": len(graph.nodes)})

    def report_section(self, record):
        return {"seen": record["info"]["seen"]}

    @classmethod
    def report_text(cls, entry):
        return f"test-reports saw {entry['seen']} nodes"


def test_passes_fill_their_own_report_sections_and_terminal_lines(zoo_onnx, scratch_pass):
    from graphopt import api, cli
    scratch_pass(_Reports)
    g = graphopt.load(zoo_onnx("cnn_digits"))
    pm = PassManager.parse("remove-identity,test-reports")
    report = api.report_sections(pm.passes, pm.run(g).records)
    assert report == {"test-section": [{"pass": "test-reports", "seen": len(g.nodes)}]}
    assert cli._report_texts({"ops": 3, **report}) == [f"test-reports saw {len(g.nodes)} nodes"]


class _SneakyFunctional(Pass):
    """Declared functional, but edits the graph it is given (renames a node) before returning a copy."""
    name = "test-sneaky-functional"
    in_place = False

    def run(self, graph, ctx):
        graph.nodes[0].name += "_renamed"
        return PassResult(graph.copy(), False)


def test_a_functional_pass_that_edits_its_input_fails_the_strict_check(zoo_onnx, scratch_pass):
    scratch_pass(_SneakyFunctional)
    with pytest.raises(CheckFailed, match="test-sneaky-functional.*declared functional.*changed the graph"):
        PassManager.parse("test-sneaky-functional").run(graphopt.load(zoo_onnx("cnn_digits")),
                                                         PassContext(verify="structural", strict=True))
    PassManager.parse("test-sneaky-functional").run(graphopt.load(zoo_onnx("cnn_digits")),
                                                     PassContext(verify="structural", strict=False))


@pytest.mark.parametrize("text", ["infer-shapes", "fold-constants,remove-identity,infer-shapes"])
def test_functional_passes_leave_their_input_alone(zoo_onnx, text):
    """The declaration the manager relies on (it compares a functional pass's output with its input, uncopied)."""
    from graphopt.graph import fingerprint
    g = graphopt.load(zoo_onnx("resnet"))
    g.nodes[0].outputs[0].shape = None               # something for infer-shapes to do
    pm = PassManager.parse(text)
    assert any(not p.in_place for p in pm.passes)
    mark = fingerprint(g)
    res = pm.run(g, PassContext(strict=True))
    if all(not p.in_place for p in pm.passes):
        assert fingerprint(g) == mark and res.graph is not g


def test_analyses_follow_edits_made_outside_passes(zoo_onnx):
    """No caller invalidates: an edited graph (same object) or another graph object gets a fresh analysis."""
    g = graphopt.load(zoo_onnx("resnet"))
    ctx = PassContext()
    a = ctx.analyses.get("flops", g)
    assert ctx.analyses.get("flops", g) is a
    w = next(n for n in g.nodes if n.op == "Conv").inputs[1]
    w.values = w.values[:1]                                   # a weight edited in place: one output channel
    b = ctx.analyses.get("flops", g)
    assert b is not a and b["params"] < a["params"]
    assert ctx.analyses.get("flops", graphopt.graph.copy(g)) is not b


class _RenamesAndPreservesFlops(Pass):
    """Changes the graph (a node's name) in a way that leaves the MAC count true."""
    name = "test-preserves-flops"
    preserves = ("flops",)

    def run(self, graph, ctx):
        graph.nodes[0].name += "_renamed"
        return PassResult(graph, True)


def test_preserved_analyses_stay_cached_after_a_pass(zoo_onnx, scratch_pass):
    scratch_pass(_RenamesAndPreservesFlops)
    g = graphopt.load(zoo_onnx("resnet"))
    ctx = PassContext(verify="structural")
    a, s = ctx.analyses.get("flops", g), ctx.analyses.get("shapes", g)
    res = PassManager.parse("test-preserves-flops").run(g, ctx)
    assert ctx.analyses.cached() == ["flops"] and ctx.analyses.get("flops", res.graph) is a
    assert ctx.analyses.get("shapes", res.graph) is not s
