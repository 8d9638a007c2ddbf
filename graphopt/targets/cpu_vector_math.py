"""Rewrites of scalar math in scheduled CPU PrimFuncs so that TVM's loop vectorizer keeps vector loops vector.

TVM 0.27 scalarizes a whole vectorized loop when its body calls an intrinsic not marked vectorizable: tirx.erf
(every GELU epilogue) and tirx.rsqrt (layer norm) are such intrinsics, so a matmul tile's GELU epilogue ran as
scalar code re-vectorized by LLVM at half width. Here, after scheduling and before lowering:

    erf(x)    -> the rational approximation of cpu_sched_common.fast_erf_f32 (what tirx.erf lowers to anyway)
    rsqrt(x)  -> 1 / sqrt(x)
    x / c     -> x * (1 / c) for a float32 constant c whose reciprocal is a normal float (at most one rounding
                 step from the division; the compile self-check compares with onnxruntime), except under round /
                 nearbyint (llvm.nearbyint too): a QuantizeLinear's division stays exact

and the other way round, so that the fp32 ops between QuantizeLinear / DequantizeLinear round as onnxruntime's do:

    float(q) * s  -> llvm.arithmetic.fence(float(q) * s): a dequantized value (an integer converted to float32,
                 times a scale) is rounded to float32 before it is used, as onnxruntime's DequantizeLinear writes
                 it, instead of LLVM contracting it into an FMA with the add that follows

Why exact: QDQ graphs put many values on exact rounding ties (GELU's Erf + 1 is dequantize(q) + 1.0, and 1.0 is
127.5 steps of 1/127.5: every element lands on x.5 before the next QuantizeLinear), so one unit in the last place
moves an element by a whole quantization step (minilm-l3-paraphrase: 2% of its first BERT layer's MatMul outputs,
47% of the model's outputs more than a step off). The int8 kernels (graphopt.int8_kernel) are not fenced here:
their epilogues fence what the graph rounds themselves (targets/int8/kernels.py).

Only float32 scalar expressions are rewritten; everything else is left as it is.
"""
from __future__ import annotations

import math

import numpy as np
import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.expr import Call, TensorLoad
from tvm.ir.prim.expr import Cast, Div, FloatImm, Mul

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


def _is_dequantized(mul) -> bool:
    """float(integer) * scale (a constant or a loaded per-channel scale): the value a DequantizeLinear writes."""
    if str(mul.ty) != _F32:
        return False
    for a, b in ((mul.a, mul.b), (mul.b, mul.a)):
        integer = isinstance(a, Cast) and str(a.value.ty).startswith(("int", "uint"))
        if integer and isinstance(b, (FloatImm, TensorLoad)):
            return True
    return False


def _is_llvm_nearbyint(call) -> bool:
    """call_llvm_pure_intrin(llvm.nearbyint, x): the int8 kernels' rounding, vectorizable unlike tirx.nearbyint."""
    if not call.op.same_as(tvm.ir.Op.get("tirx.call_llvm_pure_intrin")) or len(call.args) != 2:
        return False
    from tvm.target import codegen
    return isinstance(call.args[0], tirx.IntImm) and \
        int(call.args[0].value) == int(codegen.llvm_lookup_intrinsic_id("llvm.nearbyint"))


def _fence(mul):
    return tirx.call_llvm_pure_intrin(_F32, "llvm.arithmetic.fence", mul) if _is_dequantized(mul) else mul


def vectorizable_math(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """func with erf, rsqrt and division by constants in float32 written as vectorizable arithmetic, dequantized
    values fenced and quantizing divisions kept (see the module docstring)."""
    reciprocals = []          # (x * (1 / c), x / c) made here: a rounding over one gets its division back
    rounding = [(tvm.ir.Op.get("tirx.round"), tirx.round), (tvm.ir.Op.get("tirx.nearbyint"), tirx.nearbyint)]

    def on_div(div):
        new = _on_div(div)
        if new is not div:
            reciprocals.append((new, div))
        return new

    def on_call(call):
        make = next((f for op, f in rounding if call.op.same_as(op)), None)
        if _is_llvm_nearbyint(call):
            for new, div in reciprocals:
                if call.args[1].same_as(new):
                    return tirx.call_llvm_pure_intrin(_F32, "llvm.nearbyint", tirx.Div(new.a, div.b))
            return call
        if make is not None and len(call.args) == 1:
            for new, div in reciprocals:
                if call.args[0].same_as(new):
                    return make(tirx.Div(new.a, div.b))
            return call
        return _on_call(call)

    callbacks = [(Call, on_call), (Div, on_div)]
    if func.attrs is None or "graphopt.int8_kernel" not in func.attrs:
        callbacks.append((Mul, _fence))
    return tvm_ffi.structural_map(func, callbacks)
