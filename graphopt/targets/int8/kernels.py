"""The scheduled integer PrimFuncs: TE compute plus a hand schedule (conv2d, dense, depthwise conv2d, max pool)."""
from __future__ import annotations

from .. import conv_padding_rows as padding_rows
from .intrinsics import KERNEL_ATTR, TENSOR_INTRINS, register_intrinsics
from .epilogue import epilogue_expr, nearbyint, to_u8
from .specs import ConvSpec, DenseSpec

#: 16-lane s32 accumulators a micro tile may use. x86: one zmm each, 24 of the 32 (room for the weights and the
#: broadcast). aarch64: four 128-bit NEON registers each, 6 (24 registers) of the 32.
MAX_TILE_ACC = 24
MAX_TILE_ACC_BY_DOT = {"usdot": 6}
#: a conv whose whole reduction is at most SHORT_REDUCTION 4-channel steps (a 1x1 conv over up to 32 channels) is
#: fully unrolled by LLVM, which then keeps every weight vector of the tile in a register across the row, and its
#: requantize epilogue outweighs its vpdpbusd: its tile holds at most SHORT_TILE_ACC accumulators (24 spilled:
#: MobileNetV2's 16 -> 96 conv, 112x112, 141 -> 105 us with 12; one Zen 4 core, 2 x 3 tiles against the 24- and
#: 12-accumulator ones: 112x112 16 -> 96 199 -> 185 us, 56x56 24 -> 144 108 -> 92, 28x28 32 -> 192 49 -> 43)
SHORT_REDUCTION, SHORT_TILE_ACC = 8, 6


def pick_tiles(width: int, oc_blocks: int, max_acc: int = MAX_TILE_ACC) -> tuple[int, int]:
    """(TM pixels, TN 16-channel blocks): TM divides width, TN divides oc_blocks, TM*TN accumulators fit."""
    best = (1, 1, 0)
    for tn in (4, 3, 2, 1):
        if oc_blocks % tn:
            continue
        for tm in range(min(width, 14), 0, -1):
            if width % tm or tm * tn > max_acc:
                continue
            score = tm * tn + (0.5 if tn >= 2 else 0)   # prefer more accumulators, then wider channel tiles
            if score > best[2]:
                best = (tm, tn, score)
            break
    return best[0], best[1]


def conv_weight(spec: ConvSpec, w, dot: str = "vnni"):
    """int8 OIHW weights packed for the kernel conv2d_int8 builds for spec: AMX's (amx_kernels.conv_weight) where
    it takes the shape, else pack_conv_weight's for the dot product."""
    from . import amx_kernels
    from .packing import pack_conv_weight
    return amx_kernels.conv_weight(spec, w) if amx_kernels.conv_fits(spec) else pack_conv_weight(w, spec.C4, dot)


def dense_weight(spec: DenseSpec, w, dot: str = "vnni"):
    """int8 [N, K] weights packed for the kernel dense_int8 builds for spec (AMX's where it takes the shape)."""
    from . import amx_kernels
    from .packing import pack_dense_weight
    return amx_kernels.dense_weight(spec, w) if amx_kernels.dense_fits(spec) else pack_dense_weight(w, spec.K4, dot)


def conv2d_int8(spec: ConvSpec, dot: str = "vnni", cores: int = 1, residual: bool = False):
    """PrimFunc (X, Wp (conv_weight), Bi, M, Bf[, R], Y): X u8/s8 in spec.in_layout, Y NHWC with OCp channels; on
    AMX tiles where amx_kernels.conv_fits (spec.amx: the target has AMX), else scheduled for the dot product."""
    from . import amx_kernels
    if amx_kernels.conv_fits(spec):
        return amx_kernels.conv2d_amx(spec, residual)
    from tvm import te, tirx
    s = spec
    OH, OW, C4, OCp = s.OH, s.OW, s.C4, s.OCp
    sh, sw = s.stride
    dh, dw = s.dilation
    pt, pl, pb, pr = s.pad
    zx_u = s.zx + (128 if s.in_dtype == "int8" else 0)
    xshape = (s.N, s.C, s.H, s.W) if s.in_layout == "NCHW" else (s.N, s.H, s.W, s.Cphys or s.C)
    X = te.placeholder(xshape, s.in_dtype, name="X")
    wshape = (OCp // 16, s.KH, s.KW, C4 // 4) + ((16, 4) if dot in TENSOR_INTRINS else (4, 16))
    Wp = te.placeholder(wshape, "int8", name="W")
    wl = (lambda ob, kh, kw, c4, oi, ci: Wp[ob, kh, kw, c4, oi, ci]) if dot in TENSOR_INTRINS else \
        (lambda ob, kh, kw, c4, oi, ci: Wp[ob, kh, kw, c4, ci, oi])
    Bi = te.placeholder((OCp,), "int32", name="Bi")
    Mq = te.placeholder((OCp,), "float32", name="M")
    Bf = te.placeholder((OCp,), "float32", name="Bf")
    Hp, Wpd = s.H + pt + pb, s.W + pl + pr
    cin = s.Cphys or s.C if s.in_layout == "NHWC" else s.C
    direct = (s.in_layout == "NHWC" and s.in_dtype == "uint8" and not any(s.pad) and cin >= C4)
    if direct:
        P = X
    else:
        def pad_value(n, h, w, c):
            conds = []
            if pt:
                conds.append(h >= pt)
            if pb:
                conds.append(h < s.H + pt)
            if pl:
                conds.append(w >= pl)
            if pr:
                conds.append(w < s.W + pl)
            if C4 > cin:         # channels past the input's (C rounded up to 4) read the zero point
                conds.append(c < cin)
            if s.in_layout == "NCHW":
                src = X[n, c, h - pt, w - pl]
            else:
                src = X[n, h - pt, w - pl, c]
            src = to_u8(src, s.in_dtype)
            if not conds:
                return src
            cond = conds[0]
            for c2 in conds[1:]:
                cond = tirx.all(cond, c2)
            return tirx.if_then_else(cond, src, tirx.const(zx_u, "uint8"))
        P = te.compute((s.N, Hp, Wpd, C4), pad_value, name="pad")
    kh = te.reduce_axis((0, s.KH), "kh")
    kw = te.reduce_axis((0, s.KW), "kw")
    c4 = te.reduce_axis((0, C4 // 4), "c4")
    ci = te.reduce_axis((0, 4), "ci")
    acc = te.compute(
        (s.N, OH, OW, OCp // 16, 16),
        lambda n, oh, ow, ob, oi: te.sum(
            P[n, oh * sh + kh * dh, ow * sw + kw * dw, c4 * 4 + ci].astype("int32")
            * wl(ob, kh, kw, c4, oi, ci).astype("int32"), axis=[kh, kw, c4, ci]),
        name="acc")
    args = [X, Wp, Bi, Mq, Bf]
    if residual:
        R = te.placeholder((s.N, OH, OW, OCp), s.epi.res_dtype, name="R")
        args.append(R)
        Y = te.compute((s.N, OH, OW, OCp), lambda n, h, w, o: epilogue_expr(
            s.epi, acc[n, h, w, o // 16, o % 16], Bi[o], Mq[o], Bf[o], R[n, h, w, o]), name="out")
    else:
        Y = te.compute((s.N, OH, OW, OCp), lambda n, h, w, o: epilogue_expr(
            s.epi, acc[n, h, w, o // 16, o % 16], Bi[o], Mq[o], Bf[o]), name="out")
    func = te.create_prim_func(args + [Y])
    # the padding rows are skipped only where they hold zeros (a u8 input with zero point 0: ReLU's output): a
    # zero point's taps are part of the sums the epilogue's folded correction takes away
    rows = dict(H=s.H, OH=OH, KH=s.KH, stride=sh, pad_top=pt) \
        if not direct and zx_u == 0 and padding_rows.pays(s.H, OH, s.KH, sh, pt, dh) else None
    return _schedule_conv(func, spec, dot, cores, padded=not direct, padding_rows_of=rows)


def _schedule_conv(func, spec: ConvSpec, dot: str, cores: int, padded: bool, padding_rows_of: dict | None = None):
    from tvm.s_tir import Schedule
    if dot in TENSOR_INTRINS:
        register_intrinsics()
    sch = Schedule(func)
    acc = sch.get_sblock("acc")
    out = sch.get_sblock("out")
    OW, OCb = spec.OW, spec.OCp // 16
    max_acc = MAX_TILE_ACC_BY_DOT.get(dot, MAX_TILE_ACC)
    if spec.KH * spec.KW * spec.C4 // 4 <= SHORT_REDUCTION:
        max_acc = min(max_acc, SHORT_TILE_ACC)
    TM, TN = pick_tiles(OW, OCb, max_acc)
    sch.set_scope(acc, 0, "local")
    n, h, w, o = sch.get_loops(out)
    wo, wi = sch.split(w, [None, TM])
    oo, oi = sch.split(o, [None, TN * 16])
    sch.reorder(oo, n, h, wo, wi, oi)
    sch.compute_at(acc, wo, preserve_unit_loops=True)
    par = sch.fuse(oo, n, h)
    sch.parallel(par)
    ln, lh, lw, lob, loi, lkh, lkw, lc4, lci = sch.get_loops(acc)[-9:]
    if dot in TENSOR_INTRINS:
        sch.reorder(lkh, lkw, lc4, ln, lh, lw, lob, loi, lci)
    else:
        sch.reorder(lkh, lkw, lc4, ln, lh, lw, lob, lci, loi)
        sch.vectorize(loi)
        sch.unroll(lci)
    sch.decompose_reduction(acc, lkh)
    init = sch.get_sblock("acc_init")
    if dot in TENSOR_INTRINS:
        sch.tensorize(loi, TENSOR_INTRINS[dot])
    sch.unroll(lw)
    sch.unroll(lob)
    il = sch.get_loops(init)
    sch.vectorize(il[-1])
    _, vi = sch.split(oi, [None, 16])
    sch.vectorize(vi)
    if padded:
        pad = sch.get_sblock("pad")
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*loops[:2]))
        if spec.in_layout == "NHWC":
            sch.vectorize(loops[-1])
    if padding_rows_of:                    # last: it replaces a loop behind the schedule's back
        padding_rows.bound_kernel_rows(sch, par, **padding_rows_of)
    return sch.mod["main"].with_attr(KERNEL_ATTR, f"conv2d_{dot}")


def dense_int8(spec: DenseSpec, dot: str = "vnni", cores: int = 1):
    """PrimFunc (A [M, Kin] u8/s8, Wp (dense_weight), Bi, M, Bf, Y [M, Np]): on AMX tiles where
    amx_kernels.dense_fits, else scheduled for the dot product."""
    from . import amx_kernels
    if amx_kernels.dense_fits(spec):
        return amx_kernels.dense_amx(spec)
    from tvm import te, tirx
    s = spec
    K4, Np = s.K4, s.Np
    kin = max(s.K, s.Kphys)
    zx_u = s.zx + (128 if s.in_dtype == "int8" else 0)
    A = te.placeholder((s.M, kin), s.in_dtype, name="A")
    tensorized = dot in TENSOR_INTRINS
    Wp = te.placeholder((Np // 16, K4 // 4) + ((16, 4) if tensorized else (4, 16)), "int8", name="W")
    wl = (lambda nb, k4, ni, ki: Wp[nb, k4, ni, ki]) if tensorized else (lambda nb, k4, ni, ki: Wp[nb, k4, ki, ni])
    Bi = te.placeholder((Np,), "int32", name="Bi")
    Mq = te.placeholder((Np,), "float32", name="M")
    Bf = te.placeholder((Np,), "float32", name="Bf")
    direct = s.in_dtype == "uint8" and kin == K4
    if direct:
        P = A
    else:
        P = te.compute((s.M, K4), lambda m, k: tirx.if_then_else(
            k < kin, to_u8(A[m, tirx.min(k, kin - 1)], s.in_dtype), tirx.const(zx_u, "uint8")), name="pad")
    k4 = te.reduce_axis((0, K4 // 4), "k4")
    ki = te.reduce_axis((0, 4), "ki")
    acc = te.compute((s.M, Np // 16, 16), lambda m, nb, ni: te.sum(
        P[m, k4 * 4 + ki].astype("int32") * wl(nb, k4, ni, ki).astype("int32"), axis=[k4, ki]), name="acc")
    Y = te.compute((s.M, Np), lambda m, n: epilogue_expr(s.epi, acc[m, n // 16, n % 16], Bi[n], Mq[n], Bf[n]),
                   name="out")
    func = te.create_prim_func([A, Wp, Bi, Mq, Bf, Y])
    from tvm.s_tir import Schedule
    if dot in TENSOR_INTRINS:
        register_intrinsics()
    sch = Schedule(func)
    acc_b, out = sch.get_sblock("acc"), sch.get_sblock("out")
    TM, TN = pick_tiles(s.M, Np // 16, MAX_TILE_ACC_BY_DOT.get(dot, MAX_TILE_ACC))
    sch.set_scope(acc_b, 0, "local")
    m, n = sch.get_loops(out)
    mo, mi = sch.split(m, [None, TM])
    no, ni_ = sch.split(n, [None, TN * 16])
    sch.reorder(no, mo, mi, ni_)
    sch.compute_at(acc_b, mo, preserve_unit_loops=True)
    sch.parallel(sch.fuse(no, mo))
    lm, lnb, lni, lk4, lki = sch.get_loops(acc_b)[-5:]
    if dot in TENSOR_INTRINS:
        sch.reorder(lk4, lm, lnb, lni, lki)
    else:
        sch.reorder(lk4, lm, lnb, lki, lni)
        sch.vectorize(lni)
        sch.unroll(lki)
    sch.decompose_reduction(acc_b, lk4)
    init = sch.get_sblock("acc_init")
    if dot in TENSOR_INTRINS:
        sch.tensorize(lni, TENSOR_INTRINS[dot])
    sch.unroll(lm)
    sch.unroll(lnb)
    sch.vectorize(sch.get_loops(init)[-1])
    _, vi = sch.split(ni_, [None, 16])
    sch.vectorize(vi)
    if not direct:
        pad = sch.get_sblock("pad")
        sch.vectorize(sch.get_loops(pad)[-1]) if K4 % 16 == 0 else None
    return sch.mod["main"].with_attr(KERNEL_ATTR, f"dense_{dot}")


def dwconv2d_int8(spec: ConvSpec, cores: int = 1):
    """Scheduled PrimFunc (X, Wdw [KH, KW, Cp], Bi, M, Bf, Y [N, OH, OW, Cp]): depthwise conv (one filter per
    channel) in NHWC: s32 sums of the KH*KW taps, vectorized along the channels (LLVM: widening int32
    multiplies and adds, exact), then the same requantize epilogue as the dense kernels, a row of output pixels
    per 16-channel block. There is no reduction over channels, so VNNI's 4-wide dot products do not apply."""
    from tvm import te, tirx
    s = spec
    OH, OW, Cp = s.OH, s.OW, s.OCp
    sh, sw = s.stride
    dh, dw = s.dilation
    pt, pl, pb, pr = s.pad
    zx_u = s.zx + (128 if s.in_dtype == "int8" else 0)
    cin = (s.Cphys or s.C) if s.in_layout == "NHWC" else s.C
    xshape = (s.N, s.C, s.H, s.W) if s.in_layout == "NCHW" else (s.N, s.H, s.W, cin)
    X = te.placeholder(xshape, s.in_dtype, name="X")
    Wk = te.placeholder((s.KH, s.KW, Cp), "int8", name="W")
    Bi = te.placeholder((Cp,), "int32", name="Bi")
    Mq = te.placeholder((Cp,), "float32", name="M")
    Bf = te.placeholder((Cp,), "float32", name="Bf")
    Hp, Wpd = s.H + pt + pb, s.W + pl + pr

    def pad_value(n, h, w, c):
        cond = tirx.all(h >= pt, h < s.H + pt, w >= pl, w < s.W + pl, c < min(cin, Cp))
        hh, ww = tirx.min(tirx.max(h - pt, 0), s.H - 1), tirx.min(tirx.max(w - pl, 0), s.W - 1)
        cc = tirx.min(c, cin - 1)
        src = X[n, cc, hh, ww] if s.in_layout == "NCHW" else X[n, hh, ww, cc]
        return tirx.if_then_else(cond, to_u8(src, s.in_dtype), tirx.const(zx_u, "uint8"))
    # strided: every tap reads the input in place (clamped index, zero point outside: cheaper than copying an input
    # stride^2 times the output's size); stride 1: one zero-point-padded copy, then plain loads
    padded = tuple(s.stride) == (1, 1) or s.in_layout != "NHWC" or cin != Cp
    if padded:
        P = te.compute((s.N, Hp, Wpd, Cp), pad_value, name="pad")

        def tapv(n, h, w, c):
            return P[n, h, w, c]
    else:
        def tapv(n, h, w, c):
            inside = tirx.all(h >= pt, h < s.H + pt, w >= pl, w < s.W + pl)
            hh, ww = tirx.min(tirx.max(h - pt, 0), s.H - 1), tirx.min(tirx.max(w - pl, 0), s.W - 1)
            # if_then_else, not Select: under a Select's condition the simplifier drops the clamp, and the load
            # (which a Select evaluates either way) then reads rows before the input (SIGSEGV on a fresh mapping)
            return tirx.if_then_else(inside, to_u8(X[n, hh, ww, c], s.in_dtype), tirx.const(zx_u, "uint8"))

    def body(n, h, w, c):
        acc = None
        for i in range(s.KH):
            for j in range(s.KW):
                t = tapv(n, h * sh + i * dh, w * sw + j * dw, c).astype("int32") * Wk[i, j, c].astype("int32")
                acc = t if acc is None else acc + t
        return epilogue_expr(s.epi, acc, Bi[c], Mq[c], Bf[c])
    Y = te.compute((s.N, OH, OW, Cp), body, name="out")
    from tvm.s_tir import Schedule
    sch = Schedule(te.create_prim_func([X, Wk, Bi, Mq, Bf, Y]))
    if padded:
        b = sch.get_sblock("pad")
        n, h, w, c = sch.get_loops(b)
        sch.parallel(sch.fuse(n, h))
        sch.vectorize(sch.split(c, [None, 16])[1])
    # a row of TW output pixels per 16-channel block: the block's KH*KW weight vectors are loaded once for the row
    b = sch.get_sblock("out")
    n, h, w, c = sch.get_loops(b)
    tw = next(t for t in (8, 7, 6, 4, 3, 2, 1) if OW % t == 0)
    wo, wi = sch.split(w, [None, tw])
    co, ci_ = sch.split(c, [None, 16])
    sch.reorder(wo, co, wi, ci_)
    sch.parallel(sch.fuse(n, h))
    sch.unroll(wi)
    sch.vectorize(ci_)
    return sch.mod["main"].with_attr(KERNEL_ATTR, "dwconv2d")


def maxpool_int8(N: int, H: int, W: int, C: int, OH: int, OW: int, pool: tuple, stride: tuple, pad: tuple,
                 dilation: tuple, dtype: str, cores: int = 1):
    """Scheduled PrimFunc (X [N, H, W, C], Y [N, OH, OW, C]): max pooling of an integer NHWC tensor. The input is
    padded with the type's lowest value (never the maximum of a window that holds a real element, like fp32's
    -inf), then every output is the max of its KH*KW taps, vectorized along the channels."""
    from tvm import te, tirx
    KH, KW = pool
    sh, sw = stride
    dh, dw = dilation
    pt, pl = pad[0], pad[1]
    Hp = max(H + pt + (pad[2] if len(pad) > 2 else pt), (OH - 1) * sh + (KH - 1) * dh + 1)
    Wp = max(W + pl + (pad[3] if len(pad) > 3 else pl), (OW - 1) * sw + (KW - 1) * dw + 1)
    lowest = tirx.const(0 if dtype == "uint8" else -128, dtype)
    X = te.placeholder((N, H, W, C), dtype, name="X")
    P = te.compute((N, Hp, Wp, C), lambda n, h, w, c: tirx.if_then_else(
        tirx.all(h >= pt, h < H + pt, w >= pl, w < W + pl),
        X[n, tirx.min(tirx.max(h - pt, 0), H - 1), tirx.min(tirx.max(w - pl, 0), W - 1), c], lowest), name="pad")

    def window(n, oh, ow, c):
        v = None
        for i in range(KH):
            for j in range(KW):
                t = P[n, oh * sh + i * dh, ow * sw + j * dw, c]
                v = t if v is None else tirx.max(v, t)
        return v
    Y = te.compute((N, OH, OW, C), window, name="pool")
    from tvm.s_tir import Schedule
    sch = Schedule(te.create_prim_func([X, Y]))
    for name in ("pad", "pool"):
        b = sch.get_sblock(name)
        n, h, w, c = sch.get_loops(b)
        sch.parallel(sch.fuse(n, h))
        if C % 16 == 0:
            co, ci_ = sch.split(c, [None, 16])
            sch.vectorize(ci_)
    return sch.mod["main"].with_attr(KERNEL_ATTR, "maxpool_nhwc")


def batch_matmul_int8(spec, dot: str = "vnni"):
    """PrimFunc (A [*batch, M, K] u8/s8, B [*batch, K, N] u8/s8, Y [*batch, M, N] u8/s8): dequantize(A) @
    dequantize(B) -> quantize of two quantized activations (attention's QK^T and PV in a QDQ encoder) in integers.
    A as u8 (s8 shifted by 128), B as s8 (u8 shifted by -128) packed per call into [*batch, N/16, K/4, 16, 4] (the
    dot-product intrinsic's layout; K zero-padded to a multiple of 4), s32 sums S = sum (a - za)(b - zb) from the
    dot products and the row sums of A and column sums of B, then requantized as the dense kernels do: nearbyint(S *
    sa * sb / sy) + zy, saturated. N a multiple of 16."""
    from tvm import te, tirx
    s = spec
    nb, K4 = len(s.batch), -(-s.K // 4) * 4
    i32 = "int32"
    za_u = s.za + (128 if s.a_dtype == "int8" else 0)
    zb_s = s.zb - (128 if s.b_dtype == "uint8" else 0)
    A = te.placeholder((*s.batch, s.M, s.K), s.a_dtype, name="A")
    B = te.placeholder((*s.batch, s.K, s.N), s.b_dtype, name="B")

    def b_s8(v):
        return (v.astype(i32) - 128).astype("int8") if s.b_dtype == "uint8" else v
    P = te.compute((*s.batch, s.M, K4), lambda *i: tirx.if_then_else(
        i[-1] < s.K, to_u8(A[(*i[:-1], tirx.min(i[-1], s.K - 1))], s.a_dtype), tirx.const(0, "uint8")), name="pad")
    Wp = te.compute((*s.batch, s.N // 16, K4 // 4, 16, 4), lambda *i: tirx.if_then_else(
        i[nb + 1] * 4 + i[nb + 3] < s.K,
        b_s8(B[(*i[:nb], tirx.min(i[nb + 1] * 4 + i[nb + 3], s.K - 1), i[nb] * 16 + i[nb + 2])]),
        tirx.const(0, "int8")), name="pack")
    ka = te.reduce_axis((0, s.K), "ka")
    ra = te.compute((*s.batch, s.M), lambda *i: te.sum(P[(*i, ka)].astype(i32), axis=ka), name="rowsum")
    kb = te.reduce_axis((0, s.K), "kb")
    cb = te.compute((*s.batch, s.N), lambda *i: te.sum(b_s8(B[(*i[:-1], kb, i[-1])]).astype(i32), axis=kb),
                    name="colsum")
    k4 = te.reduce_axis((0, K4 // 4), "k4")
    ki = te.reduce_axis((0, 4), "ki")
    acc = te.compute((*s.batch, s.M, s.N // 16, 16), lambda *i: te.sum(
        P[(*i[:nb], i[nb], k4 * 4 + ki)].astype(i32) * Wp[(*i[:nb], i[nb + 1], k4, i[nb + 2], ki)].astype(i32),
        axis=[k4, ki]), name="acc")
    f32 = "float32"
    lo, hi = (0, 255) if s.out_dtype == "uint8" else (-128, 127)

    def out(*i):
        n = i[-1]
        v = acc[(*i[:-1], n // 16, n % 16)] - tirx.const(zb_s, i32) * ra[(*i[:-1],)] \
            - tirx.const(za_u, i32) * cb[(*i[:-2], n)] + tirx.const(s.K * za_u * zb_s, i32)
        q = nearbyint(v.astype(f32) * tirx.const(s.mult, f32)) + tirx.const(float(s.zy), f32)
        q = tirx.min(tirx.max(q, tirx.const(float(lo), f32)), tirx.const(float(hi), f32))
        return q.astype(s.out_dtype)
    Y = te.compute((*s.batch, s.M, s.N), out, name="out")
    from tvm.s_tir import Schedule
    register_intrinsics()
    sch = Schedule(te.create_prim_func([A, B, Y]))
    acc_b, out_b = sch.get_sblock("acc"), sch.get_sblock("out")
    TM, TN = pick_tiles(s.M, s.N // 16, MAX_TILE_ACC_BY_DOT.get(dot, MAX_TILE_ACC))
    sch.set_scope(acc_b, 0, "local")
    loops = sch.get_loops(out_b)
    mo, mi = sch.split(loops[-2], [None, TM])
    no, ni_ = sch.split(loops[-1], [None, TN * 16])
    sch.reorder(*loops[:-2], no, mo, mi, ni_)
    sch.compute_at(acc_b, mo, preserve_unit_loops=True)
    sch.parallel(sch.fuse(*loops[:-2], no, mo))
    lm, lnb, lni, lk4, lki = sch.get_loops(acc_b)[-5:]
    sch.reorder(lk4, lm, lnb, lni, lki)
    sch.decompose_reduction(acc_b, lk4)
    sch.tensorize(lni, TENSOR_INTRINS[dot])
    sch.unroll(lm)
    sch.unroll(lnb)
    sch.vectorize(sch.get_loops(sch.get_sblock("acc_init"))[-1])
    _, vi = sch.split(ni_, [None, 16])
    sch.vectorize(vi)
    # the stages: a row or column sum whose zero point is 0 (u8 B at 128, u8 A at 0) is gone from the function
    present = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    for name in ("pad", "pack", "rowsum", "colsum"):
        if name not in present:
            continue
        bl = sch.get_loops(sch.get_sblock(name))
        if name == "colsum":                             # (*batch, n, k): k outside n, so B is read by rows
            sch.reorder(bl[-1], bl[-2])
        sch.parallel(sch.fuse(*bl[:nb]))
    return sch.mod["main"].with_attr(KERNEL_ATTR, f"batch_matmul_{dot}")
