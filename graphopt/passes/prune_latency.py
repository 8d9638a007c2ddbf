"""prune-channels' latency cost: the measured latency model (graphopt.latency) tied to the channel groups.

Every weighted node whose output or input channels hold prunable units becomes a `latency.Term` (its kernel timed on
the target at a few channel counts); the whole graph is timed once, and what the terms do not account for (the
remainder: other ops, activations moved, weights read from memory rather than cache) scales with the activation
volume (the elements of every intermediate tensor, each with its kept channel fraction). The predicted latency of a
removal is the terms at the kept channel counts + the scaled remainder, as a fraction of the unpruned prediction.
`counts()` says which kept counts of a layer are worth having: those faster (per the model) than every larger count,
among the counts on the target's channel step and the measured counts (an unmeasured count off the step may be
far slower: a conv's output channels off the step lose the schedule's tiling).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import latency
from graphopt.graph import to_onnx


class LatencyCost:
    def __init__(self, graph, g, cand: np.ndarray, ctx, profiler=None):
        """Measure (or read from the cache) the kernels of the nodes whose channels may change and the whole graph.
        profiler: a latency.Profiler (default: for ctx.target, 'cpu' without one)."""
        self.profiler = profiler or latency.Profiler(ctx.target or "cpu", ctx.target_options, ctx.progress)
        self.step = self.profiler.step
        todo = []
        for ka in g.kernels():
            k = latency.kernel_of(g.nodes[ka.node], g.shapes)
            if k is None:
                continue
            oc = g.classes(ka.out_slots)
            ic = None if ka.depthwise or ka.in_slots is None else g.classes(ka.in_slots)
            vary_out, vary_in = bool(cand[oc].any()), ic is not None and bool(cand[ic].any())
            if vary_out or vary_in:
                todo.append((g.name(ka.node), k, oc if vary_out else None, ic if vary_in else None))
        self.terms = []
        progress = getattr(ctx, "progress", None)
        with (progress.task("latency table", len(todo)) if progress is not None
              else contextlib.nullcontext(lambda *a, **k: None)) as update:
            for i, (name, k, oc, ic) in enumerate(todo):
                full, co, ci = self.profiler.curves(k, oc is not None, ic is not None)
                self.terms.append((latency.Term(name, k, full, co, ci), oc, ic))
                update(i + 1, name)
        self.model_ms = self.profiler.model_ms(to_onnx(graph))
        self.remainder = latency.remainder(self.model_ms, [t for t, _, _ in self.terms])
        self.full_ms = self.remainder + sum(t.full for t, _, _ in self.terms)
        self.by_unit = defaultdict(set)           # unit -> the terms whose counts it changes
        for j, (_, oc, ic) in enumerate(self.terms):
            for c in (oc, ic):
                if c is not None:
                    for u in np.unique(c).tolist():
                        self.by_unit[u].add(j)
        self.fixed_volume, self.volumes = 0.0, []     # activation elements: fixed, and (elements, unit per slot)
        self.vol_by_unit = defaultdict(set)
        inputs = {t.name for t in graph.inputs}
        for t in graph.tensors().values():
            shape = g.shapes.get(t.name)
            if t.name in inputs or isinstance(t, gs.Constant) or shape is None or \
                    not all(isinstance(d, (int, np.integer)) for d in shape):
                continue
            c = g.chan.get(t.name)
            if c is None or len(c.slots) != shape[c.axis] or not cand[g.classes(c.slots)].any():
                self.fixed_volume += float(np.prod(shape))
                continue
            for u in np.unique(g.classes(c.slots)).tolist():
                self.vol_by_unit[u].add(len(self.volumes))
            self.volumes.append((float(np.prod(shape)), g.classes(c.slots)))
        self.full_volume = self.fixed_volume + sum(v for v, _ in self.volumes)

    # ---------------------------------------------------------------- prediction
    def term_ms(self, j: int, kept: np.ndarray) -> float:
        t, oc, ic = self.terms[j]
        return t.at(int(kept[oc].sum()) if oc is not None else None, int(kept[ic].sum()) if ic is not None else None)

    def rest_ms(self, kept: np.ndarray, vols=None) -> float:
        """The remainder at these kept units (vols: only those volume entries, without the fixed part)."""
        idx = range(len(self.volumes)) if vols is None else vols
        v = sum(self.volumes[i][0] * kept[self.volumes[i][1]].mean() for i in idx)
        return self.remainder * (v + (self.fixed_volume if vols is None else 0.0)) / max(self.full_volume, 1e-12)

    def predict(self, removed: np.ndarray) -> float:
        kept = ~removed
        return self.rest_ms(kept) + sum(self.term_ms(j, kept) for j in range(len(self.terms)))

    def fraction(self, removed: np.ndarray) -> float:
        return self.predict(removed) / max(self.full_ms, 1e-12)

    def layers(self, removed: np.ndarray) -> dict:
        """{node: [ms at full size, predicted ms]} of every modelled kernel."""
        kept = ~removed
        return {t.name: [round(t.full, 4), round(self.term_ms(j, kept), 4)] for j, (t, _, _) in enumerate(self.terms)}

    def _touched(self, units) -> tuple[set, set]:
        js = set().union(*(self.by_unit.get(u, set()) for u in units)) if len(units) else set()
        vs = set().union(*(self.vol_by_unit.get(u, set()) for u in units)) if len(units) else set()
        return js, vs

    def delta(self, removed: np.ndarray, units) -> float:
        """Predicted ms saved by also removing `units`."""
        js, vs = self._touched(units)
        if not js and not vs:
            return 0.0
        kept = ~removed
        after = kept.copy()
        after[list(units)] = False
        return (sum(self.term_ms(j, kept) - self.term_ms(j, after) for j in js)
                + self.rest_ms(kept, vs) - self.rest_ms(after, vs))

    # ---------------------------------------------------------------- snapping
    def counts(self, g, ids: list[int], allowed: list[int]) -> list[int]:
        """Of a layer's allowed kept counts (largest first; ids: its prunable units in removal order), those on
        the step or measured that the model says are faster than every larger one."""
        n = allowed[0]
        width = max(1, g.units[ids[0]].width) if ids else 1
        measured = set()
        for u in ids[:1]:
            for j in self.by_unit.get(u, ()):
                t = self.terms[j][0]
                for c in (t.out, t.inp):
                    if c is not None and c.n == n * width:
                        measured |= {k // width for k, _ in c.points}
        ok = [k for k in allowed if k == n or (k * width) % self.step == 0 or k in measured]
        removed = np.zeros(g.n_units, dtype=bool)
        out, best = [], np.inf
        js, vs = self._touched(ids)
        for k in ok:                        # largest first
            removed[:] = False
            removed[ids[:n - k]] = True
            kept = ~removed
            v = sum(self.term_ms(j, kept) for j in js) + self.rest_ms(kept, vs)
            if v < best - 1e-9 or k == n:
                out.append(k)
                best = min(best, v)
        return out
