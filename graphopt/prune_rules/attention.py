"""Attention: MatMul of two activations (scores = Q x K^T, context = P x V). Batch axes couple (the heads of Q, K
and V are one unit with the Reshape that splits them, see layout.py), the contracted axis is a weightless sink
whose two sides are coupled, the M / N axes pass through."""
from __future__ import annotations

import numpy as np

from graphopt.prune_rules import NAN, Rule, register


@register
class MatMulActivations(Rule):
    """MatMul without a constant weight (an activation x activation product; anything else is refused by name)."""
    ops = frozenset({"MatMul"})

    def claims(self, g, node):
        return not (len(node.inputs) == 2 and g.const(node.inputs[1]) is not None and g.const(node.inputs[0]) is None)

    def propagate(self, g, node):
        a, b = node.inputs
        sa, sb, so = g.shape(a), g.shape(b), g.shape(node.outputs[0])
        ain, bin_ = g.get(a), g.get(b)
        y = node.outputs[0]
        if sa is None or sb is None or so is None:
            g.unknown(node, f"{g.label(node)} has unknown shapes")
            return
        if g.const(a) is not None or len(sa) < 2 or len(sb) < 2:
            g.unknown(node, f"{g.label(node)} is not an activation x weight or activation x activation MatMul")
            return
        ra, rb, ro = len(sa), len(sb), len(so)
        factors = []
        # contraction
        ka = ain is not None and ain.axis == ra - 1
        kb = bin_ is not None and bin_.axis == rb - 2
        if ka and kb:
            g.union_lists(ain.slots, bin_.slots)
            g.sink(g.cur, 0, ain, ra - 1)
            g.sink(g.cur, 1, bin_, rb - 2)
            factors.append(list(ain.slots))
        elif ka or kb:
            c = ain if ka else bin_
            g.freeze(c.slots, f"{g.label(node)} contracts channels with an operand without channel information")
        # pass-through axes
        outs = []
        if ain is not None and not ka:
            ax = ain.axis
            oax = ro - 2 if ax == ra - 2 else ax + (ro - ra)
            outs.append(("a", oax, ain))
        if bin_ is not None and not kb:
            ax = bin_.axis
            oax = ro - 1 if ax == rb - 1 else ax + (ro - rb)
            outs.append(("b", oax, bin_))
        if not outs:
            if factors:
                g.mac_factors[g.cur] = factors
            return
        axes = {o[1] for o in outs}
        if len(axes) > 1:
            for _, _, c in outs:
                g.freeze(c.slots, f"{g.label(node)} would carry channels on two axes")
            return
        oax = outs[0][1]
        if len(outs) == 2:
            ca, cb = outs[0][2], outs[1][2]
            if len(ca.slots) != len(cb.slots):
                g.freeze(ca.slots + cb.slots, f"{g.label(node)} broadcasts a channel axis")
                return
            g.union_lists(ca.slots, cb.slots)
            cv = np.where((ca.cval == 0) | (cb.cval == 0), 0.0, NAN)
            slots = ca.slots
        else:
            side, _, c = outs[0]
            # the other operand must not need the same channels (a batch axis of size > 1 without slots)
            if oax < ro - 2:
                other_shape, other_rank = (sb, rb) if side == "a" else (sa, ra)
                oth = oax - (ro - other_rank)
                if oth >= 0 and other_shape[oth] > 1:
                    g.freeze(c.slots, f"{g.label(node)} pairs the channels with an operand without channel "
                                         f"information")
                    return
            slots = c.slots
            cv = np.where(c.cval == 0, 0.0, NAN)
        factors.append(list(slots))
        g.mac_factors[g.cur] = factors
        g.set(y, oax, slots, cv)

    # ---- per-channel ops
