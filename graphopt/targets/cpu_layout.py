"""fp32 conv nets on the cpu target run channels-last (NHWC): to_nhwc(mod, target) converts every fp32 conv2d of
the module to NHWC (weights OHWI, permuted once at compile time) with Relax's ConvertLayout, which carries the layout
through the elementwise ops, pooling, reductions, resize and concat between the convs, so layout transforms are
left only where the graph needs NCHW (its inputs and outputs, a reshape, an op without layout support), not around
every conv. Channels-last lets the schedules vectorize along the channels everywhere (a conv's output channels,
depthwise convs and pooling windows alike) instead of along the width.

Before the conversion two forms the importer emits are turned into Relax ops ConvertLayout can carry, so that they
do not cut a chain in two: Clip (the ONNX importer emits call_tir kernels max(x, lo) / min(x, hi)) and relax.clip
(no layout rule in TVM 0.27) both become relax maximum / minimum with the same operand order TVM computes them in.
Two ops whose TVM 0.27 layout rules fail whatever the layouts asked for are rewritten into equivalents: a squeeze's
negative axes are counted from the front (the rule dies with std::bad_alloc on a negative axis: Silero VAD's
`squeeze(x, axis=[-1])` after its conv1d stack), and stack becomes a concat of expand_dims (the rule fails on any
use of the stacked tensor: "Invalid SLayout" in DNSMOS, openWakeWord's embedding and Magika).

A conv2d_transpose whose kernel equals its stride is converted too and then rewritten into an NHWC 1x1 conv and a
depth-to-space copy (cpu_conv_transpose; TVM 0.27 legalizes conv2d_transpose only in NCHW); a model with any other
conv2d_transpose stays NCHW.

Modules with kernels already scheduled (the int8 and bf16 rewrites keep their own NHWC layout) are left as they
are."""
from __future__ import annotations

#: the layouts a conv2d is converted to: data NHWC, weights OHWI (a weight row for one output channel is contiguous
#: in (kh, kw, ic); the conv schedule repacks it into blocks of output channels)
NHWC_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "OHWI"]}
NCHW_LAYOUTS = {"relax.nn.conv2d": ["NCHW", "OIHW"]}


def to_nhwc(mod, target, any_channels: bool = False):
    """mod with its fp32 conv2d chains in NHWC (see the module docstring), conv2d_transposes whose kernel equals
    their stride included (cpu_conv_transpose: NHWC 1x1 convs and depth-to-space copies); unchanged when it has
    neither, already holds scheduled kernels, or has another conv2d_transpose (TVM 0.27 legalizes it only in
    NCHW, so a decoder would switch layouts around every one: PP-OCRv4's detector ran 56 ms NCHW, 65 NHWC with
    such transforms, 1 thread, AMD EPYC). any_channels: convs of any output channel count go NHWC where they are
    groups-1 or depthwise (precision bf16, whose kernels take those and pad channels to 16 themselves)."""
    import tvm
    from tvm import relax

    from .cpu_conv_transpose import as_conv_depth_to_space

    if not converts(mod):
        return mod
    with target:
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                        relax.transform.FoldConstant()])(mod)
        mod = _layout_ready_ops(mod)
        mod = as_conv_depth_to_space(relax.transform.ConvertLayout(
            {}, lambda call: _conv_layout(call, any_channels))(mod), MIN_NHWC_CHANNELS)
        mod = tvm.transform.Sequential([relax.transform.CanonicalizeBindings(),
                                        relax.transform.FoldConstant()])(mod)
    return mod


def converts(mod) -> bool:
    """to_nhwc changes mod: it has an fp32 conv2d or conv2d_transpose, no scheduled kernels and no conv2d_transpose
    but those whose kernel equals their stride (cpu_conv_transpose.is_depth_to_space)."""
    from .cpu_conv_transpose import is_depth_to_space
    deconvs = [c for c in calls(mod) if getattr(c.op, "name", None) == "relax.nn.conv2d_transpose"]
    return (_has_fp32_conv(mod) or bool(deconvs)) and not _has_scheduled_kernels(mod) and \
        all(is_depth_to_space(c) for c in deconvs)


def nhwc_pass(target, any_channels: bool = False):
    """to_nhwc as the module pass `graphopt.ToNHWC`, for tvm_lowering.build(passes=...) after the int8 rewrite
    (whose kernels it leaves alone) and before the bf16 one."""
    from .relax_layout import rewrite_pass
    return rewrite_pass("graphopt.ToNHWC", lambda mod, tgt: (to_nhwc(mod, tgt, any_channels), {}), target)


#: convs go NHWC only when their output channels are a multiple of this: channels-last vectorizes along the output
#: channels and its schedule has no tile for other counts (EfficientNet-B0's squeeze convs of 4, 6, 10 ... channels
#: then ran as plain loop nests: 9.8 ms, 7.1 with them NCHW; 1 thread, AMD EPYC). Not for precision bf16
#: (any_channels): there PP-OCRv4's detector neck convs of 12, 18 and 42 channels pinned to NCHW cost transposes of
#: their inputs and NCHW input stages
MIN_NHWC_CHANNELS = 8


def _conv_layout(call, any_channels: bool = False) -> dict:
    """ConvertLayout's per-call choice: NHWC / OHWI for an fp32 conv2d whose output channels are a multiple of
    MIN_NHWC_CHANNELS (with any_channels: or that is groups-1 or depthwise), NCHW / OIHW named for the other fp32
    conv2d (with no choice it follows an NHWC input and keeps OIHW weights, a form no schedule rule takes); NHWC /
    IOHW for a conv2d_transpose (converts: one whose kernel equals its stride, which to_nhwc then rewrites); every
    other op follows its inputs."""
    if getattr(call.op, "name", None) == "relax.nn.conv2d_transpose":
        from .cpu_conv_transpose import NHWC_LAYOUTS as DECONV_NHWC_LAYOUTS
        return DECONV_NHWC_LAYOUTS
    if getattr(call.op, "name", None) != "relax.nn.conv2d" or str(getattr(call.ty, "dtype", "")) != "float32":
        return {}
    shape = getattr(call.ty, "shape", None)
    if shape is None or len(shape) != 4 or str(call.attrs.data_layout) != "NCHW":
        return {}
    if int(shape[1]) % MIN_NHWC_CHANNELS == 0:
        return NHWC_LAYOUTS
    from .relax_bindings import shape_of
    groups, xshape = int(call.attrs.groups), shape_of(call.args[0])
    depthwise = xshape is not None and len(xshape) == 4 and groups == xshape[1] == int(shape[1])
    return NHWC_LAYOUTS if any_channels and (groups == 1 or depthwise) else NCHW_LAYOUTS


def calls(mod):
    """Every Relax call of every Relax function of mod."""
    from tvm import relax
    out = []
    for _, f in mod.functions.items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, lambda e: out.append(e) if isinstance(e, relax.Call) else None)
    return out


def _has_fp32_conv(mod) -> bool:
    for c in calls(mod):
        if getattr(c.op, "name", None) == "relax.nn.conv2d" and str(getattr(c.ty, "dtype", "")) == "float32":
            return True
    return False


def _has_scheduled_kernels(mod) -> bool:
    from tvm import tirx
    for _, f in mod.functions.items():
        if isinstance(f, tirx.PrimFunc) and f.attrs is not None and "tirx.is_scheduled" in f.attrs:
            return True
    return False


def scalar_minmax(func) -> str | None:
    """'max' / 'min' when the PrimFunc computes out[i...] = max(a[i...], b[()]) (or min, either operand order) for
    its first parameter a, a 0-d parameter b and out of a's shape: what the ONNX importer emits for Clip."""
    from tvm import tirx
    from tvm.s_tir import Schedule

    from .cpu_sched_common import int_or_none, iter_kinds, root_blocks
    import tvm
    if len(func.params) != 3:
        return None
    a, b, out = func.params
    if not all(hasattr(p, "shape") for p in (a, b, out)) or len(b.shape) != 0 or \
            [int_or_none(d) for d in a.shape] != [int_or_none(d) for d in out.shape]:
        return None
    sch = Schedule(tvm.IRModule({"main": func}))
    blocks = root_blocks(sch)
    if len(blocks) != 1 or set(iter_kinds(sch, blocks[0])) != {"S"}:
        return None
    blk = sch.get(blocks[0])
    body = blk.body
    ivs = [iv.var for iv in blk.iter_vars]
    if not isinstance(body, tirx.BufferStore) or not body.buffer.same_as(out) or \
            not _at(body.indices, ivs) or not isinstance(body.value, (tirx.Max, tirx.Min)):
        return None
    x, y = body.value.a, body.value.b
    for p, q in ((x, y), (y, x)):
        if _load_of(p, a) and _at(p.indices, ivs) and _load_of(q, b):
            return "max" if isinstance(body.value, tirx.Max) else "min"
    return None


def _load_of(e, buf) -> bool:
    from .cpu_sched_common import TensorLoad
    return isinstance(e, TensorLoad) and e.source.same_as(buf)


def _at(indices, ivs) -> bool:
    from tvm import tirx
    return len(indices) == len(ivs) and all(isinstance(i, tirx.Var) and i.same_as(v) for i, v in zip(indices, ivs))


#: broadcasting binary ops whose lower-rank constant operand is given the other operand's rank
_BINARY = {f"relax.{n}" for n in ("add", "subtract", "multiply", "divide", "maximum", "minimum", "power")}
#: those whose operands may be swapped exactly (IEEE addition and multiplication commute)
_COMMUTATIVE = {"relax.add", "relax.multiply"}


def _full_rank_constants(call):
    """call with a constant operand of lower rank than the other operand reshaped to that rank (leading 1s: the
    same broadcast), and a constant first operand of add / multiply moved second: ConvertLayout cannot carry a layout
    through a binary op whose operands differ in rank or whose first operand is a constant (PaddleOCR's affine
    `Mul(scale, x)` would cut the NHWC chain)."""
    import numpy as np
    import tvm
    from tvm import relax
    a, b = call.args
    ra, rb = len(getattr(a.ty, "shape", None) or []), len(getattr(b.ty, "shape", None) or [])
    args = [a, b]
    for i, (x, rx, ry) in enumerate(((a, ra, rb), (b, rb, ra))):
        if isinstance(x, tvm.ir.expr.Constant) and 0 < rx < ry:
            v = x.value.numpy()
            args[i] = relax.const(v.reshape((1,) * (ry - rx) + v.shape), str(v.dtype))
    if str(call.op.name) in _COMMUTATIVE and isinstance(args[0], tvm.ir.expr.Constant) and \
            not isinstance(args[1], tvm.ir.expr.Constant):
        args.reverse()          # ConvertLayout takes a binary op's layout from its first operand
    if args[0] is a and args[1] is b:
        return call
    return relax.Call(call.op, args, call.attrs)


def _nonnegative_squeeze_axes(call):
    """relax.squeeze with its negative axes counted from the front (see the module docstring)."""
    from tvm import relax
    axes, rank = call.attrs.axis, int(getattr(call.args[0].ty, "ndim", -1))
    if axes is None or rank < 0 or all(int(a) >= 0 for a in axes):
        return call
    return relax.op.squeeze(call.args[0], axis=[int(a) % rank for a in axes])


def _stack_as_concat(call):
    """relax.stack(xs, axis) as concat([expand_dims(x, axis) ...], axis): the same values (see the module
    docstring)."""
    from tvm import relax
    xs = call.args[0]
    if not isinstance(xs, relax.Tuple) or call.attrs.axis is None:
        return call
    rank = int(getattr(xs.fields[0].ty, "ndim", -1)) + 1 if len(xs.fields) else 0
    if rank < 1:
        return call
    axis = int(call.attrs.axis) % rank
    return relax.op.concat([relax.op.expand_dims(x, axis) for x in xs.fields], axis=axis)


def minmax_kernels(mod) -> dict[str, str]:
    """{PrimFunc name: "max" / "min"} of mod's kernels that scalar_minmax recognizes."""
    import tvm
    return {gv.name_hint: k for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and (k := scalar_minmax(f)) is not None}


def minmax_op(call, kinds: dict):
    """relax.maximum / relax.minimum for a call_tir of a kernel in kinds (minmax_kernels), with its operands in the
    order the kernel reads them; None for any other call."""
    import tvm
    from tvm import relax
    if not call.op.same_as(tvm.ir.Op.get("relax.call_tir")) or call.args[0].name_hint not in kinds:
        return None
    args = call.args[1]
    fields = list(args.fields) if isinstance(args, relax.Tuple) else [args]
    if len(fields) != 2:
        return None
    f = relax.op.maximum if kinds[call.args[0].name_hint] == "max" else relax.op.minimum
    return f(fields[0], fields[1])


def minmax_as_ops(mod):
    """mod with every call_tir of a scalar max / min kernel (the ONNX importer's Clip) as relax.maximum /
    relax.minimum, which the int8 / bf16 epilogue matchers and ConvertLayout read."""
    from tvm import relax

    from .relax_layout import rewrite_calls
    kinds = minmax_kernels(mod)
    if not kinds:
        return mod

    def lift(_bb, new):
        op = minmax_op(new, kinds)
        return new if op is None else op

    mod = rewrite_calls(mod, lift)
    return relax.transform.DeadCodeElimination()(mod)


def _number(prim_value) -> float:
    v = prim_value.value
    return float(getattr(v, "value", v))


def _layout_ready_ops(mod):
    """call_tir(max/min against a scalar) and relax.clip -> relax.maximum / relax.minimum, constant operands of
    binary ops to full rank, squeeze axes non-negative, stack as concat (see the module docstring)."""
    from tvm import relax

    from .relax_layout import rewrite_calls
    kinds = minmax_kernels(mod)

    def lift(_bb, new):
        if (op := minmax_op(new, kinds)) is not None:
            return op
        if getattr(new.op, "name", None) in _BINARY and len(new.args) == 2:
            return _full_rank_constants(new)
        if getattr(new.op, "name", None) == "relax.clip" and str(new.args[0].ty.dtype).startswith("float"):
            x, lo, hi = new.args
            dt = str(x.ty.dtype)
            # topi.clip computes max(min(x, hi), lo)
            return relax.op.maximum(relax.op.minimum(x, relax.const(_number(hi), dt)), relax.const(_number(lo), dt))
        if getattr(new.op, "name", None) == "relax.squeeze":
            return _nonnegative_squeeze_axes(new)
        if getattr(new.op, "name", None) == "relax.stack":
            return _stack_as_concat(new)
        return new

    mod = rewrite_calls(mod, lift)
    return relax.transform.DeadCodeElimination()(mod)
