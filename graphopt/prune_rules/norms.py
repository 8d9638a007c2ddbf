"""Normalizations and ops that mix values along one axis: pass-through over other axes, frozen over the channel
axis; per-channel parameters are sliced, GroupNormalization's groups are whole units."""
from __future__ import annotations

import numpy as np

from graphopt.op_traits import ops
from graphopt.prune_rules import NAN, Freeze, Rule, register


@register
class BatchNorm(Rule):
    """Inference-mode BatchNormalization on the channel axis: its four parameters are sliced; a channel's constant
    value goes through the affine map."""
    ops = frozenset({"BatchNormalization"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        if node.attrs.get("training_mode", 0) or any(t.outputs or t in g.graph.outputs
                                                     for t in node.outputs[1:] if t.name):
            raise Freeze("BatchNormalization in training mode")
        if x.axis != 1:
            raise Freeze("BatchNormalization over a non-channel axis")
        ps = [g.const(t) for t in node.inputs[1:5]]
        if any(p is None for p in ps):
            raise Freeze("BatchNormalization parameters are not constant")
        for k in range(1, 5):
            g.param(k, 0, x.slots, "norm")
        gamma, beta, mean, var = (p.astype(np.float64) for p in ps)
        scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        g.set(node.outputs[0], 1, x.slots, x.cval * scale + (beta - mean * scale))


@register
class InstanceNorm(Rule):
    """InstanceNormalization: statistics per channel, so pass-through with scale and shift sliced; a channel with
    a known (constant) value normalizes to its shift."""
    ops = frozenset({"InstanceNormalization"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        if x.axis != 1:
            raise Freeze("InstanceNormalization normalizes over the channel axis")
        ps = [g.const(t) for t in node.inputs[1:3]]
        if any(p is None for p in ps):
            raise Freeze("InstanceNormalization parameters are not constant")
        g.param(1, 0, x.slots, "norm")
        g.param(2, 0, x.slots, "norm")
        cv = np.where(np.isnan(x.cval), NAN, ps[1].astype(np.float64))
        g.set(node.outputs[0], 1, x.slots, cv)


@register
class LayerNorm(Rule):
    """LayerNormalization over axes after the channel axis: pass-through (over the channel axis: frozen)."""
    ops = frozenset({"LayerNormalization"})

    def propagate(self, g, node):
        got = g.tracked_input(node)
        if got is None:
            return
        x, s = got
        ax = int(node.attrs.get("axis", -1)) % len(s)
        if x.axis >= ax:
            raise Freeze("LayerNormalization normalizes over the channel axis")
        if any(t.name and t.outputs for t in node.outputs[1:]):
            raise Freeze("LayerNormalization statistics are used")
        g.set(node.outputs[0], x.axis, x.slots)


@register
class GroupNorm(Rule):
    """Statistics per group of channels: a whole group is one unit; num_groups shrinks with the removed groups."""
    ops = frozenset({"GroupNormalization"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        if x.axis != 1:
            raise Freeze("GroupNormalization over the channel axis")
        G = int(node.attrs["num_groups"])
        C = len(x.slots)
        if C % G:
            raise Freeze("GroupNormalization with uneven groups")
        cpg = C // G
        for grp in range(G):
            for c in range(1, cpg):
                g.uf.union(x.slots[grp * cpg], x.slots[grp * cpg + c])
        gslots = [x.slots[grp * cpg] for grp in range(G)]
        for k in (1, 2):
            v = g.const(node.inputs[k])
            if v is None:
                raise Freeze("GroupNormalization parameters are not constant")
            if v.size == C and C != G:
                g.param(k, 0, x.slots, "norm")
            elif v.size == G:
                g.param(k, 0, gslots, "norm")
        g.rewrite(self, {"slots": gslots})
        g.set(node.outputs[0], 1, x.slots)

    def rewrite(self, node, data, edit):
        k = edit.keep(data["slots"])
        if not k.all():
            node.attrs["num_groups"] = int(k.sum())


@register
class LocalResponseNorm(Rule):
    """LRN mixes neighbouring channels: frozen."""
    ops = frozenset({"LRN"})

    def propagate(self, g, node):
        if g.get(node.inputs[0]) is not None:
            raise Freeze("LRN mixes neighbouring channels")


@register
class MeanVarianceNorm(Rule):
    """MeanVarianceNormalization over axes other than the channel axis: pass-through."""
    ops = frozenset({"MeanVarianceNormalization"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        axes = node.attrs.get("axes", [0, 2, 3])
        s = g.shape(node.inputs[0])
        if s is None or x.axis in [a % len(s) for a in axes]:
            raise Freeze("MeanVarianceNormalization over the channel axis")
        g.set(node.outputs[0], x.axis, x.slots)


@register
class AxisMixer(Rule):
    """Softmax, LpNormalization, CumSum, ... along one axis: pass-through over the others, frozen along the
    channel axis; ArgMax / ArgMin outputs indices: frozen."""
    ops = ops(family="axis_mixer")

    def propagate(self, g, node):
        got = g.tracked_input(node)
        if got is None:
            return
        x, s = got
        if node.op in ("ArgMax", "ArgMin"):
            raise Freeze(f"{node.op} output")
        legacy = node.op in ("Softmax", "LogSoftmax", "Hardmax") and g.opset() < 13
        ax = int(node.attrs.get("axis", 1 if legacy else -1)) % len(s)
        if legacy:          # coerced to 2-D: every axis from `axis` on is normalized together
            if x.axis >= ax:
                raise Freeze(f"{node.op} over the channel axis")
        elif x.axis == ax:
            raise Freeze(f"{node.op} over the channel axis")
        g.set(node.outputs[0], x.axis, x.slots)
