"""The Relax rewrite for precision bf16: fp32 conv2d (groups 1) and matmul chains with constant weights become
call_tir of the bf16 kernels, before LegalizeOps / FuseOps, in the layout the convs are in (NCHW as imported, or
NHWC after the cpu target's channels-last conversion, cpu_layout.to_nhwc):

    conv2d(x, W) | matmul(x, W) | matmul(x, permute_dims(W))
        -> [+ bias | batch_norm (inference, NCHW conv2d only) | +-*/ per-channel constant]*
        -> [relu | clip | max | min]*
        [-> + residual -> [relu | clip | max | min]*]                        (conv2d only for the residual)

W, the biases and the norms' parameters are constants: folded here (norm scales into W, shifts into one bias), W
packed to bf16 pairs; 3x3 stride-1 convs on a channels-last input run as Winograd F(2x2,3x3) kernels where that pays
(winograd.py; the target option winograd=off keeps them direct). Conv outputs stay NHWC with channels padded to 16
between kernels, dense outputs [rows, padded columns]; logical views are emitted for the fp32 ops that read them
(relax_layout). A conv output read only by other bf16 convs is stored as bf16 bits (bf16_outputs): they would round
it to bf16 on input anyway; a tensor an fp32 op makes that only bf16 convs read is converted to bf16 bits by an
elementwise op fused into its producer (bf16_inputs). The ONNX importer's Clip (call_tir of max / min kernels
against a scalar) is first turned into relax maximum / minimum (cpu_layout.minmax_as_ops) so that ReLU6 ends a chain
instead of cutting it. Depthwise convs (no reduction over channels: nothing for a dot product) with their epilogue
run as the depthwise kernel (depthwise.py: fp32 arithmetic, bf16 bits in and out where only kernels are around it)
in NHWC whatever the layout they come in; channels-last ones only where that kernel both reads and stores bf16 bits
(takes_depthwise), the others are left to the cpu target's channels-last depthwise schedule. MobileNet-style chains
(1x1 conv -> clip -> depthwise -> clip -> 1x1 conv -> residual add) so run with no layout change between the kernels
in either layout, bf16 bits between them. MatMuls of two fp32 activations with a multiple of 16 output columns
(attention's QK^T, with a scalar divide / multiply after it, and PV) run as the bf16 batch matmul kernel
(kernels.batch_matmul_bf16). Other grouped convs and the other activation matmuls stay on TVM's fp32 path."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np


from .. import x86_isa
from ..cpu_layout import MIN_NHWC_CHANNELS, minmax_as_ops
from ..target_attrs import num_cores
from ..relax_bindings import (Block, act_bounds, batch_matmul_shapes, dtype_of, fold_fp32, is_constant, op_name,
                              shape_of)
from ..relax_layout import LayoutRewriter, Phys, rewrite_main, rewrite_pass
from . import dw_pairs
from .amx_kernels import conv_fits, dense_fits
from .depthwise import DwSpec, dwconv2d_bf16
from .intrinsic import to_bf16_bits
from .kernels import (NO_BOUNDS, BatchMatmulSpec, ConvSpec, DenseSpec, batch_matmul_bf16, conv2d_bf16, conv_weight,
                      dense_bf16)
from .packing import pack_dense_weight, padded_bias
from .winograd import pack_weight as winograd_weight, pays as winograd_pays, winograd_conv2d_bf16

log = logging.getLogger("graphopt.bf16")


def bf16_dot(target) -> str | None:
    """'amx' when the target's code may use AMX tiles (and AVX512-BF16: the kernels AMX does not take), 'avx512bf16'
    when it may use AVX512-BF16 only, else None."""
    if target is None or str(target.kind.name) != "llvm":
        return None
    mtriple = str(target.attrs.get("mtriple", ""))
    if mtriple and not any(a in mtriple for a in ("x86_64", "amd64")):
        return None
    feats = x86_isa.features(str(target.attrs.get("mcpu", "")), target.attrs.get("mattr", []))
    return None if "bf16" not in feats else "amx" if "amx" in feats else "avx512bf16"


@dataclass
class Chain:
    kind: str                   # conv | dwconv | dense | batch_matmul (w, bias None; attrs: y, xshape, scale)
    root: int                   # binding index of the chain's last binding (replaced by the kernel call)
    interior: list              # binding indices consumed by the chain (dropped)
    x: object
    w: np.ndarray               # fp32 [OC, C, KH, KW] or [N, K], batch norms folded in
    bias: np.ndarray
    act: tuple
    residual: object
    act2: tuple
    attrs: dict
    out_var: object
    out_shape: tuple
    hswish: tuple = ()          # conv: (scale, shift) of a HardSwish epilogue after act (kernels.hard_swish)


def _other(v, cur):
    a, b = v.args
    return b if a.same_as(cur) else a if b.same_as(cur) else None


def _bounds(blk: Block, v, cur):
    """(lo, hi) fp32 bounds v applies to cur: relu, clip, or maximum / minimum with a scalar constant (how the
    ONNX importer writes Clip with min / max inputs); else None."""
    op = op_name(v)
    if op in ("relax.maximum", "relax.minimum"):
        other = _other(v, cur)
        c = fold_fp32(blk, other) if other is not None and is_constant(blk, other) else None
        if c is None or c.size != 1:
            return None
        return (float(c.reshape(())), None) if op == "relax.maximum" else (None, float(c.reshape(())))
    b = act_bounds(blk, v)
    return b if b is not None and v.args[0].same_as(cur) else None


def _merge(a, b):
    """Both bounds applied one after the other (b after a) as one (lo, hi), or None when they cross."""
    if a is None:
        return b
    lo = a[0] if b[0] is None else b[0] if a[0] is None else max(a[0], b[0])
    hi = a[1] if b[1] is None else b[1] if a[1] is None else min(a[1], b[1])
    return None if lo is not None and hi is not None and lo > hi else (lo, hi)    # crossed: order would matter


def _batch_norm(blk: Block, idx: int, cur, n_out: int):
    """For batch_norm(cur, constant gamma, beta, mean, var) over channels at binding idx whose only live output is
    item 0: (index of the item-0 binding, the indices consumed, per-channel scale, shift), else None."""
    from tvm import relax
    v = blk.bindings[idx].value
    if not v.args[0].same_as(cur) or int(v.attrs.axis) not in (1, -3):
        return None
    params = [fold_fp32(blk, a) if is_constant(blk, a) else None for a in v.args[1:5]]
    if any(p is None or p.size != n_out for p in params):
        return None
    gamma, beta, mean, var = (p.reshape(n_out) for p in params)
    tup = blk.bindings[idx].var
    if tup in blk.outside:
        return None
    get0, used = None, [idx]
    for j in blk.uses.get(tup, []):
        g = blk.bindings[j].value
        if not isinstance(g, relax.TupleGetItem):
            return None
        if int(g.index) == 0 and get0 is None:
            get0 = j
        elif blk.bindings[j].var in blk.outside or blk.uses.get(blk.bindings[j].var):
            return None                       # the batch statistics are read: not an inference-only norm
        used.append(j)
    if get0 is None:
        return None
    scale = gamma / np.sqrt(var + float(v.attrs.epsilon))
    return get0, used, scale, beta - mean * scale


#: (scale, shift) after x * scale + shift is followed by an op with a per-channel constant c
_AFFINE = {"relax.add": lambda s, t, c: (s, t + c), "relax.subtract": lambda s, t, c: (s, t - c),
           "relax.multiply": lambda s, t, c: (s * c, t * c), "relax.divide": lambda s, t, c: (s / c, t / c)}


def _per_channel(blk: Block, e, n_out: int, channel_axis: int) -> np.ndarray | None:
    """The constant e as n_out per-channel values (a scalar repeated), or None when it varies along another axis."""
    val = fold_fp32(blk, e)
    if val is None:
        return None
    if val.size == 1:
        return np.full(n_out, float(val.reshape(())))
    if val.size != n_out or (val.ndim > 1 and val.shape[channel_axis] != n_out):
        return None
    return val.reshape(n_out)


def _scalar(blk: Block, e) -> float | None:
    """The value of e when it is a one-element constant, else None."""
    c = fold_fp32(blk, e) if is_constant(blk, e) else None
    return None if c is None or c.size != 1 else float(c.reshape(()))


def _sixth(blk: Block, v, cur) -> bool:
    """v divides cur by 6 (or multiplies it by 1/6)."""
    op = op_name(v)
    if op == "relax.divide" and v.args[0].same_as(cur):
        return _scalar(blk, v.args[1]) == 6.0
    other = _other(v, cur) if op == "relax.multiply" else None
    c = None if other is None else _scalar(blk, other)
    return c is not None and abs(c - 1 / 6) < 1e-7


def _hard_swish(blk: Block, cur):
    """(bindings consumed, (scale, shift)) when cur's two readers compute HardSwish, cur * clip(cur + 3, 0, 6) / 6
    (the /6 before or after the product: the ONNX importer's HardSwish and PaddlePaddle's exports), followed by
    multiplies and adds of one-element constants (PP-LCNet's learnable affine blocks: folded into scale, shift);
    else None."""
    uses = blk.uses.get(cur, [])
    if len(uses) != 2 or cur in blk.outside:
        return None
    for ja in uses:
        jm = uses[1] if ja == uses[0] else uses[0]
        v = blk.bindings[ja].value
        other = _other(v, cur) if op_name(v) == "relax.add" else None
        if other is None or _scalar(blk, other) != 3.0:
            continue
        used, t, bounds, sixth = [ja], blk.bindings[ja].var, None, False
        while (nxt := blk.single_use(t)) is not None and nxt != jm:
            val = blk.bindings[nxt].value
            b = _bounds(blk, val, t)
            if b is not None:
                bounds = _merge(bounds, b)
            elif not sixth and _sixth(blk, val, t):
                sixth = True
            else:
                return None
            used.append(nxt)
            t = blk.bindings[nxt].var
        mv = blk.bindings[jm].value
        if nxt != jm or bounds != (0.0, 6.0) or op_name(mv) != "relax.multiply" or _other(mv, cur) is None \
                or not _other(mv, cur).same_as(t):
            return None
        used.append(jm)
        t = blk.bindings[jm].var
        if not sixth:
            nxt = blk.single_use(t)
            if nxt is None or not _sixth(blk, blk.bindings[nxt].value, t):
                return None
            used.append(nxt)
            t = blk.bindings[nxt].var
        scale, shift = np.ones(1), np.zeros(1)
        while (nxt := blk.single_use(t)) is not None:
            val = blk.bindings[nxt].value
            op = op_name(val)
            other = (_other(val, t) if op in ("relax.add", "relax.multiply") else
                     val.args[1] if op in _AFFINE and val.args[0].same_as(t) else None)
            c = None if other is None else _scalar(blk, other)
            if c is None or op == "relax.divide" and c == 0:
                break
            scale, shift = _AFFINE[op](scale, shift, np.array([c]))
            used.append(nxt)
            t = blk.bindings[nxt].var
        return used, (float(scale[0]), float(shift[0]))
    return None


def _follow(blk: Block, idx: int, n_out: int, channel_axis: int, allow_residual: bool, allow_hswish: bool = False):
    """(root, interior, scale, shift, act, residual, act2, hswish) of the epilogue after the compute binding idx:
    the affine part (bias adds, inference batch norms, the arithmetic DecomposeOpsForInference makes of them: add,
    subtract, multiply, divide by per-channel constants) as a per-channel scale (folded into the weights) and
    shift; with allow_hswish and no residual, a HardSwish after the bounds (_hard_swish)."""
    interior, cur = [idx], blk.bindings[idx].var
    scale, shift = np.ones(n_out), np.zeros(n_out)
    act, residual, act2 = None, None, None
    while True:
        nxt = blk.single_use(cur)
        if nxt is None:
            break
        v = blk.bindings[nxt].value
        op = op_name(v)
        if op == "relax.nn.batch_norm" and channel_axis == 1 and act is None and residual is None:
            bn = _batch_norm(blk, nxt, cur, n_out)
            if bn is None:
                break
            get0, used, s, t = bn
            scale, shift = scale * s, shift * s + t
            interior.extend(used)
            interior.remove(get0)
            interior.append(get0)
            cur = blk.bindings[get0].var
            continue
        if op in _AFFINE:
            other = _other(v, cur) if op in ("relax.add", "relax.multiply") else \
                v.args[1] if v.args[0].same_as(cur) else None
            if other is None:
                break
            if is_constant(blk, other):
                val = _per_channel(blk, other, n_out, channel_axis)
                if val is None or act is not None or residual is not None or op == "relax.divide" and (val == 0).any():
                    break
                scale, shift = _AFFINE[op](scale, shift, val)
            elif op == "relax.add" and allow_residual and residual is None and shape_of(other) == shape_of(cur) \
                    and dtype_of(other) == "float32":
                residual = other
            else:
                break
        else:
            b = _bounds(blk, v, cur)
            if b is None:
                break
            merged = _merge(act if residual is None else act2, b)
            if merged is None:
                break
            act, act2 = (merged, act2) if residual is None else (act, merged)
        interior.append(nxt)
        cur = blk.bindings[nxt].var
    hswish = ()
    if allow_hswish and residual is None and (hs := _hard_swish(blk, cur)) is not None:
        used, hswish = hs
        interior.extend(used)
    return interior[-1], interior[:-1], scale, shift, act or NO_BOUNDS, residual, act2 or NO_BOUNDS, hswish


#: (data, kernel, out) layouts of the conv2d calls matched: the importer's, and cpu_layout.to_nhwc's channels-last one
_CONV_LAYOUTS = {("NCHW", "OIHW", "NCHW"), ("NHWC", "OHWI", "NHWC")}


# Matched by hand, not with relax.dpl patterns (as int8/relax_match.py does): a weight here is any expression
# computed from constants only (is_constant) whose value fold_fp32 can compute, which no dpl pattern states, and the
# epilogue is followed forward through single-use vars (batch_norm's tuple items included), which dpl cannot say.
def _fp32_weight(blk: Block, e) -> np.ndarray | None:
    if not is_constant(blk, e):
        return None
    v = fold_fp32(blk, e)
    return None if v is None else v.astype(np.float32)


def match_conv(blk: Block, idx: int, residual: bool = True) -> Chain | None:
    v = blk.bindings[idx].value
    a = v.attrs
    layout = str(a.data_layout)
    if (layout, str(a.kernel_layout), str(a.out_layout)) not in _CONV_LAYOUTS:
        return None
    xshape = shape_of(v.args[0])
    if dtype_of(v.args[0]) != "float32" or dtype_of(blk.bindings[idx].var) != "float32" or xshape is None \
            or len(xshape) != 4 or is_constant(blk, v.args[0]):
        return None
    w = _fp32_weight(blk, v.args[1])
    if w is None or w.ndim != 4:
        return None
    if layout == "NHWC":                  # cpu_layout.to_nhwc's form: x NHWC, W OHWI
        xshape, w = tuple(xshape[i] for i in (0, 3, 1, 2)), w.transpose(0, 3, 1, 2)
    groups = int(a.groups)
    depthwise = groups > 1 and groups == xshape[1] == w.shape[0] and w.shape[1] == 1
    if groups != 1 and not depthwise:
        return None                       # grouped convs (other than depthwise) stay on TVM's fp32 path
    axis = 1 if layout == "NCHW" else 3
    root, interior, scale, bias, act, res, act2, hswish = _follow(blk, idx, w.shape[0], axis,
                                                                  residual and not depthwise, not depthwise)
    w = (w * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
    attrs = {"stride": tuple(int(s) for s in a.strides), "pad": tuple(int(p) for p in a.padding),
             "dilation": tuple(int(d) for d in a.dilation), "xshape": xshape, "layout": layout}
    out = blk.bindings[root].var
    return Chain("dwconv" if depthwise else "conv", root, interior, v.args[0], w, bias, act, res, act2, attrs, out,
                 shape_of(out), hswish)


def match_dense(blk: Block, idx: int) -> Chain | None:
    v = blk.bindings[idx].value
    xshape = shape_of(v.args[0])
    if dtype_of(v.args[0]) != "float32" or xshape is None or len(xshape) < 2 or is_constant(blk, v.args[0]):
        return None
    wexpr = blk.bound(v.args[1])
    if op_name(wexpr) == "relax.permute_dims":            # Gemm transB: permute_dims(W[N, K])
        axes = wexpr.attrs.axes
        if axes is not None and [int(x) for x in axes] != [1, 0]:
            return None
        w = _fp32_weight(blk, wexpr.args[0])
    else:                                                # MatMul: W[K, N]
        w = _fp32_weight(blk, v.args[1])
        w = None if w is None or w.ndim != 2 else np.ascontiguousarray(w.T)
    if w is None or w.ndim != 2 or w.shape[1] != xshape[-1]:
        return None
    root, interior, scale, bias, act, _, _, _ = _follow(blk, idx, w.shape[0], -1, False)
    w = (w * scale.reshape(-1, 1)).astype(np.float32)
    out = blk.bindings[root].var
    return Chain("dense", root, interior, v.args[0], w, bias, act, None, NO_BOUNDS, {"xshape": xshape}, out,
                 shape_of(out))


def match_batch_matmul(blk: Block, idx: int) -> Chain | None:
    """matmul(X[*batch, M, K], Y[*batch, K, N]) of two fp32 activations with the same batch dims (attention's QK^T
    and PV), N a multiple of 16, with the divide / multiply by a scalar constant that follows it where it is the
    matmul's only reader."""
    v = blk.bindings[idx].value
    x, y = v.args[0], v.args[1]
    xs, ys, out = shape_of(x), shape_of(y), blk.bindings[idx].var
    if not batch_matmul_shapes(xs, ys) or xs[-1] < 16:
        return None
    if any(dtype_of(e) != "float32" for e in (x, y, out)) or is_constant(blk, x) or is_constant(blk, y):
        return None
    root, interior, scale = idx, [], (None, 1.0)
    uses = blk.uses.get(out, [])
    if len(uses) == 1 and out not in blk.outside:
        j = uses[0]
        nxt = blk.bindings[j].value
        op = op_name(nxt)
        if op in ("relax.divide", "relax.multiply") and nxt.args[0].same_as(out) \
                and shape_of(blk.bindings[j].var) == shape_of(out):
            c = _scalar(blk, nxt.args[1])
            if c is not None and c != 0.0:
                root, interior, scale = j, [idx], (op.split(".")[1], c)
    var = blk.bindings[root].var
    return Chain("batch_matmul", root, interior, x, None, None, NO_BOUNDS, None, NO_BOUNDS,
                 {"y": y, "xshape": tuple(xs), "scale": scale}, var, shape_of(var))


def _compute_index(m: Chain) -> int:
    """Binding index of the chain's conv2d / matmul (its first binding)."""
    return m.interior[0] if m.interior else m.root


def bf16_outputs(blk: Block, chains: dict) -> set:
    """Output vars of conv and depthwise chains whose every reader is another such chain's conv taking it as its
    input, or a conv chain adding it as its residual, which then store bf16 bits (rounded to nearest even, but for
    fp32 denormals, which vcvtneps2bf16 flushes to zero). A conv reader rounds its input to bf16 anyway; a depthwise
    reader computes in fp32 from the rounded values, a residual reader adds the rounded values in fp32 (one more bf16
    rounding of the tensor read, for half the memory traffic on both sides: ResNet-50's residual stream, 56x56x256,
    was 3.2 MB of fp32 written and read again by every bottleneck)."""
    convs = {_compute_index(m): m for m in chains.values() if m.kind in ("conv", "dwconv")}
    adds = {j: m for m in chains.values() if m.kind == "conv" and m.residual is not None
            for j in m.interior + [m.root] if j != _compute_index(m)}

    def reads_bf16(j, var) -> bool:
        """Binding j reads var as a conv's input, or as the residual a conv chain adds (in its epilogue)."""
        if j in convs:
            return convs[j].x.same_as(var)
        return j in adds and adds[j].residual.same_as(var)
    out = set()
    for m in chains.values():
        uses = blk.uses.get(m.out_var, [])
        if m.kind in ("conv", "dwconv") and uses and m.out_var not in blk.outside \
                and all(reads_bf16(j, m.out_var) for j in uses):
            out.add(m.out_var)
    return out


def bf16_inputs(blk: Block, chains: dict) -> set:
    """Vars made by bindings of the block other than the chains (fp32 ops: activations, resize, transposes, the fp32
    depthwise convs) that only channels-last conv chains read, each as its input, with an even channel count: they
    are handed over as bf16 bits by a conversion FuseOps fuses into the op that makes them (to_bf16_func), so the
    producer writes half the bytes and the convs skip their fp32 -> bf16 input stage (PP-OCRv4's detector: every 1x1
    conv after a HardSwish, the neck's convs after its resize-adds). Not a concat's output: the conversion made the
    detector's fused resize-multiply-concat kernel 2.7x slower (1.77 ms, 0.65 without)."""
    convs = {_compute_index(m): m for m in chains.values() if m.kind == "conv" and m.attrs["layout"] == "NHWC"}
    outs = {m.out_var for m in chains.values()}
    made = {b.var for b in blk.bindings if op_name(b.value) != "relax.concat"}
    found = set()
    for j, m in convs.items():
        x, uses = m.x, blk.uses.get(m.x, [])
        shape = shape_of(x)
        if x in outs or x not in made or x in blk.outside or dtype_of(x) != "float32" or shape is None \
                or len(shape) != 4 or shape[3] % 2:
            continue
        if all(i in convs and convs[i].x.same_as(x) for i in uses):
            found.add(x)
    return found


def to_bf16_func(shape):
    """PrimFunc Y[shape] (uint16) = the bf16 bits of X[shape] (fp32), rounded to nearest even: an elementwise op
    that FuseOps fuses into the kernel making X."""
    from tvm import te, tirx
    dims = [tirx.IntImm("int64", d) for d in shape]          # int64, as LegalizeOps' kernels: FuseTIR matches them
    x = te.placeholder(dims, "float32", name="X")
    y = te.compute(dims, lambda *i: to_bf16_bits(x(*i)), name="to_bf16")
    return te.create_prim_func([x, y]).with_attr("op_pattern", 0)


def takes_depthwise(m: Chain, bf16_out: set) -> bool:
    """Whether chain m, if depthwise, runs as the bf16 depthwise kernel: NCHW ones always (one NHWC kernel between
    the bf16 convs), channels-last ones where they both read and store bf16 bits (MobileNet-style blocks: a 1x1
    conv before, one after) or where their channels are not a multiple of MIN_NHWC_CHANNELS (the fp32 NHWC schedule
    has no tile for those); the others stay on the fp32 NHWC schedule, where FuseOps also fuses the elementwise ops
    after them that the chain's epilogue does not take (PP-OCRv4's detector: the hardswish after each depthwise
    conv, which as its own kernel cost more than the bf16 input saved) and which ran its strided ones faster from
    fp32 inputs."""
    return m.kind != "dwconv" or m.attrs["layout"] == "NCHW" or (m.x in bf16_out and m.out_var in bf16_out) \
        or m.w.shape[0] % MIN_NHWC_CHANNELS != 0


def _left_in_fp32(call) -> str:
    """The count a conv2d / matmul the rewrite leaves to TVM's fp32 path goes to."""
    if op_name(call) == "relax.matmul":
        return "fp32_matmuls"
    a, shape = call.attrs, shape_of(call)
    depthwise = str(a.data_layout) == "NHWC" and shape is not None and int(a.groups) == shape[3] > 1
    return "fp32_dwconv2d_nhwc" if depthwise else "fp32_convs"


class _Rewriter(LayoutRewriter):
    def __init__(self, mod, amx: bool = False, cores: int = 1, winograd: bool = True):
        super().__init__(mod, "graphopt_bf16")
        self.amx = amx
        self.cores = cores          # the parallel split of the kernels that choose one (dw_pairs)
        self.winograd = winograd    # 3x3 stride-1 NHWC convs as winograd.winograd_conv2d_bf16 where it pays
        self.count = {"bf16_conv2d": 0, "bf16_winograd": 0, "bf16_dwconv2d": 0, "bf16_dwconv2d_pairs": 0,
                      "bf16_dense": 0,
                      "bf16_batch_matmul": 0, "bf16_amx": 0, "bf16_residual_fused": 0,
                      "bf16_residual_bf16": 0,
                      "bf16_hswish_fused": 0, "bf16_stored_bf16": 0, "bf16_converted_inputs": 0,
                      "fp32_dwconv2d_nhwc": 0, "fp32_convs": 0, "fp32_matmuls": 0}
        self.bf16_out: set = set()
        self.max_reduction = 0

    def rewrite_block(self, block, outside_uses):
        from tvm import relax
        blk = Block(block, outside_uses)
        chains: dict[int, Chain] = {}
        claimed: set = set()
        for i, b in enumerate(blk.bindings):
            op = op_name(b.value)
            if op not in ("relax.nn.conv2d", "relax.matmul") or i in claimed:
                continue
            m = self.match_root(blk, i, op, claimed, match_conv, match_dense, log)
            if m is None and op == "relax.matmul":
                m = self.match_root(blk, i, op, claimed, match_conv, match_batch_matmul, log)
            if m is None:
                self.count[_left_in_fp32(b.value)] += 1
                continue
            chains[m.root] = m
            claimed.update(m.interior + [m.root])
        self.bf16_out = bf16_outputs(blk, chains)
        while fp32_dw := [i for i, m in chains.items() if not takes_depthwise(m, self.bf16_out)]:
            for i in fp32_dw:
                del chains[i]
                self.count["fp32_dwconv2d_nhwc"] += 1
            self.bf16_out = bf16_outputs(blk, chains)
        if not chains:
            return block, False
        drop = set().union(*(m.interior for m in chains.values()))
        self.phys = {}
        converted = bf16_inputs(blk, chains)
        out = []
        for i, b in enumerate(blk.bindings):
            if i in chains:
                out.extend(self.emit(chains[i]))
            elif i not in drop:
                out.append(b)
                if b.var in converted:
                    out.append(self.to_bf16(b.var))
        return relax.DataflowBlock(out), True

    def to_bf16(self, var):
        """The binding of var's bf16 bits (to_bf16_func), recorded as var's physical NHWC form."""
        from tvm import relax
        shape = shape_of(var)
        key = ("to_bf16", shape)
        if key not in self.funcs:
            name = self.name("to_bf16")
            self.funcs[key] = self.bb.add_func(to_bf16_func(shape).with_attr("global_symbol", name), name)
        bits = self.dfvar("bits", shape, "uint16")
        self.phys[var] = Phys(bits, "NHWC", shape[3])
        self.count["bf16_converted_inputs"] += 1
        return self.bind(bits, relax.call_tir(self.funcs[key], [var], relax.TensorType(list(shape), "uint16")))

    def emit(self, m: Chain):
        from tvm import relax
        bindings = []
        p = self.phys.get(m.x)
        if m.kind == "batch_matmul":
            return [self.batch_matmul(m)]
        if m.kind == "dwconv":
            value, phys = self.depthwise(m, bindings)
        elif m.kind == "conv":
            N, C, H, W = m.attrs["xshape"]
            OC, _, KH, KW = m.w.shape
            layout = m.attrs["layout"]
            nhwc = p is not None and p.layout == "NHWC"
            x, cphys = (p.var, p.channels) if nhwc else (m.x, C if layout == "NHWC" else 0)
            out_bf16 = m.out_var in self.bf16_out
            spec = ConvSpec(N, H, W, C, OC, KH, KW, m.attrs["stride"], m.attrs["pad"], m.attrs["dilation"],
                            "NHWC" if nhwc else layout, cphys, m.act, m.residual is not None, m.act2,
                            in_bf16=nhwc and dtype_of(x) == "uint16", out_bf16=out_bf16, hswish=m.hswish,
                            amx=self.amx)
            args = [x, relax.const(conv_weight(spec, m.w)), relax.const(padded_bias(m.bias, OC, spec.OCp))]
            if m.residual is not None:
                r, bl = self.to_nhwc_padded(m.residual, spec.OCp, layout)
                bindings.extend(bl)
                args.append(r)
                spec = dataclasses.replace(spec, res_bf16=dtype_of(r) == "uint16")
                self.count["bf16_residual_fused"] += 1
                self.count["bf16_residual_bf16"] += spec.res_bf16
            if self.winograd and winograd_pays(spec):
                args[1] = relax.const(winograd_weight(m.w, spec))
                gv = self.add_kernel(("winograd", spec), lambda: winograd_conv2d_bf16(spec), "conv2d")
                self.count["bf16_winograd"] += 1
            else:
                gv = self.add_kernel(("conv", spec), lambda: conv2d_bf16(spec), "conv2d")
            shape, dt = (N, spec.OH, spec.OW, spec.OCp), "uint16" if out_bf16 else "float32"
            value = relax.call_tir(gv, args, relax.TensorType(list(shape), dt))
            phys = Phys(self.dfvar("conv", shape, dt), "NHWC", spec.OCp)
            self.count["bf16_conv2d"] += 1
            self.count["bf16_amx"] += conv_fits(spec)
            self.count["bf16_hswish_fused"] += bool(m.hswish)
            self.count["bf16_stored_bf16"] += out_bf16
            self.max_reduction = max(self.max_reduction, C * KH * KW)
        else:
            xshape = m.attrs["xshape"]
            K, rows = xshape[-1], int(np.prod(xshape[:-1]))
            Nf = m.w.shape[0]
            if p is not None and p.layout == "ROWS":
                spec, x = DenseSpec(rows, K, Nf, p.channels, m.act, self.amx), p.var
            else:
                spec, x = DenseSpec(rows, K, Nf, 0, m.act, self.amx), m.x
                if len(xshape) != 2:                 # [..., K] -> [rows, K]
                    x = self.dfvar("rows", (rows, K), "float32")
                    bindings.append(self.bind(x, relax.op.reshape(m.x, [rows, K])))
            args = [x, relax.const(pack_dense_weight(m.w, spec.K2w)), relax.const(padded_bias(m.bias, Nf, spec.Np))]
            gv = self.add_kernel(("dense", spec), lambda: dense_bf16(spec), "dense")
            shape = (rows, spec.Np)
            value = relax.call_tir(gv, args, relax.TensorType(list(shape), "float32"))
            phys = Phys(self.dfvar("dense", shape, "float32"), "ROWS", spec.Np)
            self.count["bf16_dense"] += 1
            self.count["bf16_amx"] += dense_fits(spec)
            self.max_reduction = max(self.max_reduction, K)
        bindings.append(self.bind(phys.var, value))
        if m.out_var not in self.bf16_out:     # bf16 bits are only read by the next kernels, through phys
            bindings.extend(self.bind_view(m.out_var, phys, m.out_shape, m.attrs.get("layout", "NCHW")))
        self.phys[m.out_var] = phys
        return bindings

    def batch_matmul(self, m: Chain):
        """The binding of the chain's output to the bf16 batch matmul kernel on its two fp32 operands (logical shapes:
        its output is read as it is, with no physical form)."""
        from tvm import relax
        xs, (scale_op, scale) = m.attrs["xshape"], m.attrs["scale"]
        spec = BatchMatmulSpec(tuple(xs[:-2]), xs[-2], xs[-1], m.out_shape[-1], scale_op, scale)
        gv = self.add_kernel(("batch_matmul", spec), lambda: batch_matmul_bf16(spec), "batch_matmul")
        self.count["bf16_batch_matmul"] += 1
        self.max_reduction = max(self.max_reduction, spec.K)
        return self.bind(m.out_var, relax.call_tir(gv, [m.x, m.attrs["y"]],
                                                   relax.TensorType(list(m.out_shape), "float32")))

    def depthwise(self, m: Chain, bindings: list):
        """(value, Phys) of a depthwise chain: a call of the depthwise kernel (depthwise.py; weights [KH, KW, Cp]
        with the norms folded in, bias and bounds in its epilogue) on the NHWC form of its input, which is the
        physical tensor of the kernel before it where there is one (bf16 bits when that kernel stores them), else
        the input itself (NHWC after to_nhwc; an NCHW input is transposed: its bindings are appended); its output is
        bf16 bits where only conv and depthwise chains read it (bf16_outputs), else fp32."""
        from tvm import relax
        N, C, H, W = m.attrs["xshape"]
        _, _, KH, KW = m.w.shape
        p = self.phys.get(m.x)
        if p is not None and p.layout == "NHWC":
            x, cx = p.var, p.channels
        else:
            x, bl = self.to_nhwc_padded(m.x, C, m.attrs["layout"])
            bindings.extend(bl)
            cx = C
        out_bf16 = m.out_var in self.bf16_out
        spec = DwSpec(N, H, W, C, cx, KH, KW, m.attrs["stride"], m.attrs["pad"], m.attrs["dilation"], m.act,
                      in_bf16=dtype_of(x) == "uint16", out_bf16=out_bf16)
        Cp = spec.Cp
        if dw_pairs.fits(spec):        # bf16 bits in: vdpbf16ps over the filter's rows, bf16 weights
            wk = dw_pairs.pack_weight(m.w, spec)
            gv = self.add_kernel(("dwconv_pairs", spec), lambda: dw_pairs.dwconv2d_pairs(spec, self.cores),
                                 "dwconv2d_pairs")
            self.count["bf16_dwconv2d_pairs"] += 1
            self.max_reduction = max(self.max_reduction, KH * KW)
        else:
            wk = np.zeros((KH, KW, Cp), np.float32)
            wk[..., :C] = m.w[:, 0].transpose(1, 2, 0)
            gv = self.add_kernel(("dwconv", spec), lambda: dwconv2d_bf16(spec), "dwconv2d")
        shape, dt = (N, spec.OH, spec.OW, Cp), "uint16" if out_bf16 else "float32"
        value = relax.call_tir(gv, [x, relax.const(wk), relax.const(padded_bias(m.bias, C, Cp))],
                               relax.TensorType(list(shape), dt))
        self.count["bf16_dwconv2d"] += 1
        self.count["bf16_stored_bf16"] += out_bf16
        return value, Phys(self.dfvar("dwconv", shape, dt), "NHWC", Cp)


def rewrite_bf16(mod, target, winograd: bool = True):
    """Replace the fp32 conv2d / matmul chains of mod['main'] with bf16 kernels (3x3 stride-1 channels-last convs as
    Winograd kernels where that pays, unless `winograd` is False). Returns (mod, facts): the bf16 instruction set
    used (bf16_dot; bf16_amx: the conv / dense kernels on AMX tiles), kernel counts, the convs / matmuls left in
    fp32, and the longest reduction (for the self-check's bound). Unchanged when the target has no AVX512-BF16."""
    dot = bf16_dot(target)
    facts = {"bf16_dot": dot, "bf16_kernels": 0}
    if dot is None or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, facts
    mod = minmax_as_ops(mod)               # Clip's max / min kernels as Relax ops: the epilogue matcher reads them
    rw = _Rewriter(mod, amx=dot == "amx", cores=num_cores(target), winograd=winograd)
    mod, changed = rewrite_main(mod, rw)
    facts.update(rw.count, bf16_kernels=len(rw.new_funcs) if changed else 0, bf16_max_reduction=rw.max_reduction)
    return mod, facts


def bf16_rewrite_pass(target, winograd: bool = True):
    """rewrite_bf16 as the module pass `graphopt.Bf16Rewrite`, which tvm_lowering.build runs before LegalizeOps
    (the cpu target: after graphopt.Int8Rewrite and graphopt.ToNHWC); its `facts` are rewrite_bf16's once it ran."""
    import functools
    return rewrite_pass("graphopt.Bf16Rewrite", functools.partial(rewrite_bf16, winograd=winograd), target)
