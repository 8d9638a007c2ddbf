"""The scheduled bf16 PrimFuncs: conv2d and dense with bf16 inputs and fp32 accumulation (vdpbf16ps), fp32 epilogue.

Inputs are fp32 (the graph's tensors) or, for a conv reading another bf16 conv's output, bf16 bits (uint16 NHWC);
each kernel's input stage (the zero-padded copy the micro kernel reads) rounds fp32 inputs to bf16 pairs:
[N, H+pads, W+pads, C2*2] for a conv (NHWC, from an NCHW or NHWC input), [M, K2*2] for a dense layer; an unpadded
conv over bf16 bits reads its input directly. Weights arrive packed (packing.py). The micro kernel is a register
tile of TM output pixels (rows) x TN*16 channels whose innermost 16 x 2 block is tensorized with intrinsic.INTRIN.
The epilogue adds the bias, applies relu / clip bounds, and for convs optionally adds a residual tensor (NHWC) and
applies a second bound, in fp32, in the same loop nest. Outputs are NHWC [N, OH, OW, OCp] / [M, Np], channels padded
to 16 (zero weights), fp32, or for a conv whose readers are all bf16 convs (which round their input to bf16 anyway)
its bf16 bits rounded the same way (vcvtne2ps2bf16 / vcvtneps2bf16; fp32 denormals flush to zero): the same results
with half the memory traffic and, for unpadded convs, no input stage. A conv reduces over its input's logical
channels only (C2 pairs), not the zero channels another kernel padded it with.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import conv_padding_rows as padding_rows
from ..conv_geometry import ConvOutputSize
from ..int8.kernels import MAX_TILE_ACC, pick_tiles
from .epilogue import KERNEL_ATTR, NO_BOUNDS, bounded, conv_epilogue, residual_value
from .intrinsic import CVT2_INTRIN, CVT_INTRIN, INTRIN, bf16_value, import_llvm, register_intrinsic, to_bf16_bits



@dataclass(frozen=True)
class ConvSpec(ConvOutputSize):
    N: int
    H: int
    W: int
    C: int                      # logical input channels
    OC: int
    KH: int
    KW: int
    stride: tuple = (1, 1)
    pad: tuple = (0, 0, 0, 0)   # top, left, bottom, right
    dilation: tuple = (1, 1)
    in_layout: str = "NCHW"     # NCHW (logical) or NHWC (physical, Cphys channels)
    Cphys: int = 0
    act: tuple = NO_BOUNDS      # fp32 (lo, hi) after the bias; None: unbounded
    residual: bool = False      # add a residual NHWC [N, OH, OW, OCp] input, then apply act2
    act2: tuple = NO_BOUNDS
    in_bf16: bool = False       # X holds bf16 bits (uint16, NHWC, Cphys channels, an even count)
    out_bf16: bool = False      # Y holds the bf16 bits of the fp32 result (uint16)
    hswish: tuple = ()          # (scale, shift): after act, v * clip(v + 3, 0, 6) / 6 * scale + shift; (): none
    amx: bool = False           # the target has AMX: the AMX kernel where it takes the shape (amx_kernels.conv_fits)
    res_bf16: bool = False      # the residual holds bf16 bits (uint16): another bf16 kernel's output

    @property
    def cin(self):
        return (self.Cphys or self.C) if self.in_layout == "NHWC" else self.C

    @property
    def C2(self):
        """Channel pairs the kernel reduces over: the logical channels, not an NHWC input's zero padding (a 1x1 conv
        reading 24 channels padded to 32 did a third more work: 56x56, 24 -> 144 channels, 74 us, OpenVINO 53)."""
        return -(-self.C // 2)

    @property
    def OCp(self):
        return -(-self.OC // 16) * 16

    @property
    def fold_pairs(self) -> int:
        """Pairs per kernel row when its KW taps are folded into the channels (fold_kw)."""
        return -(-self.KW * self.C // 2)

    @property
    def fold_kw(self) -> bool:
        """The AVX512-BF16 kernel reads a kernel row's KW taps x C channels as one run of pairs (an odd channel
        count wastes a zero per tap otherwise: the 3-channel stem's 7 taps are 11 pairs, not 14): an fp32 NHWC
        input (the stems after the input's transpose), undilated, where folding saves pairs and the AMX kernel does
        not take the conv (it folds in its own way). 1 thread, AMD EPYC: ResNet's 7x7/2 stem on 224x224x3 1448 ->
        1093 us, a 3x3/2 stem 204 -> 140, the detector's on 640x640 1185 -> 755. From an NCHW input the stage's
        gather costs more: 7x7 1454 -> 1263, but 3x3 240 -> 305, so NCHW inputs keep the pair-padded stage."""
        from . import amx_kernels
        return (not self.in_bf16 and self.in_layout == "NHWC" and self.KW > 1 and tuple(self.dilation) == (1, 1)
                and self.fold_pairs < self.KW * self.C2 and not amx_kernels.conv_fits(self))



@dataclass(frozen=True)
class DenseSpec:
    M: int
    K: int
    N: int
    Kphys: int = 0              # columns of the input (>= K; padded rows from another kernel)
    act: tuple = NO_BOUNDS
    amx: bool = False           # the target has AMX: the AMX kernel where it takes the shape (amx_kernels.dense_fits)

    @property
    def K2(self):
        return -(-max(self.K, self.Kphys) // 2)

    @property
    def K2w(self):
        """Pairs of the packed weights: K2, padded to the AMX kernel's steps where it runs."""
        from . import amx_kernels
        return amx_kernels.padded_pairs(self.K2) if amx_kernels.dense_fits(self) else self.K2

    @property
    def Np(self):
        return -(-self.N // 16) * 16


def conv_weight(spec: ConvSpec, w):
    """fp32 OIHW weights packed for conv2d_bf16(spec): [OCp/16, KH, KW, C2, 16, 2]; with spec.fold_kw
    [OCp/16, KH, 1, fold_pairs, 16, 2] (pair q of kernel row kh: taps kw*C + c = 2q, 2q + 1); or the AMX kernel's
    packing where it runs (amx_kernels.conv_weight)."""
    from . import amx_kernels
    from .packing import pack_conv_weight
    if amx_kernels.conv_fits(spec):
        return amx_kernels.conv_weight(spec, w)
    if spec.fold_kw:
        OC, C, KH, KW = w.shape
        wf = w.transpose(0, 3, 1, 2).reshape(OC, KW * C, KH, 1)
        if KW * C % 2:          # the last pair is (tap KW*C - 2, tap KW*C - 1): a zero weight for the first
            wf = np.concatenate([wf[:, :-1], np.zeros_like(wf[:, :1]), wf[:, -1:]], axis=1)
        return pack_conv_weight(wf, spec.fold_pairs)
    return pack_conv_weight(w, spec.C2)


def conv2d_bf16(spec: ConvSpec):
    """PrimFunc (X fp32 in spec.in_layout or bf16 bits NHWC, Wp uint16 (conv_weight),
    B fp32 [OCp][, R fp32 NHWC], Y NHWC [N, OH, OW, OCp] fp32 or bf16 bits): on AMX where amx_kernels.conv_fits,
    else scheduled for AVX512-BF16."""
    from tvm import te, tirx

    from . import amx_kernels
    if amx_kernels.conv_fits(spec):
        return amx_kernels.conv2d_amx(spec)
    s = spec
    OH, OW, C2, OCp, cin = s.OH, s.OW, s.C2, s.OCp, s.cin
    sh, sw = s.stride
    dh, dw = s.dilation
    pt, pl, pb, pr = s.pad
    assert not s.in_bf16 or (s.in_layout == "NHWC" and cin % 2 == 0), s
    X = te.placeholder((s.N, s.C, s.H, s.W) if s.in_layout == "NCHW" else (s.N, s.H, s.W, cin),
                       "uint16" if s.in_bf16 else "float32", name="X")
    Wp = te.placeholder((OCp // 16, s.KH, s.KW, C2, 16, 2), "uint16", name="W")
    B = te.placeholder((OCp,), "float32", name="B")

    def pad_value(n, h, w, c):
        cond = tirx.all(h >= pt, h < s.H + pt, w >= pl, w < s.W + pl, c < cin)
        hh, ww = tirx.min(tirx.max(h - pt, 0), s.H - 1), tirx.min(tirx.max(w - pl, 0), s.W - 1)
        cc = tirx.min(c, cin - 1)
        src = X[n, cc, hh, ww] if s.in_layout == "NCHW" else X[n, hh, ww, cc]
        return tirx.if_then_else(cond, src if s.in_bf16 else to_bf16_bits(src), tirx.const(0, "uint16"))
    if s.fold_kw:
        # the padded rows flat, C channels per pixel and no pair padding ([N, Hp, Wp*C]): output pixel ow's kernel
        # row is the run of KW*C values from ow*sw*C, read as fold_pairs pairs; an odd run's last pair starts one
        # value early (its first weight zero: conv_weight), so no pair reads past the run (a NaN or inf there,
        # times a zero weight, would reach this pixel)
        Q, run = s.fold_pairs, s.KW * s.C
        Wp = te.placeholder((OCp // 16, s.KH, 1, Q, 16, 2), "uint16", name="W")
        P = te.compute((s.N, s.H + pt + pb, (s.W + pl + pr) * s.C),
                       lambda n, h, f: pad_value(n, h, f // s.C, f % s.C), name="pad")
        kh = te.reduce_axis((0, s.KH), "kh")
        kw = te.reduce_axis((0, 1), "kw")
        q = te.reduce_axis((0, Q), "c2")
        ci = te.reduce_axis((0, 2), "ci")
        acc = te.compute(
            (s.N, OH, OW, OCp // 16, 16),
            lambda n, oh, ow, ob, oi: te.sum(
                bf16_value(P[n, oh * sh + kh, ow * sw * s.C + kw + tirx.min(q * 2, run - 2) + ci])
                * bf16_value(Wp[ob, kh, kw, q, oi, ci]), axis=[kh, kw, q, ci]),
            name="acc")
    else:
        if s.in_bf16 and not any(s.pad):
            P = X                                        # already bf16 pairs, nothing to pad
        else:
            P = te.compute((s.N, s.H + pt + pb, s.W + pl + pr, C2 * 2), pad_value, name="pad")
        kh = te.reduce_axis((0, s.KH), "kh")
        kw = te.reduce_axis((0, s.KW), "kw")
        c2 = te.reduce_axis((0, C2), "c2")
        ci = te.reduce_axis((0, 2), "ci")
        acc = te.compute(
            (s.N, OH, OW, OCp // 16, 16),
            lambda n, oh, ow, ob, oi: te.sum(
                bf16_value(P[n, oh * sh + kh * dh, ow * sw + kw * dw, c2 * 2 + ci])
                * bf16_value(Wp[ob, kh, kw, c2, oi, ci]), axis=[kh, kw, c2, ci]),
            name="acc")
    args = [X, Wp, B]
    assert not (s.residual and s.hswish), s
    R = te.placeholder((s.N, OH, OW, OCp), "uint16" if s.res_bf16 else "float32", name="R") if s.residual else None
    args += [R] if s.residual else []
    Y = te.compute((s.N, OH, OW, OCp), lambda n, h, w, o: conv_epilogue(
        s, acc[n, h, w, o // 16, o % 16], B[o], residual_value(s, R[n, h, w, o]) if s.residual else None, o),
        name="out")
    if s.out_bf16:
        Y = te.compute(Y.shape, lambda *i: to_bf16_bits(Y(*i)), name="cvt")
    rows = dict(H=s.H, OH=OH, KH=s.KH, stride=sh, pad_top=pt) if padding_rows.pays(s.H, OH, s.KH, sh, pt, dh) \
        else None
    return _schedule(te.create_prim_func(args + [Y]), OW, OCp // 16, "conv2d", rows)


def dense_bf16(spec: DenseSpec):
    """PrimFunc (A fp32 [M, Kin], Wp uint16 [Np/16, K2w, 16, 2], B fp32 [Np], Y fp32 [M, Np]): on AMX where
    amx_kernels.dense_fits, else scheduled for AVX512-BF16."""
    from tvm import te, tirx

    from . import amx_kernels
    if amx_kernels.dense_fits(spec):
        return amx_kernels.dense_amx(spec)
    s = spec
    K2, Np = s.K2, s.Np
    kin = max(s.K, s.Kphys)
    A = te.placeholder((s.M, kin), "float32", name="A")
    Wp = te.placeholder((Np // 16, K2, 16, 2), "uint16", name="W")
    B = te.placeholder((Np,), "float32", name="B")
    P = te.compute((s.M, K2 * 2), lambda m, k: tirx.if_then_else(
        k < kin, to_bf16_bits(A[m, tirx.min(k, kin - 1)]), tirx.const(0, "uint16")), name="pad")
    k2 = te.reduce_axis((0, K2), "k2")
    ki = te.reduce_axis((0, 2), "ki")
    acc = te.compute((s.M, Np // 16, 16), lambda m, nb, ni: te.sum(
        bf16_value(P[m, k2 * 2 + ki]) * bf16_value(Wp[nb, k2, ni, ki]), axis=[k2, ki]), name="acc")
    Y = te.compute((s.M, Np), lambda m, n: bounded(acc[m, n // 16, n % 16] + B[n], s.act), name="out")
    return _schedule(te.create_prim_func([A, Wp, B, Y]), s.M, Np // 16, "dense")


@dataclass(frozen=True)
class BatchMatmulSpec:
    """X[*batch, M, K] @ Y[*batch, K, N] of two fp32 activations (attention's QK^T and PV), N a multiple of 16; the
    result optionally divided / multiplied by a scalar (scale_op "divide" | "multiply": the 1/sqrt(d) after QK^T)."""
    batch: tuple
    M: int
    K: int
    N: int
    scale_op: str | None = None
    scale: float = 1.0

    @property
    def K2(self):
        return -(-self.K // 2)


def batch_matmul_bf16(spec: BatchMatmulSpec):
    """PrimFunc (X fp32 [*batch, M, K], Y fp32 [*batch, K, N], Z fp32 [*batch, M, N]) for AVX512-BF16: both operands
    rounded to bf16 on the way in (X into pairs [*batch, M, K2*2], Y packed per call into [*batch, N/16, K2, 16, 2],
    the layout dense_bf16's packed weights have), fp32 accumulation, the scale applied in the epilogue."""
    from tvm import te, tirx
    s = spec
    nb, K2 = len(s.batch), s.K2
    X = te.placeholder((*s.batch, s.M, s.K), "float32", name="X")
    Y = te.placeholder((*s.batch, s.K, s.N), "float32", name="Y")
    P = te.compute((*s.batch, s.M, K2 * 2), lambda *i: tirx.if_then_else(
        i[-1] < s.K, to_bf16_bits(X[(*i[:-1], tirx.min(i[-1], s.K - 1))]), tirx.const(0, "uint16")), name="pad")
    Wp = te.compute((*s.batch, s.N // 16, K2, 16, 2), lambda *i: tirx.if_then_else(
        i[nb + 1] * 2 + i[nb + 3] < s.K,
        to_bf16_bits(Y[(*i[:nb], tirx.min(i[nb + 1] * 2 + i[nb + 3], s.K - 1), i[nb] * 16 + i[nb + 2])]),
        tirx.const(0, "uint16")), name="pack")
    k2 = te.reduce_axis((0, K2), "k2")
    ki = te.reduce_axis((0, 2), "ki")
    acc = te.compute((*s.batch, s.M, s.N // 16, 16), lambda *i: te.sum(
        bf16_value(P[(*i[:nb], i[nb], k2 * 2 + ki)]) * bf16_value(Wp[(*i[:nb], i[nb + 1], k2, i[nb + 2], ki)]),
        axis=[k2, ki]), name="acc")

    # a divide as a multiply by the reciprocal (exact for 1/sqrt(64), within an fp32 ulp else): vdivps is slow
    mult = 1.0 / s.scale if s.scale_op == "divide" else s.scale if s.scale_op == "multiply" else None
    Z = te.compute((*s.batch, s.M, s.N), lambda *i: acc[(*i[:-1], i[-1] // 16, i[-1] % 16)] if mult is None
                   else acc[(*i[:-1], i[-1] // 16, i[-1] % 16)] * tirx.const(mult, "float32"), name="out")
    return _schedule(te.create_prim_func([X, Y, Z]), s.M, s.N // 16, "batch_matmul")


def _schedule(func, rows: int, col_blocks: int, kind: str, padding_rows_of: dict | None = None):
    """Register tiles of TM rows (output pixels along a row) x TN 16-channel blocks, the reduction outermost inside
    the tile, the 16 x 2 block tensorized; parallel over the tiles; vectorized input stage and epilogue. A conv
    with padding_rows_of (conv_padding_rows.bound_kernel_rows's geometry) skips the kernel rows on its padding."""
    from tvm.s_tir import Schedule

    from ..cpu_sched_common import has_block
    register_intrinsic()
    sch = Schedule(func)
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    TM, TN = pick_tiles(rows, col_blocks, MAX_TILE_ACC)
    sch.set_scope(acc, 0, "local")
    loops = sch.get_loops(out)
    w, o = loops[-2], loops[-1]
    wo, wi = sch.split(w, [None, TM])
    oo, oi = sch.split(o, [None, TN * 16])
    sch.reorder(oo, *loops[:-2], wo, wi, oi)
    sch.compute_at(acc, wo, preserve_unit_loops=True)
    par = sch.fuse(oo, *loops[:-2])
    sch.parallel(par)
    import_llvm(sch, par)
    red = 3 if kind == "conv2d" else 1                       # (kh, kw, c2) | (k2)
    acc_loops = sch.get_loops(acc)[-(len(loops) + 1 + red + 1):]
    spatial, reduction = acc_loops[:len(loops) + 1], acc_loops[len(loops) + 1:]
    sch.reorder(*reduction[:-1], *spatial, reduction[-1])
    sch.decompose_reduction(acc, reduction[0])
    init = sch.get_sblock("acc_init")
    sch.tensorize(spatial[-1], INTRIN)
    sch.unroll(spatial[-3])
    sch.unroll(spatial[-2])
    sch.vectorize(sch.get_loops(init)[-1])
    _, vi = sch.split(oi, [None, 16])
    sch.vectorize(vi)
    if has_block(sch, "cvt"):             # bf16 output: the fp32 tile rounded 32 lanes at a time by vcvtne2ps2bf16
        cvt = sch.get_sblock("cvt")        # (16 by vcvtneps2bf16 where the tile has an odd number of vectors)
        sch.reverse_compute_at(cvt, wo, preserve_unit_loops=True)
        sch.set_scope(out, 0, "local")
        lanes, intrin = (32, CVT2_INTRIN) if TN % 2 == 0 else (16, CVT_INTRIN)
        sch.tensorize(sch.split(sch.get_loops(cvt)[-1], [None, lanes])[1], intrin)
    if has_block(sch, "pack"):            # batch_matmul's Y, packed per call: parallel over batch entries
        ploops = sch.get_loops(sch.get_sblock("pack"))
        sch.parallel(sch.fuse(*ploops[:-3]))
        sch.unroll(ploops[-1])
    if has_block(sch, "pad"):
        pad = sch.get_sblock("pad")
        ploops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*ploops[:2]) if kind == "conv2d" else ploops[0] if len(ploops) == 2
                     else sch.fuse(*ploops[:-1]))
        extent = int(sch.get(ploops[-1]).extent)       # channels (pairs * 2): 24 ran scalar, 300x slower
        lanes = next((v for v in (16, 8) if extent % v == 0), 0)
        if lanes:
            sch.vectorize(sch.split(ploops[-1], [None, lanes])[1])
    if padding_rows_of:                    # last: it replaces a loop behind the schedule's back
        padding_rows.bound_kernel_rows(sch, par, **padding_rows_of)
    return sch.mod["main"].with_attr(KERNEL_ATTR, kind)
