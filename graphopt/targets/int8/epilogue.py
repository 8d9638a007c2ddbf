"""The integer kernels' elementwise parts, shared by the dot-product schedules (kernels.py) and the AMX kernels
(amx_kernels.py): the epilogue after the s32 accumulation and the u8 view of an s8 activation."""
from __future__ import annotations

import numpy as np

from .specs import Epilogue


def nearbyint(x):
    """Round to nearest even as te.nearbyint does (llvm.nearbyint), as a call TVM's loop vectorizer keeps vector:
    tirx.nearbyint is registered not vectorizable in TVM 0.27, so a vectorized epilogue that used it ran scalar."""
    from tvm import tirx
    return tirx.call_llvm_pure_intrin("float32", "llvm.nearbyint", x)


def divide_exact(a, b: float):
    """TIR: float32 a / b correctly rounded (what `a / b` gives) without a division: y = a * (1/b), the remainder
    a - y * b by FMA, y + remainder * (1/b) by FMA. Markstein's theorem: with 1/b rounded to nearest and y within an
    ulp of a/b, the last FMA rounds to the correctly rounded quotient (finite, normal operands). vdivps on 16 lanes
    issues once per ~10-16 cycles; this is three multiply-adds. The residual-add epilogue divides once per output
    element (QuantizeLinear divides by its scale, as onnxruntime's does)."""
    from tvm import tirx
    f32 = "float32"
    rb = tirx.const(float(np.float32(1.0 / np.float64(np.float32(b)))), f32)
    bc = tirx.const(float(np.float32(b)), f32)
    fma = lambda x, y, z: tirx.call_llvm_pure_intrin(f32, "llvm.fma", x, y, z)  # noqa: E731
    y = a * rb
    return fma(fma(-y, bc, a), rb, y)


def epilogue_expr(epi: Epilogue, acc, bi, m, bf, r=None):
    """TIR: the kernel output from an s32 sum acc: + int32 bias bi, * per-channel multiplier m, + float bias bf, then
    epi's mode: f (fp32 with bounds), q (requantized) or qadd (requantized, the dequantized residual r added, and
    requantized again)."""
    from tvm import tirx
    f32 = "float32"
    v = (acc + bi).astype(f32) * m + bf
    if epi.mode == "f":
        if epi.flo is not None:
            v = tirx.max(v, tirx.const(epi.flo, f32))
        if epi.fhi is not None:
            v = tirx.min(v, tirx.const(epi.fhi, f32))
        return v
    if epi.mode == "q":
        q = nearbyint(v) + tirx.const(float(epi.zy), f32)
        q = tirx.min(tirx.max(q, tirx.const(epi.lo, f32)), tirx.const(epi.hi, f32))
        return q.astype(epi.out_dtype)
    # qadd: requantize the conv result as the graph does, add the dequantized residual, requantize. As in
    # onnxruntime, each dequantized value is rounded to float32 before the add (fenced: no FMA) and the last
    # QuantizeLinear divides by its scale: on rounding ties one unit in the last place is a whole step
    t = nearbyint(v) + tirx.const(float(epi.z1), f32)
    t = tirx.min(tirx.max(t, tirx.const(epi.lo1, f32)), tirx.const(epi.hi1, f32))
    fence = "llvm.arithmetic.fence"
    a = tirx.call_llvm_pure_intrin(f32, fence, (t - tirx.const(float(epi.z1), f32)) * tirx.const(epi.s1, f32)) + \
        tirx.call_llvm_pure_intrin(f32, fence, (r.astype(f32) - tirx.const(float(epi.zr), f32)) *
                                   tirx.const(epi.sr, f32))
    if epi.act2_lo is not None:
        a = tirx.max(a, tirx.const(epi.act2_lo, f32))
    if epi.act2_hi is not None:
        a = tirx.min(a, tirx.const(epi.act2_hi, f32))
    q = nearbyint(divide_exact(a, epi.s2)) + tirx.const(float(epi.zy), f32)
    q = tirx.min(tirx.max(q, tirx.const(epi.lo, f32)), tirx.const(epi.hi, f32))
    return q.astype(epi.out_dtype)


def to_u8(x, in_dtype):
    """u8 view of an activation value: s8 is shifted by +128 (its zero point too)."""
    if in_dtype == "uint8":
        return x
    return (x.astype("int32") + 128).astype("uint8")
