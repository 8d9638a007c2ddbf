"""The bf16 kernels' fp32 epilogue, shared by the vdpbf16ps schedules (kernels.py), the AMX kernels
(amx_kernels.py) and the depthwise kernel: bias, bounds, HardSwish, residual add."""
from __future__ import annotations

#: PrimFunc attribute naming the bf16 kernel (tests, debugging)
KERNEL_ATTR = "graphopt.bf16_kernel"
NO_BOUNDS = (None, None)


def hard_swish(v, hswish):
    """TIR: v * clip(v + 3, 0, 6) / 6, then * scale + shift, for hswish = (scale, shift); v itself for ()."""
    from tvm import tirx
    if not hswish:
        return v
    scale, shift = hswish
    f = (lambda x: tirx.const(x, "float32"))
    v = v * tirx.min(tirx.max(v + f(3.0), f(0.0)), f(6.0)) * f(1.0 / 6.0)
    return v * f(scale) + f(shift)


def bounded(v, bounds):
    """TIR: v clamped to the fp32 (lo, hi) bounds (None: that side unbounded)."""
    from tvm import tirx
    lo, hi = bounds
    if lo is not None:
        v = tirx.max(v, tirx.const(lo, "float32"))
    if hi is not None:
        v = tirx.min(v, tirx.const(hi, "float32"))
    return v


def residual_value(s, r):
    """TIR: the fp32 value of a residual element r (bf16 bits where s.res_bf16)."""
    from .intrinsic import bf16_value
    return bf16_value(r) if s.res_bf16 else r


def conv_epilogue(s, acc, bias, residual, o):
    """TIR: output channel o of a conv (s: its kernels.ConvSpec) from its fp32 sum acc: bias, act, then the residual
    (fp32 value) and act2 or the hard swish (the padding channels stay zero)."""
    from tvm import tirx
    v = bounded(acc + bias, s.act)
    if residual is not None:
        return bounded(v + residual, s.act2)
    v = hard_swish(v, s.hswish)
    if s.hswish and s.hswish[1] != 0 and s.OC < s.OCp:
        v = tirx.Select(o < s.OC, v, tirx.const(0.0, "float32"))
    return v
