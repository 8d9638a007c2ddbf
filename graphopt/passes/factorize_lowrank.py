"""factorize-lowrank: low-rank factorization of constant-weight Gemm / MatMul / Conv layers.

Factorizations (all computed in float64, stored in the weight's dtype):

* Gemm / MatMul with a constant 2-D weight W (K x N, y = x @ W; Gemm's alpha and transB are folded in) -> two
  nodes of the same kind through truncated SVD, W ~ P Q with P = U_r sqrt(S_r) (K x r) and Q = sqrt(S_r) V_r^T
  (r x N): the singular values are split evenly (sqrt to both sides), which keeps both factors equally scaled
  (better float32 conditioning, friendlier to later quantization). Gemm -> Gemm(x, P) + Gemm(t, Q, C): the second
  keeps the bias C and beta, the first keeps transA; both keep the original transB layout. MatMul -> MatMul,MatMul
  (a following bias Add is untouched).
* Pointwise Conv (every kernel dim 1, group 1) -> two 1x1 Convs through the same SVD of W (N x C): the first
  (C -> r) keeps the original strides/pads, the second (r -> N) gets the bias.
* Conv k x k (group 1, any number of spatial dims) -> Tucker-2 on the two channel modes:
  1x1 (C -> R1), k x k (R1 -> R2, same strides/pads/dilations/auto_pad), 1x1 (R2 -> N, with the bias).
  HOSVD initialization (leading left singular vectors of the mode-0 and mode-1 unfoldings), then `hooi_iters`
  HOOI sweeps. A channel mode kept at its full size needs no projection: R1 = C drops the first 1x1 Conv and R2 = N
  the last (unless always=true, which always builds all three).
* Grouped and depthwise Convs are left alone and reported in `skipped` with the reason.

Rank selection (one of; none given = energy=1.0: full rank, an exact and, without always=true, no-op pass):

* energy=e: per matrix (per unfolding for Tucker-2) the smallest rank keeping that fraction of the spectrum's
  energy (sum of squared singular values);
* rank=n (an integer) or rank=f (a fraction in (0, 1) of the full rank);
* evbmf=true: analytic empirical variational Bayes matrix factorization (Nakajima, Sugiyama, Babacan, Tomioka,
  JMLR 2013) on every matrix / unfolding: the noise variance is estimated by minimizing the EVB free energy over
  its analytic bounds, and the rank is the number of singular values above the EVB threshold
  sigma * sqrt(M (1 + tau)(1 + alpha / tau)), tau = 2.5129 sqrt(alpha), alpha = L / M;
* flops=b / params=b: a global budget (the factorized model's MACs / parameters at most b times the original's, the
  whole model counted). Every layer's candidate ranks (multiples of round_to) are scored by relative squared
  reconstruction error (exact from the spectra for SVD and from the HOSVD core for Tucker-2) and MACs/params; the
  lower convex hull of each layer's (cost, error) points is walked greedily, always taking the step with the
  smallest error increase per MAC (param) saved, until the budget holds; leftover slack is then spent on the
  largest error reductions that still fit. An unreachable budget is a CheckFailed naming the best ratio possible.
* latency=b: the same walk over measured cost (factorize_latency.py): each layer and its factorized chain at up to
  four ranks along its MAC hull are compiled for the target and timed (cached, graphopt.latency), the other ranks
  interpolated in MACs; a rank whose chain is not faster than the layer itself is never a candidate. The whole
  model is timed once; what the layers do not account for stays fixed. The predicted latency is reported beside the
  budget (info["latency"]); `graphopt compile` measures the compiled result.

Ranks are rounded up to a multiple of `round_to` (0: the target's channel step, ctx.hw.structure.channels, 16
without a target) and clipped to full rank. A layer is factorized only when its MACs drop, unless always=true.
The pass is exact (checked numerically by the PassManager) only for the full-rank selection; otherwise it is lossy:
it reports per-layer ranks, relative reconstruction error ||W - W_hat|| / ||W|| and MACs/params before and after,
the PassManager adds output drift, and `min_cosine` turns the drift into a budget.

Created nodes are named '<original node>/lowrank_{in,core,out}' and are never factorized again, so a second run
over the output changes nothing (the pass is idempotent).

Modules: factorize_math.py (spectra, EVBMF, rank grids and hulls, factors, costs), factorize_rewrite.py (the chain
of nodes), factorize_latency.py (the latency cost); this module finds the candidate layers, selects ranks, reports.
"""
from __future__ import annotations

import heapq
import math
import re

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analyses import node_macs
from graphopt.errors import BadInput, CheckFailed
from graphopt.graph import Names, toposort
from graphopt.hardware import GENERIC
from graphopt.passmanager import Option, Pass, PassResult, register
from graphopt.text_table import table

from .factorize_math import (Layer, analyze, energy_rank, evbmf_spectrum, lower_hull, rank_grid, round_up,
                             svd_factors, tucker_factors)
from .factorize_rewrite import MARK, apply_svd, apply_tucker

OPS = ("gemm", "matmul", "conv")
_MARK_RE = re.compile(re.escape(MARK) + r"(in|core|out)$")


# ----------------------------------------------------------------------------------------------------------------
# candidate layers
# ----------------------------------------------------------------------------------------------------------------

def _int_shape(shape):
    """A shape with symbolic dims taken as 1 (MACs scale with them equally before and after), or None."""
    if shape is None:
        return None
    return tuple(d if isinstance(d, (int, np.integer)) and d >= 0 else 1 for d in shape)


def _const(t) -> np.ndarray | None:
    return t.values if isinstance(t, gs.Constant) else None


def _is_float(a: np.ndarray) -> bool:
    return a is not None and a.dtype.kind == "f"


def _layer(node: gs.Node, shapes: dict, opsel: set) -> tuple[Layer | None, str | None]:
    """(candidate, None), (None, reason to report) or (None, None) for nodes that are not candidates at all."""
    op = node.op
    if op == "Gemm" and "gemm" in opsel:
        if len(node.inputs) < 2 or len(node.outputs) != 1:
            return None, None
        B = _const(node.inputs[1])
        if B is None or isinstance(node.inputs[0], gs.Constant) or not _is_float(B) or B.ndim != 2:
            return None, None
        out = _int_shape(shapes.get(node.outputs[0].name))
        if out is None or len(out) != 2:
            return None, "output shape unknown (bind the input shapes)"
        W = B.astype(np.float64)
        W = (W.T if node.attrs.get("transB", 0) else W) * float(node.attrs.get("alpha", 1.0))
        lay = Layer(node, "svd", W, 0, int(B.size), rows=int(out[0]))
    elif op == "MatMul" and "matmul" in opsel:
        if len(node.inputs) != 2 or len(node.outputs) != 1:
            return None, None
        B = _const(node.inputs[1])
        if B is None or isinstance(node.inputs[0], gs.Constant) or not _is_float(B) or B.ndim != 2:
            return None, None
        out = _int_shape(shapes.get(node.outputs[0].name))
        if out is None or len(out) == 0:
            return None, "output shape unknown (bind the input shapes)"
        lay = Layer(node, "svd", B.astype(np.float64), 0, int(B.size), rows=int(np.prod(out[:-1])) if len(out) > 1 else 1)
    elif op == "Conv" and "conv" in opsel:
        if len(node.inputs) < 2 or len(node.outputs) != 1:
            return None, None
        Wc = _const(node.inputs[1])
        if Wc is None or not _is_float(Wc) or Wc.ndim < 3:
            return None, None
        group = int(node.attrs.get("group", 1))
        if group != 1:
            x = _int_shape(shapes.get(node.inputs[0].name))
            depthwise = Wc.shape[1] == 1 and (x is None or len(x) < 2 or x[1] == group)
            return None, (f"depthwise conv (group={group})" if depthwise else f"grouped conv (group={group})") + \
                ": left alone"
        x, out = _int_shape(shapes.get(node.inputs[0].name)), _int_shape(shapes.get(node.outputs[0].name))
        if x is None or out is None or len(x) < 2 or len(out) < 2:
            return None, "input/output shape unknown (bind the input shapes)"
        N, C = Wc.shape[:2]
        in_pos, out_pos = int(np.prod(x)) // max(C, 1), int(np.prod(out)) // max(N, 1)
        if all(k == 1 for k in Wc.shape[2:]):
            lay = Layer(node, "svd", Wc.reshape(N, C).T.astype(np.float64), 0, int(Wc.size), rows=out_pos)
        else:
            lay = Layer(node, "tucker2", Wc.astype(np.float64), 0, int(Wc.size), in_pos=in_pos, out_pos=out_pos)
    else:
        return None, None
    lay.macs = node_macs(node, {k: _int_shape(v) for k, v in ((t.name, shapes.get(t.name))
                                                              for t in list(node.inputs) + list(node.outputs))})
    return lay, None


def _rank_selectors(o: dict) -> list[str]:
    """The options that select ranks (none: the full-rank factorization)."""
    return [k for k, on in (("energy", o["energy"] < 1.0), ("rank", str(o["rank"]).strip().lower() != "full"),
                            ("evbmf", o["evbmf"]), ("flops", o["flops"] < 1.0), ("params", o["params"] < 1.0),
                            ("latency", o["latency"] < 1.0)) if on]


# ----------------------------------------------------------------------------------------------------------------
# the pass
# ----------------------------------------------------------------------------------------------------------------

@register
class FactorizeLowRank(Pass):
    name = "factorize-lowrank"
    help = ("Low-rank factorization: Gemm/MatMul/1x1 Conv by SVD, Conv kxk by Tucker-2; ranks by energy, rank, "
            "evbmf or a global flops/params budget")
    lossy = True
    report_name = "factorization"
    options = {
        "energy": Option(float, 1.0, "keep this fraction of each spectrum's energy (sum of squares); 1.0 = full rank"),
        "rank": Option(str, "full", "fixed rank: an integer, or a fraction (0, 1) of the full rank; 'full' = off"),
        "evbmf": Option(bool, False, "pick each rank by analytic empirical variational Bayes MF (Nakajima 2013)"),
        "flops": Option(float, 1.0, "global budget: factorized model's MACs at most this fraction of the original's"),
        "params": Option(float, 1.0, "global budget: factorized model's parameters at most this fraction"),
        "latency": Option(float, 1.0, "global budget: factorized model's latency on the target at most this fraction "
                                      "(each layer's factorization compiled and timed at a few ranks, cached)"),
        "round_to": Option(int, 0, "round ranks up to a multiple of this; 0 = the target's channel step (16 without)",
                           minimum=0),
        "always": Option(bool, False, "factorize even when a layer's MACs do not drop (full-rank oracle); "
                                      "no effect with flops/params"),
        "min_macs": Option(int, 0, "leave layers with fewer MACs than this alone", minimum=0),
        "ignore": Option(list, [], "node names to leave alone"),
        "ops": Option(list, list(OPS), "op kinds to factorize: gemm, matmul, conv"),
        "hooi_iters": Option(int, 0, "HOOI sweeps refining the Tucker-2 factors after HOSVD", minimum=0, maximum=100),
        "min_cosine": Option(float, 0.0, "fail when an output's cosine similarity to the original drops below this "
                                         "(0 = off)", minimum=-1.0, maximum=1.0),
    }

    @classmethod
    def target_defaults(cls, hw):
        return {"round_to": hw.structure.channels}

    @classmethod
    def exact_for(cls, opts):
        return not _rank_selectors(opts)    # only the full-rank factorization reconstructs every weight

    # report ---------------------------------------------------------------------------------------------------
    REPORTED = ("selection", "factorized", "layers", "macs_ratio", "params_ratio", "skipped", "drift", "latency")

    def report_section(self, record):
        """Runs that factorized something: layers, ranks, ratios, and the output drift the manager measured."""
        if not record["modified"]:
            return None
        found = {**record["info"], **({"drift": record["drift"]} if "drift" in record else {})}
        return {k: found[k] for k in self.REPORTED if k in found}

    @classmethod
    def report_text(cls, f, max_rows: int = 12):
        """Layers, ranks, reconstruction errors, drift."""
        rows = [(x["node"], x["method"], "x".join(map(str, x["ranks"])),
                 f"{x['macs_after'] / max(1, x['macs_before']):.2f}", f"{x['rel_error']:.3g}")
                for x in f.get("layers", [])[:max_rows]]
        head = (f"factorize-lowrank ({f.get('selection')}): MACs x{f.get('macs_ratio')}, params "
                f"x{f.get('params_ratio')}; {f.get('factorized', 0)} layer(s) factorized, "
                f"{len(f.get('skipped', []))} left alone")
        tail = [f"output drift on '{name}': max abs {d['max_abs']:.3g}, cosine {d['cosine']:.6f}"
                for name, d in (f.get("drift") or {}).items() if isinstance(d, dict) and "max_abs" in d]
        return "\n".join([head, table(rows, ("layer", "method", "ranks", "MACs", "rel. error"))] + tail)

    def validate(self) -> None:
        o = self.opts

        def bad(msg):
            return BadInput(f"pass '{self.name}': {msg}")
        if not 0.0 < o["energy"] <= 1.0:
            raise bad(f"option energy={o['energy']} must be in (0, 1]: the fraction of each spectrum's energy to keep")
        for k in ("flops", "params", "latency"):
            if not 0.0 < o[k] <= 1.0:
                raise bad(f"option {k}={o[k]} must be in (0, 1]: the factorized model's {'MACs' if k == 'flops' else k}"
                          f" as a fraction of the original's")
        self.rank_value = None
        rank = str(o["rank"]).strip().lower()
        if rank != "full":
            try:
                v = float(rank)
            except ValueError:
                v = float("nan")
            if not (0 < v < float("inf")) or (v >= 1 and v != int(v)):     # inf: int() would overflow
                raise bad(f"option rank={o['rank']} must be an integer >= 1 or a fraction in (0, 1) of the full rank")
            self.rank_value = int(v) if v >= 1 else v
        ops = [str(x).strip().lower() for x in o["ops"]]
        unknown = [x for x in ops if x not in OPS]
        if unknown or not ops:
            raise bad(f"option ops={o['ops']} must list some of: {', '.join(OPS)}")
        self.ops = set(ops)
        selectors = _rank_selectors(o)
        if len(selectors) > 1:
            raise bad(f"options {' and '.join(selectors)} both select ranks; give one of energy, rank, evbmf, "
                      f"flops, params, latency")
        self.mode = selectors[0] if selectors else "full"

    # drift budget (lossy runs) --------------------------------------------------------------------------------
    def check_drift(self, drift: dict) -> str | None:
        mc = self.opts["min_cosine"]
        if mc <= 0:
            return None
        for name, d in drift.items():
            if d.get("cosine", 1.0) < mc:
                return f"output '{name}' cosine similarity {d['cosine']:.5f} is below min_cosine={mc}"
        return None

    # ----------------------------------------------------------------------------------------------------------
    def run(self, graph, ctx):
        o = self.opts
        rt = int(o["round_to"]) or (ctx.hw if ctx is not None else GENERIC).structure.channels
        always = bool(o["always"]) and self.mode not in ("flops", "params", "latency")   # a budget decides by itself
        names_in_graph = {n.name for n in graph.nodes}
        missing = [n for n in o["ignore"] if n not in names_in_graph]
        if missing:
            raise BadInput(f"pass '{self.name}': option ignore names node '{missing[0]}', which is not in the graph "
                           f"(ignore takes node names, as `graphopt inspect` lists them)")
        ignore = set(o["ignore"])
        shapes = ctx.analyses.get("shapes", graph)
        int_shapes = {k: _int_shape(v) for k, v in shapes.items()}
        total_macs = sum(node_macs(n, int_shapes) for n in graph.nodes)
        total_params = sum(int(t.values.size) for t in graph.tensors().values()
                           if isinstance(t, gs.Constant) and t.values.dtype.kind == "f")

        layers, skipped, already = [], [], 0
        for node in graph.nodes:
            if node.op not in ("Gemm", "MatMul", "Conv"):
                continue
            if _MARK_RE.search(node.name or ""):
                already += 1
                continue
            lay, reason = _layer(node, shapes, self.ops)
            if lay is None:
                if reason:
                    skipped.append({"node": node.name, "op": node.op, "reason": reason})
                continue
            if node.name in ignore:
                skipped.append({"node": node.name, "op": node.op, "reason": "named in ignore"})
                continue
            if lay.macs < o["min_macs"]:
                skipped.append({"node": node.name, "op": node.op, "reason": f"{lay.macs} MACs < min_macs"})
                continue
            if min(lay.W.shape[:2]) < 1:
                continue
            layers.append(lay)

        lat = None
        if self.mode == "latency":
            from .factorize_latency import FactorizeLatency
            lat = FactorizeLatency(graph, layers, rt, ctx, shapes)
        if self.mode in ("flops", "params", "latency"):
            chosen = self._budget(layers, rt, total_macs, total_params, skipped, lat)
        else:
            chosen = self._per_layer(layers, rt)

        info_layers, names = [], Names(graph)
        macs_saved = params_saved = 0
        for lay, cfg in zip(layers, chosen):
            node_name, op = lay.node.name, lay.node.op
            if cfg is None:
                continue
            macs_after, params_after = lay.cost(cfg, always)
            if not always and macs_after >= lay.macs:
                what = f"rank {cfg[0]}" if lay.kind == "svd" else f"ranks {cfg[0]},{cfg[1]}"
                skipped.append({"node": node_name, "op": op,
                                "reason": f"MACs would not drop ({lay.macs} -> {macs_after} at {what})"})
                continue
            entry = {"node": node_name, "op": op, "method": lay.kind}
            if lay.s is None and lay.core_energy is None:
                analyze(lay)
            if lay.kind == "svd":
                P, Q, err = svd_factors(lay, cfg[0])
                apply_svd(graph, lay, P, Q, shapes, names)
                entry.update(ranks=[cfg[0]], full_ranks=[min(lay.W.shape)])
            else:
                U_in, core, U_out, err, (r1, r2), (p_in, p_out) = tucker_factors(lay, cfg[0], cfg[1], always,
                                                                                 o["hooi_iters"])
                macs_after, params_after = lay.cost((r1, r2), always)
                apply_tucker(graph, lay, U_in, core, U_out, shapes, names)
                entry.update(ranks=[r1, r2], full_ranks=[lay.C, lay.N], max_ranks=list(lay.full_ranks()),
                             projections=[p_in, p_out])
            entry.update(macs_before=int(lay.macs), macs_after=int(macs_after), params_before=int(lay.params),
                         params_after=int(params_after), rel_error=float(f"{err:.4g}"), **lay.extra)
            macs_saved += lay.macs - macs_after
            params_saved += lay.params - params_after
            info_layers.append(entry)

        modified = bool(info_layers)
        if modified:
            toposort(graph.cleanup(remove_unused_graph_inputs=False))
        macs_after_total = total_macs - macs_saved
        params_after_total = total_params - params_saved
        info = {"selection": self.mode, "round_to": rt, "factorized": len(info_layers),
                "macs_before": int(total_macs), "macs_after": int(macs_after_total),
                "macs_ratio": round(macs_after_total / total_macs, 4) if total_macs else None,
                "params_before": int(total_params), "params_after": int(params_after_total),
                "params_ratio": round(params_after_total / total_params, 4) if total_params else None,
                "layers": info_layers, "skipped": skipped}
        if already:
            info["already_factorized"] = already
        if lat is not None:
            info["latency"] = lat.report(self.opts["latency"], chosen)
        return PassResult(graph, modified, info)

    # per-layer selection ----------------------------------------------------------------------------------------
    def _pick(self, s: np.ndarray, full: int, rt: int, lay: Layer, shape: tuple[int, int]) -> int:
        mode = self.mode
        if mode == "full":
            r = full
        elif mode == "energy":
            r = energy_rank(s, self.opts["energy"])
        elif mode == "rank":
            v = self.rank_value
            r = min(v, full) if isinstance(v, int) else math.ceil(v * full)
        else:  # evbmf
            r, _ = evbmf_spectrum(s, *shape)
            lay.extra.setdefault("evbmf_ranks", []).append(r)
        return round_up(r, full, rt)

    def _per_layer(self, layers: list[Layer], rt: int) -> list:
        chosen = []
        for lay in layers:
            if self.mode != "full":
                analyze(lay)
            if lay.kind == "svd":
                (full,) = lay.full_ranks()
                chosen.append((self._pick(lay.s, full, rt, lay, lay.W.shape),))
            else:
                f1, f2 = lay.full_ranks()
                N, C, ks = lay.N, lay.C, lay.ks
                r1 = self._pick(lay.s_in, f1, rt, lay, (C, N * ks))
                r2 = self._pick(lay.s_out, f2, rt, lay, (N, C * ks))
                if self.mode == "full" or self.opts["always"]:
                    chosen.append((r1, r2))
                else:   # an unfolding kept at full rank needs no projection
                    chosen.append((C if r1 >= f1 else r1, N if r2 >= f2 else r2))
        return chosen

    # global budget ----------------------------------------------------------------------------------------------
    def _budget(self, layers: list[Layer], rt: int, total_macs: int, total_params: int, skipped: list,
                lat=None) -> list:
        """The global budget: flops, params or latency (lat: factorize_latency.FactorizeLatency, its measured
        per-layer costs; a configuration is only a candidate when the table says it is faster than the layer)."""
        key = self.mode
        budget = self.opts[key]
        total = {"flops": total_macs, "params": total_params}.get(key) or (lat.full_ms if lat is not None else 0)
        if total <= 0:
            raise BadInput(f"pass '{self.name}': the model's {'MACs' if key == 'flops' else 'parameters'} are unknown "
                           f"(0); bind the input shapes so {key}={budget} can be measured")
        idx = 0 if key == "flops" else 1
        hulls, current, every = [], [], []
        for i, lay in enumerate(layers):
            analyze(lay)
            orig = lat.ms(i, None) if lat is not None else (lay.macs, lay.params)[idx]
            if lay.kind == "svd":
                cfgs = [(r,) for r in rank_grid(lay.full_ranks()[0], rt)]
            else:
                f1, f2 = lay.full_ranks()
                g1 = sorted(set(rank_grid(f1, rt) + [lay.C]))
                g2 = sorted(set(rank_grid(f2, rt) + [lay.N]))
                cfgs = [(a, b) for a in g1 for b in g2 if not (a >= lay.C and b >= lay.N)]
            pts = [(orig, 0.0, None)]
            for cfg in cfgs:
                c = lay.cost(cfg, False)
                cost = lat.ms(i, cfg) if lat is not None else c[idx]
                if c[0] < lay.macs and cost < orig:      # only configurations whose MACs (and budgeted cost) drop
                    pts.append((cost, lay.err2(cfg), cfg))
            hull = lower_hull(pts)
            hulls.append(hull)
            every.append((np.array([p[0] for p in pts], dtype=np.float64), np.array([p[1] for p in pts]), pts))
            current.append(len(hull) - 1)            # the hull ends at the unfactorized point (max cost, no error)
        cost = total
        target = budget * total
        floor = total - sum(h[-1][0] - h[0][0] for h in hulls)
        if floor > target + 1e-9:
            what = {"flops": "MACs", "params": "parameters"}.get(key, "predicted latency")
            raise CheckFailed(f"pass '{self.name}': {key}={budget} cannot be met: factorizing all {len(layers)} "
                              f"eligible layers at their cheapest ranks (round_to={rt}) leaves {floor / total:.3f}x "
                              f"the original's {what}; raise {key}, lower round_to or min_macs, or add ops")
        heap = []

        def push(i):
            j = current[i]
            if j > 0:
                h = hulls[i]
                dc = h[j][0] - h[j - 1][0]
                heapq.heappush(heap, ((h[j - 1][1] - h[j][1]) / dc, i))
        for i in range(len(layers)):
            push(i)
        while cost > target + 1e-9 and heap:
            _, i = heapq.heappop(heap)
            j = current[i]
            cost -= hulls[i][j][0] - hulls[i][j - 1][0]
            current[i] = j - 1
            push(i)
        # Spend leftover slack on the largest error reductions that still fit (any configuration, not only hulls).
        state = [hulls[i][current[i]] for i in range(len(layers))]
        for _ in range(4 * len(layers) + 4):
            slack = target - cost
            best = None
            for i, (costs, errs, pts) in enumerate(every):
                c0, e0, _ = state[i]
                ok = np.flatnonzero((errs < e0) & (costs - c0 <= slack + 1e-9))
                if ok.size:
                    j = int(ok[np.argmin(errs[ok])])
                    if best is None or e0 - errs[j] > best[0]:
                        best = (e0 - errs[j], i, pts[j])
            if best is None:
                break
            _, i, p = best
            cost += p[0] - state[i][0]
            state[i] = p
        chosen = []
        for lay, (c, e, cfg) in zip(layers, state):
            if cfg is None:
                skipped.append({"node": lay.node.name, "op": lay.node.op, "reason": f"left whole by the {key} budget"})
            chosen.append(cfg)
        return chosen
