"""Pass instruments: what the PassManager does around every pass besides running it (timing, the structural,
finite-weight, numeric and drift checks), each pluggable and testable on its own (as TVM's
`PassContext(instruments=...)`). verify.py holds the checks themselves; these decide when they run."""
from __future__ import annotations

import time

import onnx_graphsurgeon as gs

from . import ort, verify
from .data_checks import nonfinite_weights
from .graph import copy as copy_graph, to_onnx


class Instrument:
    """Hooks the PassManager calls: enter_pipeline before the first pass, before_pass / after_pass around each
    pass, exit_pipeline after the last (when no pass or check failed). before_pass hooks run in reverse list
    order and after_pass hooks in list order, so the first instrument wraps the pass most tightly (Timing, first
    by default, times the pass alone) and the checks after a pass run in the order listed. Override what you
    need; every hook does nothing by default."""

    def enter_pipeline(self, graph: gs.Graph, passes: list, ctx) -> None:
        """The pipeline `passes` is about to run on `graph` (reset per-run state here)."""

    def before_pass(self, p, graph: gs.Graph, ctx) -> None:
        """Pass p is about to run on graph."""

    def after_pass(self, p, result, record: dict, ctx) -> str | None:
        """Pass p returned result (a PassResult; result.graph is the graph after it) and the manager made its
        record, to which an instrument may add keys. Return a problem in words that complete "pass 'p' (#i in the
        pipeline; reproduce with ...) ..." to fail the pipeline with CheckFailed, or None."""
        return None

    def exit_pipeline(self, result, ctx) -> None:
        """The pipeline finished with result (a PipelineResult)."""


class Timing(Instrument):
    """Adds "seconds" (the pass's run time) to each record."""

    def before_pass(self, p, graph, ctx):
        self.t0 = time.perf_counter()

    def after_pass(self, p, result, record, ctx):
        record["seconds"] = round(time.perf_counter() - self.t0, 4)


class StructuralCheck(Instrument):
    """After every pass: no dangling tensor, topological order, onnx.checker with full shape inference."""

    def after_pass(self, p, result, record, ctx):
        problems = verify.structural_problems(result.graph)
        return f"produced an invalid graph: {problems[0]}" if problems else None


class FiniteWeightsCheck(Instrument):
    """After a pass that changed the graph: no weight holds NaN or Inf that did not already at the pipeline's
    start."""

    def enter_pipeline(self, graph, passes, ctx):
        self.bad_before = set(nonfinite_weights(graph))

    def after_pass(self, p, result, record, ctx):
        if not result.modified:
            return None
        bad = [w for w in nonfinite_weights(result.graph) if w not in self.bad_before]
        return f"produced NaN or Inf in weight '{bad[0]}'" if bad else None


class _OutputCheck(Instrument):
    """Runs the graph before and after each pass it applies to (and that changed the graph) in onnxruntime, on
    seeded inputs of the pipeline's input graph (or feeds), and judges the two outputs."""

    def __init__(self, feeds: dict | None = None):
        self.given_feeds = feeds

    def applies(self, p) -> bool:
        raise NotImplementedError

    def judge(self, p, ref: dict, got: dict, record: dict, graphs: tuple) -> str | None:
        """The problem with the pass's outputs (got) against its input graph's (ref), or None; graphs: (before,
        after)."""
        raise NotImplementedError

    def enter_pipeline(self, graph, passes, ctx):
        self.feeds = self.given_feeds
        if self.feeds is None and any(self.applies(p) for p in passes):
            self.feeds = verify.seeded_inputs(graph, ctx.seed)
        self.before = None

    def before_pass(self, p, graph, ctx):
        # a functional pass leaves its input alone: that input is the reference, no copy needed
        self.before = (copy_graph(graph) if p.in_place else graph) if self.applies(p) else None

    def after_pass(self, p, result, record, ctx):
        before, self.before = self.before, None
        if before is None or not result.modified:
            return None
        after = result.graph
        ref = ort.run(to_onnx(before), self.feeds)
        got = ort.run(to_onnx(after), {k: v for k, v in self.feeds.items() if k in {t.name for t in after.inputs}})
        return self.judge(p, ref, verify.outputs_by_position(before, ref, after, got), record, (before, after))


class NumericCheck(_OutputCheck):
    """Exact passes keep every output: compared with their input graph at verify.EXACT_RTOL / EXACT_ATOL (atol
    scaled by each output's magnitude); adds "max_error" to the record. An output a Sigmoid / Softmax / Tanh
    produces in both graphs that misses is judged at that op's input (verify.compare_before_squashing; the record
    gets "max_error_before_squashing")."""

    def applies(self, p):
        return p.exact

    def judge(self, p, ref, got, record, graphs):
        ok, err, name = verify.compare(ref, got, verify.EXACT_RTOL, verify.EXACT_ATOL, scale_atol=True)
        record["max_error"] = err
        if not ok:
            missed = [k for k in ref if not verify.compare({k: ref[k]}, {k: got[k]}, verify.EXACT_RTOL,
                                                           verify.EXACT_ATOL, scale_atol=True)[0]]
            logits = verify.compare_before_squashing(*graphs, self.feeds, missed, verify.EXACT_RTOL,
                                                     verify.EXACT_ATOL)
            if logits is not None and logits[0]:
                record["max_error_before_squashing"] = logits[1]
                return None
        return None if ok else f"is exact but changed output '{name}' (max abs error {err:.3g})"


class DriftCheck(_OutputCheck):
    """Lossy passes: drift figures (verify.drift) added to the record as "drift" and judged by the pass's own
    check_drift."""

    def applies(self, p):
        return not p.exact

    def judge(self, p, ref, got, record, graphs):
        record["drift"] = verify.drift(ref, got)
        problem = p.check_drift(record["drift"])
        return f"exceeded its budget: {problem}" if problem else None


def default_instruments(level: str, feeds: dict | None = None) -> list[Instrument]:
    """The instruments of a verification level (PassContext.verify): "full" every check, "structural" the
    structural and finite-weight checks, anything else none; timing always. feeds: the output checks' inputs."""
    checks = {"full": [StructuralCheck(), FiniteWeightsCheck(), NumericCheck(feeds), DriftCheck(feeds)],
              "structural": [StructuralCheck(), FiniteWeightsCheck()]}.get(level, [])
    return [Timing(), *checks]
