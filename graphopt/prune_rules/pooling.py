"""Pooling, reductions and resampling: channels pass through when the op works on other axes."""
from __future__ import annotations

import numpy as np

from graphopt.op_traits import ops, traits
from graphopt.prune_rules import NAN, Freeze, Rule, register, shrink_shape_input


def _zero_stays_zero(cval):
    return np.where(cval == 0, 0.0, NAN)


@register
class Pool(Rule):
    """Pooling over the spatial axes: pass-through; a channel's constant value survives max / average pooling
    (not zero padding counted in the average, not Lp norms, which keep only zero)."""
    ops = ops(family="pool")

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        if x.axis >= 2:
            raise Freeze("pooling over the channel axis")
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            raise Freeze("pooling indices are used")
        cv = x.cval
        if node.op == "AveragePool" and any(node.attrs.get("pads", [0])) and node.attrs.get("count_include_pad", 0):
            cv = _zero_stays_zero(cv)
        elif node.op in ("LpPool", "GlobalLpPool"):
            cv = _zero_stays_zero(cv)
        g.set(node.outputs[0], x.axis, x.slots, cv)


#: reductions whose result is the value itself when every element has it
_IDEMPOTENT = frozenset({"ReduceMean", "ReduceMax", "ReduceMin"})


@register
class Reduce(Rule):
    """Reductions over axes other than the channel axis: pass-through (the axis moves when keepdims=0). A channel
    with a constant value keeps it through mean / max / min, keeps 0 through the zero-preserving ones (sum, L2,
    ...), and nothing else is known (log-sum-exp of zeros is log n, log-sum of zeros is -inf)."""
    ops = ops(family="reduce")

    def propagate(self, g, node):
        got = g.tracked_axes(node, lambda s: [] if node.attrs.get("noop_with_empty_axes", 0) else list(range(len(s))))
        if got is None:
            return
        x, s, axes = got
        if x.axis in axes:
            raise Freeze(f"{node.op} over the channel axis")
        keep = int(node.attrs.get("keepdims", 1))
        oax = x.axis if keep else x.axis - sum(1 for a in axes if a < x.axis)
        if node.op in _IDEMPOTENT:
            cv = x.cval
        elif traits(node.op).zero_preserving:
            cv = _zero_stays_zero(x.cval)
        else:
            cv = np.full(len(x.slots), NAN)
        g.set(node.outputs[0], oax, x.slots, cv)


@register
class Resize(Rule):
    """Resize / Upsample with scale 1 on the channel axis: pass-through; explicit `sizes` lose the removed
    channels."""
    ops = frozenset({"Resize", "Upsample"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        s, so = g.shape(node.inputs[0]), g.shape(node.outputs[0])
        if s is None or so is None or so[x.axis] != s[x.axis]:
            raise Freeze("Resize scales the channel axis")
        if len(node.inputs) > 1 and node.inputs[1].name and g.get(node.inputs[1]) is not None:
            raise Freeze("channels used as a Resize parameter")
        if len(node.inputs) > 3 and node.inputs[3].name:
            if g.const(node.inputs[3]) is None:
                raise Freeze("Resize sizes are not constant")
            g.rewrite(self, {"axis": x.axis, "slots": list(x.slots)})
        cv = x.cval if node.attrs.get("mode", "nearest") == "nearest" else _zero_stays_zero(x.cval)
        g.set(node.outputs[0], x.axis, x.slots, cv)

    def rewrite(self, node, data, edit):
        shrink_shape_input(node, 3, data["axis"], data["slots"], edit)
