"""Rewrites of scalar math in scheduled CPU PrimFuncs so that TVM's loop vectorizer keeps vector loops vector.

TVM 0.27 scalarizes a whole vectorized loop when its body calls an intrinsic not marked vectorizable: tirx.erf
(every GELU epilogue) and tirx.rsqrt (layer norm) are such intrinsics, so a matmul tile's GELU epilogue ran as
scalar code re-vectorized by LLVM at half width. Here, after scheduling and before lowering:

    erf(x)    -> the rational approximation of cpu_sched_common.fast_erf_f32 (what tirx.erf lowers to anyway)
    rsqrt(x)  -> 1 / sqrt(x)
    x / c     -> x * (1 / c) for a float32 constant c whose reciprocal is a normal float (at most one rounding
                 step from the division; the compile self-check compares with onnxruntime)

Only float32 scalar expressions are rewritten; everything else is left as it is.
"""
from __future__ import annotations

import math

import numpy as np
import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.expr import Call
from tvm.ir.prim.expr import Div

from .cpu_sched_common import fast_erf_f32

_F32 = "float32"


def _erf(arg):
    x = tirx.Var("erf_x", _F32)
    return tirx.Let(x, arg, fast_erf_f32(x))


def _on_call(call):
    if str(call.ty) != _F32 or len(call.args) != 1:
        return call
    if call.op.same_as(tvm.ir.Op.get("tirx.erf")):
        return _erf(call.args[0])
    if call.op.same_as(tvm.ir.Op.get("tirx.rsqrt")):
        return tirx.const(1.0, _F32) / tirx.sqrt(call.args[0])
    return call


def _on_div(div):
    c = div.b
    if str(div.ty) != _F32 or not isinstance(c, tirx.FloatImm) or not math.isfinite(c.value) or c.value == 0:
        return div
    inv = np.float32(1.0) / np.float32(c.value)
    if not np.isfinite(inv) or abs(inv) < np.finfo(np.float32).tiny:
        return div
    return div.a * tirx.const(float(inv), _F32)


def vectorizable_math(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """func with erf, rsqrt and division by constants in float32 written as vectorizable arithmetic."""
    return tvm_ffi.structural_map(func, [(Call, _on_call), (Div, _on_div)])
