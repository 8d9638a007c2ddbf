"""The bf16 depthwise conv on vdpbf16ps: each instruction sums two vertical taps of 16 channels.

depthwise.py multiplies tap by tap in fp32 (one widening of the bf16 input and one FMA per tap and 16 channels).
Where the input holds bf16 bits with the padded channel count, this kernel reduces over the filter's rows instead
(as int8/dw_quads.py does with byte quads and vpdpbusd): per input column and 16 channels, the bf16 values of two
consecutive input rows are interleaved into one 32-pair vector (two 32-byte loads and one word permute) and one
vdpbf16ps adds both rows' products with the matching weight pair (rows of the filter an output row does not use
are zero weights, packed once per block row: pack_weight). A block of two output rows reads (2 - 1) * stride + KH
input rows in NP pairs per column; each output row takes, per filter column, the pairs that overlap its rows; a
tile of TW pixels reuses each column's pairs for the pixels that read it. 3x3 stride 1: two pairs per column for
both rows, six vdpbf16ps per output pixel against nine FMAs and their widenings.

Numerics: the weights are rounded to bf16 (the conv kernels' are too; depthwise.py keeps them fp32), the products
are exact in fp32 and vdpbf16ps adds them with fp32 accumulation, so the result differs from depthwise.py's by the
weights' rounding (a relative 2^-9 per weight) and the order of the adds. Padding reads zero bits through guarded
loads (no clamped index, no padded copy). Bias, bounds and the fp32 -> bf16 store (vcvtneps2bf16) follow.
"""
from __future__ import annotations

import numpy as np

from .depthwise import DwSpec
from .epilogue import KERNEL_ATTR, bounded
from .intrinsic import CVT_EXTERN, EXTERN, LLVM_IR
from .packing import bf16_bits

ROWS = 2                # output rows per block
ACCUMULATORS = 16       # zmm registers the block's fp32 sums may take
KERNELS = (3, 5)        # square filter sizes taken (strides 1 and 2)


def fits(spec: DwSpec) -> bool:
    """Whether this kernel computes the depthwise conv: bf16 bits in, the padded channel count (32-byte loads per
    16-channel block), a square 3x3 or 5x5 filter with equal strides 1 or 2, no dilation."""
    s = spec
    return (s.in_bf16 and s.Cx == s.Cp and s.KH == s.KW and s.KH in KERNELS and s.stride[0] == s.stride[1]
            and s.stride[0] in (1, 2) and tuple(s.dilation) == (1, 1))


def geometry(spec: DwSpec) -> tuple[int, int, int]:
    """(TW output pixels per row tile, input rows per block, NP row pairs per input column). TW divides the output
    width where a divisor above half the accumulators' share exists; else the last tile is partial."""
    rows_in = (ROWS - 1) * spec.stride[0] + spec.KH
    tmax = ACCUMULATORS // ROWS
    tw = next((t for t in range(tmax, tmax // 2, -1) if spec.OW % t == 0), tmax)
    return tw, rows_in, -(-rows_in // 2)


def pack_weight(w: np.ndarray, spec: DwSpec) -> np.ndarray:
    """fp32 depthwise weights [C, 1, KH, KW] -> bf16 bits [CB, ROWS, KW, NP, 16, 2]: for output row r of a block,
    filter column j and pair p, lane c slot k holds w[16 cb + c, 2p + k - r * stride, j] where that filter row
    exists, else 0; channels padded to a multiple of 16 with zeros."""
    _, _, NP = geometry(spec)
    C, _, KH, KW = w.shape
    s, Cp = spec.stride[0], spec.Cp
    bits = bf16_bits(w[:, 0])              # [C, KH, KW]
    wp = np.zeros((Cp, KH, KW), np.uint16)
    wp[:C] = bits
    out = np.zeros((Cp // 16, ROWS, KW, NP, 16, 2), np.uint16)
    for r in range(ROWS):
        for p in range(NP):
            for k in range(2):
                i = 2 * p + k - r * s
                if 0 <= i < KH:
                    out[:, r, :, p, :, k] = wp[:, i, :].reshape(Cp // 16, 16, KW).transpose(0, 2, 1)
    return out


def dwconv2d_pairs(spec: DwSpec, cores: int = 1):
    """PrimFunc (X [N, H, W, Cp] bf16 bits, Wp (pack_weight) bf16 bits, B fp32 [Cp], Y [N, OH, OW, Cp] fp32 or bf16
    bits); see the module docstring. Blocks of two output rows run in parallel; inside one, 16-channel blocks, then
    tiles of TW pixels: the tile's accumulators, then per input column its pairs and the vdpbf16ps of every pixel
    that reads the column."""
    from tvm.script import tirx as T
    sp = spec
    TW, rows_in, NP = geometry(sp)
    R, s, KH, KW = ROWS, sp.stride[0], sp.KH, sp.KW
    pt, pl = sp.pad[0], sp.pad[1]
    N, H, W, Cp, OH, OW = sp.N, sp.H, sp.W, sp.Cp, sp.OH, sp.OW
    CB, HB, WT = Cp // 16, -(-OH // R), -(-OW // TW)
    NCOL = (TW - 1) * s + KW
    odt = "uint16" if sp.out_bf16 else "float32"
    loop = T.parallel if cores > 1 and N * HB > 1 else T.serial
    interleave = [k * 16 + c for c in range(16) for k in range(2)]      # pair c <- (row 0, row 1) of channel c

    def zero():
        return T.broadcast(T.uint16(0), 16)

    def row(X, n, ih, ix, c0):       # 16 channels of input pixel (ih, ix), zero bits outside
        inside = T.And(T.And(ih >= 0, ih < H), T.And(ix >= 0, ix < W))
        return T.if_then_else(inside, X.vload([n, ih, ix, c0], dtype="uint16x16"), zero())

    def pair(X, n, ih0, ix, c0, p):  # rows ih0 + 2p, ih0 + 2p + 1 interleaved; a slot past the block's rows: zero
        return T.Shuffle([T.if_then_else(2 * p + k < rows_in, row(X, n, ih0 + 2 * p + k, ix, c0), zero())
                          for k in range(2)], interleave)

    def dot(acc, a, Pb, Wp, cb, r, j, p):
        return T.call_extern("float32x16", EXTERN, acc.vload([a * 16], dtype="float32x16"),
                             T.reinterpret(Pb.vload([p * 32], dtype="uint16x32"), dtype="int32x16"),
                             T.reinterpret(Wp.vload([cb, r, j, p, 0, 0], dtype="uint16x32"), dtype="int32x16"))

    def out_value(acc, a, B, cb, lane):
        return bounded(acc[a * 16 + lane] + B[cb * 16 + lane], sp.act)

    def stored(Tb):                  # the output tile's 16 channels as Y holds them
        if sp.out_bf16:
            return T.call_extern("uint16x16", CVT_EXTERN, Tb.vload([0], dtype="float32x16"))
        return Tb.vload([0], dtype="float32x16")

    @T.prim_func(s_tir=True)
    def main(X: T.Buffer((N, H, W, Cp), "uint16"), Wp: T.Buffer((CB, R, KW, NP, 16, 2), "uint16"),
             B: T.Buffer((Cp,), "float32"), Y: T.Buffer((N, OH, OW, Cp), odt)):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            for nh in loop(N * HB, annotations={"pragma_import_llvm": LLVM_IR}):
                with T.sblock("rows"):     # per-iteration accumulators and pairs (one set per thread)
                    T.reads(X[0:N, 0:H, 0:W, 0:Cp], Wp[0:CB, 0:R, 0:KW, 0:NP, 0:16, 0:2], B[0:Cp])
                    T.writes(Y[0:N, 0:OH, 0:OW, 0:Cp])
                    acc = T.alloc_buffer((R * TW * 16,), "float32", scope="local")
                    Pb = T.alloc_buffer((NP * 32,), "uint16", scope="local")
                    Tb = T.alloc_buffer((16,), "float32", scope="local")
                    for cb in T.serial(CB):
                        for wt in T.serial(WT):
                            for a in T.unroll(R * TW):
                                acc[T.ramp(a * 16, 1, 16)] = T.broadcast(T.float32(0), 16)
                            for xc in T.unroll(NCOL):
                                for p in T.unroll(NP):
                                    Pb[T.ramp(p * 32, 1, 32)] = pair(X, nh // HB, (nh % HB) * R * s - pt,
                                                                      wt * TW * s + xc - pl, cb * 16, p)
                                for r in T.unroll(R):
                                    for o in T.unroll(TW):
                                        for p in T.unroll(NP):
                                            # pixel o reads this column through filter column xc - o*s, and
                                            # pair p overlaps output row r's filter rows
                                            if xc - o * s >= 0 and xc - o * s < KW and 2 * p + 1 >= r * s \
                                                    and 2 * p < r * s + KH:
                                                acc[T.ramp((r * TW + o) * 16, 1, 16)] = dot(
                                                    acc, r * TW + o, Pb, Wp, cb, r, xc - o * s, p)
                            for r in T.unroll(R):
                                for o in T.unroll(TW):
                                    if (nh % HB) * R + r < OH and wt * TW + o < OW:
                                        for lane in T.vectorized(16):
                                            Tb[lane] = out_value(acc, r * TW + o, B, cb, lane)
                                        Y[nh // HB, (nh % HB) * R + r, wt * TW + o, T.ramp(cb * 16, 1, 16)] = \
                                            stored(Tb)
    return main.with_attr(KERNEL_ATTR, "dwconv2d_pairs")
