"""factorize-lowrank's mathematics: layers as matrices / tensors, their spectra (SVD, HOSVD), EVBMF rank selection,
rank grids and hulls, the factors (truncated SVD, Tucker-2 with HOOI) and their cost. numpy only, no graph editing."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

EVB_TAU = 2.5129          # tau_lower / sqrt(alpha) of EVBMF (Nakajima et al. 2013)


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


@dataclass
class Layer:
    """A candidate node's weight in float64 and its geometry; analyze() adds its spectra."""
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


def analyze(lay: Layer) -> None:
    """Fill in lay's spectra: U, s, Vt (svd); the bases of both channel unfoldings and the HOSVD core's
    cumulative energy (tucker2)."""
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


def energy_rank(s: np.ndarray, energy: float) -> int:
    """The smallest rank keeping this fraction of the spectrum's energy (sum of squares)."""
    if energy >= 1.0:
        return len(s)
    e = np.cumsum(s.astype(np.float64) ** 2)
    if e[-1] <= 0:
        return 1
    return int(min(len(s), np.searchsorted(e, energy * e[-1] * (1 - 1e-12)) + 1))


def round_up(r: int, full: int, rt: int) -> int:
    """r rounded up to a multiple of rt, within [1, full]."""
    return int(min(full, max(1, math.ceil(max(r, 1) / rt) * rt)))


def rank_grid(full: int, rt: int) -> list[int]:
    """Candidate ranks: the multiples of rt below full, and full."""
    return sorted(set(list(range(rt, full, rt)) + [full]))


def lower_hull(points: list[tuple[float, float, object]]) -> list[tuple[float, float, object]]:
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


def svd_factors(lay: Layer, r: int):
    """(P [K, r], Q [r, N], ||W - P Q|| / ||W||): the truncated SVD, singular values split evenly."""
    rs = np.sqrt(lay.s[:r])
    P = lay.U[:, :r] * rs[None, :]           # K x r
    Q = rs[:, None] * lay.Vt[:r]             # r x N
    err = np.linalg.norm(lay.W - P @ Q) / math.sqrt(lay.total) if lay.total > 0 else 0.0
    return P, Q, float(err)


def tucker_factors(lay: Layer, r1: int, r2: int, always: bool, iters: int):
    """Tucker-2 at ranks (r1 in, r2 out) after `iters` HOOI sweeps; a channel mode kept whole gets no projection
    (None) unless always. (U_in, core, U_out, relative error, (r1, r2), (projects in, projects out))."""
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
