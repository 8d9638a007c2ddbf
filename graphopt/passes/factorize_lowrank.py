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
"""
from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analyses import node_macs
from graphopt.errors import BadInput, CheckFailed
from graphopt.graph import np_dtype, toposort
from graphopt.hardware import GENERIC
from graphopt.passmanager import Option, Pass, PassResult, register
from graphopt.text_table import table

OPS = ("gemm", "matmul", "conv")
MARK = "/lowrank_"
_MARK_RE = re.compile(re.escape(MARK) + r"(in|core|out)$")
EVB_TAU = 2.5129          # tau_lower / sqrt(alpha) of EVBMF (Nakajima et al. 2013)


# ----------------------------------------------------------------------------------------------------------------
# EVBMF
# ----------------------------------------------------------------------------------------------------------------

def evbmf(Y: np.ndarray) -> tuple[int, float]:
    """Analytic empirical VBMF (Nakajima et al. 2013) of Y = B A^T + E, E ~ N(0, sigma^2): the number of components
    it keeps and the estimated noise variance sigma^2 (minimizer of the EVB free energy over its analytic bounds)."""
    Y = np.asarray(Y, dtype=np.float64)
    return evbmf_spectrum(np.linalg.svd(Y, compute_uv=False), *Y.shape)


def evbmf_spectrum(s: np.ndarray, L: int, M: int) -> tuple[int, float]:
    """evbmf() of an L x M matrix given its min(L, M) singular values."""
    L, M = min(L, M), max(L, M)
    s = np.asarray(s, dtype=np.float64)[:L]
    s2 = s ** 2
    total = float(s2.sum())
    if L < 2 or total <= 0.0:
        return (1 if total > 0 else 0), 0.0
    alpha = L / M
    tau_l = EVB_TAU * math.sqrt(alpha)
    x_l = (1 + tau_l) * (1 + alpha / tau_l)        # threshold on x = gamma^2 / (M sigma^2)
    h = min(math.ceil(L / (1 + alpha)) - 1, L - 1)  # at most h components can be positive
    upper = total / (L * M)
    lower = min(max(s2[h] / (M * x_l), float(np.mean(s2[h:])) / M), upper)

    def free_energy(sig2: float) -> float:
        # 2F up to constants: sum_h psi0(x_h) + [x_h > x_l] psi1(x_h), with the sigma-independent -log(gamma_h^2/M)
        # of psi0 = x - log x dropped (it is the same on both sides of the threshold).
        x = s2 / (M * sig2)
        z = x[x > x_l]
        tau = 0.5 * (z - (1 + alpha) + np.sqrt(np.maximum((z - (1 + alpha)) ** 2 - 4 * alpha, 0.0)))
        return L * math.log(sig2) + float(x.sum()) + float(np.sum(np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau))

    if upper > lower > 0:
        grid = np.geomspace(lower, upper, 200)
        vals = [free_energy(g) for g in grid]
        i = int(np.argmin(vals))
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        phi = (math.sqrt(5) - 1) / 2
        for _ in range(60):                        # golden section inside the best grid bracket
            c, d = b - phi * (b - a), a + phi * (b - a)
            if free_energy(c) < free_energy(d):
                b = d
            else:
                a = c
        sig2 = (a + b) / 2
        if free_energy(sig2) > vals[i]:
            sig2 = float(grid[i])
    else:
        sig2 = upper
    threshold = math.sqrt(M * sig2 * x_l)
    return int(np.sum(s > threshold)), float(sig2)


# ----------------------------------------------------------------------------------------------------------------
# candidate layers
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Layer:
    node: gs.Node
    kind: str                  # "svd" (Gemm / MatMul / pointwise Conv) or "tucker2" (Conv k x k)
    W: np.ndarray              # float64. svd: (K, N) with y = x @ W. tucker2: (N, C, *k)
    macs: int                  # of the original node
    params: int                # weight elements of the original node
    rows: int = 0              # svd: output positions (MACs = rows * K * N)
    in_pos: int = 0            # tucker2: input positions (the first 1x1 runs there) and output positions
    out_pos: int = 0
    # spectra / bases, filled by analyze()
    s: np.ndarray | None = None
    U: np.ndarray | None = None
    Vt: np.ndarray | None = None
    U_out: np.ndarray | None = None
    U_in: np.ndarray | None = None
    s_out: np.ndarray | None = None
    s_in: np.ndarray | None = None
    core_energy: np.ndarray | None = None   # tucker2: cumulative energy of the HOSVD core, [r2, r1] (1-based)
    total: float = 0.0
    extra: dict = field(default_factory=dict)

    # geometry ---------------------------------------------------------------------------------------------------
    @property
    def K(self):
        return self.W.shape[0]

    @property
    def N(self):
        return self.W.shape[1] if self.kind == "svd" else self.W.shape[0]

    @property
    def C(self):
        return self.W.shape[1]

    @property
    def ks(self):
        return int(np.prod(self.W.shape[2:])) if self.W.ndim > 2 else 1

    def full_ranks(self) -> tuple[int, ...]:
        if self.kind == "svd":
            return (min(self.W.shape),)
        return (min(self.C, self.N * self.ks), min(self.N, self.C * self.ks))   # (R1 in, R2 out)

    def cost(self, cfg, always: bool) -> tuple[int, int]:
        """(MACs, params) of the factorized layer. svd cfg: (r,); tucker2 cfg: (r1, r2)."""
        if self.kind == "svd":
            (r,) = cfg
            return self.rows * r * (self.K + self.N), r * (self.K + self.N)
        r1, r2 = cfg
        p_in, p_out = always or r1 < self.C, always or r2 < self.N
        c1, c2 = (r1 if p_in else self.C), (r2 if p_out else self.N)
        macs = self.out_pos * c1 * c2 * self.ks
        params = c1 * c2 * self.ks
        if p_in:
            macs += self.in_pos * self.C * r1
            params += self.C * r1
        if p_out:
            macs += self.out_pos * r2 * self.N
            params += r2 * self.N
        return macs, params

    def err2(self, cfg) -> float:
        """Relative squared reconstruction error of the (HOSVD-)truncated factorization."""
        if self.total <= 0:
            return 0.0
        if self.kind == "svd":
            (r,) = cfg
            kept = float(np.sum(self.s[:r] ** 2))
        else:
            r1, r2 = cfg
            r1, r2 = min(r1, self.core_energy.shape[1] - 1), min(r2, self.core_energy.shape[0] - 1)
            kept = float(self.core_energy[r2, r1])
        return max(0.0, 1.0 - kept / self.total)


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


def _analyze(lay: Layer) -> None:
    W = lay.W
    lay.total = float(np.sum(W ** 2))
    if lay.kind == "svd":
        lay.U, lay.s, lay.Vt = np.linalg.svd(W, full_matrices=False)
        return
    N, C = W.shape[:2]
    lay.U_out, lay.s_out, _ = np.linalg.svd(W.reshape(N, -1), full_matrices=False)
    lay.U_in, lay.s_in, _ = np.linalg.svd(np.moveaxis(W, 1, 0).reshape(C, -1), full_matrices=False)
    G = np.einsum("nc...,nr,cs->rs...", W, lay.U_out, lay.U_in, optimize=True)   # full HOSVD core
    G2 = np.sum(G.reshape(G.shape[0], G.shape[1], -1) ** 2, axis=2)
    cum = np.zeros((G2.shape[0] + 1, G2.shape[1] + 1))
    cum[1:, 1:] = G2.cumsum(0).cumsum(1)
    lay.core_energy = cum


# ----------------------------------------------------------------------------------------------------------------
# rank selection helpers
# ----------------------------------------------------------------------------------------------------------------

def _energy_rank(s: np.ndarray, energy: float) -> int:
    if energy >= 1.0:
        return len(s)
    e = np.cumsum(s.astype(np.float64) ** 2)
    if e[-1] <= 0:
        return 1
    return int(min(len(s), np.searchsorted(e, energy * e[-1] * (1 - 1e-12)) + 1))


def _round_up(r: int, full: int, rt: int) -> int:
    return int(min(full, max(1, math.ceil(max(r, 1) / rt) * rt)))


def _grid(full: int, rt: int) -> list[int]:
    return sorted(set(list(range(rt, full, rt)) + [full]))


def _lower_hull(points: list[tuple[float, float, object]]) -> list[tuple[float, float, object]]:
    """Lower convex hull of (cost, err, cfg) points, by increasing cost."""
    pts = sorted(points, key=lambda p: (p[0], p[1]))
    hull: list = []
    for p in pts:
        if hull and hull[-1][0] == p[0]:
            continue                                  # same cost, larger error: dominated
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


# ----------------------------------------------------------------------------------------------------------------
# factor construction and graph rewriting
# ----------------------------------------------------------------------------------------------------------------

def _svd_factors(lay: Layer, r: int):
    rs = np.sqrt(lay.s[:r])
    P = lay.U[:, :r] * rs[None, :]           # K x r
    Q = rs[:, None] * lay.Vt[:r]             # r x N
    err = np.linalg.norm(lay.W - P @ Q) / math.sqrt(lay.total) if lay.total > 0 else 0.0
    return P, Q, float(err)


def _tucker_factors(lay: Layer, r1: int, r2: int, always: bool, iters: int):
    W = lay.W
    N, C = W.shape[:2]
    p_in, p_out = always or r1 < C, always or r2 < N
    r1 = min(r1, lay.U_in.shape[1]) if p_in else C
    r2 = min(r2, lay.U_out.shape[1]) if p_out else N
    U_in = lay.U_in[:, :r1] if p_in else None
    U_out = lay.U_out[:, :r2] if p_out else None
    if p_in and p_out:
        for _ in range(iters):                                       # HOOI sweeps
            Y = np.einsum("nc...,cs->ns...", W, U_in).reshape(N, -1)
            U_out = np.linalg.svd(Y, full_matrices=False)[0][:, :r2]
            Z = np.einsum("nc...,nr->cr...", W, U_out).reshape(C, -1)
            U_in = np.linalg.svd(Z, full_matrices=False)[0][:, :r1]
    core = W
    if p_out:
        core = np.einsum("nc...,nr->rc...", core, U_out)
    if p_in:
        core = np.einsum("rc...,cs->rs...", core, U_in)
    W_hat = core
    if p_in:
        W_hat = np.einsum("rs...,cs->rc...", W_hat, U_in)
    if p_out:
        W_hat = np.einsum("rc...,nr->nc...", W_hat, U_out)
    err = np.linalg.norm(W - W_hat) / math.sqrt(lay.total) if lay.total > 0 else 0.0
    return U_in, core, U_out, float(err), (r1, r2), (p_in, p_out)


class _Names:
    def __init__(self, graph: gs.Graph):
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _with_channels(shape, c):
    if shape is None or len(shape) < 2:
        return None
    return [shape[0], c] + list(shape[2:])


def _rewrite(graph: gs.Graph, lay: Layer, nodes_spec: list, names: _Names) -> None:
    """Replace lay.node by a chain. nodes_spec: [(suffix, op, inputs, attrs, out_shape)] in order; an input given
    as None is the previous node's output; the last node writes the original output tensor (names are kept)."""
    node = lay.node
    base = node.name or f"{node.op}_{node.outputs[0].name}"
    out = node.outputs[0]
    dtype = np_dtype(out) if out.dtype is not None else np.dtype(np.float32)
    prev, new_nodes = None, []
    for k, (suffix, op, inputs, attrs, shape) in enumerate(nodes_spec):
        ins = [prev if t is None else t for t in inputs]
        if k == len(nodes_spec) - 1:
            o = out
        else:
            o = gs.Variable(names(f"{base}{MARK}{suffix}_out"), dtype=dtype, shape=shape)
        new_nodes.append(gs.Node(op, names(f"{base}{MARK}{suffix}"), attrs=attrs, inputs=ins, outputs=[o]))
        prev = o
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.extend(new_nodes)


def _const_t(names: _Names, base: str, value: np.ndarray, dtype) -> gs.Constant:
    return gs.Constant(names(base), np.ascontiguousarray(value.astype(dtype)))


def _apply_svd(graph, lay: Layer, P: np.ndarray, Q: np.ndarray, shapes: dict, names: _Names) -> None:
    node = lay.node
    base = node.name or f"{node.op}_{node.outputs[0].name}"
    r = P.shape[1]
    if node.op == "Gemm":
        B = node.inputs[1]
        dt = B.values.dtype
        tB = int(node.attrs.get("transB", 0))
        tA = int(node.attrs.get("transA", 0))
        a_shape = shapes.get(node.inputs[0].name)
        m = (a_shape[1] if tA else a_shape[0]) if a_shape is not None and len(a_shape) == 2 else None
        w1 = _const_t(names, f"{base}{MARK}in.weight", P.T if tB else P, dt)
        w2 = _const_t(names, f"{base}{MARK}out.weight", Q.T if tB else Q, dt)
        a1 = {"transA": tA, "transB": tB} if tA else {"transB": tB}
        a2 = {"transB": tB}
        ins2 = [None, w2]
        if len(node.inputs) > 2 and node.inputs[2].name:
            ins2.append(node.inputs[2])
            a2["beta"] = float(node.attrs.get("beta", 1.0))
        spec = [("in", "Gemm", [node.inputs[0], w1], a1, [m, r]), ("out", "Gemm", ins2, a2, None)]
    elif node.op == "MatMul":
        dt = node.inputs[1].values.dtype
        a_shape = shapes.get(node.inputs[0].name)
        w1 = _const_t(names, f"{base}{MARK}in.weight", P, dt)
        w2 = _const_t(names, f"{base}{MARK}out.weight", Q, dt)
        mid = list(a_shape[:-1]) + [r] if a_shape is not None and len(a_shape) >= 1 else None
        spec = [("in", "MatMul", [node.inputs[0], w1], {}, mid), ("out", "MatMul", [None, w2], {}, None)]
    else:  # pointwise Conv: lay.W = W.reshape(N, C).T ~ P Q: conv C -> r with weight P^T, then r -> N with Q^T
        Wc = node.inputs[1].values
        dt, nd = Wc.dtype, Wc.ndim - 2
        ones = [1] * nd
        w1 = _const_t(names, f"{base}{MARK}in.weight", P.T.reshape([r, Wc.shape[1]] + ones), dt)
        w2 = _const_t(names, f"{base}{MARK}out.weight", Q.T.reshape([Wc.shape[0], r] + ones), dt)
        a1 = {k: v for k, v in node.attrs.items() if k != "group"}
        a1["kernel_shape"] = ones
        ins2 = [None, w2] + ([node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2].name else [])
        spec = [("in", "Conv", [node.inputs[0], w1], a1, _with_channels(shapes.get(node.outputs[0].name), r)),
                ("out", "Conv", ins2, {"kernel_shape": ones}, None)]
    _rewrite(graph, lay, spec, names)


def _apply_tucker(graph, lay: Layer, U_in, core, U_out, shapes: dict, names: _Names) -> None:
    node = lay.node
    base = node.name or f"{node.op}_{node.outputs[0].name}"
    Wc = node.inputs[1].values
    dt, nd = Wc.dtype, Wc.ndim - 2
    ones = [1] * nd
    x = node.inputs[0]
    spec = []
    if U_in is not None:
        w = _const_t(names, f"{base}{MARK}in.weight", U_in.T.reshape([U_in.shape[1], U_in.shape[0]] + ones), dt)
        spec.append(("in", "Conv", [x, w], {"kernel_shape": ones},
                     _with_channels(shapes.get(x.name), U_in.shape[1])))
        x = None
    bias = [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2].name else []
    a_core = {k: v for k, v in node.attrs.items() if k != "group"}
    wc = _const_t(names, f"{base}{MARK}core.weight", core, dt)
    if U_out is not None:
        spec.append(("core", "Conv", [x, wc], a_core, _with_channels(shapes.get(node.outputs[0].name), core.shape[0])))
        w = _const_t(names, f"{base}{MARK}out.weight", U_out.reshape([U_out.shape[0], U_out.shape[1]] + ones), dt)
        spec.append(("out", "Conv", [None, w] + bias, {"kernel_shape": ones}, None))
    else:
        spec.append(("core", "Conv", [x, wc] + bias, a_core, None))
    _rewrite(graph, lay, spec, names)


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
            if not (v > 0) or (v >= 1 and v != int(v)):
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

        info_layers, names = [], _Names(graph)
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
                _analyze(lay)
            if lay.kind == "svd":
                P, Q, err = _svd_factors(lay, cfg[0])
                _apply_svd(graph, lay, P, Q, shapes, names)
                entry.update(ranks=[cfg[0]], full_ranks=[min(lay.W.shape)])
            else:
                U_in, core, U_out, err, (r1, r2), (p_in, p_out) = _tucker_factors(lay, cfg[0], cfg[1], always,
                                                                                 o["hooi_iters"])
                macs_after, params_after = lay.cost((r1, r2), always)
                _apply_tucker(graph, lay, U_in, core, U_out, shapes, names)
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
            r = _energy_rank(s, self.opts["energy"])
        elif mode == "rank":
            v = self.rank_value
            r = min(v, full) if isinstance(v, int) else math.ceil(v * full)
        else:  # evbmf
            r, _ = evbmf_spectrum(s, *shape)
            lay.extra.setdefault("evbmf_ranks", []).append(r)
        return _round_up(r, full, rt)

    def _per_layer(self, layers: list[Layer], rt: int) -> list:
        chosen = []
        for lay in layers:
            if self.mode != "full":
                _analyze(lay)
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
            _analyze(lay)
            orig = lat.ms(i, None) if lat is not None else (lay.macs, lay.params)[idx]
            if lay.kind == "svd":
                cfgs = [(r,) for r in _grid(lay.full_ranks()[0], rt)]
            else:
                f1, f2 = lay.full_ranks()
                g1 = sorted(set(_grid(f1, rt) + [lay.C]))
                g2 = sorted(set(_grid(f2, rt) + [lay.N]))
                cfgs = [(a, b) for a in g1 for b in g2 if not (a >= lay.C and b >= lay.N)]
            pts = [(orig, 0.0, None)]
            for cfg in cfgs:
                c = lay.cost(cfg, False)
                cost = lat.ms(i, cfg) if lat is not None else c[idx]
                if c[0] < lay.macs and cost < orig:      # only configurations whose MACs (and budgeted cost) drop
                    pts.append((cost, lay.err2(cfg), cfg))
            hull = _lower_hull(pts)
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
