"""The int8 conv2d and dense kernels on AMX tiles (tdpbusd: u8 x s8 -> s32, ../amx.py's micro kernel and GEMM), for
targets with AMX; written with TVM's IRBuilder (plain loops and extern calls in a root block), not scheduled.

The same GEMM as bf16/amx_kernels.py with 4-byte units of four u8 activations: the input stage writes every stage
pixel's u8 values (s8 activations + 128, like the VNNI kernels' input stage) padded with the activation's zero
point (u8), so the zero-point compensation stays the per-channel int32 Bi of packing.epilogue_constants; a conv's
stage is the padded input split into phase images (stride > 1). The weights are the VNNI packing ([OCp/16, KH, KW,
C4/4, 16, 4], which is tdpbusd's B layout: K/4 rows of 16 channels x 4 bytes) over the logical input channels
padded to whole steps of KP quads (zero weights). s32 accumulation is exact, so the results equal the VNNI
kernel's bit for bit: the 32 x 32 s32 block goes through a scratch buffer to the same requantize epilogue
(epilogue.epilogue_expr: zero points, bias, scale, bounds, fused residual), 16 lanes at a time. An u8 NHWC input
that already is the stage (1x1, stride 1, no padding, its physical channels whole steps) is read in place. Grids of
fewer than 32 rows (dense layers of few rows, tiny images) and reductions of fewer than MIN_QUADS quads (1x1:
MIN_QUADS_1X1) stay on the VNNI kernel (kernels.py). A KxK conv of few channels (a stem's 3) is a strip
(conv_layout): its KW taps x C channels are read as consecutive bytes of the padded input itself, so its stage is
no bigger than the input (bf16's fold, a stage pixel of KW*C channels per output pixel, made ResNet-18's int8 stem
slower on AMX than on vpdpbusd, 822 vs 501 us on 1 thread; the strip: 289 us).
"""
from __future__ import annotations

import dataclasses

from .. import amx
from ..amx import BM
from .epilogue import epilogue_expr, to_u8

#: a conv or dense layer needs at least this many quads (4 input channels; a strip: KW*C bytes) per step for AMX
#: (MobileNetV2's 3x3/2 stem, a strip of 3 quads: 132 vs 121 us on VNNI, 1 thread)
MIN_QUADS = 4
#: amx.conv_layout's fold (bf16's: the KW taps of a row as the channels of stage pixels of their own) for none:
#: the folded int8 stem ran slower than VNNI's (822 vs 501 us: the stage dominates); a strip replaces it
FOLD_QUADS = 0


#: a 1x1 conv needs at least this many quads: with fewer its AMX kernel is no faster than VNNI's (1 thread,
#: MobileNetV2's 112x112 16 -> 96 expand conv 217 vs 193 us, 56x56 24 -> 144 94 vs 96)
MIN_QUADS_1X1 = 8


def _in_place(s) -> bool:
    """An u8 NHWC input the 1x1 stride-1 unpadded kernel reads as its stage."""
    return (s.in_layout == "NHWC" and s.in_dtype == "uint8" and s.KH == s.KW == 1 and tuple(s.stride) == (1, 1)
            and not any(s.pad))


def _strip(s) -> bool:
    """Whether conv spec s takes the strip layout (a KxK conv of fewer than MIN_QUADS input quads: a stem)."""
    return s.KW > 1 and -(-s.C // 4) < MIN_QUADS and tuple(s.dilation) == (1, 1)


def conv_layout(s) -> amx.ConvLayout:
    """The stage of int8 conv spec s (amx.ConvLayout, units = quads of u8). An input read in place (_in_place)
    reduces over its physical channels (another kernel's zero padding included: zero weights) where they are whole
    steps, which spares the stage copy. A strip (_strip, amx.strip_layout): the zero-point-padded input itself,
    stage pixels of sw*C bytes."""
    if _strip(s):
        return amx.strip_layout(s, 4)
    lay = amx.conv_layout(s, 4, FOLD_QUADS)
    phys = (s.Cphys or s.C) // 4
    if _in_place(s) and (s.Cphys or s.C) % 4 == 0 and phys > lay.units and amx.padded_units(phys) == phys:
        return dataclasses.replace(lay, units=phys)
    return lay


def conv_fits(s) -> bool:
    """Whether the AMX kernel takes int8 conv spec s (its target has AMX: s.amx)."""
    if not s.amx:
        return False
    lay = conv_layout(s)
    least = MIN_QUADS_1X1 if s.KH == s.KW == 1 else MIN_QUADS
    return lay.units >= least and lay.rows >= BM


def dense_fits(s) -> bool:
    return s.amx and s.M >= BM and -(-s.K // 4) >= MIN_QUADS


def conv_weight(s, w):
    """int8 OIHW weights for the AMX kernel of spec s: [OCp/16, KH, KW, quads, 16, 4], quads padded to whole
    steps."""
    from .packing import pack_conv_weight
    lay = conv_layout(s)
    if lay.fold:
        OC, C, KH, KW = w.shape
        w = w.transpose(0, 3, 1, 2).reshape(OC, KW * C, KH, 1)
    return pack_conv_weight(w, 4 * amx.padded_units(lay.units), "vnni")


def dense_weight(s, w):
    """int8 [N, K] weights for the AMX dense kernel: [Np/16, quads, 16, 4], quads padded to whole steps."""
    from .packing import pack_dense_weight
    return pack_dense_weight(w, 4 * amx.padded_units(-(-s.K // 4)), "vnni")


def _finish(epi_of, Y, Ypos):
    """amx.build's epilogue: Y[Ypos(n, oh, ow, ch)] = epi_of(acc, n, oh, ow, ch), 16 lanes at a time."""
    from tvm.script.ir_builder import tirx as T

    def finish(D, r, ob, n, oh, ow, cols):
        with T.serial(0, cols // 16) as v:
            with T.vectorized(0, 16) as i:
                ch = ob * amx.BN + v * 16 + i
                T.buffer_store(Y, epi_of(D[r, v * 16 + i], n, oh, ow, ch), Ypos(n, oh, ow, ch))
    return finish


def conv2d_amx(s, residual: bool = False):
    """PrimFunc (X, Wp int8 (conv_weight), Bi, M, Bf[, R], Y NHWC [N, OH, OW, OCp]) of int8 conv spec s on AMX."""
    from tvm import tirx
    from .intrinsics import KERNEL_ATTR
    lay = conv_layout(s)
    g = amx.Grid.conv("int8", s, lay, s.stride[1] * s.C if lay.fold else None)
    cin = (s.Cphys or s.C) if s.in_layout == "NHWC" else s.C
    zx_u = s.zx + (128 if s.in_dtype == "int8" else 0)
    xshape = (s.N, s.C, s.H, s.W) if s.in_layout == "NCHW" else (s.N, s.H, s.W, cin)
    X = tirx.decl_buffer(xshape, s.in_dtype, "X")
    Wp = tirx.decl_buffer((s.OCp // 16, s.KH, g.KW, g.units, 16, 4), "int8", "W")
    Bi = tirx.decl_buffer((s.OCp,), "int32", "Bi")
    Mq = tirx.decl_buffer((s.OCp,), "float32", "M")
    Bf = tirx.decl_buffer((s.OCp,), "float32", "Bf")
    R = tirx.decl_buffer((s.N, s.OH, s.OW, s.OCp), s.epi.res_dtype, "R") if residual else None
    Y = tirx.decl_buffer((s.N, s.OH, s.OW, s.OCp), s.epi.out_dtype, "Y")

    def read(n, hh, ww, cc):
        v = X[n, cc, hh, ww] if s.in_layout == "NCHW" else X[n, hh, ww, cc]      # cc < C <= cin (conv_source)
        return to_u8(v, s.in_dtype)

    def epi(acc, n, oh, ow, ch):
        return epilogue_expr(s.epi, acc, Bi[ch], Mq[ch], Bf[ch], R[n, oh, ow, ch] if R is not None else None)
    direct = _in_place(s) and cin == 4 * g.units
    source = None if direct else g.conv_source(s, lay, read, tirx.const(zx_u, "uint8"))
    args = [X, Wp, Bi, Mq, Bf] + ([R] if R is not None else []) + [Y]
    return amx.build(g, args, X, source, Wp, _finish(epi, Y, lambda n, oh, ow, ch: [n, oh, ow, ch]),
                     {KERNEL_ATTR: "conv2d_amx"})


def dense_amx(s):
    """PrimFunc (A [M, Kin] u8/s8, Wp int8 (dense_weight), Bi, M, Bf, Y [M, Np]) of int8 dense spec s on AMX."""
    from tvm import tirx
    from .intrinsics import KERNEL_ATTR
    k4a = amx.padded_units(-(-s.K // 4))
    kin = max(s.K, s.Kphys)
    zx_u = s.zx + (128 if s.in_dtype == "int8" else 0)
    A = tirx.decl_buffer((s.M, kin), s.in_dtype, "A")
    Wp = tirx.decl_buffer((s.Np // 16, k4a, 16, 4), "int8", "W")
    Bi = tirx.decl_buffer((s.Np,), "int32", "Bi")
    Mq = tirx.decl_buffer((s.Np,), "float32", "M")
    Bf = tirx.decl_buffer((s.Np,), "float32", "Bf")
    Y = tirx.decl_buffer((s.M, s.Np), s.epi.out_dtype, "Y")

    def source(n, ph, i, j, c):
        return tirx.if_then_else(c < kin, to_u8(A[j, tirx.min(c, kin - 1)], s.in_dtype), tirx.const(zx_u, "uint8"))
    direct = s.in_dtype == "uint8" and kin == 4 * k4a
    g = amx.Grid("int8", 1, 1, 1, s.M, s.M, s.M, k4a, s.Np, 1, 1, lambda kh, kw: 0)
    finish = _finish(lambda acc, n, oh, ow, ch: epilogue_expr(s.epi, acc, Bi[ch], Mq[ch], Bf[ch]), Y,
                     lambda n, oh, ow, ch: [ow, ch])
    return amx.build(g, [A, Wp, Bi, Mq, Bf, Y], A, None if direct else source, Wp, finish,
                     {KERNEL_ATTR: "dense_amx"})
