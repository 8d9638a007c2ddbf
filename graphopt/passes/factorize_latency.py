"""factorize-lowrank's latency cost: each candidate layer, and its factorized chain at a few ranks, compiled for
the target and timed (graphopt.latency, cached); the other ranks interpolated in MACs between the measured ones."""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import latency
from graphopt.graph import Names, to_onnx, toposort

from .factorize_math import analyze, lower_hull, rank_grid, svd_factors, tucker_factors
from .factorize_rewrite import apply_svd, apply_tucker

#: MAC fractions of the layer near which factorized configurations are measured
MEASURE_AT = (0.15, 0.3, 0.5, 0.75)


def chain_model(lay, cfg, shapes: dict):
    """The layer alone (cfg None) or its factorization at cfg, as factorize-lowrank writes it, as an ONNX model."""
    node = lay.node
    xs, ys = shapes[node.inputs[0].name], shapes[node.outputs[0].name]
    x = gs.Variable("x", np.float32, [int(d) for d in xs])
    y = gs.Variable("y", np.float32, [int(d) for d in ys])
    ins = [x] + [gs.Constant(f"c{i}", np.asarray(t.values)) for i, t in enumerate(node.inputs[1:], 1)
                 if isinstance(t, gs.Constant)]
    copy = gs.Node(node.op, "layer", attrs=dict(node.attrs), inputs=ins, outputs=[y])
    g = gs.Graph(nodes=[copy], inputs=[x], outputs=[y], opset=17)
    if cfg is not None:
        one = dataclasses.replace(lay, node=copy)
        sh = {"x": tuple(xs), "y": tuple(ys)}
        if lay.kind == "svd":
            P, Q, _ = svd_factors(one, cfg[0])
            apply_svd(g, one, P, Q, sh, Names(g))
        else:
            U_in, core, U_out, *_ = tucker_factors(one, cfg[0], cfg[1], False, 0)
            apply_tucker(g, one, U_in, core, U_out, sh, Names(g))
        toposort(g.cleanup())
    return to_onnx(g)


def _label(cfg) -> str:
    return "layer" if cfg is None else "ranks " + ",".join(map(str, cfg))


class FactorizeLatency:
    def __init__(self, graph, layers, rt: int, ctx, shapes: dict, profiler=None):
        self.profiler = profiler or latency.Profiler(getattr(ctx, "target", None) or "cpu",
                                                     getattr(ctx, "target_options", None),
                                                     getattr(ctx, "progress", None))
        self.layers, self.measured, self.orig = layers, [], []
        progress = getattr(ctx, "progress", None)
        with (progress.task("latency table", len(layers)) if progress is not None
              else contextlib.nullcontext(lambda *a, **k: None)) as update:
            for i, lay in enumerate(layers):
                analyze(lay)
                pick = self._to_measure(lay, rt)
                k = latency.kernel_of(lay.node, shapes)
                sig = {"factorize": lay.kind, "layer": k.signature if k is not None else
                       {"op": lay.node.op, "w": list(lay.W.shape)}}
                ms = self.profiler.variants_table(sig, {_label(c): (lambda c=c: chain_model(lay, c, shapes))
                                                        for c in [None, *pick]}, _label(None))
                self.orig.append(ms[_label(None)])
                self.measured.append(sorted((lay.cost(c, False)[0], ms[_label(c)], c) for c in pick))
                update(i + 1, lay.node.name)
        self.model_ms = self.profiler.model_ms(to_onnx(graph))
        self.remainder = max(0.0, self.model_ms - sum(self.orig))
        self.full_ms = self.remainder + sum(self.orig)

    @staticmethod
    def _to_measure(lay, rt):
        """Up to len(MEASURE_AT) configurations on the layer's (MACs, error) lower hull, spread by MACs."""
        if lay.kind == "svd":
            cfgs = [(r,) for r in rank_grid(lay.full_ranks()[0], rt)]
        else:
            f1, f2 = lay.full_ranks()
            cfgs = [(a, b) for a in rank_grid(f1, rt) for b in rank_grid(f2, rt)]
        pts = [(lay.cost(c, False)[0], lay.err2(c), c) for c in cfgs if lay.cost(c, False)[0] < lay.macs]
        hull = [p for p in lower_hull(pts + [(lay.macs, 0.0, None)]) if p[2] is not None]
        out = []
        for f in MEASURE_AT:
            if hull:
                best = min(hull, key=lambda p: abs(p[0] - f * lay.macs))
                if best[2] not in out:
                    out.append(best[2])
        return out

    def ms(self, i: int, cfg) -> float:
        """Predicted ms of layer i at cfg (None: unfactorized), interpolated in MACs over the measured ranks."""
        if cfg is None:
            return self.orig[i]
        pts = self.measured[i]
        if not pts:
            return np.inf
        macs = self.layers[i].cost(cfg, False)[0]
        xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        if len(pts) == 1:
            return float(ys[0] * macs / max(xs[0], 1.0))
        if macs < xs[0]:
            slope = (ys[1] - ys[0]) / max(xs[1] - xs[0], 1.0)
            return float(max(ys[0] + slope * (macs - xs[0]), ys[0] * macs / max(xs[0], 1.0)))
        if macs > xs[-1]:
            slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1.0)
            return float(ys[-1] + max(slope, 0.0) * (macs - xs[-1]))
        return float(np.interp(macs, xs, ys))

    def report(self, target: float, chosen: list) -> dict:
        after = self.remainder + sum(self.ms(i, c) for i, c in enumerate(chosen))
        p = self.profiler
        return {"target": target, "predicted": round(after / max(self.full_ms, 1e-12), 4),
                "predicted_ms": round(after, 4), "original_ms": round(self.full_ms, 4),
                "model_ms": round(self.model_ms, 4), "remainder_ms": round(self.remainder, 4),
                "threads": p.threads, "clock": latency.clock_name(p.threads), "on": p.target_name,
                "table": str(p.cache.path),
                "layers": {lay.node.name: {"layer_ms": round(self.orig[i], 4),
                                           "measured": {_label(c): round(ms, 4) for _, ms, c in self.measured[i]},
                                           "chosen": _label(chosen[i]),
                                           "predicted_ms": round(self.ms(i, chosen[i]), 4)}
                           for i, lay in enumerate(self.layers)}}
