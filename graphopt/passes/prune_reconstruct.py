"""prune-channels' compensation of the removed channels (reconstruct=bias or lsq), measured on calibration data.

A removed channel takes its whole contribution to every consumer (sink) with it. In folded-BatchNorm networks much
of that contribution is a constant (a channel with a large mean that downstream layers rely on), which the consumer
can absorb:

* bias: at every sink with a constant weight (Conv, Gemm, MatMul), the removed channels' mean contribution
  W[:, c, tap] * E[x_c at that tap] is folded into the consumer's bias (created where there is none: a Conv's third
  input, a Gemm's C, an Add after a MatMul). The mean is taken per kernel tap over the output positions, so zero
  padding at the borders is accounted for; a grouped conv's output reads only its group's channels. This is the
  least-squares best constant.
* lsq: at 1x1 group-1 Conv, Gemm and MatMul sinks the kept weights are refitted too (He et al. 2017, ThiNet):
  W', b' = argmin E||W x + b - (W' z + b')||^2 + lambda ||W' - W_K||^2, where x is the sink's input in the original
  graph and z its kept channels in the compensated pruned graph on the same inputs, so the refit also absorbs what
  the layers before it lost (consumers are refitted in waves, each after the lsq consumers upstream of it);
  lambda = (RIDGE + |K| / positions) * trace(Cov z) / |K| (strong shrinkage where positions are few, e.g. a Gemm
  after a global pool). Where z equals the original's kept channels this is the regression of the removed
  channels on the kept ones, W' = W_K + W_R Cov_RK (Cov_KK + lambda)^-1. Other sinks, and readers of a weight that
  several nodes share (it stays shared), get the bias only.

Statistics come from the calibration runs: means per tap on the ORIGINAL graph, then for lsq the cross moments
E[x z^T], E[z z^T] (original and compensated graph run on the same inputs, once per wave); a tensor read by several
sinks is fetched once per run and each sink keeps its own statistics (its own window and stride). A consumer whose
own output channels are pruned in the same run keeps the rows it kept. Sinks that are not a plain constant-weight op
(ConvTranspose, an activation x activation MatMul, a Gemm with a non-constant or per-row C) are skipped and named.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import channel_groups as cg
from graphopt import ort
from graphopt.errors import BadInput, CheckFailed
from graphopt.graph import constant_value, copy as copy_graph, to_onnx, toposort
from graphopt.shapes import infer

from .prune_oracle import with_pre_activations
from .prune_removal import Names, Plan, nodes_for

MODES = ("none", "bias", "lsq")
RIDGE = 1e-3        # ridge of the lsq regression, relative to the mean variance of the kept channels


@dataclass
class Consumer:
    """A sink that loses channels, in the form W (O, C/groups, taps) x + bias, with its statistics."""
    sink: cg.Sink
    node: gs.Node               # in the original graph
    weight: np.ndarray          # float64 (O, C/groups, taps): effective weight (a Gemm's alpha included)
    bias: np.ndarray            # float64 (O,): effective bias (a Gemm's beta * C)
    groups: int
    removed: np.ndarray         # bool per input channel
    rows: np.ndarray            # bool per output row: kept by the same plan
    lsq: bool
    n: int = 0                  # positions seen (means)
    tap_sum: np.ndarray | None = None     # (C, taps): sum of x_c at each tap, original graph
    target: gs.Node | None = None         # the node in the compensated graph
    bias_const: gs.Constant | None = None
    bias_base: np.ndarray | float = 0.0   # a bias the compensation adds to (a MatMul's following Add's constant)
    m: int = 0                  # positions seen (lsq)
    z_sum: np.ndarray | None = None       # (K,): sum of the compensated graph's input z (kept channels)
    xz: np.ndarray | None = None          # (C, K): sum of x z^T
    zz: np.ndarray | None = None          # (K, K): sum of z z^T


def _conv_windows(x: np.ndarray, node: gs.Node, kernel: tuple[int, ...]):
    """Per kernel tap, the window (N, C, *out) it reads over the output positions, zero padding included."""
    sp = x.shape[2:]
    nd = len(sp)
    strides = list(node.attrs.get("strides", [1] * nd))
    dil = list(node.attrs.get("dilations", [1] * nd))
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pads = list(node.attrs.get("pads", [0] * (2 * nd)))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for i in range(nd):
            out = -(-sp[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1 - sp[i])
            small = total // 2
            pads[i], pads[i + nd] = (small, total - small) if auto == "SAME_UPPER" else (total - small, small)
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    outs = [(sp[i] + pads[i] + pads[i + nd] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    for tap in itertools.product(*[range(k) for k in kernel]):
        sl = tuple(slice(tap[i] * dil[i], tap[i] * dil[i] + strides[i] * (outs[i] - 1) + 1, strides[i])
                   for i in range(nd))
        yield xp[(slice(None), slice(None)) + sl]


def _effective(node: gs.Node, s: cg.Sink) -> tuple[np.ndarray, np.ndarray, int] | str:
    """(W (O, C/groups, taps), bias (O,), groups) of a sink's node, or why it cannot be compensated."""
    w = constant_value(node.inputs[1]) if s.weight is not None and len(node.inputs) > 1 else None
    if w is None:
        return "no constant weight to fold into (an activation x activation MatMul)"
    w = w.astype(np.float64)
    if node.op == "Conv":
        b = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(w.shape[0])
        if b is None:
            return "Conv bias is not constant"
        return w.reshape(w.shape[0], w.shape[1], -1), b.astype(np.float64).reshape(-1), int(node.attrs.get("group", 1))
    if node.op == "MatMul":
        return w.T[:, :, None], np.zeros(w.shape[1]), 1
    if node.op == "Gemm":
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        if alpha == 0:
            return "Gemm alpha is 0"
        if node.attrs.get("transB", 0):
            w = w.T
        n = w.shape[1]
        c = np.zeros(n)
        if len(node.inputs) > 2 and node.inputs[2].name:
            cv = constant_value(node.inputs[2])
            if cv is None or cv.size not in (1, n) or cv.ndim > 2:
                return "Gemm C is not a constant per-feature bias"
            c = np.broadcast_to(cv.astype(np.float64).reshape(-1), (n,)) * beta
        return alpha * w.T[:, :, None], c, 1
    return f"{node.op} is not a Conv, Gemm or MatMul"


def consumers(original: gs.Graph, plan: Plan, mode: str) -> tuple[list[Consumer], list[dict]]:
    """The sinks that lose channels and can be compensated, and those skipped [{"node", "op", "why"}]."""
    g = plan.groups
    nodes = nodes_for(original, g)
    rows_of = {s.node: plan.keep(s.slots) for s in g.sources}
    out, skipped = [], []
    for s in g.sinks:
        keep = plan.keep(s.slots)
        if keep.all():
            continue
        node = nodes[s.node]
        eff = _effective(node, s) if node.op != "ConvTranspose" else "ConvTranspose (taps overlap per output)"
        if isinstance(eff, str):
            skipped.append({"node": cg.ChannelGroups.label(None, node), "op": node.op, "why": eff})
            continue
        w, b, groups = eff
        rows = rows_of.get(s.node, np.ones(w.shape[0], bool))
        lsq = mode == "lsq" and groups == 1 and w.shape[2] == 1
        out.append(Consumer(s, node, w, b, groups, ~keep, rows, lsq))
    return out, skipped


def _columns(c: Consumer, x: np.ndarray) -> list[np.ndarray]:
    """Per kernel tap, the (channels, positions) matrix of what the consumer reads (one tap for Gemm / MatMul)."""
    if c.node.op == "Conv":
        kernel = tuple(c.node.inputs[1].shape[2:])
        return [np.moveaxis(v, 1, 0).reshape(x.shape[1], -1) for v in _conv_windows(x, c.node, kernel)]
    return [np.moveaxis(x, c.sink.axis, 0).reshape(x.shape[c.sink.axis], -1)]


def _x_name(c: Consumer) -> str:
    return c.node.inputs[c.sink.input].name


def _z_name(c: Consumer) -> str:
    return c.target.inputs[c.sink.input].name


def measure_means(original: gs.Graph, cons: list[Consumer], runs: list[dict]) -> None:
    """Each consumer's per-tap input means on the original graph."""
    for vals in ort.tensor_values(original, sorted({_x_name(c) for c in cons}), runs):
        for c in cons:
            cols = _columns(c, vals[_x_name(c)])
            if c.tap_sum is None:
                c.tap_sum = np.zeros((cols[0].shape[0], len(cols)))
            for t, v in enumerate(cols):
                c.tap_sum[:, t] += v.sum(axis=1)
            c.n += cols[0].shape[1]


def measure_joint(original: gs.Graph, compensated: gs.Graph, cons: list[Consumer], runs: list[dict]) -> None:
    """lsq consumers: cross statistics of the original input x and the compensated graph's input z on the same
    runs."""
    xs = ort.tensor_values(original, sorted({_x_name(c) for c in cons}), runs)
    zs = ort.tensor_values(compensated, sorted({_z_name(c) for c in cons}), runs)
    for xv, zv in zip(xs, zs):
        for c in cons:
            x, = _columns(c, xv[_x_name(c)])
            z, = _columns(c, zv[_z_name(c)])
            if c.zz is None:
                c.z_sum, c.xz, c.zz = np.zeros(len(z)), np.zeros((len(x), len(z))), np.zeros((len(z), len(z)))
            c.z_sum += z.sum(axis=1)
            c.xz += x @ z.T
            c.zz += z @ z.T
            c.m += x.shape[1]


def bias_solution(c: Consumer) -> np.ndarray:
    """The bias (O,) with the removed channels' mean contribution folded in (per tap; per group)."""
    means = c.tap_sum / max(1, c.n)
    G = c.groups
    O, Cg, T = c.weight.shape
    mr = np.where(c.removed[:, None], means, 0.0).reshape(G, Cg, T)
    return c.bias + np.einsum("gojt,gjt->go", c.weight.reshape(G, O // G, Cg, T), mr).reshape(O)


def lsq_solution(c: Consumer) -> tuple[np.ndarray, np.ndarray]:
    """(W' (O, |K|), b' (O,)): ridge least squares of the original output W x + b on the compensated graph's kept
    inputs z; the ridge pulls W' towards the plain slice W_K."""
    m = max(1, c.m)
    mx, mz = c.tap_sum[:, 0] / max(1, c.n), c.z_sum / m
    sxz = c.xz / m - np.outer(mx, mz)
    szz = c.zz / m - np.outer(mz, mz)
    w = c.weight[:, :, 0]
    wk = w[:, ~c.removed]
    lam = (RIDGE + len(szz) / m) * max(float(np.trace(szz)) / max(1, len(szz)), 1e-12)
    d = np.linalg.solve(szz + lam * np.eye(len(szz)), (w @ sxz - wk @ szz).T).T
    wn = wk + d
    return wn, c.bias + w @ mx - wn @ mz


def compensate(original: gs.Graph, pruned: gs.Graph, cons: list[Consumer], runs: list[dict]) -> tuple[gs.Graph, dict]:
    """The compensated copy of the pruned graph, and how many sinks got {"lsq": n, "bias": n}. Every consumer
    first gets the bias; lsq consumers are then refitted on that graph's inputs, in waves from the inputs on. A
    weight that several nodes share stays shared: its readers get the bias only."""
    out = copy_graph(pruned)
    names = Names(out)
    by_output = {t.name: n for n in out.nodes for t in n.outputs}
    readers = {}
    for n in out.nodes:
        for t in n.inputs:
            readers[t.name] = readers.get(t.name, 0) + 1
    for c in cons:
        c.target = by_output[c.node.outputs[0].name]
        c.lsq = c.lsq and readers.get(c.target.inputs[1].name, 0) == 1
        _write_bias(out, c, bias_solution(c)[c.rows], names)
    refit = [c for c in cons if c.lsq]
    toposort(out)
    for level in _levels(out, refit):
        measure_joint(original, out, level, runs)
        for c in level:
            w, b = lsq_solution(c)
            _write_weight(c, w[c.rows], names)
            c.bias_const.values = (b[c.rows] + c.bias_base).reshape(c.bias_const.shape).astype(
                c.bias_const.values.dtype)
    for t in out.tensors().values():
        if isinstance(t, gs.Variable) and t not in out.inputs and t not in out.outputs:
            t.shape = None
    try:
        return infer(out, "compensated graph"), {"lsq": len(refit), "bias": len(cons) - len(refit)}
    except BadInput as e:
        raise CheckFailed(f"prune-channels reconstruct produced a graph that fails shape inference: {e}") from None


def _levels(graph: gs.Graph, refit: list[Consumer]) -> list[list[Consumer]]:
    """The lsq consumers in waves: a consumer comes after every lsq consumer upstream of it, so it is refitted on
    inputs that those refits already corrected (a sorted graph)."""
    target = {id(c.target): c for c in refit}
    depth, waves = {}, {}
    for n in graph.nodes:
        d = max((depth.get(t.name, 0) for t in n.inputs), default=0)
        if id(n) in target:
            waves.setdefault(d, []).append(target[id(n)])
            d += 1
        for t in n.outputs:
            depth[t.name] = d
    return [waves[d] for d in sorted(waves)]


def _write_bias(graph, c: Consumer, b, names) -> None:
    """Give the pruned node the bias b (kept rows): a Conv's third input, a Gemm's C (beta set to 1); after a MatMul
    added to the constant of the Add that alone reads it (a linear layer's bias), else a new Add."""
    node = c.target
    dtype = constant_value(node.inputs[1]).dtype
    c.bias_const = gs.Constant(names((node.name or "node") + "_bias_comp"), b.astype(dtype))
    if node.op == "MatMul":
        add, j = _bias_add(graph, node, len(b))
        if add is not None:
            base = constant_value(add.inputs[j])
            c.bias_base = base.astype(np.float64).reshape(-1)
            c.bias_const.values = (b + c.bias_base).reshape(base.shape).astype(dtype)
            add.inputs[j] = c.bias_const
            return
    if node.op in ("Conv", "Gemm"):
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0
        if len(node.inputs) > 2:
            node.inputs[2] = c.bias_const
        else:
            node.inputs.append(c.bias_const)
        return
    y = node.outputs[0]
    mid = gs.Variable(names(y.name + "_nobias"), dtype=y.dtype)
    node.outputs[0] = mid
    graph.nodes.append(gs.Node("Add", names((node.name or "matmul") + "_bias_comp"), inputs=[mid, c.bias_const],
                               outputs=[y]))


def _bias_add(graph, node, n):
    """(the Add that alone reads node's output with a constant of n values along the last axis, its index), or
    (None, None)."""
    y = node.outputs[0]
    if len(y.outputs) != 1 or y in graph.outputs or y.outputs[0].op != "Add":
        return None, None
    add = y.outputs[0]
    for j, t in enumerate(add.inputs):
        v = constant_value(t) if t is not y else None
        if v is not None and v.size == n and v.ndim >= 1 and v.shape[-1] == n:
            return add, j
    return None, None


def _write_weight(c: Consumer, w, names) -> None:
    """Give the pruned node the refitted weight w (kept rows x kept columns, effective form) in its own layout."""
    node = c.target
    wt = node.inputs[1]
    dtype = constant_value(wt).dtype
    if node.op == "Conv":
        v = w.reshape(wt.shape)
    elif node.op == "Gemm":
        v = w / float(node.attrs.get("alpha", 1.0))
        v = v if node.attrs.get("transB", 0) else v.T
    else:
        v = w.T
    node.inputs[1] = gs.Constant(names(wt.name + "_lsq"), np.ascontiguousarray(v).astype(dtype))


def output_errors(original: gs.Graph, candidates: list[gs.Graph], runs: list[dict]) -> list[float]:
    """Per candidate, the relative RMS error of its outputs (and the inputs of saturating output ops) against the
    original's, averaged over those tensors, on the runs (onnxruntime; the original runs once for all)."""
    pairs = [with_pre_activations(original, c) for c in candidates]
    wanted = [[t.name for t in a.outputs] for a, _ in pairs]          # the original's tensors each one is held to
    sessions = [(ort.session(to_onnx(b)), [t.name for t in b.outputs], {t.name for t in b.inputs}) for _, b in pairs]
    diff = [np.zeros(len(w)) for w in wanted]
    ref = [np.zeros(len(w)) for w in wanted]
    union = sorted({n for w in wanted for n in w})
    for feeds, ya in zip(runs, ort.tensor_values(original, union, runs)):
        for c, (sess, outs, keep) in enumerate(sessions):
            yb = sess.run(outs, {k: v for k, v in feeds.items() if k in keep})
            for i, (name, v) in enumerate(zip(wanted[c], yb)):
                diff[c][i] += float(np.sum((ya[name] - v.astype(np.float64)) ** 2))
                ref[c][i] += float(np.sum(ya[name] ** 2))
    return [float(np.mean(np.sqrt(d / np.maximum(r, 1e-30)))) for d, r in zip(diff, ref)]


def reconstruct(original: gs.Graph, plan: Plan, pruned: gs.Graph, runs: list[dict], check_runs: list[dict],
                mode: str) -> tuple[gs.Graph, dict]:
    """Compensate the pruned graph for its removed channels (statistics on `runs`), keep the result only where it
    brings the outputs closer to the original's on `check_runs`. Returns (graph, the report's "reconstruct")."""
    cons, skipped = consumers(original, plan, mode)
    info = {"mode": mode, "sinks": {"lsq": 0, "bias": 0}, "skipped": skipped[:20], "skipped_count": len(skipped),
            "samples": len(runs), "check_samples": len(check_runs)}
    if not cons:
        info["note"] = "no sink to compensate"
        return pruned, info
    measure_means(original, cons, runs)
    fixed, info["sinks"] = compensate(original, pruned, cons, runs)
    before, after = output_errors(original, [pruned, fixed], check_runs)
    info["output_error_before"] = round(before, 6)
    info["output_error_after"] = round(after, 6)
    if not after <= before or not math.isfinite(after):
        info["kept"] = "uncompensated"
        info["note"] = (f"compensation raised the output error ({before:.4g} -> {after:.4g}): the uncompensated "
                        f"graph is kept")
        return pruned, info
    info["kept"] = "compensated"
    return fixed, info
