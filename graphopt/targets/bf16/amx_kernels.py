"""The bf16 conv2d and dense kernels on AMX tiles (amx.py's micro kernel), for targets with AMX; written with TVM's
IRBuilder (plain loops and extern calls in a root block), not scheduled.

Both are one GEMM over a grid of pixels. The input stage writes the bf16 pairs of every stage pixel as one flat row
(a dense layer: its M rows). For a conv the stage is the zero-padded input split into phase images (conv_layout): a
stride-s conv reads padded pixel (s*i + a, s*j + b) into pixel (i, j) of phase (a, b), so each tap (kh, kw) reads
one phase shifted by (kh*dh // s, kw*dw // s): stride 1 within it (stride 1: one phase, the padded input). Output
pixel (oh, ow) is grid row m = oh*Wq + ow, so one A tile (16 consecutive grid rows, one pixel apart) serves every
tap at its offset, with no im2col; rows with ow >= OW are computed and dropped, and Mg = (OH-1)*Wq + OW rows keep
every tap inside the stage. A conv of few channels (the stem: 3) folds the KW taps of a kernel row into a stage
pixel's channels, so its steps are not mostly zeros. Grids of fewer than 32 rows (dense layers of few rows, tiny
images) and reductions of fewer than MIN_PAIRS pairs stay on the AVX512-BF16 kernel (kernels.py).

A block is 32 grid rows x 32 channels (four fp32 tiles), the reduction KH*KW taps x c2a/KP steps of KP pairs (KP =
16, or all the pairs when there are fewer; the pairs are padded to a multiple of KP with zeros, weights included);
a last 16-channel block uses the two-tile step. The last row block starts at Mg - 32 (it overlaps the one before:
the same rows are written twice with the same values). The 32 x 32 block goes through a scratch buffer to the TIR
epilogue (epilogue.conv_epilogue), 16 lanes at a time; a bf16 output is rounded 32 lanes per vcvtne2ps2bf16 like the
AVX512-BF16 kernel's. An input of bf16 bits that already is the stage (1x1, stride 1, no padding, channels = the
padded pairs) is read in place.
"""
from __future__ import annotations

from .. import amx
from ..amx import BM, BN
from .epilogue import KERNEL_ATTR, bounded, conv_epilogue, residual_value
from .intrinsic import CVT2_EXTERN, CVT_EXTERN, LLVM_IR, to_bf16_bits

#: a conv or dense layer needs at least this many bf16 pairs per step for AMX (fewer: tdpbf16ps does too little)
MIN_PAIRS = 4
#: a KxK conv with fewer input channel pairs than this folds its KW taps into the channels (conv_layout)
FOLD_PAIRS = 8
step_pairs, padded_pairs = amx.step_units, amx.padded_units


def _strip(s) -> bool:
    """Whether conv spec s takes the strip layout (amx.strip_layout): a KxK conv of fewer than FOLD_PAIRS input
    pairs, undilated, whose stage pixels (sw*C elements) are whole pairs (a tile row starts on a pair)."""
    return s.KW > 1 and -(-s.C // 2) < FOLD_PAIRS and tuple(s.dilation) == (1, 1) and s.stride[1] * s.C % 2 == 0


def conv_layout(s) -> amx.ConvLayout:
    """The stage of conv spec s (amx.ConvLayout, units = bf16 pairs): a strip (_strip), or the padded input in
    phase images, KW folded into the channels where they are few (FOLD_PAIRS)."""
    return amx.strip_layout(s, 2) if _strip(s) else amx.conv_layout(s, 2, FOLD_PAIRS)


def conv_fits(s) -> bool:
    """Whether the AMX kernel takes conv spec s (its target has AMX: s.amx): a grid of at least a block's rows
    and enough pairs per tile step."""
    if not s.amx:
        return False
    lay = conv_layout(s)
    return lay.units >= MIN_PAIRS and lay.rows >= BM


def dense_fits(s) -> bool:
    return s.amx and s.M >= BM and s.K2 >= MIN_PAIRS


def conv_weight(s, w):
    """fp32 OIHW weights packed for the AMX kernel of spec s: [OCp/16, KH, KW, pairs, 16, 2] (KW folded into the
    channels, kw-major, where the layout folds: [OCp/16, KH, 1, pairs, 16, 2]), pairs padded to whole steps."""
    from .packing import pack_conv_weight
    lay = conv_layout(s)
    if lay.fold:
        OC, C, KH, KW = w.shape
        w = w.transpose(0, 3, 1, 2).reshape(OC, KW * C, KH, 1)
    return pack_conv_weight(w, padded_pairs(lay.units))


def conv2d_amx(s):
    """PrimFunc (X, Wp uint16 (conv_weight), B[, R], Y) of conv spec s on AMX."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T
    lay = conv_layout(s)
    g = amx.Grid.conv("bf16", s, lay, s.stride[1] * s.C if _strip(s) else None)
    c2a, cin, KW = g.units, s.cin, g.KW
    xshape = (s.N, s.C, s.H, s.W) if s.in_layout == "NCHW" else (s.N, s.H, s.W, cin)
    X = tirx.decl_buffer(xshape, "uint16" if s.in_bf16 else "float32", "X")
    Y = tirx.decl_buffer((s.N, s.OH, s.OW, s.OCp), "uint16" if s.out_bf16 else "float32", "Y")
    R = tirx.decl_buffer((s.N, s.OH, s.OW, s.OCp), "uint16" if s.res_bf16 else "float32", "R") if s.residual else None
    bias = tirx.decl_buffer((s.OCp,), "float32", "B")
    Wp = tirx.decl_buffer((s.OCp // 16, s.KH, KW, c2a, 16, 2), "uint16", "W")

    def read(n, hh, ww, cc):
        v = X[n, cc, hh, ww] if s.in_layout == "NCHW" else X[n, hh, ww, cc]      # cc < C <= cin (conv_source)
        return v if s.in_bf16 else to_bf16_bits(v)

    def store(vals, n, oh, ow, ch):
        T.buffer_store(Y, vals, [n, oh, ow, ch])

    def epi(acc, n, oh, ow, ch):
        return conv_epilogue(s, acc, bias[ch], residual_value(s, R[n, oh, ow, ch]) if R is not None else None, ch)
    direct = (s.in_bf16 and s.KH == s.KW == 1 and s.stride == (1, 1) and not any(s.pad) and cin == 2 * c2a)
    source = None if direct else g.conv_source(s, lay, read, tirx.const(0, "uint16"))
    args = [X, Wp, bias] + ([R] if R is not None else []) + [Y]
    return amx.build(g, args, X, source, Wp, _finish(epi, store, s.out_bf16), {KERNEL_ATTR: "conv2d"}, LLVM_IR)


def dense_amx(s):
    """PrimFunc (A fp32 [M, Kin], Wp uint16 [Np/16, K2w, 16, 2], B fp32 [Np], Y fp32 [M, Np]) on AMX."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T
    k2a, kin = padded_pairs(s.K2), max(s.K, s.Kphys)
    A = tirx.decl_buffer((s.M, kin), "float32", "A")
    Y = tirx.decl_buffer((s.M, s.Np), "float32", "Y")
    bias = tirx.decl_buffer((s.Np,), "float32", "B")
    Wp = tirx.decl_buffer((s.Np // 16, k2a, 16, 2), "uint16", "W")

    def source(n, ph, i, j, c):
        return tirx.if_then_else(c < kin, to_bf16_bits(A[j, tirx.min(c, kin - 1)]), tirx.const(0, "uint16"))

    def store(vals, n, oh, ow, ch):
        T.buffer_store(Y, vals, [ow, ch])
    grid = amx.Grid("bf16", 1, 1, 1, s.M, s.M, s.M, k2a, s.Np, 1, 1, lambda kh, kw: 0)
    finish = _finish(lambda acc, n, oh, ow, ch: bounded(acc + bias[ch], s.act), store, False)
    return amx.build(grid, [A, Wp, bias, Y], A, source, Wp, finish, {KERNEL_ATTR: "dense"}, LLVM_IR)


def _finish(epi, store, out_bf16: bool):
    """amx.build's epilogue: _epilogue_row with these epi, store and out_bf16."""
    return lambda D, r, ob, n, oh, ow, cols: _epilogue_row(D, r, ob, n, oh, ow, cols, epi, store, out_bf16)


def _epilogue_row(D, r, ob, n, oh, ow, cols: int, epi, store, out_bf16: bool):
    """Output pixel (oh, ow) of block row r: epi over its `cols` channels, 16 lanes at a time; bf16 bits stored
    32 (or 16) lanes per conversion from D, which then holds the fp32 results."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T
    base = ob * BN
    with T.serial(0, cols // 16) as v:
        with T.vectorized(0, 16) as i:
            val = epi(D[r, v * 16 + i], n, oh, ow, base + v * 16 + i)
            if out_bf16:
                T.buffer_store(D, val, [r, v * 16 + i])
            else:
                store(val, n, oh, ow, base + v * 16 + i)
    if out_bf16:
        if cols == BN:
            bits = T.call_extern("uint16x32", CVT2_EXTERN, D.vload([r, 16], "float32x16"),
                                 D.vload([r, 0], "float32x16"))
        else:
            bits = T.call_extern("uint16x16", CVT_EXTERN, D.vload([r, 0], "float32x16"))
        store(bits, n, oh, ow, tirx.Ramp(base, 1, cols))
