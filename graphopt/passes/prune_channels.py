"""prune-channels: dependency-aware structural channel pruning, exact by construction.

The `channel-groups` analysis (graphopt/channel_groups.py) cuts the graph's channels into *units* that must be removed
together (a conv's output channel with its BN slice, the next conv's input slice, every summand of a residual
add, a whole attention head, ...), frozen where it cannot prove a removal safe. This pass ranks the prunable
units, picks the ones to remove under the budgets, and removes them: weights, biases, norm parameters, bare
parameters (layer scale, position embedding, class token), Reshape targets, Split sizes, Slice bounds, Gather
indices, Resize sizes and the `group` attribute of depthwise convs shrink together. A weight that several nodes
read is one set of units for all of them (the analysis couples its readers), so it is sliced once and stays one
initializer. A quantized graph (QDQ or integer ops) is refused: its weights sit behind DequantizeLinear, where no
channel can be pruned; prune the float model, then quantize.

The oracle (why removal is exact by construction: prune_oracle.py) compares the pruned graph with the original
whose removed channels are multiplied by 0 where they are consumed; the pass runs it by default
(`verify_oracle=true`) and fails with CheckFailed when the two disagree.

`criterion=dead` removes only units whose value is provably zero at every sink (zero weights and bias, zero
norm shift, carried through zero-preserving ops such as Relu, GELU, x*sigmoid(x), pooling, layout ops; a
negative bias before a Relu counts too): the mask changes nothing, so the pass is exact and declares itself so
(`exact` depends on the criterion), and the PassManager checks the outputs against the input graph.

Budgets: `ratio` (fraction of the prunable channels removed), `flops` (fraction of the MACs kept), `params`
(fraction of the weights kept), `latency` (fraction of the latency on the target kept), in any combination; every
budget given is met when the structure allows it, otherwise the pass prunes what it can and says what limited it
(`strict=true` makes that an error).

Latency budgets use a model measured on the compiled target (graphopt.latency, prune_latency.py): each layer's kernel
timed at a few channel counts, the whole graph once. The global selection then takes, step by step, the move with
the least importance lost (LAMP) per millisecond saved, and a layer's kept counts are only those the table says are
faster than every larger count (with round_to=0; an explicit round_to keeps its multiples). The predicted latency is
reported beside the budget; `graphopt compile` measures the compiled result.

`reconstruct=bias|lsq` compensates the removed channels on calibration data (prune_reconstruct.py): their mean
contribution is folded into each consumer's bias, and with lsq the kept weights of 1x1 conv / Gemm / MatMul consumers
are refitted by ridge least squares; criterion=activation then ranks by variance (what compensation cannot restore).
The oracle checks the plain removal first; the compensated graph is kept only where it brings the outputs closer to
the original's than the plain removal does (both errors are reported).

Modules: prune_removal.py (a Plan applied to the graph), prune_oracle.py (the zeroed-channel oracle),
prune_importance.py (the criteria's scores), prune_cost.py (MACs and parameters of a removal), prune_latency.py
(the latency cost), prune_sensitivity.py (allocation=sensitivity); this module ranks, selects and reports.
"""
from __future__ import annotations

import heapq
import math

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analyses import flops as flops_analysis
from graphopt.errors import BadInput, CheckFailed, printable
from graphopt.graph import copy as copy_graph, np_dtype, to_onnx
from graphopt.metadata import pruned_widths, set_pruned_widths
from graphopt.passmanager import Option, Pass, PassResult, register
from graphopt.text_table import table

from graphopt import channel_groups as cg

from .prune_cost import CostModel, total_macs
from .prune_importance import activation_scores, bn_scale_ranking, dead_units, magnitude_scores, taylor_scores
from .prune_oracle import verify_removal
from .prune_reconstruct import MODES as RECONSTRUCT_MODES, reconstruct
from .prune_removal import Plan, apply_removal

CRITERIA = ("l1", "l2", "bn_scale", "activation", "taylor", "random", "dead")
#: ops of a quantized graph: the pass refuses such graphs (prune first, then quantize)
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger")
CALIBRATION_TOL = 0.05      # latency budgets: measured fraction within 5% (relative) of the budget ends calibration


def _feeds_list(graph: gs.Graph, data: dict | None, seed: int, limit: int = 4) -> tuple[list[dict], str | None]:
    """Per-run feeds from ctx.data ('calib' or 'train': {input name: samples in graphopt.samples' layout, so
    recurrent states and other inputs without a batch axis work too}), else seeded random inputs.
    Returns (feeds, note)."""
    from graphopt.samples import feeds_from_samples
    specs = [(t.name, tuple(t.shape), np_dtype(t)) for t in graph.inputs]
    src = None
    for key in ("calib", "train"):
        if data and isinstance(data.get(key), dict) and all(n in data[key] for n, _, _ in specs):
            src = data[key]
            break
    if src is None:
        from graphopt.check_inputs import seeded_inputs
        return [seeded_inputs(graph, specs, seed + i) for i in range(limit)], "no calibration data: seeded random inputs"
    return feeds_from_samples(src, specs, "prune-channels data", limit), None


def _with(removed: np.ndarray, units) -> np.ndarray:
    out = removed.copy()
    out[list(units)] = True
    return out


# ----------------------------------------------------------------------------------------------------------------
# the pass
# ----------------------------------------------------------------------------------------------------------------

@register
class PruneChannels(Pass):
    name = "prune-channels"
    help = ("Structural channel pruning over dependency groups (conv/linear channels, heads); exact by "
            "construction (oracle-checked); a shared weight is pruned once; refuses quantized graphs (prune before "
            "quantize)")
    lossy = True
    report_name = "pruning"
    options = {
        "criterion": Option(str, "l1", "importance: l1, l2, bn_scale, activation (a channel's mean square "
                                       "at its consumers times their weights, on data; its variance with "
                                       "reconstruct=), taylor, random, or dead "
                                       "(exact: only provably zero channels)", choices=CRITERIA),
        "ratio": Option(float, 0.0, "fraction of the prunable channels to remove (0: no channel budget)"),
        "flops": Option(float, 1.0, "fraction of the MACs to keep (0 < flops <= 1)"),
        "params": Option(float, 1.0, "fraction of the weights to keep (0 < params <= 1)"),
        "latency": Option(float, 1.0, "fraction of the original's latency on the target to keep (0 < latency <= 1; "
                                      "measured per layer on the compiled target, cached)"),
        "calibrate": Option(int, 3, "with latency=: compile and time the pruned graph against the original up to "
                                    "this many times, correcting the model's target until the measured fraction "
                                    "is within 5% of the budget (0: trust the model)", minimum=0, maximum=10),
        "scope": Option(str, "global", "global: one LAMP-normalized ranking; local: the same ratio per layer",
                        choices=("global", "local")),
        "max_layer_ratio": Option(float, 0.9, "at most this fraction of a layer's channels is removed, counted "
                                              "from its width before the graph's first prune-channels (so over all "
                                              "of compress's prune steps together)",
                                  minimum=0.0, maximum=1.0),
        "round_to": Option(int, 0, "kept channel counts are multiples of this where a layer is wider "
                                   "(0: the target's channel step, hw.structure.channels)", minimum=0),
        "min_widths": Option(int, 0, "per-layer steps: a layer's kept counts are multiples of the largest power of "
                                     "two <= round_to that still leaves it this many widths to choose from (wide "
                                     "layers snap to the vector width, narrow ones keep fine steps; 0: round_to "
                                     "everywhere)", minimum=0),
        "ignore": Option(list, [], "node names whose channels are never pruned"),
        "only": Option(list, [], "prune only the channel groups these nodes produce (empty: every group)"),
        "allocation": Option(str, "ranking", "how the budget is spread over layers: ranking (the importance "
                                             "ranking of scope=) or sensitivity (from `graphopt sensitivity`: the "
                                             "layers whose accuracy suffers most lose least)",
                             choices=("ranking", "sensitivity")),
        "sensitivity": Option(str, "", "allocation=sensitivity: the JSON `graphopt sensitivity` wrote (empty: "
                                       "ctx.data['sensitivity'])"),
        "predict_latency": Option(bool, False, "also report the latency the target's latency table predicts (no "
                                               "budget)"),
        "verify_oracle": Option(bool, True, "check the pruning oracle (zeroed original == pruned) in onnxruntime"),
        "seed": Option(int, -1, "seed for criterion=random and for generated inputs (-1: the context's)"),
        "samples": Option(int, 4, "batches of data (or random inputs) used by taylor and the oracle (reconstruct=: "
                                  "max(32, samples) for its statistics and as many for its check)", minimum=1),
        "reconstruct": Option(str, "none", "compensate the removed channels on calibration data: bias (their mean "
                                           "folded into each consumer's bias), lsq (also refit the kept weights of "
                                           "1x1 conv / Gemm / MatMul consumers by least squares), none",
                              choices=RECONSTRUCT_MODES),
        "strict": Option(bool, False, "fail when a budget cannot be met"),
    }

    @classmethod
    def target_defaults(cls, hw):
        return {"round_to": hw.structure.channels}

    @classmethod
    def exact_for(cls, opts):
        return opts["criterion"] == "dead"      # only provably dead channels go

    # ------------------------------------------------------------------ report
    REPORTED = ("criterion", "round_to", "units", "held", "layers", "macs", "params", "frozen", "oracle_max_error",
                "oracle_fp64_max_error", "oracle_note", "budget", "budget_met", "limits", "notes", "latency",
                "reconstruct")

    def report_section(self, record):
        """Every run, also one that removed nothing (the entry then says what kept the channels)."""
        return {k: record["info"][k] for k in self.REPORTED if k in record["info"]}

    @classmethod
    def report_text(cls, p, max_rows: int = 12):
        """Changed layers, channels removed and what kept the others, frozen layers and why, the oracle."""
        changed = [(k, b, a) for k, (b, a) in p.get("layers", {}).items() if a != b]
        rows = [(k, b, a, f"{a / b:.2f}") for k, b, a in changed[:max_rows]]
        if len(changed) > max_rows:
            rows.append((f"... {len(changed) - max_rows} more layers (report.json)", "", "", ""))
        lines = [f"prune-channels ({p.get('criterion')}): MACs x{p['macs']['ratio']}, params x{p['params']['ratio']}; "
                 f"{len(changed)} of {len(p.get('layers', {}))} layers narrowed",
                 table(rows, ("layer", "channels", "kept", "ratio")) if rows else "(no layer narrowed)"]
        if "units" in p:
            u = p["units"]
            lines.append(f"channels: removed {u['removed']} of {u['prunable']} prunable ({u['total']} in all)")
        for h in p.get("held", []):
            lines.append(f"kept {h['channels']} channel(s): {h['why']}")
        if "latency" in p:
            lat = p["latency"]
            lines.append(f"latency on {lat['on']} ({lat['threads']} thread(s)): predicted {lat['predicted']:.3f} of "
                         f"the original's ({lat['predicted_ms']:.3f} of {lat['original_ms']:.3f} ms; {lat['kernels']} "
                         f"layer kernels measured, {lat['remainder_ms']:.3f} ms elsewhere)"
                         + (f", measured {lat['measured']:.3f} after {len(lat['calibration'])} calibration round(s)"
                            if "measured" in lat else "") + f"; target {lat['target']:g}")
        if p.get("limits"):
            lines.append(f"budget not met: {p['limits']}")
        for f in p.get("frozen", [])[:5]:
            lines.append(f"frozen: {f['layer']}: {'; '.join(f['why'])}")
        if len(p.get("frozen", [])) > 5:
            lines.append(f"frozen: ... {len(p['frozen']) - 5} more (report.json)")
        if "reconstruct" in p:
            lines.append(cls._reconstruct_line(p["reconstruct"]))
        if "oracle_max_error" in p:
            lines.append(f"oracle (zeroed original == pruned, onnxruntime): max error {p['oracle_max_error']:.3g}"
                         + (f"; {p['oracle_note']}" if p.get("oracle_note") else ""))
        return "\n".join(lines)

    @staticmethod
    def _reconstruct_line(r) -> str:
        """reconstruct=: the sinks compensated and skipped, the output errors, which graph was kept."""
        line = (f"reconstruct={r['mode']}: {r['sinks']['lsq']} sink(s) refitted, {r['sinks']['bias']} bias-compensated"
                f", {r['skipped_count']} skipped")
        if r["skipped"]:
            line += " (" + ", ".join(f"{k['node']}: {k['why']}" for k in r["skipped"][:3]) + \
                (", ..." if r["skipped_count"] > 3 else "") + ")"
        if "output_error_after" in r:
            line += (f"; output error vs original {r['output_error_before']:.4g} uncompensated, "
                     f"{r['output_error_after']:.4g} compensated ({r['kept']} kept)")
        return line + (f"; {r['note']}" if r.get("note") else "")

    def summary(self, record):
        """The budget's outcome."""
        return {k: record["info"][k] for k in ("budget_met", "limits", "notes") if k in record["info"]}

    def validate(self):
        o = self.opts
        for key in ("flops", "params", "latency"):
            v = o[key]
            if not (0.0 < v <= 1.0):
                raise BadInput(f"pass 'prune-channels': option {key}={v:g} must be in (0, 1]: the fraction of "
                               f"{ {'flops': 'MACs', 'params': 'weights'}.get(key, key)} to keep ({key}=0.5 keeps "
                               f"half)")
        if not (0.0 <= o["ratio"] < 1.0):
            raise BadInput(f"pass 'prune-channels': option ratio={o['ratio']:g} must be in [0, 1): the fraction of "
                           f"channels to remove")
        targets = [k for k in ("ratio", "flops", "params", "latency") if k in self.changed()]
        if o["criterion"] == "dead" and targets:
            raise BadInput(f"pass 'prune-channels': criterion=dead removes exactly the provably dead channels; "
                           f"drop {targets[0]}=")
        if o["criterion"] != "dead" and not targets:
            raise BadInput("pass 'prune-channels' needs a budget: ratio=, flops=, params= or latency= "
                           "(for example prune-channels{flops=0.5}), or criterion=dead")
        if o["criterion"] == "dead" and o["reconstruct"] != "none":
            raise BadInput(f"pass 'prune-channels': criterion=dead removes only channels that are always zero, which "
                           f"leaves nothing to compensate; drop reconstruct={o['reconstruct']}")
        if o["allocation"] == "sensitivity" and (o["scope"] == "local" or o["criterion"] == "dead"):
            raise BadInput(f"pass 'prune-channels': allocation=sensitivity spreads a global budget; it does not go "
                           f"with {'scope=local' if o['scope'] == 'local' else 'criterion=dead'}")

    # ------------------------------------------------------------------ run
    def run(self, graph, ctx):
        o = self.opts
        seed = ctx.seed if o["seed"] < 0 else o["seed"]
        quantized = [n for n in graph.nodes if n.op in QUANTIZED_OPS or n.op.startswith("QLinear")]
        if quantized:
            raise BadInput(f"pass 'prune-channels': the graph is already quantized ({len(quantized)} quantization "
                           f"node(s), e.g. {printable(quantized[0].name)!r} ({quantized[0].op})): its weights sit "
                           f"behind DequantizeLinear and no channel could be pruned; prune the float model before "
                           f"quantize (pipeline 'prune-channels{{...}},quantize{{...}}')")
        recon_runs = self._reconstruct_runs(graph, ctx, seed) if o["reconstruct"] != "none" else None
        names = {n.name for n in graph.nodes}
        for n in o["ignore"]:
            if n not in names:
                import difflib
                close = difflib.get_close_matches(n, sorted(names), n=1)
                hint = f"did you mean '{close[0]}'?" if close else \
                    "node names look like: " + ", ".join(sorted(x for x in names if x)[:3])
                raise BadInput(f"pass 'prune-channels': ignore names node '{n}', which is not in the graph ({hint})")
        g: cg.ChannelGroups = ctx.analyses.get("channel-groups", graph)
        self._widths0 = pruned_widths(graph)     # max_layer_ratio counts from the widths before any pruning
        round_to = o["round_to"] or ctx.hw.structure.channels
        extra = self._ignored(g, set(o["ignore"]))
        if o["only"]:
            extra.update(self._outside(g, o["only"], names))
        notes = []
        cand = np.array([not u.frozen and u.id not in extra for u in g.units], dtype=bool)
        cost = CostModel(graph, g, ctx)
        calibration = None
        if ("latency" in self.changed() or o["predict_latency"]) and cand.any():
            from .prune_latency import LatencyCost
            cost.latency = LatencyCost(graph, g, cand, ctx)
            cost.latency_budget = "latency" in self.changed()
        removed = np.zeros(g.n_units, dtype=bool)
        held = []
        if o["criterion"] == "dead":
            removed, held = dead_units(g, cand, extra)
        elif cand.any():
            scores, note = self._scores(graph, g, cand, ctx, seed)
            if note:
                notes.append(note)
            if o["allocation"] == "sensitivity":
                from .prune_sensitivity import loss_curves
                cost.curves, note = loss_curves(self._sensitivity_data(ctx), g, cand)
                notes.append(note)
            removed = self._select(g, cand, scores, cost, round_to)
            if cost.latency_budget and o["calibrate"] and removed.any():
                removed, calibration = self._calibrate(graph, g, cand, scores, cost, round_to, removed)
        info = self._report(graph, g, cost, removed, extra, round_to, notes)
        if calibration:
            info["latency"].update(calibration=calibration, measured=min(
                calibration, key=lambda r: abs(r["measured"] - o["latency"]))["measured"])
            self._check_budgets(info)
        if not info["budget_met"]:
            held = self._held_at_floor(g, cand, extra, round_to, cost)
            floor = self._floor(g, cand, round_to, cost)
            info["reachable"] = {"macs": round(cost.macs(floor) / max(1, cost.macs0), 4),
                                 "params": round(cost.params(floor) / max(1, cost.params0), 4)}
            if cost.latency is not None:
                info["reachable"]["latency"] = round(cost.latency.fraction(floor), 4)
            self._check_budgets(info)
        info["held"] = held
        if not removed.any():
            if o["strict"] and not info["budget_met"]:
                raise CheckFailed(f"pass 'prune-channels' cannot meet its budget: {info['limits']}")
            return PassResult(graph, False, info)
        plan = Plan(g, removed)
        original = copy_graph(graph) if o["verify_oracle"] or o["reconstruct"] != "none" else None
        pruned = apply_removal(graph, plan)
        set_pruned_widths(pruned, {**{lay.name: len(lay.units) for lay in g.layers}, **self._widths0})
        if o["verify_oracle"]:
            runs, _ = _feeds_list(original, ctx.data, seed, limit=min(2, o["samples"]))
            info.update(verify_removal(original, plan, pruned, runs))
        if recon_runs:
            half = (len(recon_runs) + 1) // 2
            pruned, info["reconstruct"] = reconstruct(original, plan, pruned, recon_runs[:half],
                                                      recon_runs[half:] or recon_runs, o["reconstruct"])
        after = flops_analysis(pruned, None)
        after["macs"] = total_macs(pruned)
        info["macs"]["after"] = int(after["macs"])
        info["macs"]["ratio"] = round(after["macs"] / max(1, cost.macs0), 4)
        info["params"]["after"] = int(after["params"])
        info["params"]["ratio"] = round(after["params"] / max(1, cost.params0), 4)
        self._check_budgets(info)
        if o["strict"] and not info["budget_met"]:
            raise CheckFailed(f"pass 'prune-channels' cannot meet its budget: {info['limits']}")
        return PassResult(pruned, True, info)

    # ------------------------------------------------------------------ pieces

    def _reconstruct_runs(self, graph, ctx, seed) -> list[dict]:
        """reconstruct=: the calibration runs, statistics from the first half, the check on the second (2 *
        max(32, samples) samples at most); BadInput without calibration data (random inputs have no meaningful
        means)."""
        runs, note = _feeds_list(graph, ctx.data, seed, limit=2 * max(32, self.opts["samples"]))
        if note:
            raise BadInput(f"pass 'prune-channels': reconstruct={self.opts['reconstruct']} needs calibration data "
                           f"(arrays named after the graph inputs: --calib FILE.npz, or data 'calib' in the API); "
                           f"drop reconstruct= to prune without it")
        return runs

    def _sensitivity_data(self, ctx) -> dict:
        from ..sensitivity import results_for
        return results_for(self.name, self.opts["sensitivity"], ctx, "allocation=sensitivity")

    def _outside(self, g, only, names) -> dict[int, list[str]]:
        """Units outside the channel groups that the `only` nodes produce."""
        for n in only:
            if n not in names:
                raise BadInput(f"pass 'prune-channels': only names node '{printable(n)}', which is not in the graph")
        inside = set()
        for s in g.sources:
            if g.name(s.node) in only or g.nodes[s.node].name in only:
                for k in set(g.classes(s.slots).tolist()):
                    inside.update(g.layers[g.units[k].layer].units)
        return {u.id: ["outside only="] for u in g.units if u.id not in inside}

    def _ignored(self, g, names: set) -> dict[int, list[str]]:
        if not names:
            return {}
        idx = {i for i, n in enumerate(g.nodes) if n.name in names}
        hit = set()
        for s in g.sources:
            if s.node in idx:
                hit |= set(g.classes(s.slots).tolist())
        for s in g.sinks:
            if s.node in idx:
                hit |= set(g.classes(s.slots).tolist())
        for p in g.params:
            if p.node in idx:
                hit |= set(g.classes(p.slots).tolist())
        for i in idx:
            for t in list(g.nodes[i].outputs) + list(g.nodes[i].inputs):
                c = g.chan.get(t.name) if isinstance(t, gs.Variable) else None
                if c is not None:
                    hit |= set(g.classes(c.slots).tolist())
        return {k: ["ignored by the user"] for k in hit}

    def _scores(self, graph, g, cand, ctx, seed):
        crit = self.opts["criterion"]
        if crit in ("l1", "l2"):
            return magnitude_scores(g, crit), None
        if crit == "random":
            return np.random.default_rng(seed).random(g.n_units), None
        if crit == "bn_scale":
            return bn_scale_ranking(g, cand)
        if crit == "activation":       # forward passes only: more samples than taylor's for the same cost
            runs, data_note = _feeds_list(graph, ctx.data, seed, limit=max(16, self.opts["samples"]))
            centered = self.opts["reconstruct"] != "none"     # the mean is compensated: rank by variance
            return activation_scores(graph, g, runs, centered), f"activation{' (variance)' if centered else ''}: " \
                f"{len(runs)} sample(s)" + (
                f"; {data_note}" if data_note else "")
        runs, data_note = _feeds_list(graph, ctx.data, seed, limit=self.opts["samples"])
        s, how = taylor_scores(graph, g, [k for k in range(g.n_units) if cand[k]], runs)
        return s, how + (f"; {data_note}" if data_note else "")

    def _floor(self, g, cand, round_to, cost):
        rem = np.zeros(g.n_units, dtype=bool)
        for lay in g.layers:
            ids = [k for k in lay.units if cand[k]]
            if ids:
                allowed = self._counts(g, lay, ids, round_to, cost)
                rem[ids[:len(lay.units) - allowed[-1]]] = True
        return rem

    def _counts(self, g, lay, ids, round_to, cost) -> list[int]:
        """A layer's allowed kept counts, largest first: multiples of round_to (_allowed), or with a latency budget
        and round_to=0 the counts the latency table says are worth having (prune_latency.LatencyCost.counts)."""
        snap = cost.latency_budget and not self.opts["round_to"]
        step = 1 if snap else self._layer_step(len(lay.units), round_to, self.opts["min_widths"])
        allowed = self._allowed(len(lay.units), len(ids), step, self.opts["max_layer_ratio"], self._width0(lay))
        return cost.latency.counts(g, ids, allowed) if snap else allowed

    @staticmethod
    def _layer_step(n: int, round_to: int, min_widths: int) -> int:
        """round_to, or with min_widths the largest power of two <= round_to leaving n // step >= min_widths."""
        if not min_widths:
            return round_to
        step = 1
        while step * 2 <= round_to and n // (step * 2) >= min_widths:
            step *= 2
        return step

    def _width0(self, lay) -> int:
        """The layer's width before the graph's first prune-channels (graphopt.metadata pruned_widths)."""
        return max(len(lay.units), self._widths0.get(lay.name, 0))

    @staticmethod
    def _allowed(n: int, n_cand: int, round_to: int, max_ratio: float | None, n0: int | None = None) -> list[int]:
        """Allowed kept counts of a layer with n units of which n_cand are prunable, largest first; max_ratio
        caps the removal counted from n0, the width before any pruning (default n)."""
        m = round_to if n > round_to else 1
        floor = max(1, n - n_cand)
        if max_ratio is not None:
            floor = max(floor, math.ceil((n0 or n) * (1.0 - max_ratio) - 1e-9))
        ks = [k for k in range(n - 1, 0, -1) if k >= floor and k % m == 0]
        return [n] + ks

    def _held_at_floor(self, g, cand, extra, round_to, cost) -> list[dict]:
        """Why a budget cannot be met: the units that stay with every prunable layer at its narrowest, by the
        constraint that keeps them."""
        frozen = sum(1 for u in g.units if u.frozen)
        counts = {"frozen (see 'frozen')": frozen, "ignored by the user": len(extra) - sum(1 for k in extra
                                                                                            if g.units[k].frozen)}
        one = ratio = rounding = 0
        max_ratio = self.opts["max_layer_ratio"]
        for lay in g.layers:
            n, n_cand = len(lay.units), sum(1 for k in lay.units if cand[k])
            if not n_cand:
                continue
            base = max(1, n - n_cand)
            capped = max(base, math.ceil(self._width0(lay) * (1.0 - max_ratio) - 1e-9))
            one += base - (n - n_cand)
            ratio += capped - base
            ids = [k for k in lay.units if cand[k]]
            rounding += self._counts(g, lay, ids, round_to, cost)[-1] - capped
        counts[f"max_layer_ratio={max_ratio:g}"] = ratio
        snap = cost.latency_budget and not self.opts["round_to"]
        counts["narrower counts are not faster (latency table)" if snap else
               f"round_to={round_to}" + (f", min_widths={self.opts['min_widths']}" if self.opts["min_widths"] else "")
               ] = rounding
        counts["a layer keeps at least one channel"] = one
        return [{"channels": n, "why": why} for why, n in counts.items() if n]

    def _calibrate(self, graph, g, cand, scores, cost, round_to, removed):
        """Meet the measured latency, not only the predicted one: compile the pruned graph, time it against the
        original (interleaved), and select again with the model's target corrected (proportionally, then by
        secant) until the measured fraction is within CALIBRATION_TOL of the budget or the rounds run out. Returns
        the removal whose measured fraction came closest, and the rounds."""
        from graphopt import latency
        want = self.opts["latency"]
        lat = cost.latency
        rounds, best, t, seen = [], None, want, []
        with latency.Baseline(lat.profiler, to_onnx(graph)) as base:
            for r in range(self.opts["calibrate"]):
                rem = removed if r == 0 else self._select(g, cand, scores, cost, round_to, latency_target=t)
                pruned = apply_removal(copy_graph(graph), Plan(g, rem))
                a, ms, ms0 = base.fraction(to_onnx(pruned))
                rounds.append({"model_target": round(t, 4), "predicted": round(lat.fraction(rem), 4),
                               "measured": round(a, 4), "ms": round(ms, 4), "original_ms": round(ms0, 4)})
                if best is None or abs(a - want) < abs(best[1] - want):
                    best = (rem, a)
                if abs(a - want) <= CALIBRATION_TOL * want:
                    break
                seen.append((t, a))
                if len(seen) >= 2 and abs(seen[-1][1] - seen[-2][1]) > 1e-6 and \
                        (seen[-1][0] - seen[-2][0]) / (seen[-1][1] - seen[-2][1]) > 0:
                    (t0, a0), (t1, a1) = seen[-2:]
                    t = t1 + (want - a1) * (t1 - t0) / (a1 - a0)
                else:
                    t = t * want / max(a, 1e-6)
                t = float(min(1.0, max(0.02, t)))
        return best[0], rounds

    def _select(self, g, cand, scores, cost: CostModel, round_to, latency_target: float | None = None):
        o = self.opts
        latency_target = o["latency"] if latency_target is None else latency_target
        removed = np.zeros(g.n_units, dtype=bool)
        total_cand = int(cand.sum())
        layers = []
        for lay in g.layers:
            ids = [k for k in lay.units if cand[k]]
            if not ids:
                continue
            ids.sort(key=lambda k: (scores[k], k))
            allowed = self._counts(g, lay, ids, round_to, cost)
            if len(allowed) > 1:
                layers.append((lay, ids, allowed))

        def met(rem):
            if cost.macs(rem) > o["flops"] * cost.macs0 * (1 + 1e-9):
                return False
            if cost.params(rem) > o["params"] * cost.params0 * (1 + 1e-9):
                return False
            if rem.sum() < o["ratio"] * total_cand - 1e-9:
                return False
            if cost.latency_budget and cost.latency.fraction(rem) > latency_target * (1 + 1e-9):
                return False
            return True

        if o["scope"] == "local":
            steps = [i / 400 for i in range(0, 401)]
            best = removed
            for r in steps:
                rem = np.zeros(g.n_units, dtype=bool)
                for lay, ids, allowed in layers:
                    n = len(lay.units)
                    want = n * (1 - r)
                    k = min((a for a in allowed if a >= want - 1e-9), default=n)
                    rem[ids[:n - k]] = True
                best = rem
                if met(rem):
                    break
            return best
        # global: LAMP-normalized scores, greedy over moves (a move takes a layer to its next allowed width)
        lamp = np.zeros(g.n_units)
        for lay, ids, allowed in layers:
            s2 = np.array([scores[k] for k in ids], dtype=np.float64) ** 2
            tail = np.cumsum(s2[::-1])[::-1]
            lamp[ids] = s2 / np.maximum(tail, 1e-30)
        if cost.curves is not None:
            return self._ratio_greedy(layers, cost.curves.lost(lamp), self._saved(cost), met, removed)
        if cost.latency_budget:
            return self._ratio_greedy(layers, lambda rem, lay, units: float(sum(lamp[k] for k in units)),
                                      self._saved(cost), met, removed)
        heap = []
        state = {}
        for li, (lay, ids, allowed) in enumerate(layers):
            state[li] = 0          # index into allowed
            self._push(heap, li, layers, state, lamp)
        while heap and not met(removed):
            _, li, nxt = heapq.heappop(heap)
            lay, ids, allowed = layers[li]
            if state[li] + 1 != nxt:
                continue
            n = len(lay.units)
            removed[ids[:n - allowed[nxt]]] = True
            state[li] = nxt
            self._push(heap, li, layers, state, lamp)
        return removed

    def _saved(self, cost):
        """saved(removed, units): what removing units also saves, in the budget that matters most: predicted ms
        with a latency budget, else MACs, weights, or channels."""
        if cost.latency_budget:
            return cost.latency.delta
        if "flops" in self.changed():
            return lambda rem, units: cost.macs(rem) - cost.macs(_with(rem, units))
        if "params" in self.changed():
            return lambda rem, units: cost.params(rem) - cost.params(_with(rem, units))
        return lambda rem, units: float(len(units))

    @staticmethod
    def _ratio_greedy(layers, lost_fn, saved_fn, met, removed):
        """Global selection: always the move with the least loss (lost_fn(removed, layer, units): LAMP importance,
        or the measured sensitivity) per unit of budget saved (saved_fn(removed, units)). A move's saving depends on
        the neighbouring layers' widths, so keys are re-evaluated when popped (lazy greedy); a move that saves
        nothing is not taken. Moves are coarse (a step of a wide, early layer can be several percent of the
        latency), so the last move may overshoot the budget: it is then undone once and the budget met with the
        other layers' moves instead, when that loses less."""
        def key(rem, li, j):
            lay, ids, allowed = layers[li]
            n = len(lay.units)
            units = ids[n - allowed[j]:n - allowed[j + 1]]
            saved, lost = saved_fn(rem, units), lost_fn(rem, lay, units)
            return (lost / saved if saved > 1e-12 else math.inf, lost), units

        def walk(rem, state, blocked=None):
            """Apply moves until met; returns the moves [(layer, units, lost)]."""
            heap = [(key(rem, li, state[li])[0], li, state[li]) for li in range(len(layers))
                    if li != blocked and state[li] + 1 < len(layers[li][2])]
            heapq.heapify(heap)
            moves = []
            while heap and not met(rem):
                _, li, j = heapq.heappop(heap)
                if state[li] != j:
                    continue
                k, units = key(rem, li, j)
                if heap and k > heap[0][0]:
                    heapq.heappush(heap, (k, li, j))
                    continue
                if k[0] == math.inf:
                    continue
                rem[units] = True
                state[li] = j + 1
                moves.append((li, units, k[1]))
                if j + 2 < len(layers[li][2]):
                    heapq.heappush(heap, (key(rem, li, j + 1)[0], li, j + 1))
            return moves
        state = [0] * len(layers)
        moves = walk(removed, state)
        if moves and met(removed):
            li, units, lost = moves[-1]
            alt, alt_state = removed.copy(), list(state)
            alt[units] = False
            alt_state[li] -= 1
            extra = walk(alt, alt_state, blocked=li)
            if met(alt) and sum(m[2] for m in extra) < lost:
                return alt
        return removed

    @staticmethod
    def _push(heap, li, layers, state, lamp):
        lay, ids, allowed = layers[li]
        nxt = state[li] + 1
        if nxt >= len(allowed):
            return
        n = len(lay.units)
        units = ids[n - allowed[state[li]]:n - allowed[nxt]]
        heapq.heappush(heap, (float(max(lamp[k] for k in units)), li, nxt))

    def _report(self, graph, g, cost, removed, extra, round_to, notes) -> dict:
        o = self.opts
        layers = {}
        for s in g.sources:
            node = g.nodes[s.node]
            if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                continue
            k = ~removed[g.classes(s.slots)]
            layers[g.name(s.node)] = [len(s.slots), int(k.sum())]
        info = {
            "criterion": o["criterion"], "scope": o["scope"], "round_to": round_to,
            "units": {"total": g.n_units, "prunable": int(sum(1 for u in g.units if not u.frozen
                                                              and u.id not in extra)),
                      "removed": int(removed.sum())},
            "layers": layers,
            "macs": {"before": cost.macs0, "after": int(round(cost.macs(removed))),
                     "ratio": round(cost.macs(removed) / max(1, cost.macs0), 4)},
            "params": {"before": cost.params0, "after": int(round(cost.params(removed))),
                       "ratio": round(cost.params(removed) / max(1, cost.params0), 4)},
            "frozen": (g.frozen_summary(extra) + [{"layer": d["node"], "channels": None, "why": [d["why"]]}
                                                  for d in g.opaque])[:40],
            "notes": notes,
        }
        if cost.latency is not None:
            info["latency"] = self._latency_info(cost.latency, removed)
        self._check_budgets(info)
        return info

    def _latency_info(self, lat, removed) -> dict:
        """The predicted latency beside the budget, and what the prediction rests on."""
        from graphopt import latency
        p = lat.profiler
        return {"target": self.opts["latency"], "predicted": round(lat.fraction(removed), 4),
                "predicted_ms": round(lat.predict(removed), 4), "original_ms": round(lat.full_ms, 4),
                "model_ms": round(lat.model_ms, 4), "remainder_ms": round(lat.remainder, 4),
                "kernels": len(lat.terms), "threads": p.threads, "clock": latency.clock_name(p.threads),
                "on": p.target_name, "table": str(p.cache.path),
                "layers": lat.layers(removed)}

    def _check_budgets(self, info):
        o = self.opts
        budget, limits = {}, []
        for key, what in (("flops", "macs"), ("params", "params")):
            if key in self.changed():
                reached = info[what]["ratio"]
                ok = reached <= o[key] + 1e-6
                budget[key] = {"target": o[key], "reached": reached, "met": ok}
                if not ok:
                    limits.append(f"{key}: reached {reached:.3f} of the original, target {o[key]:g}")
        if "latency" in info and "latency" in self.changed():
            measured = "measured" in info["latency"]
            reached = info["latency"]["measured" if measured else "predicted"]
            ok = reached <= o["latency"] * (1 + CALIBRATION_TOL) + 1e-6 if measured else reached <= o["latency"] + 1e-6
            budget["latency"] = {"target": o["latency"], "reached": reached, "met": ok,
                                 "by": "measured" if measured else "predicted"}
            if not ok:
                limits.append(f"latency: {'measured' if measured else 'predicted'} {reached:.3f} of the original's, "
                              f"target {o['latency']:g}")
        if "ratio" in self.changed():
            pr = info["units"]["prunable"]
            reached = info["units"]["removed"] / max(1, pr)
            ok = reached >= o["ratio"] - 1e-6
            budget["ratio"] = {"target": o["ratio"], "reached": round(reached, 4), "met": ok}
            if not ok:
                limits.append(f"ratio: removed {reached:.3f} of the prunable channels, target {o['ratio']:g}")
        info["budget"] = budget
        info["budget_met"] = not limits
        if limits:
            why = "limited by frozen channels (see 'frozen'), max_layer_ratio and round_to"
            if budget.get("latency", {}).get("by") == "measured" and not budget["latency"]["met"]:
                why = ("the compiled graph measured off the latency model's prediction; more calibrate= rounds "
                       "correct it further")
            info["limits"] = "; ".join(limits) + f" ({why})"
            if "reachable" in info:
                info["limits"] += (f"; with every prunable layer at its narrowest the graph keeps "
                                   f"{info['reachable']['macs']:.3f} of its MACs and "
                                   f"{info['reachable']['params']:.3f} of its weights"
                                   + (f" (predicted latency {info['reachable']['latency']:.3f})"
                                      if "latency" in info["reachable"] else ""))
        else:
            info.pop("limits", None)
