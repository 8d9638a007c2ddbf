"""The depthwise conv kernel of precision bf16: NHWC, one filter per channel, fp32 weights and fp32 arithmetic, the
input and the output each in fp32 or as bf16 bits (uint16).

A depthwise conv has no reduction over channels, so there is nothing for vdpbf16ps; what bf16 buys here is memory:
reading the expand conv's output and writing the project conv's input as bf16 bits halves the traffic of the
largest tensors of MobileNet-style blocks, and the 1x1 convs around it then skip their fp32 -> bf16 input stage.
Every output is the sum of its KH*KW taps (written out, not a reduction), each tap a channel vector of the input
(bf16 bits widened to fp32 by a shift) times the tap's weights; taps outside the input read a clamped index and
are zeroed by a select (no padded copy). Bias and bounds follow in the same expression; a bf16 output is rounded
16 lanes at a time by vcvtneps2bf16 (intrinsic.CVT_INTRIN). Register tiles: TW output pixels of a row x 16
channels, rows in parallel.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..conv_geometry import ConvOutputSize
from .intrinsic import CVT_INTRIN, bf16_value, import_llvm, register_intrinsic, to_bf16_bits
from .epilogue import KERNEL_ATTR, NO_BOUNDS, bounded

#: the widest register tile along a row (output pixels x one 16-lane vector each); beside the accumulators the
#: unrolled window keeps its KH*KW weight vectors and a few input vectors in registers
MAX_TILE_W = 8


@dataclass(frozen=True)
class DwSpec(ConvOutputSize):
    N: int
    H: int
    W: int
    C: int                      # logical channels (input = output)
    Cx: int                     # channels of the NHWC input tensor: C, or C padded to 16 by the kernel before it
    KH: int
    KW: int
    stride: tuple = (1, 1)
    pad: tuple = (0, 0, 0, 0)   # top, left, bottom, right
    dilation: tuple = (1, 1)
    act: tuple = NO_BOUNDS      # fp32 (lo, hi) after the bias
    in_bf16: bool = False       # X holds bf16 bits (uint16)
    out_bf16: bool = False      # Y holds the bf16 bits of the fp32 result (uint16)

    @property
    def Cp(self):
        return -(-self.C // 16) * 16


def tile_width(ow: int) -> int:
    """Output pixels per register tile: the largest divisor of the row up to MAX_TILE_W."""
    return next(t for t in range(min(ow, MAX_TILE_W), 0, -1) if ow % t == 0)


def dwconv2d_bf16(spec: DwSpec):
    """Scheduled PrimFunc (X NHWC [N, H, W, Cx] fp32 or bf16 bits, Wk fp32 [KH, KW, Cp], B fp32 [Cp],
    Y NHWC [N, OH, OW, Cp] fp32 or bf16 bits); channels from C up to Cp come out zero."""
    from tvm import te, tirx
    s = spec
    OH, OW, Cp = s.OH, s.OW, s.Cp
    sh, sw = s.stride
    dh, dw = s.dilation
    pt, pl = s.pad[0], s.pad[1]
    assert s.C <= s.Cx <= Cp and (not s.in_bf16 or s.Cx % 2 == 0), s
    X = te.placeholder((s.N, s.H, s.W, s.Cx), "uint16" if s.in_bf16 else "float32", name="X")
    Wk = te.placeholder((s.KH, s.KW, Cp), "float32", name="W")
    B = te.placeholder((Cp,), "float32", name="B")
    # per spatial axis: (padding before, input size, whether a tap can cross the low / high bound: none, no test
    # and no clamp)
    axes = [(pt, s.H, pt > 0, (OH - 1) * sh + (s.KH - 1) * dh - pt >= s.H),
            (pl, s.W, pl > 0, (OW - 1) * sw + (s.KW - 1) * dw - pl >= s.W)]

    def clamped(x, pad, size, low, high, conds):
        """The input index of padded position x, clamped into the input where a tap can leave it (conds gets the
        test that it did not)."""
        i = x - pad
        if low:
            conds.append(x >= pad)
            i = tirx.max(i, 0)
        if high:
            conds.append(x < size + pad)
            i = tirx.min(i, size - 1)
        return i

    def tap(n, h, w, c):
        """The input at padded position (h, w) as fp32, zero outside the input and beyond its channels."""
        conds, cc = [], c
        hh, ww = (clamped(x, *axis, conds) for x, axis in zip((h, w), axes))
        if s.Cx < Cp:
            conds.append(c < s.Cx)
            cc = tirx.min(c, s.Cx - 1)
        v = X[n, hh, ww, cc]
        v = bf16_value(v) if s.in_bf16 else v
        return tirx.Select(tirx.all(*conds), v, tirx.const(0.0, "float32")) if conds else v

    def body(n, h, w, c):
        acc = None
        for i in range(s.KH):
            for j in range(s.KW):
                t = tap(n, h * sh + i * dh, w * sw + j * dw, c) * Wk[i, j, c]
                acc = t if acc is None else acc + t
        return bounded(acc + B[c], s.act)
    Y = te.compute((s.N, OH, OW, Cp), body, name="out")
    args = [X, Wk, B]
    if s.out_bf16:
        Y = te.compute(Y.shape, lambda *i: to_bf16_bits(Y(*i)), name="cvt")
    return _schedule(te.create_prim_func(args + [Y]), OW, s.out_bf16)


def _schedule(func, ow: int, out_bf16: bool):
    """Tiles of tile_width(ow) pixels x 16 channels, unrolled (LLVM keeps the tile's taps in registers and loads
    each input vector once for the taps that share it), rows in parallel; a bf16 output's fp32 tile stays local
    and is rounded by CVT_INTRIN."""
    from tvm.s_tir import Schedule
    sch = Schedule(func)
    tw = tile_width(ow)
    last = sch.get_sblock("cvt" if out_bf16 else "out")
    n, h, w, c = sch.get_loops(last)
    wo, wi = sch.split(w, [None, tw])
    co, ci = sch.split(c, [None, 16])
    sch.reorder(n, h, wo, co, wi, ci)
    par = sch.fuse(n, h)
    sch.parallel(par)
    if out_bf16:
        register_intrinsic()
        import_llvm(sch, par)
        out = sch.get_sblock("out")
        sch.set_scope(out, 0, "local")
        sch.compute_at(out, co, preserve_unit_loops=True)
        owi, oci = sch.get_loops(out)[-2:]
        sch.unroll(owi)
        sch.vectorize(oci)
        sch.tensorize(ci, CVT_INTRIN)
        sch.unroll(wi)
    else:
        sch.unroll(wi)
        sch.vectorize(ci)
    return sch.mod["main"].with_attr(KERNEL_ATTR, "dwconv2d")
