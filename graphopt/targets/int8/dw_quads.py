"""The VNNI depthwise conv: each vpdpbusd sums four vertical taps of 16 channels at once.

A depthwise conv has no reduction over channels, so the channel-wise dot products of the dense kernels do not apply
and kernels.dwconv2d_int8 multiplies tap by tap (one widening multiply and one add per tap and 16 channels). Here
the reduction runs over the kernel's rows instead: for an input column, the bytes of four consecutive input rows
are interleaved into one 64-byte "quad" vector (byte 4c + k = row k, channel c: four 16-byte loads and one byte
permute, vpermt2b with VBMI), and one vpdpbusd multiplies it by the matching weight quad (byte 4c + k = w[c, row k
of the filter]) into 16 s32 sums. A block of R output rows reads (R - 1) * stride + KH input rows, in NQ quads per
column; every output row of the block takes, per filter column, the quads that overlap its rows, with weight quads
that are zero on the rows it does not use (packed once, per block row: pack_weight). A row of TW output pixels
reuses each column's quads for the KW pixels that read it. 3x3, stride 1 (R = 2): one quad per input column, three
vpdpbusd per output pixel and 16 channels, against nine multiplies and eight adds (MobileNetV2's 56x56x144 conv:
184 -> 75 us on one AMD EPYC Zen 4 core).

Padding needs no padded copy: a row or column outside the input reads the zero point's byte (a guarded load, not a
clamped index), and the quad slots no output row uses read it too (their weights are zero). Exact (s32 sums, the
kernels' shared epilogue): tests/targets/test_cpu_int8.py compares it with the tap-by-tap kernel bit for bit.
"""
from __future__ import annotations

import numpy as np

from .epilogue import epilogue_expr
from .intrinsics import KERNEL_ATTR
from .specs import ConvSpec

VNNI_DOT = "llvm.x86.avx512.vpdpbusd.512"
#: (kernel size, stride) -> output rows per block: the rows that share one or two quads per input column (one
#: core, Zen 4: 3x3 stride 2 on 112x112x96 70 us with R = 1, 88 with 2, 77 with 4; stride 1 on 56x56x144 76 with
#: R = 2, 86 with 1 or 4; 5x5 stride 2 on 56x56x144 43 with 2, 48 with 1)
ROWS = {(3, 1): 2, (5, 1): 4, (3, 2): 1, (5, 2): 2}
ACCUMULATORS = 16      # zmm registers the block's s32 sums may take (of 32: the rest hold quads and weights)


def fits(spec: ConvSpec, dot: str) -> bool:
    """Whether this kernel computes the depthwise conv: VNNI, a square 3x3 / 5x5 filter with equal strides 1 or 2,
    no dilation, an NHWC input whose channel count is the padded one (16-byte loads per channel block), and a
    requantizing or fp32 epilogue."""
    s = spec
    return (dot == "vnni" and s.in_layout == "NHWC" and (s.Cphys or s.C) == s.OCp and s.KH == s.KW
            and s.stride[0] == s.stride[1] and (s.KH, s.stride[0]) in ROWS and tuple(s.dilation) == (1, 1)
            and s.epi.mode in ("q", "f"))


def geometry(spec: ConvSpec) -> tuple[int, int, int, int]:
    """(R output rows per block, TW output pixels per row tile, input rows per block, NQ quads per input column).
    TW divides the output width where a divisor above half the accumulators' share exists; else the last tile is
    partial (its missing pixels are computed from zero-point columns and not stored)."""
    s = spec.stride[0]
    R = ROWS[(spec.KH, s)]
    rows_in = (R - 1) * s + spec.KH
    tmax = ACCUMULATORS // R
    TW = next((t for t in range(tmax, tmax // 2, -1) if spec.OW % t == 0), tmax)
    return R, TW, rows_in, -(-rows_in // 4)


def pack_weight(w: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """int8 depthwise weights [C, 1, KH, KW] -> [CB, R, KW, NQ, 16, 4]: for output row r of a block, filter column
    j and quad q, lane c byte k holds w[16 cb + c, 4q + k - r * stride, j] where that filter row exists, else 0
    (channels padded to a multiple of 16 with zeros)."""
    R, _, _, NQ = geometry(spec)
    C, _, KH, KW = w.shape
    s = spec.stride[0]
    Cp = spec.OCp
    wp = np.zeros((Cp, KH, KW), np.int8)
    wp[:C] = w[:, 0]
    out = np.zeros((Cp // 16, R, KW, NQ, 16, 4), np.int8)
    for r in range(R):
        for q in range(NQ):
            for k in range(4):
                i = 4 * q + k - r * s
                if 0 <= i < KH:
                    out[:, r, :, q, :, k] = wp[:, i, :].reshape(Cp // 16, 16, KW).transpose(0, 2, 1)
    return out


def dwconv2d_quads(spec: ConvSpec, cores: int = 1):
    """PrimFunc (X [N, H, W, Cp], Wq (pack_weight), Bi, M, Bf, Y [N, OH, OW, Cp]); see the module docstring. Blocks
    of R output rows run in parallel; inside one, 16-channel blocks, then tiles of TW pixels: the tile's R x TW
    accumulators, then per input column its quads and the vpdpbusd of every pixel that reads the column."""
    from tvm.script import tirx as T
    sp = spec
    R, TW, rows_in, NQ = geometry(sp)
    s, KH, KW = sp.stride[0], sp.KH, sp.KW
    pt, pl = sp.pad[0], sp.pad[1]
    N, H, W, Cp, OH, OW = sp.N, sp.H, sp.W, sp.OCp, sp.OH, sp.OW
    CB, HB, WT = Cp // 16, -(-OH // R), -(-OW // TW)
    NCOL = (TW - 1) * s + KW            # input columns a tile reads
    dt, odt = sp.in_dtype, sp.epi.out_dtype
    zx_u = sp.zx + (128 if dt == "int8" else 0)
    loop = T.parallel if cores > 1 and N * HB > 1 else T.serial
    interleave = [k * 16 + c for c in range(16) for k in range(4)]     # byte 4c + k <- row k, channel c

    # helpers called while the script is parsed (expressions; the loop variables are still symbolic there, so
    # the static choices below are TIR conditions that fold once the unrolled loops have constant indices)
    def zero_point():
        return T.broadcast(T.uint8(zx_u), 16)

    def row(X, n, ih, ix, c0):       # 16 channels of input pixel (ih, ix) as u8, the zero point outside
        v = X.vload([n, ih, ix, c0], dtype=f"{dt}x16")
        if dt == "int8":
            v = T.bitwise_xor(T.reinterpret(v, dtype="uint8x16"), T.broadcast(T.uint8(128), 16))
        inside = T.And(T.And(ih >= 0, ih < H), T.And(ix >= 0, ix < W))
        return T.if_then_else(inside, v, zero_point())

    def quad(X, n, ih0, ix, c0, q):  # rows ih0 + 4q .. ih0 + 4q + 3 interleaved; slots past the block's rows: zx
        return T.Shuffle([T.if_then_else(4 * q + k < rows_in, row(X, n, ih0 + 4 * q + k, ix, c0), zero_point())
                          for k in range(4)], interleave)

    def dot(acc, a, Qb, Wq, cb, r, j, q):
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(VNNI_DOT), acc.vload([a * 16], dtype="int32x16"),
                                       T.reinterpret(Qb.vload([q * 64], dtype="uint8x64"), dtype="int8x64"),
                                       Wq.vload([cb, r, j, q, 0, 0], dtype="int8x64"), dtype="int32x16")

    def epi(a, bi, m, bf):
        return epilogue_expr(sp.epi, a, bi, m, bf)

    @T.prim_func(s_tir=True)
    def main(X: T.Buffer((N, H, W, Cp), dt), Wq: T.Buffer((CB, R, KW, NQ, 16, 4), "int8"),
             Bi: T.Buffer((Cp,), "int32"), M: T.Buffer((Cp,), "float32"), Bf: T.Buffer((Cp,), "float32"),
             Y: T.Buffer((N, OH, OW, Cp), odt)):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for nh in loop(N * HB):
                with T.sblock("rows"):     # per-iteration accumulators and quads (one set per thread)
                    T.reads(X[0:N, 0:H, 0:W, 0:Cp], Wq[0:CB, 0:R, 0:KW, 0:NQ, 0:16, 0:4], Bi[0:Cp], M[0:Cp],
                            Bf[0:Cp])
                    T.writes(Y[0:N, 0:OH, 0:OW, 0:Cp])
                    acc = T.alloc_buffer((R * TW * 16,), "int32", scope="local")
                    Qb = T.alloc_buffer((NQ * 64,), "uint8", scope="local")
                    for cb in T.serial(CB):
                        for wt in T.serial(WT):
                            for a in T.unroll(R * TW):
                                acc[T.ramp(a * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
                            for xc in T.unroll(NCOL):
                                for q in T.unroll(NQ):
                                    Qb[T.ramp(q * 64, 1, 64)] = quad(X, nh // HB, (nh % HB) * R * s - pt,
                                                                      wt * TW * s + xc - pl, cb * 16, q)
                                for r in T.unroll(R):
                                    for o in T.unroll(TW):
                                        for q in T.unroll(NQ):
                                            # pixel o reads this column through filter column xc - o*s, and
                                            # quad q overlaps output row r's filter rows
                                            if xc - o * s >= 0 and xc - o * s < KW and 4 * q + 3 >= r * s \
                                                    and 4 * q < r * s + KH:
                                                acc[T.ramp((r * TW + o) * 16, 1, 16)] = dot(
                                                    acc, r * TW + o, Qb, Wq, cb, r, xc - o * s, q)
                            for r in T.unroll(R):
                                for o in T.unroll(TW):
                                    if (nh % HB) * R + r < OH and wt * TW + o < OW:
                                        for lane in T.vectorized(16):
                                            Y[nh // HB, (nh % HB) * R + r, wt * TW + o, cb * 16 + lane] = epi(
                                                acc[(r * TW + o) * 16 + lane], Bi[cb * 16 + lane],
                                                M[cb * 16 + lane], Bf[cb * 16 + lane])
    return main.with_attr(KERNEL_ATTR, "dwconv2d_vnni")
