"""Weighted layers: Conv / ConvTranspose, Gemm, MatMul with a constant weight. Their output channels are new
units (sources: weight rows / columns and bias sliced); their input channels are sinks (the weight's input-channel
slice is removed). Grouped convs keep every group the same size (channel j of every group is one unit); depthwise
convs pass channels through and get `group` rewritten."""
from __future__ import annotations

import numpy as np

from graphopt.prune_rules import NAN, Rule, register


@register
class Conv(Rule):
    """Conv / ConvTranspose with constant weight (and bias)."""
    ops = frozenset({"Conv", "ConvTranspose"})

    def propagate(self, g, node):
        transpose = node.op == "ConvTranspose"
        x = node.inputs[0]
        W = g.const(node.inputs[1]) if len(node.inputs) > 1 else None
        B = None
        has_b = len(node.inputs) > 2 and node.inputs[2].name
        if has_b:
            B = g.const(node.inputs[2])
        xin = g.get(x)
        if W is None or (has_b and B is None):
            if xin is not None:
                g.freeze(xin.slots, f"{'weight' if W is None else 'bias'} of {g.label(node)} is not constant")
            return
        G = int(node.attrs.get("group", 1))
        if transpose:
            cin, cout_g = W.shape[0], W.shape[1]
            cin_g, cout = cin // G, cout_g * G
        else:
            cout, cin_g = W.shape[0], W.shape[1]
            cin, cout_g = cin_g * G, cout // G
        y = node.outputs[0]
        out_w_axis = 1 if transpose else 0
        in_w_axis = 0 if transpose else 1
        xc = xin.cval if (xin is not None and xin.axis == 1 and len(xin.slots) == cin) else np.full(cin, NAN)
        bias = B.astype(np.float64).reshape(-1) if B is not None else np.zeros(cout)
        if G > 1 and cin_g == 1:     # depthwise (with multiplier m): channels pass through
            m = cout // G
            if xin is None or xin.axis != 1 or len(xin.slots) != cin:
                if xin is not None:
                    g.freeze(xin.slots, f"depthwise {g.label(node)} reads channels on axis {xin.axis}")
                slots = g.fresh(cout)
                g.freeze(slots, f"depthwise {g.label(node)} reads an input without prunable channels")
                g.set(y, 1, slots)
                return
            slots = [xin.slots[o // m] for o in range(cout)]
            Wf = W.reshape(W.shape[0] if not transpose else cin, -1)
            if transpose:      # W (cin, m, k..): output channel o = i*m + j
                zero_w = ~np.any(W.reshape(cout, -1) != 0, axis=1)
                g.param(1, 0, xin.slots, "weight_out")
            else:
                zero_w = ~np.any(Wf != 0, axis=1)
                g.param(1, 0, slots, "weight_out")
            if has_b:
                g.param(2, 0, slots, "bias")
            g.rewrite(self, {"slots": list(xin.slots)})
            g.mac_factors[g.cur] = [slots]
            xo = np.array([xc[o // m] for o in range(cout)])
            cv = np.where(zero_w | (xo == 0), bias, NAN)
            g.set(y, 1, slots, cv)
            g.source(slots, None)
            return
        factors = []
        # input side: a sink
        if xin is not None:
            if xin.axis != 1 or len(xin.slots) != cin:
                g.freeze(xin.slots, f"{g.label(node)} reads channels on axis {xin.axis}")
                xc = np.full(cin, NAN)
            else:
                for j in range(cin_g):
                    for k in range(1, G):
                        g.uf.union(xin.slots[j], xin.slots[k * cin_g + j])
                g.sink(g.cur, 0, xin, 1, (1, in_w_axis), rank=W.ndim)
                g.param(1, in_w_axis, xin.slots if transpose else xin.slots[:cin_g], "weight_in")
                factors.append(list(xin.slots))
        out = g.fresh(cout)
        for j in range(cout_g):
            for k in range(1, G):
                g.uf.union(out[j], out[k * cout_g + j])
        g.param(1, out_w_axis, out[:cout_g] if transpose else out, "weight_out")
        if has_b:
            g.param(2, 0, out, "bias")
        factors.append(out)
        g.mac_factors[g.cur] = factors
        g.source(out, (1, out_w_axis))
        # provable values: out channel o is its bias when every input channel it reads has zero weight or is 0
        if transpose:      # W (cin, cout_g, k..) -> live[o, j]: input j of o's group reaches output o
            lv = np.any(W.reshape(G, cin_g, cout_g, -1) != 0, axis=3).transpose(0, 2, 1).reshape(cout, cin_g)
        else:
            lv = np.any(W.reshape(cout, cin_g, -1) != 0, axis=2)
        xs = (xc.reshape(G, cin_g) == 0)[np.arange(cout) // cout_g]
        cv = np.where(~np.any(lv & ~xs, axis=1), bias, NAN)
        g.set(y, 1, out, cv)

    def rewrite(self, node, data, edit):
        k = edit.keep(data["slots"])
        if not k.all():
            node.attrs["group"] = int(k.sum())


@register
class Gemm(Rule):
    """Gemm with a constant weight; a bias that is an activation is coupled to the output features."""
    ops = frozenset({"Gemm"})

    def propagate(self, g, node):
        a, b = node.inputs[0], node.inputs[1]
        Bv = g.const(b)
        ain = g.get(a)
        y = node.outputs[0]
        if Bv is None or g.const(a) is not None:
            g.unknown(node, f"{g.label(node)} has no constant weight")
            return
        ta, tb = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
        K, N = (Bv.shape[1], Bv.shape[0]) if tb else Bv.shape
        kax = 0 if ta else 1
        factors = []
        xc = np.full(K, NAN)
        if ain is not None:
            if ain.axis != kax or len(ain.slots) != K:
                g.freeze(ain.slots, f"{g.label(node)} reads channels on a non-contracted axis")
            else:
                g.sink(g.cur, 0, ain, kax, (1, 1 if tb else 0), rank=2)
                g.param(1, 1 if tb else 0, ain.slots, "weight_in")
                factors.append(list(ain.slots))
                xc = ain.cval
        out = g.fresh(N)
        g.param(1, 0 if tb else 1, out, "weight_out")
        factors.append(out)
        g.mac_factors[g.cur] = factors
        g.source(out, (1, 0 if tb else 1))
        beta = float(node.attrs.get("beta", 1.0))
        bias = np.zeros(N)
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = node.inputs[2]
            Cv = g.const(c)
            cin = g.get(c)
            if Cv is None:
                shp = g.shape(c)
                if cin is not None and cin.axis == len(shp) - 1 and len(cin.slots) == N:
                    g.union_lists(cin.slots, out)
                    bias = np.full(N, NAN)
                elif shp is not None and (len(shp) == 0 or shp[-1] == 1):
                    if cin is not None:
                        g.freeze(cin.slots, f"bias of {g.label(node)} is broadcast")
                    bias = np.full(N, NAN)
                else:
                    g.freeze(out, f"bias of {g.label(node)} is not constant")
                    bias = np.full(N, NAN)
            else:
                Cv64 = Cv.astype(np.float64)
                if Cv.ndim >= 1 and Cv.shape[-1] == N and N > 1:
                    g.param(2, Cv.ndim - 1, out, "bias")
                    rows = Cv64.reshape(-1, N)
                    bias = np.where(np.all(rows == rows[:1], axis=0), beta * rows[0], NAN)
                else:
                    bias = np.full(N, beta * float(Cv64.reshape(-1)[0])) if Cv64.size == 1 else np.full(N, NAN)
        Bk = Bv.T if tb else Bv     # (K, N)
        live = Bk != 0
        dead_in = (xc == 0)[:, None]
        cv = np.where(~np.any(live & ~dead_in, axis=0), bias, NAN)
        g.set(y, 1, out, cv)


@register
class MatMulWeight(Rule):
    """MatMul of an activation and a constant 2-D weight: a linear layer."""
    ops = frozenset({"MatMul"})

    def claims(self, g, node):
        return len(node.inputs) == 2 and g.const(node.inputs[1]) is not None and g.const(node.inputs[0]) is None

    def propagate(self, g, node):
        a, b = node.inputs
        Bv = g.const(b)
        sa, so = g.shape(a), g.shape(node.outputs[0])
        ain = g.get(a)
        y = node.outputs[0]
        if sa is None or g.shape(b) is None or so is None:
            g.unknown(node, f"{g.label(node)} has unknown shapes")
            return
        if Bv.ndim != 2 or len(sa) < 1:
            g.unknown(node, f"{g.label(node)} has a batched constant weight")
            return
        K, N = Bv.shape
        ra = len(sa)
        factors = []
        xc = np.full(K, NAN)
        if ain is not None:
            if ain.axis != ra - 1:
                g.freeze(ain.slots, f"{g.label(node)} reads channels on a non-contracted axis")
            else:
                g.sink(g.cur, 0, ain, ra - 1, (1, 0))
                g.param(1, 0, ain.slots, "weight_in")
                factors.append(list(ain.slots))
                xc = ain.cval
        out = g.fresh(N)
        g.param(1, 1, out, "weight_out")
        factors.append(out)
        g.mac_factors[g.cur] = factors
        g.source(out, (1, 1))
        live = Bv != 0
        cv = np.where(~np.any(live & ~(xc == 0)[:, None], axis=0), 0.0, NAN)
        g.set(y, len(so) - 1, out, cv)
