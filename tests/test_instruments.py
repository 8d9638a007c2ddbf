"""Pass instruments (graphopt/instruments.py): each check catches what it should on its own, around a deliberately
wrong pass on a tiny graph; the manager calls the hooks in their documented order."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest

import graphopt
from graph_compare import parse
from graphopt import Option, Pass, PassContext, PassManager, PassResult
from graphopt.errors import CheckFailed
from graphopt.instruments import (DriftCheck, FiniteWeightsCheck, Instrument, NumericCheck, StructuralCheck, Timing,
                                  default_instruments)

pytestmark = pytest.mark.fast

TINY = """
g (float[2,2] x) => (float[2,2] y)
<float[2,2] w = {1, 2, 3, 4}, float[2] b = {0.5, -0.5}>
{
    h = MatMul(x, w)
    y = Add(h, b)
}"""


def tiny() -> gs.Graph:
    return graphopt.load(parse(TINY))


def weight(graph) -> gs.Constant:
    return next(n for n in graph.nodes if n.op == "MatMul").inputs[1]


class _Dangle(Pass):
    """Makes Add read a tensor nothing produces."""
    name = "test-dangle"

    def run(self, graph, ctx):
        add = next(n for n in graph.nodes if n.op == "Add")
        add.inputs[0] = gs.Variable("nowhere", dtype=np.float32, shape=[2, 2])
        return PassResult(graph, True)


class _NanWeight(Pass):
    """Writes NaN into the MatMul weight."""
    name = "test-nan-weight"

    def run(self, graph, ctx):
        w = weight(graph)
        w.values = np.full_like(w.values, np.nan)
        return PassResult(graph, True)


class _DoubleWeight(Pass):
    """Claims to be exact, doubles the MatMul weight."""
    name = "test-double-weight"

    def run(self, graph, ctx):
        w = weight(graph)
        w.values = w.values * 2
        return PassResult(graph, True)


class _Rename(Pass):
    """A correct exact pass that changes the graph: renames the nodes."""
    name = "test-rename"

    def run(self, graph, ctx):
        for n in graph.nodes:
            n.name += "_renamed"
        return PassResult(graph, True)


class _Scale(Pass):
    """Lossy: scales the MatMul weight by 1 + error; its drift budget is a max abs error."""
    name = "test-scale"
    lossy = True
    options = {"error": Option(float, 0.1), "budget": Option(float, 1.0)}

    def run(self, graph, ctx):
        w = weight(graph)
        w.values = w.values * np.float32(1 + self.opts["error"])
        return PassResult(graph, True)

    def check_drift(self, drift):
        worst = max(d["max_abs"] for d in drift.values())
        return f"max abs error {worst:.3g} > {self.opts['budget']}" if worst > self.opts["budget"] else None


def around(instrument: Instrument, p: Pass, graph: gs.Graph, ctx=None):
    """Run p with one instrument's hooks around it, as the manager would: (its problem or None, the record)."""
    ctx = ctx or PassContext()
    instrument.enter_pipeline(graph, [p], ctx)
    instrument.before_pass(p, graph, ctx)
    result = p.run(graph, ctx)
    record = {}
    return instrument.after_pass(p, result, record, ctx), record


def test_structural_check_catches_a_dangling_tensor():
    problem, _ = around(StructuralCheck(), _Dangle(), tiny())
    assert "produced an invalid graph" in problem and "reads 'nowhere', which nothing produces" in problem
    assert around(StructuralCheck(), _Rename(), tiny())[0] is None


def test_finite_weights_check_catches_a_new_nan_weight_only():
    problem, _ = around(FiniteWeightsCheck(), _NanWeight(), tiny())
    assert problem == "produced NaN or Inf in weight 'w'"
    g = tiny()
    weight(g).values = np.full((2, 2), np.inf, np.float32)       # bad before the pipeline: not the pass's doing
    assert around(FiniteWeightsCheck(), _NanWeight(), g)[0] is None


def test_numeric_check_catches_an_exact_pass_that_changes_outputs():
    problem, record = around(NumericCheck(), _DoubleWeight(), tiny())
    assert problem.startswith("is exact but changed output 'y' (max abs error") and record["max_error"] > 1
    problem, record = around(NumericCheck(), _Rename(), tiny())
    assert problem is None and record["max_error"] == 0
    assert around(NumericCheck(), _Scale(error=5.0), tiny()) == (None, {})     # lossy: not its business


SQUASHED = """
g (float[64] x) => (float[64] y)
<float a = {50.0}, float c = {0.0}>
{
    h = Mul(x, a)
    l = Add(h, c)
    y = Sigmoid(l)
}"""


class _NudgeLogits(Pass):
    """Claims to be exact, moves the logits (up to 50 in magnitude) by `shift`, or swaps the Sigmoid for a Tanh."""
    name = "test-nudge-logits"
    options = {"shift": Option(float, 0.0), "swap": Option(bool, False)}

    def run(self, graph, ctx):
        add = next(n for n in graph.nodes if n.op == "Add")
        add.inputs[1].values = np.array(self.opts["shift"], np.float32)
        if self.opts["swap"]:
            next(n for n in graph.nodes if n.op == "Sigmoid").op = "Tanh"
        return PassResult(graph, True)


def _squashed() -> gs.Graph:
    return graphopt.load(parse(SQUASHED))


def test_numeric_check_judges_a_sigmoid_output_at_its_logits():
    """Logits up to 50 moved by 4e-5 (8e-7 of their largest: float reassociation's size) move a probability of 0.5
    by 1e-5, over the output tolerance: judged at the Sigmoid's input, where it is within it. A shift of 1e-3 (2e-5
    of the largest logit) fails there too, and so does a pass that changes the Sigmoid itself."""
    feeds = {"x": np.linspace(-1, 1, 64, dtype=np.float32)}
    problem, record = around(NumericCheck(feeds), _NudgeLogits(shift=4e-5), _squashed())
    assert problem is None and record["max_error"] > 5e-6 and record["max_error_before_squashing"] <= 5e-5
    problem, _ = around(NumericCheck(feeds), _NudgeLogits(shift=1e-3), _squashed())
    assert problem.startswith("is exact but changed output 'y'")
    problem, _ = around(NumericCheck(feeds), _NudgeLogits(shift=4e-5, swap=True), _squashed())
    assert problem.startswith("is exact but changed output 'y'")


def test_drift_check_records_drift_and_applies_the_pass_budget():
    problem, record = around(DriftCheck(), _Scale(error=0.1, budget=100.0), tiny())
    assert problem is None and 0 < record["drift"]["y"]["max_abs"] < 100 and record["drift"]["y"]["cosine"] > 0.99
    problem, _ = around(DriftCheck(), _Scale(error=0.1, budget=1e-3), tiny())
    assert problem.startswith("exceeded its budget: max abs error")
    assert around(DriftCheck(), _DoubleWeight(), tiny()) == (None, {})          # exact: the numeric check's


def test_timing_adds_seconds():
    problem, record = around(Timing(), _Rename(), tiny())
    assert problem is None and record["seconds"] >= 0


@pytest.mark.parametrize("instrument,wrong,needle", [
    (StructuralCheck(), _Dangle(), "nothing produces"),
    (FiniteWeightsCheck(), _NanWeight(), "NaN or Inf in weight 'w'"),
    (NumericCheck(), _DoubleWeight(), "is exact but changed output 'y'"),
    (DriftCheck(), _Scale(budget=1e-3), "exceeded its budget"),
])
def test_the_manager_fails_with_the_instruments_problem_naming_the_pass(instrument, wrong, needle):
    pm = PassManager([_Rename(), wrong], instruments=[instrument])
    with pytest.raises(CheckFailed) as e:
        pm.run(tiny(), PassContext(verify="none"))            # the instruments given, not the level's, run
    assert f"pass '{wrong.name}' (#2 in the pipeline; reproduce with --pipeline 'test-rename,{wrong.text()}')" \
        in str(e.value) and needle in str(e.value)


def test_no_instruments_no_checks():
    res = PassManager([_DoubleWeight()], instruments=[]).run(tiny())
    assert res.modified and set(res.records[0]) == {"pass", "position", "exact", "modified", "nodes_before",
                                                    "nodes_after", "info"}


@pytest.mark.parametrize("level,kinds", [
    ("full", [Timing, StructuralCheck, FiniteWeightsCheck, NumericCheck, DriftCheck]),
    ("structural", [Timing, StructuralCheck, FiniteWeightsCheck]),
    ("none", [Timing]),
])
def test_default_instruments_follow_the_verification_level(level, kinds):
    assert [type(i) for i in default_instruments(level)] == kinds


def test_default_records_keep_the_managers_keys_in_order():
    rec = PassManager([_Rename()]).run(tiny()).records[0]
    assert list(rec) == ["pass", "position", "exact", "modified", "seconds", "nodes_before", "nodes_after", "info",
                         "max_error"]
    with pytest.raises(CheckFailed, match="is exact but changed output"):
        PassManager([_DoubleWeight()]).run(tiny())                       # verify="full" by default
    PassManager([_DoubleWeight()]).run(tiny(), PassContext(verify="structural"))


class _Log(Instrument):
    """A user's instrument: logs every hook call; adds a key to each record."""

    def __init__(self, tag, log):
        self.tag, self.log = tag, log

    def enter_pipeline(self, graph, passes, ctx):
        self.log.append((self.tag, "enter", [p.name for p in passes]))

    def before_pass(self, p, graph, ctx):
        self.log.append((self.tag, "before", p.name))

    def after_pass(self, p, result, record, ctx):
        self.log.append((self.tag, "after", record["pass"], record["position"], result.modified))
        record[f"seen_by_{self.tag}"] = True

    def exit_pipeline(self, result, ctx):
        self.log.append((self.tag, "exit", len(result.records)))


def test_user_instruments_get_their_hooks_in_order():
    log = []
    pm = PassManager([_Rename(), _Scale()], instruments=[_Log("a", log), _Log("b", log)])
    res = pm.run(tiny())
    scale = pm.passes[1].text(resolved=True)
    assert log == [("a", "enter", ["test-rename", "test-scale"]), ("b", "enter", ["test-rename", "test-scale"]),
                   ("b", "before", "test-rename"), ("a", "before", "test-rename"),
                   ("a", "after", "test-rename", 1, True), ("b", "after", "test-rename", 1, True),
                   ("b", "before", "test-scale"), ("a", "before", "test-scale"),
                   ("a", "after", scale, 2, True), ("b", "after", scale, 2, True),
                   ("a", "exit", 2), ("b", "exit", 2)]
    assert all(r["seen_by_a"] and r["seen_by_b"] for r in res.records)
