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
epilogue (kernels.conv_epilogue), 16 lanes at a time; a bf16 output is rounded 32 lanes per vcvtne2ps2bf16 like the
AVX512-BF16 kernel's. An input of bf16 bits that already is the stage (1x1, stride 1, no padding, channels = the
padded pairs) is read in place.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import amx
from .intrinsic import CVT2_EXTERN, CVT_EXTERN, LLVM_IR, to_bf16_bits

#: block rows (two A tiles) and channels (two B tiles)
BM, BN = 2 * amx.ROWS, 32
#: a conv or dense layer needs at least this many bf16 pairs per step for AMX (fewer: tdpbf16ps does too little)
MIN_PAIRS = 4
#: a KxK conv with fewer input channel pairs than this folds its KW taps into the channels (conv_layout)
FOLD_PAIRS = 8
#: parallel runs of consecutive blocks (enough for any thread count graphopt meets to share the work evenly)
CHUNKS = 64


def step_pairs(pairs: int) -> int:
    """KP: bf16 pairs per tile step."""
    return min(16, pairs)


def padded_pairs(pairs: int) -> int:
    """The reduction's pairs padded to a multiple of KP (zeros in the stage and the packed weights)."""
    kp = step_pairs(pairs)
    return -(-pairs // kp) * kp


@dataclass(frozen=True)
class ConvLayout:
    """How the AMX kernel lays out a conv spec's stage: `phases` row phases x column phases of Hq x Wq pixels each
    (a stride-s conv reads pixel (s*i + a, s*j + b) of the padded input into pixel (i, j) of phase (a, b), so every
    tap reads one phase with a shift: stride 1 within it), `pairs` bf16 pairs per stage pixel; `fold`: the KW taps
    of a row are the stage's channels (kw-major), for convs of few channels (the stem's 3): one tap per kernel row,
    KW times the pairs per step."""
    fold: bool
    ah: int                     # row phases
    aw: int                     # column phases
    Hq: int
    Wq: int
    pairs: int                  # pairs per stage pixel: C channels, or KW*C padded to 16 (a stage vectorized 16
                                # lanes wide: the stem's 21 channels in 11 pairs, 2 lanes, ran 1.5x slower)
    rows: int                   # Mg: grid rows up to the last output pixel, (OH - 1)*Wq + OW


def conv_layout(s) -> ConvLayout:
    sh, sw = s.stride
    dh, dw = s.dilation
    fold = s.KW > 1 and -(-s.C // 2) < FOLD_PAIRS
    ah = min(sh, (s.KH - 1) * dh + 1)
    aw = 1 if fold else min(sw, (s.KW - 1) * dw + 1)
    shift_h, shift_w = (s.KH - 1) * dh // sh, 0 if fold else (s.KW - 1) * dw // sw
    Wq = s.OW + shift_w
    pairs = -(-s.C * s.KW // 16) * 8 if fold else -(-s.C // 2)
    return ConvLayout(fold, ah, aw, s.OH + shift_h, Wq, pairs, (s.OH - 1) * Wq + s.OW)


def conv_fits(s) -> bool:
    """Whether the AMX kernel takes conv spec s (its target has AMX: s.amx): a grid of at least a block's rows
    and enough pairs per tile step."""
    if not s.amx:
        return False
    lay = conv_layout(s)
    return lay.pairs >= MIN_PAIRS and lay.rows >= BM


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
    return pack_conv_weight(w, padded_pairs(lay.pairs))


def conv2d_amx(s):
    """PrimFunc (X, Wp uint16 (conv_weight), B[, R], Y) of conv spec s on AMX."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T
    from .kernels import conv_epilogue
    lay = conv_layout(s)
    c2a, cin, KW = padded_pairs(lay.pairs), s.cin, 1 if lay.fold else s.KW
    sh, sw = s.stride
    dh, dw = s.dilation
    pt, pl = s.pad[0], s.pad[1]
    xshape = (s.N, s.C, s.H, s.W) if s.in_layout == "NCHW" else (s.N, s.H, s.W, cin)
    X = tirx.decl_buffer(xshape, "uint16" if s.in_bf16 else "float32", "X")
    Y = tirx.decl_buffer((s.N, s.OH, s.OW, s.OCp), "uint16" if s.out_bf16 else "float32", "Y")
    R = tirx.decl_buffer((s.N, s.OH, s.OW, s.OCp), "float32", "R") if s.residual else None
    bias = tirx.decl_buffer((s.OCp,), "float32", "B")
    Wp = tirx.decl_buffer((s.OCp // 16, s.KH, KW, c2a, 16, 2), "uint16", "W")

    def source(n, ph, i, j, c):
        """Stage channel c of pixel (i, j) of phase ph of image n: bf16 bits of the padded input, or 0."""
        a, b = ph // lay.aw, ph % lay.aw
        kw, c = (c // s.C, c % s.C) if lay.fold else (0, c)
        h, w = i * sh + a - pt, j * sw + b + kw * dw - pl
        inside = tirx.all(h >= 0, h < s.H, w >= 0, w < s.W, c < s.C, kw < s.KW)
        hh, ww, cc = tirx.min(tirx.max(h, 0), s.H - 1), tirx.min(tirx.max(w, 0), s.W - 1), tirx.min(c, cin - 1)
        v = X[n, cc, hh, ww] if s.in_layout == "NCHW" else X[n, hh, ww, cc]
        return tirx.if_then_else(inside, v if s.in_bf16 else to_bf16_bits(v), tirx.const(0, "uint16"))

    def tap(kh, kw):
        """The pixel offset of tap (kh, kw) in the stage: its phase, then its shift within the phase."""
        if lay.fold:
            return (kh * dh % sh) * lay.Hq * lay.Wq + kh * dh // sh * lay.Wq
        phase = (kh * dh % sh) * lay.aw + kw * dw % sw
        return phase * lay.Hq * lay.Wq + kh * dh // sh * lay.Wq + kw * dw // sw

    def store(vals, n, oh, ow, ch):
        T.buffer_store(Y, vals, [n, oh, ow, ch])

    def epi(acc, n, oh, ow, ch):
        return conv_epilogue(s, acc, bias[ch], R[n, oh, ow, ch] if R is not None else None, ch)
    direct = (s.in_bf16 and s.KH == s.KW == 1 and s.stride == (1, 1) and not any(s.pad) and cin == 2 * c2a)
    grid = _Grid(s.N, lay.ah * lay.aw, lay.Hq, lay.Wq, s.OW, lay.rows, c2a, s.OCp, s.KH, KW, tap)
    return _build(grid, X, None if direct else source, Wp, bias, R, Y, epi, store, s.out_bf16, "conv2d")


def dense_amx(s):
    """PrimFunc (A fp32 [M, Kin], Wp uint16 [Np/16, K2w, 16, 2], B fp32 [Np], Y fp32 [M, Np]) on AMX."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T
    from .kernels import bounded
    k2a, kin = padded_pairs(s.K2), max(s.K, s.Kphys)
    A = tirx.decl_buffer((s.M, kin), "float32", "A")
    Y = tirx.decl_buffer((s.M, s.Np), "float32", "Y")
    bias = tirx.decl_buffer((s.Np,), "float32", "B")
    Wp = tirx.decl_buffer((s.Np // 16, k2a, 16, 2), "uint16", "W")

    def source(n, ph, i, j, c):
        return tirx.if_then_else(c < kin, to_bf16_bits(A[j, tirx.min(c, kin - 1)]), tirx.const(0, "uint16"))

    def store(vals, n, oh, ow, ch):
        T.buffer_store(Y, vals, [ow, ch])
    grid = _Grid(1, 1, 1, s.M, s.M, s.M, k2a, s.Np, 1, 1, lambda kh, kw: 0)
    return _build(grid, A, source, Wp, bias, None, Y, lambda acc, n, oh, ow, ch: bounded(acc + bias[ch], s.act),
                  store, False, "dense")


class _Grid:
    """The GEMM: N images of `phases` x Hq x Wq stage pixels (c2a pairs each), grid row m = oh*Wq + ow for the
    OW-wide outputs, `rows` of them; OCp channels; KH x KW taps, tap(kh, kw) -> their pixel offset."""

    def __init__(self, N, phases, Hq, Wq, OW, rows, c2a, OCp, KH, KW, tap):
        self.N, self.phases, self.Hq, self.Wq, self.OW, self.rows = N, phases, Hq, Wq, OW, rows
        self.c2a, self.OCp, self.KH, self.KW, self.tap = c2a, OCp, KH, KW, tap
        self.pixels = phases * Hq * Wq                       # per image
        self.row_blocks = -(-rows // BM)
        self.col_blocks = -(-OCp // BN)                      # the last one is 16 channels when OCp % 32 == 16
        self.kp = step_pairs(c2a)


def _lanes(n: int) -> int:
    return next(v for v in (32, 16, 8, 4, 2, 1) if n % v == 0)


def _build(g: _Grid, X, source, Wp, bias, R, Y, epi, store, out_bf16: bool, kind: str):
    """The PrimFunc: the input stage (source(n, phase, i, j, c) -> uint16 bits; None: X is the stage), then the
    blocks."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    from .kernels import KERNEL_ATTR
    amx.request_amx()
    with IRBuilder() as ib:
        with T.prim_func(s_tir=True):
            T.func_name("main")
            T.func_attr({"tir.noalias": True, KERNEL_ATTR: kind})
            for buf in [X, Wp, bias] + ([R] if R is not None else []) + [Y]:
                T.arg(buf.name, buf)
            # relax.transform.SplitLayoutRewritePreproc wants a root block with a block in it in every kernel
            with T.sblock("root"):
                P = X
                if source is not None:
                    P = T.sblock_alloc_buffer([g.N * g.pixels * 2 * g.c2a], "uint16")
                with T.sblock("amx"):
                    if source is not None:
                        _stage(g, P, source)
                    _blocks(g, P, Wp, epi, store, out_bf16)
    return ib.get()


def _stage(g: _Grid, P, source):
    """P[(((n*phases + ph)*Hq + i)*Wq + j)*2*c2a + c] = source(n, ph, i, j, c): rows in parallel, channels
    vectorized."""
    from tvm.script.ir_builder import tirx as T
    width = 2 * g.c2a
    lanes = _lanes(width)
    with T.parallel(0, g.N * g.phases * g.Hq) as t:
        with T.serial(0, g.Wq) as j:
            with T.serial(0, width // lanes) as cb:
                with T.vectorized(0, lanes) as c:
                    T.buffer_store(P, source(t // (g.phases * g.Hq), t // g.Hq % g.phases, t % g.Hq, j,
                                             cb * lanes + c), [(t * g.Wq + j) * width + cb * lanes + c])


def _blocks(g: _Grid, P, Wp, epi, store, out_bf16: bool):
    """The (channel block, image, row block) blocks in CHUNKS parallel runs of consecutive blocks, each run
    configuring the tiles once (ldtilecfg per block: the stem's blocks of 7 steps ran 1.25x slower) and releasing
    them at its end; per block: zero the tiles, the taps' steps, store, epilogue."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T
    nb, tail = g.OCp // BN, g.OCp % BN                  # full 32-channel blocks; 16 more channels or none
    rb = g.row_blocks
    blocks = g.col_blocks * g.N * rb
    chunks = min(blocks, CHUNKS)
    with T.parallel(0, chunks, annotations={"pragma_import_llvm": LLVM_IR}) as k:
        D = T.alloc_buffer([BM, BN], "float32", scope="local")
        T.evaluate(T.call_extern("void", amx.name(amx.CONFIG, g.kp)))
        with T.serial(k * blocks // chunks, (k + 1) * blocks // chunks) as t:
            ob, n, mb = t // (g.N * rb), t // rb % g.N, t % rb
            start = tirx.min(mb * BM, g.rows - BM)
            T.evaluate(T.call_extern("void", amx.name(amx.ZERO, g.kp)))
            if not tail:
                _block(g, P, Wp, D, ob, n, start, BN, epi, store, out_bf16)
            elif not nb:
                _block(g, P, Wp, D, ob, n, start, BN // 2, epi, store, out_bf16)
            else:
                with T.If(ob < nb):
                    with T.Then():
                        _block(g, P, Wp, D, ob, n, start, BN, epi, store, out_bf16)
                    with T.Else():
                        _block(g, P, Wp, D, ob, n, start, BN // 2, epi, store, out_bf16)
        T.evaluate(T.call_extern("void", amx.name(amx.RELEASE, g.kp)))


def _block(g: _Grid, P, Wp, D, ob, n, start, cols: int, epi, store, out_bf16: bool):
    """One block of `cols` channels (32: four tiles, 16: two): the steps over the taps and pairs, then the
    epilogue of the grid rows that are output pixels."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T
    kp, width = g.kp, 2 * g.c2a
    wstep = g.KH * g.KW * g.c2a * 32                    # elements from one 16-channel block of Wp to the next
    i64 = (lambda v: tirx.const(v, "int64"))
    with T.serial(0, g.KH, annotations={"pragma_import_llvm": amx.llvm_ir(kp)}) as kh:
        with T.serial(0, g.KW) as kw:
            with T.serial(0, g.c2a // kp) as c:
                a = P.access_ptr("r", offset=((n * g.pixels + start + g.tap(kh, kw)) * width + c * 2 * kp))
                w0 = ((2 * ob * g.KH + kh) * g.KW + kw) * g.c2a * 32 + c * kp * 32
                if cols == BN:
                    T.evaluate(T.call_extern("void", amx.name(amx.STEP, kp), a, i64(2 * width),
                                             Wp.access_ptr("r", offset=w0), Wp.access_ptr("r", offset=w0 + wstep)))
                else:
                    T.evaluate(T.call_extern("void", amx.name(amx.STEP1, kp), a, i64(2 * width),
                                             Wp.access_ptr("r", offset=w0)))
    T.evaluate(T.call_extern("void", amx.name(amx.STORE if cols == BN else amx.STORE1, kp),
                             D.access_ptr("w"), i64(4 * BN)))
    with T.serial(0, BM) as r:
        m = start + r
        oh, ow = m // g.Wq, m % g.Wq
        with T.If(ow < g.OW):
            with T.Then():
                _epilogue_row(D, r, ob, n, oh, ow, cols, epi, store, out_bf16)


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
