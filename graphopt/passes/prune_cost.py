"""prune-channels' cost model: MACs and parameters of the graph as functions of the removed channel units (the
latency cost is prune_latency.py's)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import channel_groups as cg
from graphopt.graph import constant_value


def total_macs(graph: gs.Graph) -> int:
    from graphopt.analyses import node_macs, shapes
    sh = shapes(graph, None)
    return int(sum(node_macs(n, sh) for n in graph.nodes))


class CostModel:
    """MACs and parameters of a removal; `latency` (prune_latency.LatencyCost) when the pass has a latency budget."""

    def __init__(self, graph: gs.Graph, g: cg.ChannelGroups, ctx):
        self.g = g
        self.latency = None              # prune_latency.LatencyCost: with a latency budget or predict_latency
        self.latency_budget = False      # whether the selection must meet a latency budget
        self.curves = None               # allocation=sensitivity: {layer id: prune_sensitivity.LossCurve}
        fl = ctx.analyses.get("flops", graph)
        self.params0 = int(fl["params"])
        base = g.base_macs()
        self.macs0 = int(sum(base.values()))     # per node index, as the flops analysis counts
        self.mac_terms = []
        self.fixed_macs = 0
        for i, macs in base.items():
            fs = g.mac_factors.get(i)
            if not macs:
                continue
            if not fs:
                self.fixed_macs += macs
                continue
            self.mac_terms.append((macs, [g.classes(f) for f in fs]))
        per = defaultdict(list)          # by constant: a weight shared by several nodes counts once
        for p in g.params:
            per[g.nodes[p.node].inputs[p.input].name].append(p)
        self.param_terms = []
        for ps in per.values():
            v = constant_value(g.nodes[ps[0].node].inputs[ps[0].input])
            if v is None or v.dtype.kind != "f":
                continue
            axes = {}
            for p in ps:
                axes.setdefault(p.axis, g.classes(p.slots))
            self.param_terms.append((int(v.size), list(axes.values())))

    def macs(self, removed: np.ndarray) -> float:
        kept = removed.__invert__()
        total = self.fixed_macs
        for macs, fs in self.mac_terms:
            f = macs
            for c in fs:
                f *= kept[c].mean() if len(c) else 1.0
            total += f
        return total

    def params(self, removed: np.ndarray) -> float:
        kept = ~removed
        gone = 0.0
        for size, fs in self.param_terms:
            f = 1.0
            for c in fs:
                f *= kept[c].mean() if len(c) else 1.0
            gone += size * (1.0 - f)
        return self.params0 - gone
