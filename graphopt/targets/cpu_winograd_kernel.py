"""Winograd F(2x2, 3x3) for channels-last fp32 convolutions (3x3, stride 1, dilation 1, groups 1): one scheduled
PrimFunc per conv shape, and the compile-time weight transform.

    U[e, c, k] = (G g[k, c] G^T)[e]              4x4 = 16 components per (c, k), computed in float64 (pack_weight)
    V[e, p, c] = (B^T d[p, c] B)[e]              d: the 4x4 input tile of output tile p (zero outside the image)
    M[e, p, k] = sum_c V[e, p, c] U[e, c, k]     16 GEMMs: 9/4 fewer multiplies than the direct conv
    Y[p, k]    = A^T M[:, p, k] A                the 2x2 output tile, then the conv's epilogue (bias, bounds,
                                                 residual add, bounds)

The kernel keeps the transformed tensors out of memory: its parallel loop runs over blocks of m_bn tiles along one
tile row; for each block it computes V (16 x m_bn x C, in L1/L2), then for each block of nb output channels the 16
GEMMs (register tiles of m_bn rows x nb channels, reduction over C) into a 16 x m_bn x nb scratch, and from it the
output tile with its epilogue. Tiles past the image's edge (odd output sizes, a partial last block) read zeros and
their outputs are not written.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bf16.epilogue import bounded
from .winograd_transforms import output_at, transformed_input, transformed_weight

NO_BOUNDS = (None, None)
#: PrimFunc attribute naming the kernel (tests, debugging)
KERNEL_ATTR = "graphopt.winograd_kernel"


@dataclass(frozen=True)
class WinogradSpec:
    N: int
    H: int
    W: int
    C: int
    K: int
    pad: tuple = (1, 1, 1, 1)   # top, left, bottom, right
    m_bn: int = 8               # output tiles per register tile (along a tile row)
    nb: int = 32                # output channels per register tile (a multiple of vl)
    vl: int = 16                # fp32 lanes of a vector
    act: tuple = NO_BOUNDS      # (lo, hi) after the bias
    residual: bool = False      # add a residual NHWC [N, OH, OW, K] input, then apply act2
    act2: tuple = NO_BOUNDS

    @property
    def OH(self):
        return self.H + self.pad[0] + self.pad[2] - 2

    @property
    def OW(self):
        return self.W + self.pad[1] + self.pad[3] - 2

    @property
    def TH(self):
        return -(-self.OH // 2)

    @property
    def TW(self):
        return -(-self.OW // 2)

    @property
    def TWp(self):
        return -(-self.TW // self.m_bn) * self.m_bn


def pack_weight(w: np.ndarray, nb: int) -> np.ndarray:
    """OIHW 3x3 weights -> fp32 U [K / nb, 16, C, nb]: G g G^T in float64, rounded once."""
    K, C = w.shape[:2]
    u = transformed_weight(w)
    return np.ascontiguousarray(u.reshape(16, C, K // nb, nb).transpose(2, 0, 1, 3)).astype(np.float32)


def winograd_conv2d(spec: WinogradSpec):
    """Scheduled PrimFunc (X NHWC [N, H, W, C], U [K/nb, 16, C, nb], B [K][, R NHWC [N, OH, OW, K]], Y NHWC)."""
    from tvm import te
    s = spec
    pt, pl = s.pad[0], s.pad[1]
    X = te.placeholder((s.N, s.H, s.W, s.C), "float32", name="X")
    U = te.placeholder((s.K // s.nb, 16, s.C, s.nb), "float32", name="U")
    B = te.placeholder((s.K,), "float32", name="B")

    V = te.compute((s.N, s.TH, s.TWp, 16, s.C), lambda n, th, tw, e, c: transformed_input(
        th, tw, e, pt, pl, s.H, s.W, lambda h, w: X[n, h, w, c]), name="V")
    rc = te.reduce_axis((0, s.C), "rc")
    M = te.compute((s.N, s.TH, s.TWp, 16, s.K),
                   lambda n, th, tw, e, k: te.sum(V[n, th, tw, e, rc] * U[k // s.nb, e, rc, k % s.nb], axis=rc),
                   name="M")
    args = [X, U, B]
    if s.residual:
        R = te.placeholder((s.N, s.OH, s.OW, s.K), "float32", name="R")
        args.append(R)

    def y_value(n, h, w, k):
        th, tw = h // 2, w // 2
        m = lambda a, b: M[n, th, tw, a * 4 + b, k]  # noqa: E731
        v = output_at(m, h, w)
        v = bounded(v + B[k], s.act)
        if s.residual:
            v = bounded(v + R[n, h, w, k], s.act2)
        return v

    Y = te.compute((s.N, s.OH, s.OW, s.K), y_value, name="Y")
    return _schedule(te.create_prim_func(args + [Y]), s)


def weights_outer(s: WinogradSpec) -> bool:
    """Whether the kernel runs its channel blocks outside its tile blocks, with the input transform of the whole
    image done first: when the transformed weights (16 C K fp32) outgrow L2 (the direct conv's threshold,
    cpu_conv.L2_WEIGHT_BYTES) and the transformed input. ResNet-50's 14x14 256->256 convs (4 MB of U, 7 tile rows)
    otherwise stream all of U from memory once per tile row."""
    from .cpu_conv import L2_WEIGHT_BYTES
    u_bytes = 16 * s.C * s.K * 4
    v_bytes = 16 * s.N * s.TH * s.TWp * s.C * 4
    return u_bytes > L2_WEIGHT_BYTES and u_bytes > v_bytes


def _schedule(func, s: WinogradSpec):
    """Loops of the output: (n, tile row, block of m_bn tiles) fused and parallel > V for the block > blocks of nb
    channels > [16 GEMMs into the scratch M: component, reduction, m_bn rows unrolled, nb channels vectorized] >
    the output tiles from M with the epilogue, channels vectorized. With weights_outer: V for the whole image first
    (its own parallel loop), then (n, channel block, tile row, tile block) parallel, so one channel block's weights
    serve every tile row in a row."""
    from tvm.s_tir import Schedule
    sch = Schedule(func)
    vb, mb, yb = sch.get_sblock("V"), sch.get_sblock("M"), sch.get_sblock("Y")
    n, h, w, k = sch.get_loops(yb)
    ho, hi = sch.split(h, [s.TH, 2])
    wo, wt, wj = sch.split(w, [s.TWp // s.m_bn, s.m_bn, 2])
    ko, kv, kl = sch.split(k, [s.K // s.nb, s.nb // s.vl, s.vl])
    outer = weights_outer(s)
    if outer:
        sch.reorder(n, ko, ho, wo, hi, wt, wj, kv, kl)
        par = sch.fuse(n, ko, ho, wo)
    else:
        sch.reorder(n, ho, wo, ko, hi, wt, wj, kv, kl)
        par = sch.fuse(n, ho, wo)
    sch.parallel(par)
    sch.unroll(hi)
    sch.unroll(wj)
    sch.unroll(kv)
    sch.vectorize(kl)
    # the GEMMs of one block of tiles x channels, into a scratch read by the output transform
    sch.compute_at(mb, par if outer else ko)
    t, e, kk, c = sch.get_loops(mb)[-4:]
    sch.reorder(e, c, t, kk)
    acc_copy = sch.cache_write(mb, 0, "local")
    sch.reverse_compute_at(acc_copy, e)
    kvv, kll = sch.split(kk, [s.nb // s.vl, s.vl])
    sch.unroll(t)
    sch.unroll(kvv)
    sch.vectorize(kll)
    cl = sch.get_loops(acc_copy)
    _, cv = sch.split(cl[-1], [None, s.vl])
    sch.vectorize(cv)
    init = sch.decompose_reduction(mb, c)
    il = sch.get_loops(init)
    _, iv = sch.split(il[-1], [None, s.vl])
    sch.vectorize(iv)
    if outer:
        # the input transform of the whole image: (n, tile row) parallel
        vn, vh = sch.get_loops(vb)[:2]
        sch.parallel(sch.fuse(vn, vh))
    else:
        # the input transform of the block, once for all its channel blocks
        sch.compute_at(vb, par)
    vt, ve, vc = sch.get_loops(vb)[-3:]
    cvl = next(v for v in (s.vl, 8, 4, 2, 1) if s.C % v == 0)
    vco, vci = sch.split(vc, [None, cvl])
    sch.reorder(vt, vco, ve, vci)
    sch.unroll(ve)
    if cvl > 1:
        sch.vectorize(vci)
    return sch.mod["main"].with_attr(KERNEL_ATTR, "f2x2_3x3 weights_outer" if outer else "f2x2_3x3")
