"""prune-channels{latency=...}: the selection against a latency table (prune_latency.py). The table is computed from
a formula (FormulaProfiler) so the mechanics are tested without timings: where the budget goes, the snapping rule,
what holds an unreachable budget, the calibration loop."""
import pytest

import graphopt
import onnx_builders as ob
from graphopt import PassContext, PassManager, api, latency
from graphopt.analyses import flops
from graphopt.errors import BadInput
from graphopt.latency import Curve, kernel_of, sample_counts

pytestmark = pytest.mark.fast


class FormulaProfiler:
    """A latency table computed from ms(node name, out, in) instead of measured: the selection's mechanics only."""

    def __init__(self, ms, step=16, remainder=0.0):
        self.ms, self.step, self.extra = ms, step, remainder
        self.threads, self.target_name = 1, "cpu"
        self.cache = type("C", (), {"path": "formula"})()
        self.names = {}

    def curves(self, kernel, out, inp):
        name = self.names[kernel]
        n_out, n_in = kernel.n_out, kernel.n_in
        co = Curve([(k, self.ms(name, k, n_in)) for k in sample_counts(n_out, self.step)], n_out, self.step) \
            if out else None
        ci = Curve([(k, self.ms(name, n_out, k)) for k in sample_counts(n_in, self.step)], n_in, self.step) \
            if inp else None
        return self.ms(name, n_out, n_in), co, ci

    def model_ms(self, model):
        return self.total + self.extra


def _inject(monkeypatch, graph, ms, **kw):
    """Make prune-channels' latency model read ms(name, out, in) (remainder 0 unless given)."""
    prof = FormulaProfiler(ms, **kw)
    from graphopt.analyses import shapes
    sh = shapes(graph, None)
    for n in graph.nodes:
        k = kernel_of(n, sh)
        if k is not None:
            prof.names[k] = n.name
    prof.total = sum(ms(prof.names[k], k.n_out, k.n_in) for k in prof.names)
    monkeypatch.setattr(latency, "Profiler", lambda *a, **k: prof)
    return prof


def _kept(rec, node):
    return rec["info"]["layers"][node][1]


def test_the_budget_goes_where_milliseconds_are_cheapest_in_importance(monkeypatch):
    """Both branches rank alike; branch p/q costs 10x as much per channel, so a latency budget prunes it alone,
    where a MAC budget of the same size would prune both."""
    g = graphopt.load(ob.two_branches())
    _inject(monkeypatch, g, lambda name, o, i: (10.0 if name in "pq" else 1.0) * (o if name in "pr" else i) / 64)
    res = PassManager.parse("prune-channels{latency=0.6,calibrate=0}").run(g, PassContext())
    rec = res.records[0]
    assert _kept(rec, "p") < 64 == _kept(rec, "r")
    assert rec["info"]["latency"]["predicted"] <= 0.6 and rec["info"]["budget"]["latency"] == {
        "target": 0.6, "reached": rec["info"]["latency"]["predicted"], "met": True, "by": "predicted"}
    by_macs = PassManager.parse("prune-channels{flops=0.6}").run(graphopt.load(ob.two_branches())).records[0]
    assert _kept(by_macs, "p") == _kept(by_macs, "r") < 64


def test_channel_counts_snap_to_what_the_table_says_is_fast(monkeypatch):
    def padded(name, o, i):           # cost of the varying axis padded up to 16, steep for branch p/q
        c = o if name in "pr" else i
        return (10.0 if name in "pq" else 1.0) * -(-c // 16) * 16 / 64
    g = graphopt.load(ob.two_branches())
    _inject(monkeypatch, g, padded)
    rec = PassManager.parse("prune-channels{latency=0.6,calibrate=0}").run(g, PassContext()).records[0]
    assert (_kept(rec, "p"), _kept(rec, "r")) == (32, 64)       # 33 costs what 48 does: never chosen
    g = graphopt.load(ob.two_branches())
    _inject(monkeypatch, g, lambda name, o, i: (10.0 if name in "pq" else 1.0) * (o if name in "pr" else i) / 64)
    rec = PassManager.parse("prune-channels{latency=0.6,calibrate=0}").run(g, PassContext()).records[0]
    assert _kept(rec, "p") == 33       # measured, and faster than 48: a count off the step is chosen when it pays
    g = graphopt.load(ob.two_branches(32))
    _inject(monkeypatch, g, lambda name, o, i: (10.0 if name in "pq" else 1.0) * (o if name in "pr" else i) / 32)
    rec = PassManager.parse("prune-channels{latency=0.6,calibrate=0}").run(g, PassContext()).records[0]
    assert _kept(rec, "p") in set(sample_counts(32, 16)) | {16, 32}     # unmeasured off-step counts: never


def test_an_unreachable_latency_budget_says_what_held_it(monkeypatch):
    g = graphopt.load(ob.two_branches())
    _inject(monkeypatch, g, lambda name, o, i: 1.0, remainder=0.0)      # nothing gets faster
    rec = PassManager.parse("prune-channels{latency=0.5,calibrate=0}").run(g, PassContext()).records[0]
    assert not rec["info"]["budget_met"] and "latency: predicted 1.000" in rec["info"]["limits"]
    assert any("not faster" in h["why"] for h in rec["info"]["held"])


def test_calibration_corrects_the_model_until_the_measured_fraction_fits(monkeypatch):
    g = graphopt.load(ob.two_branches())
    _inject(monkeypatch, g, lambda name, o, i: (o if name in "pr" else i) / 64)
    base_macs = flops(graphopt.load(ob.two_branches()), None)["macs"]

    class MacsBaseline:               # "measured": the MAC fraction squared, far from the linear model
        def __init__(self, profiler, model):
            pass

        def fraction(self, model):
            f = (flops(graphopt.graph.from_onnx(model), None)["macs"] / base_macs) ** 2
            return f, f, 1.0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass
    monkeypatch.setattr(latency, "Baseline", MacsBaseline)
    rec = PassManager.parse("prune-channels{latency=0.5,calibrate=4}").run(g, PassContext()).records[0]
    lat = rec["info"]["latency"]
    assert len(lat["calibration"]) >= 2 and lat["calibration"][0]["model_target"] == 0.5
    assert abs(lat["measured"] - 0.5) <= abs(lat["calibration"][0]["measured"] - 0.5)
    assert rec["info"]["budget"]["latency"]["by"] == "measured"


@pytest.mark.parametrize("text,needle", [
    ("prune-channels{latency=0}", "latency=0 must be in (0, 1]"),
    ("prune-channels{latency=1.5}", "must be in (0, 1]"),
    ("prune-channels{criterion=dead,latency=0.5}", "drop latency="),
    ("prune-channels{latency=0.5,calibrate=11}", "at most 10"),
])
def test_bad_latency_options(text, needle):
    with pytest.raises(BadInput) as e:
        PassManager.parse(text)
    assert needle in str(e.value)


def test_a_target_that_cannot_be_timed_here_is_refused():
    g = graphopt.load(ob.two_branches())
    hw = api.get_target("arm-sve").hw()
    with pytest.raises(BadInput, match="cannot be measured on this machine"):
        PassManager.parse("prune-channels{latency=0.5}").run(g, PassContext(target="arm-sve", hw=hw))
