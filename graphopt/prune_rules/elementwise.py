"""Activations and other unary ops, and elementwise ops with broadcasting: channels pass through; the operands'
channel axes are aligned from the right and united; constant operands with the full channel size are sliced."""
from __future__ import annotations

import math

import numpy as np

from graphopt.op_traits import ops
from graphopt.prune_rules import NAN, Freeze, Rule, register


def _relu(x, n):
    return np.maximum(x, 0.0)


def _leaky(x, n):
    a = float(n.attrs.get("alpha", 0.01))
    return np.where(x < 0, a * x, x)


def _hsig(x, n):
    return np.clip(float(n.attrs.get("alpha", 0.2)) * x + float(n.attrs.get("beta", 0.5)), 0.0, 1.0)


def _erf(x):
    return np.vectorize(lambda v: math.erf(v) if np.isfinite(v) else NAN, otypes=[np.float64])(x) if x.size else x


#: the value a unary op's output channel provably has, from its input's (ops op_traits lists as family "unary" and
#: that are not here get NaN: unknown, or computed in _unary)
UNARY_VALUES = {
    "Relu": _relu, "LeakyRelu": _leaky,
    "Sigmoid": lambda x, n: 1.0 / (1.0 + np.exp(-x)),
    "HardSigmoid": _hsig,
    "HardSwish": lambda x, n: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Tanh": lambda x, n: np.tanh(x),
    "Erf": lambda x, n: _erf(x),
    "Gelu": lambda x, n: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "Elu": lambda x, n: np.where(x < 0, float(n.attrs.get("alpha", 1.0)) * (np.exp(x) - 1.0), x),
    "Selu": lambda x, n: float(n.attrs.get("gamma", 1.0507)) * np.where(
        x <= 0, float(n.attrs.get("alpha", 1.67326)) * (np.exp(x) - 1.0), x),
    "Celu": lambda x, n: np.maximum(x, 0) + np.minimum(0, float(n.attrs.get("alpha", 1.0)) * (
        np.exp(x / float(n.attrs.get("alpha", 1.0))) - 1.0)),
    "Softplus": lambda x, n: np.log1p(np.exp(x)),
    "Softsign": lambda x, n: x / (1.0 + np.abs(x)),
    "Mish": lambda x, n: x * np.tanh(np.log1p(np.exp(x))),
    "ThresholdedRelu": lambda x, n: np.where(x > float(n.attrs.get("alpha", 1.0)), x, 0.0),
    "Exp": lambda x, n: np.exp(x), "Abs": lambda x, n: np.abs(x), "Neg": lambda x, n: -x,
    "Floor": lambda x, n: np.floor(x), "Ceil": lambda x, n: np.ceil(x),
    "Round": lambda x, n: np.round(x), "Sign": lambda x, n: np.sign(x), "Sin": lambda x, n: np.sin(x),
    "Cos": lambda x, n: np.cos(x), "Identity": lambda x, n: x, "Dropout": lambda x, n: x,
}


@register
class Unary(Rule):
    """Activations, Cast, Identity, Dropout, Clip: pass-through; the channel's provable value goes through the
    function (UNARY_VALUES)."""
    ops = ops(family="unary")

    def propagate(self, g, node):
        x = g.get(node.inputs[0]) if node.inputs else None
        if x is None:
            return
        for t in node.inputs[1:]:
            if t.name and g.get(t) is not None:
                raise Freeze("a channel tensor used as a bound")
            if t.name and g.const(t) is None:
                raise Freeze("a non-constant bound")
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            raise Freeze("Dropout mask is used")
        fn = UNARY_VALUES.get(node.op)
        cv = np.full(len(x.slots), NAN)
        with np.errstate(all="ignore"):
            if fn is not None:
                cv = fn(x.cval, node)
            elif node.op == "Clip":
                lo = g.const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
                hi = g.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
                lo = float(lo) if lo is not None else float(node.attrs.get("min", -np.inf))
                hi = float(hi) if hi is not None else float(node.attrs.get("max", np.inf))
                cv = np.clip(x.cval, lo, hi)
            elif node.op == "Cast":
                cv = x.cval
        g.set(node.outputs[0], x.axis, x.slots, np.asarray(cv, dtype=np.float64))


@register
class Elementwise(Rule):
    """Add, Mul, ... with broadcasting: the channel axes of all operands are aligned from the right and their slots
    united (a residual Add couples its summands; an SE gate's Mul the gate and the features). Constant operands with
    the full channel size (biases, layer scale, position embedding) are sliced. A non-constant operand without
    channel information that is not broadcast along the channel axis freezes."""
    ops = ops(family="elementwise")

    def propagate(self, g, node):
        out = node.outputs[0]
        so = g.shape(out)
        ins = [t for t in node.inputs]
        tracked = [(i, g.get(t)) for i, t in enumerate(ins) if g.get(t) is not None]
        if not tracked:
            return
        if so is None:
            raise Freeze("unknown shape")
        ro = len(so)
        axes = set()
        for i, c in tracked:
            r = len(g.shape(ins[i]))
            axes.add(c.axis + ro - r)
        if len(axes) != 1:
            raise Freeze("operands carry channels on different axes")
        oax = axes.pop()
        C = so[oax]
        full = [(i, c) for i, c in tracked if len(c.slots) == C]
        if not full:
            raise Freeze("channels broadcast against a larger axis")
        slots = full[0][1].slots
        for i, c in full[1:]:
            g.union_lists(slots, c.slots)
        # per-channel value of each operand (NaN unknown)
        vals = []
        for i, t in enumerate(ins):
            c = g.get(t)
            if c is not None:
                vals.append(c.cval if len(c.cval) == C else np.full(C, c.cval[0]))
                continue
            s = g.known_shape(t)
            r = len(s)
            pax = oax - (ro - r)
            size = s[pax] if 0 <= pax < r else 1
            v = g.const(t)
            if size != 1:
                if v is None:
                    raise Freeze("an operand without channel information is not broadcast along the channel axis")
                g.param(i, pax, slots, "data")
            if v is None:
                vals.append(np.full(C, NAN))
                continue
            v = v.astype(np.float64)
            if v.size == 1:
                vals.append(np.full(C, float(v.reshape(-1)[0])))
            else:          # the operand's value per channel when it is constant along every other axis
                vr = v.reshape((1,) * (ro - r) + v.shape)
                vv = np.moveaxis(vr, oax, 0).reshape(vr.shape[oax], -1)
                per = np.where(np.all(vv == vv[:, :1], axis=1), vv[:, 0], NAN)
                vals.append(per if len(per) == C else np.full(C, per[0]))
        cv = _value(node, vals, C)
        g.set(out, oax, slots, cv)


def _value(node, vals, C):
    """The output channel's provable value from the operands' (NaN: unknown)."""
    op = node.op
    with np.errstate(all="ignore"):
        if op == "Mul":
            r = vals[0].copy()
            for v in vals[1:]:
                r = r * v
            anyzero = np.any([v == 0 for v in vals], axis=0)
            return np.where(anyzero, 0.0, r)
        if op in ("Add", "Sum"):
            return np.sum(vals, axis=0)
        if op == "Mean":
            return np.mean(vals, axis=0)
        if op == "Sub":
            return vals[0] - vals[1]
        if op == "Div":
            ok = ~np.isnan(vals[1]) & (vals[1] != 0)
            return np.where(ok, vals[0] / np.where(ok, vals[1], 1.0), NAN)
        if op == "Max":
            return np.max(vals, axis=0)
        if op == "Min":
            return np.min(vals, axis=0)
        if op == "PRelu":
            return np.where(vals[0] < 0, vals[0] * vals[1], vals[0])
        if op == "Pow":
            return np.where(vals[1] > 0, np.power(vals[0], vals[1]), NAN)
    return np.full(C, NAN)
