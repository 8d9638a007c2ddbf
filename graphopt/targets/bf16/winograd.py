"""Winograd F(2x2, 3x3) for precision bf16: the 16 GEMMs of the transformed tiles in bf16 pairs with fp32
accumulation (vdpbf16ps, intrinsic.INTRIN), the transforms in fp32.

    U[e, c, k] = (G g[k, c] G^T)[e]        float64 at compile time, rounded once to bf16: [OCp/16, 16, C2, 16, 2]
    V[e, p, c] = (B^T d[p, c] B)[e]        fp32 from the input tile (fp32 or bf16 bits), rounded to bf16 pairs
    M[e, p, k] = sum_c V[e, p, c] U[e, c, k]
    Y[p, k]    = A^T M[:, p, k] A          fp32, then the conv's epilogue (epilogue.conv_epilogue: bias, bounds,
                                           residual and its bounds) and, for a bf16 output, its bf16 bits

The direct bf16 conv (kernels.conv2d_bf16) already runs ResNet's 3x3 convs at about 94% of the vdpbf16ps peak; the
GEMMs here do 4/9 of its multiplies. Arguments, layouts and the epilogue are the direct kernel's (the same
kernels.ConvSpec, the same call in rewrite.py), so the rewrite can take either. Loop structure as the fp32 kernel
(cpu_winograd_kernel): parallel over blocks of m_bn tiles along a tile row; per block V (16 x m_bn x C2 pairs),
then per block of TN*16 output channels the 16 GEMMs (register tiles of m_bn tiles x TN vectors, reduction over
the pairs) into a scratch, and the output tiles from it.

Error: V and U are rounded to bf16 once each, as the direct kernel rounds its input and weights; V's components
are sums of up to four input values (B's entries are 0 and +-1), so their rounding error is relative to those sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..winograd_transforms import output_at, transformed_input, transformed_weight
from .epilogue import KERNEL_ATTR, conv_epilogue, residual_value
from .intrinsic import CVT_INTRIN, INTRIN, bf16_value, import_llvm, register_intrinsic, to_bf16_bits
from .packing import bf16_bits


@dataclass(frozen=True)
class Tiling:
    m_bn: int = 8       # output tiles per register tile (along a tile row)
    TN: int = 2         # 16-channel vectors per register tile


def fits(spec) -> bool:
    """Whether the kernel takes the conv: 3x3, stride 1, undilated, padding 0 or 1 on every side, NHWC input (fp32
    or bf16 bits), no HardSwish (the direct kernel's), not on AMX (whose direct kernel is faster than these GEMMs'
    vdpbf16ps)."""
    return (spec.KH == 3 and spec.KW == 3 and tuple(spec.stride) == (1, 1) and tuple(spec.dilation) == (1, 1)
            and all(p in (0, 1) for p in spec.pad) and spec.in_layout == "NHWC" and not spec.hswish
            and not spec.amx and spec.C >= 2)


#: the fewest input channels and output rows / columns measured: every conv from 8 channels and 4x4 outputs up
#: ran faster than the direct kernel (1 thread, AMD EPYC Zen 4, conv + relu: 56x56 64->64 1034 -> 664 us, 28x28
#: 128->128 1014 -> 571, 14x14 256->256 978 -> 566, 7x7 512->512 927 -> 634, 160x160 16->16 763 -> 668, 20x20
#: 128->128 546 -> 533, 4x4 256->256 87 -> 60, 28x28 8->16 27 -> 19)
MIN_CHANNELS = 8
MIN_SIZE = 4


def pays(spec) -> bool:
    """fits(spec) and within the measured sizes."""
    return fits(spec) and spec.C >= MIN_CHANNELS and min(spec.OH, spec.OW) >= MIN_SIZE


def pick_tiling(spec) -> Tiling:
    """m_bn x TN of at most 24 accumulators (the direct kernels' bound with AVX-512's 32 registers): at most 15%
    padded tiles (none where the output is bf16 bits: the conversion's tensorized store takes no partial block),
    then the largest tile, then the fewest padded tiles."""
    TW = -(-spec.OW // 2)
    blocks = spec.OCp // 16
    best = None
    for TN in (4, 3, 2, 1):
        if blocks % TN:
            continue
        for m_bn in range(1, 13):
            if m_bn * TN > 24:
                continue
            waste = -(-TW // m_bn) * m_bn - TW
            key = (waste > 0 if spec.out_bf16 else waste / TW > 0.15, -m_bn * TN, waste)
            if best is None or key < best[0]:
                best = (key, Tiling(m_bn, TN))
    return best[1]


def pack_weight(w: np.ndarray, spec) -> np.ndarray:
    """OIHW 3x3 fp32 weights -> bf16 bits U [OCp/16, 16, C2, 16, 2]: G g G^T in float64, rounded once."""
    K, C = w.shape[:2]
    u = transformed_weight(w)
    up = np.zeros((16, spec.C2 * 2, spec.OCp), np.float64)
    up[:, :C, :K] = u
    up = up.reshape(16, spec.C2, 2, spec.OCp // 16, 16).transpose(3, 0, 1, 4, 2)
    return bf16_bits(up.astype(np.float32))


def winograd_conv2d_bf16(spec, tiling: Tiling | None = None):
    """Scheduled PrimFunc (X NHWC [N, H, W, cin] fp32 or bf16 bits, U (pack_weight), B fp32 [OCp][, R NHWC
    [N, OH, OW, OCp] fp32 or bf16 bits], Y NHWC [N, OH, OW, OCp] fp32 or bf16 bits): kernels.conv2d_bf16's
    arguments and results."""
    from tvm import te, tirx
    s = spec
    t = tiling or pick_tiling(s)
    assert fits(s), s
    pt, pl = s.pad[0], s.pad[1]
    cin, C2, OCp = s.cin, s.C2, s.OCp
    TH, TW = -(-s.OH // 2), -(-s.OW // 2)
    TWp = -(-TW // t.m_bn) * t.m_bn
    X = te.placeholder((s.N, s.H, s.W, cin), "uint16" if s.in_bf16 else "float32", name="X")
    U = te.placeholder((OCp // 16, 16, C2, 16, 2), "uint16", name="U")
    B = te.placeholder((OCp,), "float32", name="B")

    def v_value(n, th, tw, e, c):     # channels past the logical ones (a padded input's, the last pair's) read 0
        def load(h, w):
            v = X[n, h, w, tirx.min(c, cin - 1)]
            return bf16_value(v) if s.in_bf16 else v
        return to_bf16_bits(transformed_input(th, tw, e, pt, pl, s.H, s.W, load, c < s.C))

    V = te.compute((s.N, TH, TWp, 16, C2 * 2), v_value, name="V")
    c2 = te.reduce_axis((0, C2), "c2")
    ci = te.reduce_axis((0, 2), "ci")
    M = te.compute((s.N, TH, TWp, 16, OCp // 16, 16), lambda n, th, tw, e, ob, oi: te.sum(
        bf16_value(V[n, th, tw, e, c2 * 2 + ci]) * bf16_value(U[ob, e, c2, oi, ci]), axis=[c2, ci]), name="M")
    args = [X, U, B]
    R = None
    if s.residual:
        R = te.placeholder((s.N, s.OH, s.OW, OCp), "uint16" if s.res_bf16 else "float32", name="R")
        args.append(R)

    def y_value(n, h, w, o):
        th, tw = h // 2, w // 2
        m = lambda a, b: M[n, th, tw, a * 4 + b, o // 16, o % 16]  # noqa: E731
        v = output_at(m, h, w)
        return conv_epilogue(s, v, B[o], residual_value(s, R[n, h, w, o]) if s.residual else None, o)

    Y = te.compute((s.N, s.OH, s.OW, OCp), y_value, name="out")
    if s.out_bf16:
        Y = te.compute(Y.shape, lambda *i: to_bf16_bits(Y(*i)), name="cvt")
    return _schedule(te.create_prim_func(args + [Y]), s, t, TH, TWp)


def _schedule(func, s, t: Tiling, TH: int, TWp: int):
    """(n, tile row, block of m_bn tiles) fused and parallel > V for the block > blocks of TN*16 channels >
    [16 GEMMs: component, pairs, m_bn tiles and TN vectors unrolled, the 16 x 2 block tensorized, into the scratch
    M] > the output tiles with the epilogue, channels vectorized (a bf16 output converted 16 lanes at a time)."""
    from tvm.s_tir import Schedule

    from ..cpu_sched_common import has_block
    register_intrinsic()
    sch = Schedule(func)
    vb, mb, yb = sch.get_sblock("V"), sch.get_sblock("M"), sch.get_sblock("out")
    n, h, w, o = sch.get_loops(yb)
    ho, hi = sch.split(h, [TH, 2])
    wo, wt, wj = sch.split(w, [TWp // t.m_bn, t.m_bn, 2])
    ko, kv, kl = sch.split(o, [s.OCp // 16 // t.TN, t.TN, 16])
    sch.reorder(n, ho, wo, ko, hi, wt, wj, kv, kl)
    par = sch.fuse(n, ho, wo)
    sch.parallel(par)
    import_llvm(sch, par)
    sch.unroll(hi)
    sch.unroll(wj)
    sch.unroll(kv)
    sch.vectorize(kl)
    if has_block(sch, "cvt"):
        cvt = sch.get_sblock("cvt")
        sch.reverse_compute_at(cvt, ko, preserve_unit_loops=True)
        sch.set_scope(yb, 0, "local")
        lanes = sch.split(sch.get_loops(cvt)[-1], [None, 16])[1]
        if TWp * 2 == s.OW and TH * 2 == s.OH:       # no partial tile block: vcvtneps2bf16
            sch.tensorize(lanes, CVT_INTRIN)
        else:               # the store of a partial block is predicated: to_bf16_bits' integer arithmetic
            sch.vectorize(lanes)
    # the GEMMs of one block of tiles x channel vectors into a scratch the output transform reads
    sch.compute_at(mb, ko, preserve_unit_loops=True)
    tt, e, ob, oi, c2, ci = sch.get_loops(mb)[-6:]
    sch.reorder(e, c2, tt, ob, oi, ci)
    acc = sch.cache_write(mb, 0, "local")
    sch.reverse_compute_at(acc, e)
    # the input transform of the block, once for all its channel blocks: pairs vectorized
    sch.compute_at(vb, par)
    vt, ve, vc = sch.get_loops(vb)[-3:]
    lanes = next(v for v in (16, 8, 4, 2) if (s.C2 * 2) % v == 0)
    vco, vci = sch.split(vc, [None, lanes])
    sch.reorder(vt, vco, ve, vci)
    sch.unroll(ve)
    sch.vectorize(vci)
    init = sch.decompose_reduction(mb, c2)
    sch.tensorize(oi, INTRIN)
    sch.unroll(tt)
    sch.unroll(ob)
    il = sch.get_loops(init)
    sch.vectorize(il[-1])
    al = sch.get_loops(acc)
    sch.vectorize(al[-1])
    return sch.mod["main"].with_attr(KERNEL_ATTR, "winograd_f2x2_3x3")
