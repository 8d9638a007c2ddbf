"""prune-channels{allocation=sensitivity}: per-layer loss curves from `graphopt sensitivity` (graphopt/sensitivity.py).

Each channel group the analysis measured has points (fraction of its prunable channels removed, accuracy or
agreement lost) with (0, 0) added; the curve is their running maximum (more pruning never counts as a gain: a
measured gain is noise), linear between points and extended with the last slope. The selection then takes, step
by step, the move with the least loss added per unit of budget saved, which equalizes the marginal loss per MAC (or
millisecond) across layers: the most sensitive layers lose least. Within a layer the criterion's ranking picks the
channels. A tiny multiple of the LAMP importance breaks ties between flat curves.
"""
from __future__ import annotations

import numpy as np

from graphopt.errors import BadInput, printable

TIE = 1e-6      # weight of the LAMP importance beside the measured loss


class LossCurve:
    def __init__(self, points, prunable: int):
        pts = sorted({0.0: 0.0, **{float(r): float(d) for r, d in points}}.items())
        self.r = np.array([p[0] for p in pts])
        self.loss = np.maximum.accumulate(np.maximum(np.array([p[1] for p in pts]), 0.0))
        self.prunable = max(1, prunable)

    def at(self, removed_units: int) -> float:
        r = removed_units / self.prunable
        if r <= self.r[-1] or len(self.r) < 2:
            return float(np.interp(r, self.r, self.loss))
        slope = max(0.0, (self.loss[-1] - self.loss[-2]) / max(self.r[-1] - self.r[-2], 1e-12))
        return float(self.loss[-1] + slope * (r - self.r[-1]))


class Curves:
    """{layer id: LossCurve}; lost(lamp) is the selection's loss function."""

    def __init__(self, by_layer: dict, g, cand):
        self.by_layer, self.g, self.cand = by_layer, g, cand

    def lost(self, lamp):
        def fn(removed, lay, units):
            curve = self.by_layer.get(lay.id)
            tie = TIE * float(sum(lamp[k] for k in units))
            if curve is None:
                return np.inf
            ids = [k for k in lay.units if self.cand[k]]
            before = int(removed[ids].sum())
            return curve.at(before + len(units)) - curve.at(before) + tie
        return fn


def loss_curves(data, g, cand) -> tuple[Curves, str]:
    """The curves of the layers in `data` (the JSON `graphopt sensitivity` writes), matched to this graph's channel
    groups by the node each group was measured through; (curves, a note on what matched)."""
    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, list) or not groups:
        raise BadInput("pass 'prune-channels': the sensitivity results hold no groups; run `graphopt sensitivity` on "
                       "this model")
    metric = data.get("metric", "top1")
    by_node = {}
    for e in groups:
        if not (isinstance(e, dict) and isinstance(e.get("node"), str) and isinstance(e.get("levels"), list)):
            raise BadInput("pass 'prune-channels': malformed sensitivity results (each group needs 'node' and "
                           "'levels'); write them with `graphopt sensitivity`")
        by_node[e["node"]] = e
    curves, matched = {}, 0
    for lay in g.layers:
        ids = [k for k in lay.units if cand[k]]
        if not ids:
            continue
        sources = {s for k in lay.units for s in g.units[k].sources}
        entry = next((by_node[n] for n in sources if n in by_node), None)
        if entry is None:
            continue
        try:
            pts = [(float(x["level"]), float(x["drop"])) for x in entry["levels"] if x.get("drop") is not None]
        except (TypeError, ValueError, KeyError):
            raise BadInput(f"pass 'prune-channels': malformed sensitivity levels for node "
                           f"'{printable(entry['node'])}'") from None
        curves[lay.id] = LossCurve(pts, len(ids))
        matched += 1
    if not matched:
        raise BadInput("pass 'prune-channels': no channel group of this graph was measured by the sensitivity "
                       "results (node names differ: run `graphopt sensitivity` on the same model)")
    total = sum(1 for lay in g.layers if any(cand[k] for k in lay.units))
    note = f"allocation=sensitivity: {matched} of {total} prunable layer(s) have measured {metric} curves"
    if matched < total:
        note += "; the others are left whole"
    return Curves(curves, g, cand), note
