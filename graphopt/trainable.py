"""The trainable view: an ONNX graph (onnx-graphsurgeon IR) run op by op with torch, as a torch.nn.Module.

`TrainableGraph(graph)` interprets the graph with torch ops. Its nn.Parameters are the graph's own float
initializers that act as weights: Conv/ConvTranspose/Gemm/MatMul weights and biases, normalization scales and
shifts, PRelu slopes, and bare float tensors (more than one element) used as data by elementwise or layout ops
(layer scale, position embeddings, class tokens, unrolled-RNN biases). Everything else (shape tensors, indices,
axes, BatchNormalization running statistics, scalar constants such as GELU's 1/sqrt(2)) stays a buffer. Training
changes only parameters; `to_graph()` / `write_back(graph)` write them back into the ONNX graph, whose structure
never changes.

Batch handling
--------------
graphopt graphs have static shapes, and a file exported at batch B0 (usually 1) bakes B0 into constants: Reshape
targets, Expand shapes, zero initial states of unrolled RNNs, class tokens already expanded to the batch, Reshapes
that put the batch on another axis (unrolled LSTM outputs are (seq, 1, B0, H)). Rewriting "the leading entry of
Reshape constants" only covers the first case and is ambiguous when B0 == 1 (is the 1 in [1, 1, 1, 16] the batch?).
So the view does not rewrite constants. It runs the graph exactly as exported on groups of B0 samples and
vectorizes over the groups with torch.vmap:

* axis 0 of every graph input is the batch. A mini-batch of B samples is cut into G = ceil(B / B0) groups (padded
  with zeros to G * B0 when B is not a multiple of B0; padding rows are dropped from the results);
* every group sees exactly the tensors onnxruntime would see at the exported shape, so every baked batch constant
  is right, wherever the batch axis goes inside the graph;
* results (graph outputs and requested features) come back with the batch first: a tensor whose per-group shape
  starts with B0 is returned as (B, *rest); a tensor whose leading axis is not the batch (an unrolled RNN's
  (seq, 1, B0, H), say) is returned as (G, *per-group shape), i.e. per sample when B0 == 1.
* when B == B0 the graph runs directly (no vmap) and graph outputs have their exported shapes.

A graph whose inputs have a symbolic batch dimension (loaded with require_static=False) is run directly at any
batch size.

Gradients flow through vmap to the shared parameters as usual (torch.func.vmap composes with autograd).
Normalization layers are always in inference form: BatchNormalization uses its running statistics (buffers); its
scale and shift are trainable. The graph has no dropout or other train/eval-dependent behaviour.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadInput, UnsupportedModel, reraise_if_strict
from .graph import copy as copy_graph
from .graph import constant_node_value, node_label
from .op_traits import ops, traits

__all__ = ["TrainableGraph", "SUPPORTED_OPS", "parameter_names"]


# ----------------------------------------------------------------------------------------------------------------
# which initializers are parameters
# ----------------------------------------------------------------------------------------------------------------

def _is_float(values: np.ndarray) -> bool:
    return values.dtype.kind == "f"


def parameter_names(graph: gs.Graph) -> list[str]:
    """Names of the float initializers that TrainableGraph makes nn.Parameters (in first-use order): the op's
    parameter inputs (op_traits `params`), and other constants of more than one element that are not among its
    `fixed` inputs (shapes, axes, indices, statistics, bounds, quantization scales)."""
    names, seen = [], set()
    for node in graph.nodes:
        tr = traits(node.op)
        for i, t in enumerate(node.inputs):
            if not isinstance(t, gs.Constant) or not _is_float(t.values):
                continue
            if i in tr.params:
                role = "weight"
            elif i in tr.fixed:
                role = "const"
            else:
                role = "weight" if t.values.size > 1 else "const"
            if role == "weight":
                if t.name not in seen:
                    seen.add(t.name)
                    names.append(t.name)
    return names


# ----------------------------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------------------------

_ONNX_TO_TORCH = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}


def _to_tensor(values: np.ndarray) -> torch.Tensor:
    values = np.asarray(values)
    if values.dtype == np.uint16 or values.dtype.kind not in "fiub":
        raise UnsupportedModel(f"initializer dtype {values.dtype} is not supported by the trainable view")
    if values.dtype.kind == "u" and values.dtype != np.uint8:
        values = values.astype(np.int64)
    return torch.from_numpy(np.array(values, order="C"))      # a copy; keeps 0-d arrays 0-d (ascontiguousarray
    #                                                              makes them 1-d)


# ----------------------------------------------------------------------------------------------------------------
# op implementations
# ----------------------------------------------------------------------------------------------------------------

def _declared_torch_dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    try:
        return _ONNX_TO_TORCH.get(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except Exception:
        return None


class _Op:
    """One node, compiled: its handler, attributes, input/output names and the static values of constant inputs."""
    __slots__ = ("node", "op", "attrs", "inputs", "outputs", "static", "fn", "opset", "label")

    def __init__(self, node: gs.Node, fn, opset: int):
        self.node = node
        self.op = node.op
        self.attrs = dict(node.attrs)
        self.inputs = [t.name if t is not None and t.name else None for t in node.inputs]
        self.outputs = [t.name if t.name else None for t in node.outputs]
        self.static = [t.values if isinstance(t, gs.Constant) else None for t in node.inputs]
        self.fn = fn
        self.opset = opset
        self.label = node_label(node)

    def value(self, i: int, xs) -> np.ndarray | None:
        """The value of input i as numpy (initializers at compile time; other tensors read at run time)."""
        if i >= len(self.inputs) or self.inputs[i] is None:
            return None
        if self.static[i] is not None:
            return np.asarray(self.static[i])
        x = xs[i]
        try:
            return x.detach().cpu().numpy()
        except Exception:  # a batched (vmapped) tensor: a data-dependent shape
            raise UnsupportedModel(f"{self.label}: input #{i} ('{self.inputs[i]}') must be known without the "
                                   f"batch (a shape, axes or indices tensor), but it depends on the inputs") from None

    def ints(self, i: int, xs) -> list[int] | None:
        v = self.value(i, xs)
        return None if v is None else [int(a) for a in np.asarray(v).reshape(-1)]

    def attr(self, name, default=None):
        v = self.attrs.get(name, default)
        if isinstance(v, bytes):
            v = v.decode()
        return v

    def fail(self, why: str):
        raise UnsupportedModel(f"{self.label}: {why}; the trainable view cannot run it")


OPS: dict = {}


def _op(*names):
    def deco(fn):
        for n in names:
            OPS[n] = fn
        return fn
    return deco


def _norm_axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


# --- elementwise ------------------------------------------------------------------------------------------------

_UNARY = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Exp": torch.exp,
    "Log": torch.log, "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg, "Reciprocal": torch.reciprocal,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign, "Sin": torch.sin,
    "Cos": torch.cos, "Softplus": F.softplus, "Softsign": F.softsign, "Mish": F.mish, "Not": torch.logical_not,
    "HardSwish": F.hardswish, "IsNaN": torch.isnan,
}
for _name, _f in _UNARY.items():
    OPS[_name] = (lambda f: (lambda op, xs: [f(xs[0])]))(_f)


@_op("Identity", "Dropout")
def _identity(op, xs):
    outs = [xs[0]]
    if op.op == "Dropout" and len(op.outputs) > 1:
        outs.append(torch.ones_like(xs[0], dtype=torch.bool))
    return outs


@_op("LeakyRelu")
def _leaky(op, xs):
    return [F.leaky_relu(xs[0], float(op.attr("alpha", 0.01)))]


@_op("Elu")
def _elu(op, xs):
    return [F.elu(xs[0], float(op.attr("alpha", 1.0)))]


@_op("Celu")
def _celu(op, xs):
    return [F.celu(xs[0], float(op.attr("alpha", 1.0)))]


@_op("Selu")
def _selu(op, xs):
    a = float(op.attr("alpha", 1.67326319217681884765625))
    g = float(op.attr("gamma", 1.05070102214813232421875))
    x = xs[0]
    return [g * torch.where(x > 0, x, a * (torch.exp(x) - 1))]


@_op("ThresholdedRelu")
def _thresholded(op, xs):
    x = xs[0]
    return [torch.where(x > float(op.attr("alpha", 1.0)), x, torch.zeros_like(x))]


@_op("PRelu")
def _prelu(op, xs):
    x, slope = xs
    return [torch.where(x < 0, x * slope, x)]


@_op("HardSigmoid")
def _hardsigmoid(op, xs):
    alpha, beta = float(op.attr("alpha", 0.2)), float(op.attr("beta", 0.5))
    return [torch.clamp(xs[0] * alpha + beta, 0.0, 1.0)]


@_op("Gelu")
def _gelu(op, xs):
    return [F.gelu(xs[0], approximate=op.attr("approximate", "none"))]


@_op("Clip")
def _clip(op, xs):
    x = xs[0]
    if op.opset < 11:
        lo, hi = op.attr("min"), op.attr("max")
    else:
        lo = _scalar_bound(op, 1, xs[1] if len(xs) > 1 and xs[1] is not None else None)
        hi = _scalar_bound(op, 2, xs[2] if len(xs) > 2 and xs[2] is not None else None)
    if not torch.is_tensor(lo) and not torch.is_tensor(hi):
        # constant bounds (every export's ReLU6 / HardSwish): clamp's backward is one mask, where maximum and
        # minimum with a tensor bound cost an eq, a where and a masked_fill each (a third of PP-OCR's training step)
        return [x if lo is None and hi is None else torch.clamp(x, lo, hi)]
    if lo is not None:
        x = torch.maximum(x, lo.to(x.dtype) if torch.is_tensor(lo) else torch.tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, hi.to(x.dtype) if torch.is_tensor(hi) else torch.tensor(hi, dtype=x.dtype))
    return [x]


def _scalar_bound(op: _Op, i: int, b):
    """Clip's bound (input i) as a Python float where it is one initializer value without a gradient (not a
    parameter, not computed), else as it is."""
    if torch.is_tensor(b) and i < len(op.static) and op.static[i] is not None and b.numel() == 1 \
            and not b.requires_grad:
        return float(np.asarray(op.static[i]).reshape(-1)[0])
    return b


@_op("Add")
def _add(op, xs):
    return [xs[0] + xs[1]]


@_op("Sub")
def _sub(op, xs):
    return [xs[0] - xs[1]]


@_op("Mul")
def _mul(op, xs):
    return [xs[0] * xs[1]]


@_op("Div")
def _div(op, xs):
    a, b = xs
    if not a.is_floating_point():
        return [torch.div(a, b, rounding_mode="trunc")]
    return [a / b]


@_op("Mod")
def _mod(op, xs):
    a, b = xs
    if int(op.attr("fmod", 0)):
        return [torch.fmod(a, b)]
    return [torch.remainder(a, b)]


@_op("Pow")
def _pow(op, xs):
    a, b = xs
    if op.static[1] is not None and np.asarray(op.static[1]).size == 1:
        e = float(np.asarray(op.static[1]).reshape(-1)[0])
        if e == 2.0:
            return [a * a]
        if e == 1.0:
            return [a]
        if e == 0.5:
            return [torch.sqrt(a)]
        return [torch.pow(a, e)]
    return [torch.pow(a, b.to(a.dtype))]


def _variadic(fn):
    def run(op, xs):
        xs = [x for x in xs if x is not None]
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return run


OPS["Max"] = lambda op, xs: [_variadic(torch.maximum)(op, xs)]
OPS["Min"] = lambda op, xs: [_variadic(torch.minimum)(op, xs)]
OPS["Sum"] = lambda op, xs: [_variadic(torch.add)(op, xs)]
OPS["Mean"] = lambda op, xs: [_variadic(torch.add)(op, xs) / len([x for x in xs if x is not None])]

_COMPARE = {"Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt,
            "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
            "Xor": torch.logical_xor}
for _name, _f in _COMPARE.items():
    OPS[_name] = (lambda f: (lambda op, xs: [f(xs[0], xs[1])]))(_f)


@_op("Where")
def _where(op, xs):
    return [torch.where(xs[0].to(torch.bool), xs[1], xs[2])]


@_op("Cast")
def _cast(op, xs):
    to = int(op.attr("to"))
    if to not in _ONNX_TO_TORCH:
        op.fail(f"cast to {onnx.TensorProto.DataType.Name(to)} is not supported")
    return [xs[0].to(_ONNX_TO_TORCH[to])]


@_op("CastLike")
def _castlike(op, xs):
    return [xs[0].to(xs[1].dtype)]


# --- quantization (QDQ) -----------------------------------------------------------------------------------------
# Fake quantization, computed as onnxruntime computes it: QuantizeLinear divides by the scale, clamps to the integer
# range shifted by the zero point, rounds half to even and adds the zero point; DequantizeLinear is
# (q - zero_point) * scale in the scale's float type. QuantizeLinear's output holds those integers in the input's
# float dtype (not int8/uint8), so the rounding passes gradients straight through (zero where clamped) and a QDQ
# graph can be fine-tuned; DequantizeLinear takes either form.

_QRANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767)}
_QRANGE_ONNX = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
                onnx.TensorProto.INT16: (-32768, 32767), onnx.TensorProto.UINT16: (0, 65535)}


def _qparam(op, p: torch.Tensor, x: torch.Tensor, dtype) -> torch.Tensor:
    """A scale or zero point shaped to broadcast against x: per tensor, per axis (`axis`, default 1) or per block
    (`block_size` along `axis`: p has x's rank with that axis shortened)."""
    p = p.to(dtype)
    if p.numel() == 1:
        return p.reshape(())
    axis = _norm_axis(int(op.attr("axis", 1)), x.dim())
    block = int(op.attr("block_size", 0) or 0)
    if block:
        return p.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def _qrange(op, zp) -> tuple[int, int]:
    """The integer range of a QuantizeLinear: its zero point's type, else its output_dtype (uint8 by default)."""
    if zp is not None:
        if zp.dtype not in _QRANGE:
            op.fail(f"quantization to {zp.dtype} is not supported")
        return _QRANGE[zp.dtype]
    lo, hi = _QRANGE_ONNX.get(int(op.attr("output_dtype", 0) or onnx.TensorProto.UINT8), (None, None))
    if lo is None:
        op.fail(f"output_dtype {op.attr('output_dtype')} is not supported")
    return lo, hi


def _scale_and_zero(op, xs):
    """QuantizeLinear's (x, scale, zero point as floats shaped to broadcast against x, lo, hi)."""
    x, scale = xs[0], xs[1]
    zp = xs[2] if len(xs) > 2 and xs[2] is not None else None
    lo, hi = _qrange(op, zp)
    s = _qparam(op, scale, x, x.dtype)
    z = _qparam(op, zp, x, x.dtype) if zp is not None else torch.zeros((), dtype=x.dtype, device=x.device)
    return x, s, z, lo, hi


@_op("QuantizeLinear")
def _quantize_linear(op, xs):
    x, s, z, lo, hi = _scale_and_zero(op, xs)
    y = torch.clamp(x / s, lo - z, hi - z)
    y = y + (torch.round(y) - y).detach()         # round half to even; the gradient passes straight through
    return [y + z]


class _FakeQuant(torch.autograd.Function):
    """A QuantizeLinear -> DequantizeLinear pair in one op: round(clamp(x / s, lo, hi)) * out_scale (lo, hi: the
    integer range less the zero point), the values the two ops compute one after the other (r + z - z is exact for
    these integers), with the same straight-through gradients: dx = g where x / s was inside the range; ds and
    d out_scale (the pair's one scale, read by both ops) as the pair's autograd gives them. It keeps one bool per
    element for the backward pass (and x only when a scale trains) where the pair kept x / s in float, and runs five
    elementwise passes where the pair ran eight (PP-OCRv4's recognizer, 554 pairs: 12.4 -> 6.0 s a training step)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, s, lo, hi, out_scale):
        y = x / s
        r = torch.clamp(y, lo, hi)
        inside = r == y                             # NaN: False, as the pair's comparisons
        r = r.round_()
        r = r.mul_(out_scale) if r.dtype == out_scale.dtype else r.to(out_scale.dtype) * out_scale
        return r, inside

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, s, lo, hi, out_scale = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.scales = ctx.needs_input_grad[1] or ctx.needs_input_grad[4]
        ctx.bounds = None if torch.is_tensor(lo) else (lo, hi)
        if not ctx.scales:
            ctx.save_for_backward(output[1])
        elif ctx.bounds is None:
            ctx.save_for_backward(output[1], x, s, out_scale, lo, hi)
        else:
            ctx.save_for_backward(output[1], x, s, out_scale)

    @staticmethod
    def backward(ctx, g, _):
        inside = ctx.saved_tensors[0]
        gx = torch.where(inside, g, 0.0) if ctx.needs_input_grad[0] else None
        g_s = g_out = None
        if ctx.scales:
            x, s, out_scale = ctx.saved_tensors[1:4]
            lo, hi = ctx.bounds or ctx.saved_tensors[4:6]
            y = x / s
            if ctx.needs_input_grad[1]:        # through x / s: d(r * out_scale)/ds = -out_scale * y / s inside
                g_s = (torch.where(inside, g * y, 0.0) * (-(out_scale / s).to(y.dtype))).sum_to_size(s.shape)
            if ctx.needs_input_grad[4]:        # the dequantizing product
                r = torch.round(torch.clamp(y, lo, hi)).to(out_scale.dtype)
                g_out = (g * r).sum_to_size(out_scale.shape)
        return gx, g_s, None, None, g_out


def _fake_quant(op, xs):
    """A fused QuantizeLinear -> DequantizeLinear pair (_fuse_qdq, not an ONNX op): inputs x, scale, zero point."""
    x, s, z, lo, hi = _scale_and_zero(op, xs)
    if z.numel() == 1 and not z.requires_grad:     # a per-tensor zero point: plain numbers as clamp's bounds
        zf = float(z)
        lo, hi = lo - zf, hi - zf
    else:
        lo, hi = lo - z, hi - z
    out_scale = s if xs[1].dtype == x.dtype else _qparam(op, xs[1], x, xs[1].dtype)
    return [_FakeQuant.apply(x, s, lo, hi, out_scale)[0]]


@_op("DequantizeLinear")
def _dequantize_linear(op, xs):
    q, scale = xs[0], xs[1]
    zp = xs[2] if len(xs) > 2 and xs[2] is not None else None
    if not q.is_floating_point():
        q = q.to(torch.int32)
        if zp is not None:
            q = q - _qparam(op, zp, q, torch.int32)
        return [q.to(scale.dtype) * _qparam(op, scale, q, scale.dtype)]
    q = q.to(scale.dtype)                          # a QuantizeLinear output: integers held in floats
    if zp is not None:
        q = q - _qparam(op, zp, q, scale.dtype)
    return [q * _qparam(op, scale, q, scale.dtype)]


# --- linear algebra ---------------------------------------------------------------------------------------------

@_op("MatMul")
def _matmul(op, xs):
    return [torch.matmul(xs[0], xs[1])]


@_op("Gemm")
def _gemm(op, xs):
    a, b = xs[0], xs[1]
    c = xs[2] if len(xs) > 2 else None
    if int(op.attr("transA", 0)):
        a = a.transpose(0, 1)
    if int(op.attr("transB", 0)):
        b = b.transpose(0, 1)
    alpha, beta = float(op.attr("alpha", 1.0)), float(op.attr("beta", 1.0))
    y = torch.matmul(a, b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return [y]


@_op("Einsum")
def _einsum(op, xs):
    return [torch.einsum(op.attr("equation"), *xs)]


# --- convolution ------------------------------------------------------------------------------------------------

def _conv_pads(op, spatial, kernel, strides, dilations):
    """(begin, end) pads per spatial axis for Conv/pooling, honouring auto_pad."""
    n = len(spatial)
    auto = op.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(n):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i])
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        return begins, ends
    if auto == "VALID":
        return [0] * n, [0] * n
    pads = list(op.attr("pads", [0] * (2 * n)))
    return [int(p) for p in pads[:n]], [int(p) for p in pads[n:]]


def _torch_pad_list(begins, ends):
    out = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@_op("Conv")
def _conv(op, xs):
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    n = w.dim() - 2
    if n not in _CONV:
        op.fail(f"{n}-D convolution is not supported")
    kernel = list(op.attr("kernel_shape", list(w.shape[2:])))
    strides = list(op.attr("strides", [1] * n))
    dil = list(op.attr("dilations", [1] * n))
    group = int(op.attr("group", 1))
    begins, ends = _conv_pads(op, list(x.shape[2:]), kernel, strides, dil)
    if begins == ends:
        return [_CONV[n](x, w, b, strides, begins, dil, group)]
    x = F.pad(x, _torch_pad_list(begins, ends))
    return [_CONV[n](x, w, b, strides, 0, dil, group)]


@_op("ConvTranspose")
def _conv_transpose(op, xs):
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    n = w.dim() - 2
    if n not in _CONV_T:
        op.fail(f"{n}-D transposed convolution is not supported")
    kernel = list(op.attr("kernel_shape", list(w.shape[2:])))
    strides = list(op.attr("strides", [1] * n))
    dil = list(op.attr("dilations", [1] * n))
    group = int(op.attr("group", 1))
    out_pad = list(op.attr("output_padding", [0] * n))
    spatial = list(x.shape[2:])
    full = [strides[i] * (spatial[i] - 1) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(n)]
    auto = op.attr("auto_pad", "NOTSET")
    out_shape = op.attr("output_shape")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        if out_shape is None:
            out_shape = [spatial[i] * strides[i] for i in range(n)]
        out_shape = list(out_shape)[-n:]
        total = [full[i] - out_shape[i] for i in range(n)]
        if auto == "SAME_UPPER" or (auto == "NOTSET" and out_shape is not None and auto != "SAME_LOWER"):
            begins = [t // 2 for t in total]
        else:
            begins = [t - t // 2 for t in total]
        ends = [total[i] - begins[i] for i in range(n)]
    elif auto == "VALID":
        begins, ends = [0] * n, [0] * n
    else:
        pads = list(op.attr("pads", [0] * (2 * n)))
        begins, ends = [int(p) for p in pads[:n]], [int(p) for p in pads[n:]]
    if begins == ends and all(p >= 0 for p in begins) and all(o < max(s, d) for o, s, d in zip(out_pad, strides, dil)):
        return [_CONV_T[n](x, w, b, strides, begins, out_pad, group, dil)]
    y = _CONV_T[n](x, w, None, strides, 0, 0, group, dil)
    # y covers the output without output_padding and without cropping; pad the end, then crop the pads.
    extra = [full[i] - y.shape[2 + i] for i in range(n)]
    if any(extra):
        y = F.pad(y, _torch_pad_list([0] * n, extra))
    index = [slice(None), slice(None)] + [slice(begins[i], full[i] - ends[i]) for i in range(n)]
    y = y[tuple(index)]
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * n)
    return [y]


# --- normalization ----------------------------------------------------------------------------------------------

@_op("BatchNormalization")
def _batchnorm(op, xs):
    if int(op.attr("training_mode", 0)) or len([o for o in op.outputs if o]) > 1:
        op.fail("training-mode BatchNormalization (running-statistics outputs) is not supported")
    x, scale, bias, mean, var = xs[:5]
    eps = float(op.attr("epsilon", 1e-5))
    shape = [-1] + [1] * (x.dim() - 2)
    inv = torch.rsqrt(var + eps)
    return [(x - mean.reshape(shape)) * (inv * scale).reshape(shape) + bias.reshape(shape)]


@_op("LayerNormalization")
def _layernorm(op, xs):
    x, scale = xs[0], xs[1]
    bias = xs[2] if len(xs) > 2 else None
    axis = _norm_axis(int(op.attr("axis", -1)), x.dim())
    eps = float(op.attr("epsilon", 1e-5))
    norm_shape = list(x.shape[axis:])
    if len([o for o in op.outputs if o]) > 1:
        dims = tuple(range(axis, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        inv = torch.rsqrt(var + eps)
        y = (x - mean) * inv * scale
        if bias is not None:
            y = y + bias
        return [y, mean, inv][:len(op.outputs)]
    if list(scale.shape) != norm_shape:
        scale = scale.expand(norm_shape)
    if bias is not None and list(bias.shape) != norm_shape:
        bias = bias.expand(norm_shape)
    return [F.layer_norm(x, norm_shape, scale, bias, eps)]


@_op("InstanceNormalization")
def _instancenorm(op, xs):
    x, scale, bias = xs
    eps = float(op.attr("epsilon", 1e-5))
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    shape = [-1] + [1] * (x.dim() - 2)
    return [(x - mean) * torch.rsqrt(var + eps) * scale.reshape(shape) + bias.reshape(shape)]


@_op("GroupNormalization")
def _groupnorm(op, xs):
    x, scale, bias = xs
    eps = float(op.attr("epsilon", 1e-5))
    g = int(op.attr("num_groups"))
    n, c = x.shape[0], x.shape[1]
    xg = x.reshape(n, g, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = [-1] + [1] * (x.dim() - 2)
    if scale.numel() == g and c != g:  # opset 18: one scale per group
        scale = scale.repeat_interleave(c // g)
        bias = bias.repeat_interleave(c // g)
    return [y * scale.reshape(shape) + bias.reshape(shape)]


@_op("LpNormalization")
def _lpnorm(op, xs):
    p = int(op.attr("p", 2))
    axis = int(op.attr("axis", -1))
    x = xs[0]
    return [x / torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)]


@_op("Softmax", "LogSoftmax")
def _softmax(op, xs):
    x = xs[0]
    fn = torch.softmax if op.op == "Softmax" else torch.log_softmax
    if op.opset >= 13:
        return [fn(x, _norm_axis(int(op.attr("axis", -1)), x.dim()))]
    axis = _norm_axis(int(op.attr("axis", 1)), x.dim())
    shape = x.shape
    flat = x.reshape(int(np.prod(shape[:axis], dtype=np.int64)), -1)
    return [fn(flat, 1).reshape(shape)]


# --- pooling ----------------------------------------------------------------------------------------------------

@_op("GlobalAveragePool")
def _gap(op, xs):
    x = xs[0]
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


@_op("GlobalMaxPool")
def _gmp(op, xs):
    x = xs[0]
    return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@_op("MaxPool")
def _maxpool(op, xs):
    x = xs[0]
    if len([o for o in op.outputs if o]) > 1:
        op.fail("the Indices output is not supported")
    kernel = list(op.attr("kernel_shape"))
    n = len(kernel)
    strides = list(op.attr("strides", [1] * n))
    dil = list(op.attr("dilations", [1] * n))
    ceil = bool(op.attr("ceil_mode", 0))
    begins, ends = _conv_pads(op, list(x.shape[2:]), kernel, strides, dil)
    if begins == ends and all(2 * p <= k for p, k in zip(begins, kernel)):
        return [_MAXPOOL[n](x, kernel, strides, begins, dil, ceil_mode=ceil)]
    x = F.pad(x, _torch_pad_list(begins, ends), value=float("-inf"))
    return [_MAXPOOL[n](x, kernel, strides, 0, dil, ceil_mode=ceil)]


@_op("AveragePool")
def _avgpool(op, xs):
    x = xs[0]
    kernel = list(op.attr("kernel_shape"))
    n = len(kernel)
    strides = list(op.attr("strides", [1] * n))
    dil = list(op.attr("dilations", [1] * n))
    if any(d != 1 for d in dil):
        op.fail("dilated AveragePool is not supported")
    ceil = bool(op.attr("ceil_mode", 0))
    include = bool(op.attr("count_include_pad", 0))
    begins, ends = _conv_pads(op, list(x.shape[2:]), kernel, strides, dil)
    if begins == ends and all(2 * p <= k for p, k in zip(begins, kernel)):
        return [_AVGPOOL[n](x, kernel, strides, begins, ceil_mode=ceil, count_include_pad=include)]
    pad = _torch_pad_list(begins, ends)
    summed = _AVGPOOL[n](F.pad(x, pad), kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if include:
        return [summed]
    ones = F.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device), pad)
    frac = _AVGPOOL[n](ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    return [summed / frac]


# --- reductions -------------------------------------------------------------------------------------------------

def _reduce_axes(op, xs, rank):
    axes_from_input = {"ReduceSum": 13}.get(op.op, 18)
    if op.opset >= axes_from_input:
        axes = op.ints(1, xs) if len(op.inputs) > 1 else None
    else:
        axes = op.attr("axes")
    if not axes:
        if int(op.attr("noop_with_empty_axes", 0)):
            return None
        return list(range(rank))
    return sorted(_norm_axis(int(a), rank) for a in axes)


@_op(*sorted(ops(family="reduce")))
def _reduce(op, xs):
    x = xs[0]
    axes = _reduce_axes(op, xs, x.dim())
    if axes is None:
        return [x]
    keep = bool(op.attr("keepdims", 1))
    dims = tuple(axes)
    if op.op == "ReduceMean":
        return [x.mean(dim=dims, keepdim=keep)]
    if op.op == "ReduceSum":
        return [x.sum(dim=dims, keepdim=keep)]
    if op.op == "ReduceMax":
        return [x.amax(dim=dims, keepdim=keep)]
    if op.op == "ReduceMin":
        return [x.amin(dim=dims, keepdim=keep)]
    if op.op == "ReduceSumSquare":
        return [(x * x).sum(dim=dims, keepdim=keep)]
    if op.op == "ReduceL1":
        return [x.abs().sum(dim=dims, keepdim=keep)]
    if op.op == "ReduceL2":
        return [torch.sqrt((x * x).sum(dim=dims, keepdim=keep))]
    if op.op == "ReduceLogSumExp":
        return [torch.logsumexp(x, dim=dims, keepdim=keep)]
    if op.op == "ReduceLogSum":
        return [torch.log(x.sum(dim=dims, keepdim=keep))]
    y = x
    for d in sorted(dims, reverse=True):
        y = y.prod(dim=d, keepdim=keep)
    return [y]


@_op("ArgMax", "ArgMin")
def _argmax(op, xs):
    x = xs[0]
    axis = int(op.attr("axis", 0))
    keep = bool(op.attr("keepdims", 1))
    if int(op.attr("select_last_index", 0)):
        flipped = x.flip(axis)
        idx = (flipped.argmax if op.op == "ArgMax" else flipped.argmin)(dim=axis, keepdim=keep)
        return [x.shape[axis] - 1 - idx]
    return [(x.argmax if op.op == "ArgMax" else x.argmin)(dim=axis, keepdim=keep)]


# --- layout -----------------------------------------------------------------------------------------------------

@_op("Reshape")
def _reshape(op, xs):
    x = xs[0]
    shape = op.ints(1, xs)
    if not int(op.attr("allowzero", 0)):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


@_op("Flatten")
def _flatten(op, xs):
    x = xs[0]
    axis = _norm_axis(int(op.attr("axis", 1)), x.dim())
    lead = int(np.prod(x.shape[:axis], dtype=np.int64))
    return [x.reshape(lead, -1) if x.numel() else x.reshape(lead, int(np.prod(x.shape[axis:], dtype=np.int64)))]


@_op("Transpose")
def _transpose(op, xs):
    x = xs[0]
    perm = op.attr("perm")
    perm = list(range(x.dim() - 1, -1, -1)) if perm is None else [int(p) for p in perm]
    return [x.permute(perm)]


@_op("Squeeze")
def _squeeze(op, xs):
    x = xs[0]
    axes = op.ints(1, xs) if op.opset >= 13 else op.attr("axes")
    if not axes:
        return [x.squeeze()] if x.dim() else [x]
    axes = sorted({_norm_axis(int(a), x.dim()) for a in axes})
    return [x.reshape([d for i, d in enumerate(x.shape) if i not in axes])]


@_op("Unsqueeze")
def _unsqueeze(op, xs):
    x = xs[0]
    axes = op.ints(1, xs) if op.opset >= 13 else op.attr("axes")
    rank = x.dim() + len(axes)
    axes = sorted(_norm_axis(int(a), rank) for a in axes)
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return [x.reshape(shape)]


@_op("Concat")
def _concat(op, xs):
    xs = [x for x in xs if x is not None]
    axis = int(op.attr("axis"))
    dtype = xs[0].dtype
    return [torch.cat([x.to(dtype) for x in xs], dim=axis)]


@_op("Split")
def _split(op, xs):
    x = xs[0]
    axis = _norm_axis(int(op.attr("axis", 0)), x.dim())
    n_out = len(op.outputs)
    if op.opset >= 13:
        sizes = op.ints(1, xs) if len(op.inputs) > 1 and op.inputs[1] else None
    else:
        sizes = op.attr("split")
    if not sizes:
        dim = x.shape[axis]
        n = int(op.attr("num_outputs", n_out))
        chunk = -(-dim // n)
        sizes = [min(chunk, dim - i * chunk) for i in range(n)]
    return list(torch.split(x, [int(s) for s in sizes], dim=axis))


@_op("Slice")
def _slice(op, xs):
    x = xs[0]
    if op.opset >= 10:
        starts, ends = op.ints(1, xs), op.ints(2, xs)
        axes = op.ints(3, xs) if len(op.inputs) > 3 and op.inputs[3] else list(range(len(starts)))
        steps = op.ints(4, xs) if len(op.inputs) > 4 and op.inputs[4] else [1] * len(starts)
    else:
        starts, ends = list(op.attr("starts")), list(op.attr("ends"))
        axes = list(op.attr("axes", list(range(len(starts)))))
        steps = [1] * len(starts)
    index = [slice(None)] * x.dim()
    gathers = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _norm_axis(int(a), x.dim())
        if st == 0:
            op.fail("a Slice step of 0 is invalid")
        dim = x.shape[a]
        rng = range(*slice(int(s), int(e), int(st)).indices(dim))
        if st > 0:
            index[a] = slice(rng.start, max(rng.start, rng.stop), rng.step) if len(rng) else slice(0, 0)
        else:
            gathers.append((a, list(rng)))
    y = x[tuple(index)]
    for a, idx in gathers:
        y = y.index_select(a, torch.tensor(idx, dtype=torch.long, device=x.device))
    return [y]


@_op("Gather")
def _gather(op, xs):
    x, idx = xs
    axis = _norm_axis(int(op.attr("axis", 0)), x.dim())
    dim = x.shape[axis]
    if op.static[1] is not None:
        iv = np.asarray(op.static[1]).astype(np.int64)
        iv = np.where(iv < 0, iv + dim, iv)
        if iv.ndim == 0:
            return [x.select(axis, int(iv))]
        flat = torch.from_numpy(iv.reshape(-1)).to(x.device)
        shape = list(iv.shape)
    else:
        idx = idx.long()
        idx = torch.where(idx < 0, idx + dim, idx)
        flat = idx.reshape(-1)
        shape = list(idx.shape)
    y = x.index_select(axis, flat)
    return [y.reshape(list(x.shape[:axis]) + shape + list(x.shape[axis + 1:]))]


@_op("GatherElements")
def _gather_elements(op, xs):
    x, idx = xs
    axis = _norm_axis(int(op.attr("axis", 0)), x.dim())
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return [torch.gather(x, axis, idx)]


@_op("OneHot")
def _one_hot(op, xs):
    """ONNX OneHot: indices (negative ones count from the end), depth, values [off, on], the new axis."""
    idx, depth, values = xs
    n = op.ints(1, xs)[0]
    idx = idx.long()
    idx = torch.where(idx < 0, idx + n, idx)
    valid = (idx >= 0) & (idx < n)
    hot = F.one_hot(torch.where(valid, idx, torch.zeros_like(idx)), n) * valid.unsqueeze(-1).long()
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    out = off + (on - off) * hot.to(values.dtype)
    axis = int(op.attr("axis", -1))
    if axis < 0:
        axis += out.dim()
    return [out.movedim(-1, axis)]


@_op("Expand")
def _expand(op, xs):
    x = xs[0]
    shape = op.ints(1, xs)
    out = np.broadcast_shapes(tuple(x.shape), tuple(shape))
    return [x.expand(out)]


@_op("Tile")
def _tile(op, xs):
    return [xs[0].repeat(op.ints(1, xs))]


@_op("Pad")
def _pad(op, xs):
    x = xs[0]
    mode = op.attr("mode", "constant")
    if op.opset >= 11:
        pads = op.ints(1, xs)
        cval = op.value(2, xs) if len(op.inputs) > 2 else None
        cval = float(np.asarray(cval).reshape(-1)[0]) if cval is not None and np.asarray(cval).size else 0.0
        axes = op.ints(3, xs) if len(op.inputs) > 3 and op.inputs[3] else None
    else:
        pads = list(op.attr("pads"))
        cval = float(op.attr("value", 0.0))
        axes = None
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [_norm_axis(a, rank) for a in axes]
    n = len(axes)
    begin = {a: pads[i] for i, a in enumerate(axes)}
    end = {a: pads[n + i] for i, a in enumerate(axes)}
    last = max([a for a in axes if begin[a] or end[a]], default=None)
    if last is None:
        return [x]
    first = min(a for a in axes if begin[a] or end[a])
    torch_pads = []
    for a in range(rank - 1, first - 1, -1):
        torch_pads += [begin.get(a, 0), end.get(a, 0)]
    tmode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if tmode is None:
        op.fail(f"Pad mode '{mode}' is not supported")
    if tmode == "constant":
        return [F.pad(x, torch_pads, value=cval)]
    return [F.pad(x, torch_pads, mode=tmode)]


@_op("DepthToSpace")
def _d2s(op, xs):
    x = xs[0]
    b = int(op.attr("blocksize"))
    n, c, h, w = x.shape
    if op.attr("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // (b * b), h * b, w * b)]


@_op("SpaceToDepth")
def _s2d(op, xs):
    x = xs[0]
    b = int(op.attr("blocksize"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * b * b, h // b, w // b)]


# --- shapes and constants ---------------------------------------------------------------------------------------

@_op("Shape")
def _shape(op, xs):
    shape = list(xs[0].shape)
    start, end = op.attr("start"), op.attr("end")
    if start is not None or end is not None:
        shape = shape[slice(start, end)]
    return [torch.tensor(shape, dtype=torch.int64)]


@_op("Size")
def _size(op, xs):
    return [torch.tensor(xs[0].numel(), dtype=torch.int64)]


@_op("Constant")
def _constant(op, xs):
    v = constant_node_value(op.node)
    if v is None:
        op.fail("only value, value_float(s) and value_int(s) Constants are supported")
    return [_to_tensor(v)]


@_op("ConstantOfShape")
def _constant_of_shape(op, xs):
    shape = op.ints(0, xs)
    v = op.attrs.get("value")
    v = v.values if isinstance(v, gs.Constant) else np.zeros(1, np.float32)
    t = _to_tensor(np.asarray(v).reshape(-1)[:1])
    return [t.reshape(()).expand(shape).clone()]


@_op("Range")
def _range(op, xs):
    start, limit, delta = (np.asarray(op.value(i, xs)).reshape(()) for i in range(3))
    v = np.arange(start, limit, delta, dtype=start.dtype)
    return [_to_tensor(v)]


# --- resize -----------------------------------------------------------------------------------------------------

def _source_coords(mode: str, n_out: int, n_in: int, scale: float) -> np.ndarray:
    """ONNX Resize's coordinate transformation, in float32 like onnxruntime."""
    x = np.arange(n_out, dtype=np.float32)
    s = np.float32(scale)
    if mode == "half_pixel":
        return (x + np.float32(0.5)) / s - np.float32(0.5)
    if mode == "pytorch_half_pixel":
        return (x + np.float32(0.5)) / s - np.float32(0.5) if n_out > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return x * np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / s
    if mode == "tf_half_pixel_for_nn":
        return (x + np.float32(0.5)) / s
    if mode == "half_pixel_symmetric":
        adjustment = np.float32(n_out) / (s * np.float32(n_in))
        center = np.float32(n_in) / np.float32(2)
        offset = center * (np.float32(1) - adjustment)
        return offset + (x + np.float32(0.5)) / s - np.float32(0.5)
    raise KeyError(mode)


@_op("Resize", "Upsample")
def _resize(op, xs):
    x = xs[0]
    rank = x.dim()
    if op.op == "Upsample" or op.opset < 11:
        scales = op.value(1, xs) if len(op.inputs) > 1 else op.attr("scales")
        scales = [float(s) for s in np.asarray(scales).reshape(-1)]
        sizes = None
        coord = "asymmetric"
        nearest_mode = "floor" if op.op == "Upsample" or op.opset < 11 else "round_prefer_floor"
    else:
        scales = op.value(2, xs) if len(op.inputs) > 2 else None
        sizes = op.value(3, xs) if len(op.inputs) > 3 else None
        scales = [float(s) for s in np.asarray(scales).reshape(-1)] if scales is not None and np.size(scales) else None
        sizes = [int(s) for s in np.asarray(sizes).reshape(-1)] if sizes is not None and np.size(sizes) else None
        coord = op.attr("coordinate_transformation_mode", "half_pixel")
        nearest_mode = op.attr("nearest_mode", "round_prefer_floor")
    mode = op.attr("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):
        op.fail(f"Resize mode '{mode}' is not supported (nearest and linear are)")
    if int(op.attr("antialias", 0)):
        op.fail("antialiased Resize is not supported")
    if coord == "tf_crop_and_resize":
        op.fail("coordinate_transformation_mode 'tf_crop_and_resize' is not supported")
    axes = op.attr("axes")
    axes = list(range(rank)) if axes is None else [_norm_axis(int(a), rank) for a in axes]
    if op.attr("keep_aspect_ratio_policy", "stretch") != "stretch" and sizes is not None:
        op.fail("keep_aspect_ratio_policy other than 'stretch' is not supported")
    y = x
    for i, a in enumerate(axes):
        n_in = x.shape[a]
        if sizes is not None:
            n_out = sizes[i]
            scale = n_out / n_in
        else:
            scale = scales[i]
            n_out = int(math.floor(n_in * scale))
        if n_out == n_in and scale == 1.0:
            continue
        src = _source_coords(coord, n_out, n_in, scale)
        if mode == "nearest":
            if nearest_mode == "floor":
                idx = np.floor(src)
            elif nearest_mode == "ceil":
                idx = np.ceil(src)
            elif nearest_mode == "round_prefer_ceil":
                idx = np.where(src - np.floor(src) == 0.5, np.ceil(src), np.round(src))
            else:  # round_prefer_floor
                idx = np.where(src - np.floor(src) == 0.5, np.floor(src), np.round(src))
            idx = np.clip(idx, 0, n_in - 1).astype(np.int64)
            y = y.index_select(a, torch.from_numpy(idx).to(x.device))
        else:
            src = np.clip(src, 0, n_in - 1)
            i0 = np.floor(src).astype(np.int64)
            i1 = np.minimum(i0 + 1, n_in - 1)
            w = (src - i0).astype(np.float32)
            shape = [1] * rank
            shape[a] = n_out
            wt = torch.from_numpy(w).to(device=x.device, dtype=x.dtype).reshape(shape)
            y0 = y.index_select(a, torch.from_numpy(i0).to(x.device))
            y1 = y.index_select(a, torch.from_numpy(i1).to(x.device))
            y = y0 + (y1 - y0) * wt
    return [y]


SUPPORTED_OPS = tuple(sorted(OPS))


# ----------------------------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------------------------

def _default_opset(graph: gs.Graph) -> int:
    opset = getattr(graph, "opset", None)
    if isinstance(opset, int) and opset > 0:
        return opset
    for dom in getattr(graph, "import_domains", None) or []:
        if getattr(dom, "domain", "") in ("", "ai.onnx"):
            return int(dom.version)
    return 17


def _dead_after(plan: list[_Op], outputs: list[str]) -> list[list[str]]:
    """Per step of the plan, the tensors no later step reads: dropped after it, so that a run holds only live
    tensors (autograd keeps what the backward pass needs by itself); graph outputs are kept (and requested features,
    by the caller)."""
    last = {}
    for i, op in enumerate(plan):
        for n in op.inputs + op.outputs:
            if n is not None:
                last[n] = i
    dead: list[list[str]] = [[] for _ in plan]
    for n, i in last.items():
        if n not in outputs:
            dead[i].append(n)
    return dead


def _constant_is(op: _Op, i: int, value: float) -> bool:
    v = op.static[i] if i < len(op.static) else None
    return v is not None and np.asarray(v).size == 1 and float(np.asarray(v).reshape(-1)[0]) == value


def _plan_index(plan: list[_Op]) -> tuple[dict[str, int], dict[str, tuple[int, _Op]]]:
    """({tensor: how many inputs of the plan read it}, {first output: (position, op)}), for the fusions."""
    readers: dict[str, int] = {}
    for op in plan:
        for n in op.inputs:
            if n is not None:
                readers[n] = readers.get(n, 0) + 1
    return readers, {op.outputs[0]: (i, op) for i, op in enumerate(plan) if op.outputs and op.outputs[0]}


def _fuse_hardswish(plan: list[_Op], outputs: list[str], opset: int) -> tuple[list[_Op], set[str]]:
    """The plan with every HardSwish that an exporter spelled out, Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6) (Paddle's,
    and torch's before opset 14), run as one F.hardswish: the same arithmetic in the same order, so the same values,
    and one saved tensor and one backward kernel where the chain had four of each (with Clip's, about half
    of PP-OCRv4's training step in a torch profile). Only chains whose inner tensors nothing else reads. Returns (plan, fused-away
    tensor names)."""
    readers, by_output = _plan_index(plan)
    inner_ok = lambda n: n is not None and readers.get(n) == 1 and n not in outputs   # noqa: E731
    drop, replace, away = set(), {}, set()
    for i, div in enumerate(plan):
        if div.op != "Div" or len(div.inputs) != 2 or not _constant_is(div, 1, 6.0):
            continue
        mul = by_output.get(div.inputs[0])
        if mul is None or mul[1].op != "Mul" or not inner_ok(div.inputs[0]):
            continue
        m = mul[1]
        for x_pos in (0, 1):
            clip = by_output.get(m.inputs[1 - x_pos])
            if clip is None or clip[1].op != "Clip" or not inner_ok(m.inputs[1 - x_pos]):
                continue
            c = clip[1]
            if c.opset < 11 or len(c.inputs) != 3 or not (_constant_is(c, 1, 0.0) and _constant_is(c, 2, 6.0)):
                continue
            add = by_output.get(c.inputs[0])
            if add is None or add[1].op != "Add" or not inner_ok(c.inputs[0]):
                continue
            a = add[1]
            x = m.inputs[x_pos]
            if not any(a.inputs[k] == x and _constant_is(a, 1 - k, 3.0) for k in (0, 1)):
                continue
            node = gs.Node("HardSwish", name=f"{div.node.name or div.outputs[0]} (fused HardSwish)",
                           inputs=[_tensor_named(m.node, x)],
                           outputs=[div.node.outputs[0]])
            replace[i] = _Op(node, OPS["HardSwish"], opset)
            drop.update({mul[0], clip[0], add[0]})
            away.update({div.inputs[0], m.inputs[1 - x_pos], c.inputs[0]})
            break
    fused = [replace.get(i, op) for i, op in enumerate(plan) if i not in drop]
    return fused, away


def _fuse_qdq(plan: list[_Op], outputs: list[str], opset: int) -> tuple[list[_Op], set[str]]:
    """The plan with every QuantizeLinear -> DequantizeLinear pair of the same scale and zero point (the fake
    quantization of a QDQ graph's activations, and of its weights after graphopt.qat.fake_quant) run as one
    FakeQuant op (_FakeQuant): the same values, and one bool per element kept for the backward pass where the pair
    kept a float x / scale and computed five float temporaries. Only pairs whose quantized tensor nothing else
    reads. Returns (plan, fused-away tensor names: the QuantizeLinear outputs)."""
    readers, by_output = _plan_index(plan)
    drop, replace, away = set(), {}, set()
    for i, dq in enumerate(plan):
        if dq.op != "DequantizeLinear" or not dq.inputs or dq.inputs[0] is None:
            continue
        q = by_output.get(dq.inputs[0])
        if q is None or q[1].op != "QuantizeLinear" or readers.get(dq.inputs[0]) != 1 or dq.inputs[0] in outputs:
            continue
        qop = q[1]
        same = (qop.inputs + [None])[1:3] == (dq.inputs + [None])[1:3] and \
            all(qop.attrs.get(k, d) == dq.attrs.get(k, d) for k, d in (("axis", 1), ("block_size", 0)))
        if not same:
            continue
        node = gs.Node("FakeQuant", name=f"{dq.node.name or dq.outputs[0]} (fused QuantizeLinear)",
                       attrs=dict(qop.node.attrs), inputs=list(qop.node.inputs), outputs=[dq.node.outputs[0]])
        replace[i] = _Op(node, _fake_quant, opset)
        drop.add(q[0])
        away.add(dq.inputs[0])
    return [replace.get(i, op) for i, op in enumerate(plan) if i not in drop], away


def _fuse(plan: list[_Op], outputs: list[str], opset: int) -> tuple[list[_Op], set[str]]:
    """The plan the view runs (HardSwish chains and QDQ pairs fused) and the tensors it no longer computes."""
    plan, away = _fuse_hardswish(plan, outputs, opset)
    plan, away_qdq = _fuse_qdq(plan, outputs, opset)
    return plan, away | away_qdq


def fused_away_tensors(graph: gs.Graph) -> set[str]:
    """Names of the tensors the trainable view never computes: the inner tensors of the spelled-out HardSwish chains
    and the quantized tensors of the QDQ pairs it runs as one op (_fuse). graphopt.memory_estimate leaves them out."""
    opset = _default_opset(graph)
    plan = [_Op(n, OPS[n.op], opset) for n in graph.nodes if n.op in OPS and (n.domain or "") in ("", "ai.onnx")]
    return _fuse(plan, [t.name for t in graph.outputs], opset)[1]


def _tensor_named(node: gs.Node, name: str):
    return next(t for t in node.inputs if t is not None and t.name == name)


class TrainableGraph(nn.Module):
    """A torch.nn.Module that runs an onnx-graphsurgeon Graph op by op (see the module docstring).

    graph: the graph (copied; the caller's graph is never changed).
    trainable: names of initializers to make parameters (default: every weight-like float initializer, see
        `parameter_names`); pass an empty list to freeze everything.
    tie_identical: initializers with byte-identical values (non-constant tensors only) share one parameter, so
        weights duplicated by unrolling (decompose-rnn copies an RNN's weight into every time step) stay shared
        while training and are written back identically.
    """

    def __init__(self, graph: gs.Graph, trainable: Iterable[str] | None = None, tie_identical: bool = True):
        super().__init__()
        # the view's float precision, followed by .double() / .float() / .to() even when the graph has no float
        # parameters or buffers (float inputs are cast to it); not part of the state_dict
        self.register_buffer("_precision", torch.zeros(0), persistent=False)
        self._graph = copy_graph(graph)
        g = self._graph
        self.opset = _default_opset(g)
        self.input_names = [t.name for t in g.inputs]
        self.output_names = [t.name for t in g.outputs]
        self.input_dtypes = [t.dtype for t in g.inputs]
        self.batch0 = self._exported_batch(g)
        weights = parameter_names(g)
        if trainable is not None:
            wanted = set(trainable)
            known = {n for n, t in g.tensors().items() if isinstance(t, gs.Constant)}
            missing = sorted(wanted - known)
            if missing:
                raise BadInput(f"trainable names '{missing[0]}', which is not an initializer of the graph")
            weights = [n for n in weights if n in wanted] + sorted(wanted - set(weights))
        weight_set = set(weights)
        self._slots: list[tuple[str, str, bool]] = []      # (onnx name, attribute name, is parameter)
        self.param_keys: dict[str, str] = {}                # onnx initializer name -> parameter attribute name
        self._params = nn.ParameterDict()
        by_value: dict[tuple, str] = {}
        consts = {}
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and t.name not in consts:
                    consts[t.name] = t
        for t in g.outputs:
            if isinstance(t, gs.Constant) and t.name not in consts:
                consts[t.name] = t
        for i, (name, t) in enumerate(consts.items()):
            values = np.asarray(t.values)
            if name in weight_set and _is_float(values):
                key = None
                if tie_identical and values.size > 1 and np.ptp(values.reshape(-1)) > 0:
                    sig = (values.dtype.str, values.shape, values.tobytes())
                    key = by_value.get(sig)
                    if key is None:
                        by_value[sig] = key = f"p{len(self._params)}"
                if key is None:
                    key = f"p{len(self._params)}"
                if key not in self._params:
                    self._params[key] = nn.Parameter(_to_tensor(values))
                self.param_keys[name] = key
                self._slots.append((name, key, True))
            else:
                key = f"c{i}"
                self.register_buffer(key, _to_tensor(values))
                self._slots.append((name, key, False))
        self._plan: list[_Op] = []
        bad = []
        for node in g.nodes:
            if (node.domain or "") not in ("", "ai.onnx"):
                bad.append((node, f"operator domain '{node.domain}' is not supported"))
                continue
            fn = OPS.get(node.op)
            if fn is None:
                hint = " (run the decompose-rnn pass first)" if node.op in ("LSTM", "GRU", "RNN") else ""
                bad.append((node, f"this operator is not supported{hint}"))
                continue
            self._plan.append(_Op(node, fn, self.opset))
        if bad:
            node, why = bad[0]
            more = f" ({len(bad) - 1} more unsupported node(s): " + ", ".join(
                sorted({n.op for n, _ in bad[1:]})) + ")" if len(bad) > 1 else ""
            raise UnsupportedModel(f"{node_label(node)}: {why} in the trainable view{more}; "
                                   f"supported ops: {', '.join(SUPPORTED_OPS)}")
        self._known = {n for n in g.tensors()}
        self._image_convs = any(op.op == "Conv" and len(op.node.inputs) > 1 and op.node.inputs[1].shape is not None
                                and len(op.node.inputs[1].shape) == 4 for op in self._plan)
        # the node-by-node plan, and the one that runs: with HardSwish chains and QDQ pairs fused (see _fuse),
        # used unless a caller asks for a tensor the fusion removed as a feature
        self._plans = {False: (self._plan, _dead_after(self._plan, self.output_names))}
        fused, self._fused_away = _fuse(self._plan, self.output_names, self.opset)
        self._plans[True] = (fused, _dead_after(fused, self.output_names))

    # ---- introspection -----------------------------------------------------------------------------------------

    @staticmethod
    def _exported_batch(g: gs.Graph) -> int | None:
        batches = set()
        for t in g.inputs:
            shape = t.shape
            if not shape:
                return None
            d = shape[0]
            if not isinstance(d, (int, np.integer)) or d <= 0:
                return None
            batches.add(int(d))
        return batches.pop() if len(batches) == 1 else None

    def graph_parameters(self) -> dict[str, nn.Parameter]:
        """{initializer name: parameter} (tied initializers map to the same parameter)."""
        return {name: self._params[key] for name, key in self.param_keys.items()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def graph(self) -> gs.Graph:
        """The graph as loaded (weights as they were at construction; use to_graph() for the trained ones)."""
        return self._graph

    # ---- running -----------------------------------------------------------------------------------------------

    def _as_inputs(self, inputs) -> list[torch.Tensor]:
        if len(inputs) == 1 and isinstance(inputs[0], dict):
            d = inputs[0]
            missing = [n for n in self.input_names if n not in d]
            if missing:
                raise BadInput(f"missing graph input '{missing[0]}'; inputs are: {', '.join(self.input_names)}")
            inputs = [d[n] for n in self.input_names]
        if len(inputs) != len(self.input_names):
            raise BadInput(f"the graph takes {len(self.input_names)} input(s) ({', '.join(self.input_names)}), "
                           f"got {len(inputs)}")
        ref = next(iter(self._params.values()), None)
        if ref is None:
            ref = self._precision
        device = ref.device if ref is not None else None
        float_dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
        out = []
        for x, declared in zip(inputs, self.input_dtypes):
            if not torch.is_tensor(x):
                x = torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
            if x.is_floating_point():
                # float64 arrays fed to a float32 graph (or the reverse after .double()) run in the graph's precision
                want = float_dtype or _declared_torch_dtype(declared)
                if want is not None and x.dtype != want:
                    x = x.to(want)
            else:
                want = _declared_torch_dtype(declared)
                if want is not None and not want.is_floating_point and x.dtype != want:
                    x = x.to(want)
            if device is not None and x.device != device:
                x = x.to(device)
            out.append(x)
        return out

    def _execute(self, inputs: list[torch.Tensor], want: list[str]) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = {}
        for name, key, is_param in self._slots:
            env[name] = self._params[key] if is_param else self._buffers[key]
        for name, x in zip(self.input_names, inputs):
            env[name] = x
        keep = set(want)
        plan, dead_after = self._plans[not (keep & self._fused_away)]
        for op, dead in zip(plan, dead_after):
            xs = [env[n] if n is not None else None for n in op.inputs]
            while xs and xs[-1] is None:
                xs.pop()
            try:
                outs = op.fn(op, xs)
            except UnsupportedModel:
                raise
            except Exception as e:
                reraise_if_strict(e)
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UnsupportedModel(f"{op.label}: the trainable view failed to run it ({msg})") from e
            for name, y in zip(op.outputs, outs):
                if name is not None:
                    env[name] = y
            for n in dead:
                if n not in keep:
                    env.pop(n, None)
        return [env[n] for n in want]

    def forward(self, *inputs, features: Iterable[str] | None = None):
        """Run the graph. Inputs by position (tensors or arrays) or one {name: value} dict; axis 0 is the batch.
        Returns the output (a tuple when the graph has several). With features=[tensor names], returns
        (outputs, {name: tensor}) where each feature has the batch first (see the module docstring)."""
        xs = self._as_inputs(inputs)
        if self._image_convs:
            # channels-last images: oneDNN's convolutions run 1.5-7x faster on them (a 5x5 depthwise forward 7x;
            # PP-OCRv4's training step 2.25 -> 1.66 s), and the layout propagates through the graph, vmap included
            xs = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and x.is_floating_point() else x
                  for x in xs]
        feats = list(features or [])
        for f in feats:
            if f not in self._known:
                raise BadInput(f"feature '{f}' is not a tensor of the graph")
        want = self.output_names + feats
        n_out = len(self.output_names)
        batch = int(xs[0].shape[0]) if xs and xs[0].dim() else None
        b0 = self.batch0
        if b0 is None or batch == b0 or batch is None:
            res = self._execute(xs, want)
            outs = res[:n_out]
            fres = [self._batch_first_direct(t) for t in res[n_out:]]
        else:
            groups = -(-batch // b0)
            padded = groups * b0
            grouped = []
            for x in xs:
                if x.shape[0] != batch:
                    raise BadInput(f"all inputs must have the same batch size (axis 0): got {batch} and {x.shape[0]}")
                if padded != batch:
                    x = torch.cat([x, x.new_zeros((padded - batch,) + tuple(x.shape[1:]))], 0)
                grouped.append(x.reshape((groups, b0) + tuple(x.shape[1:])))
            res = torch.vmap(lambda *a: tuple(self._execute(list(a), want)))(*grouped)
            res = [self._ungroup(t, batch, groups) for t in res]
            outs, fres = res[:n_out], res[n_out:]
        outs = outs[0] if n_out == 1 else tuple(outs)
        if features is None:
            return outs
        return outs, dict(zip(feats, fres))

    def _batch_first_direct(self, t: torch.Tensor) -> torch.Tensor:
        b0 = self.batch0
        if b0 is None or (t.dim() >= 1 and t.shape[0] == b0):
            return t
        return t.unsqueeze(0)

    def _ungroup(self, t: torch.Tensor, batch: int, groups: int) -> torch.Tensor:
        b0 = self.batch0
        if t.dim() >= 2 and t.shape[1] == b0:
            return t.reshape((groups * b0,) + tuple(t.shape[2:]))[:batch]
        return t

    # ---- writing back ------------------------------------------------------------------------------------------

    def state_arrays(self) -> dict[str, np.ndarray]:
        """{initializer name: current value as numpy, in the initializer's own dtype}."""
        consts = {n: t for n, t in self._graph.tensors().items() if isinstance(t, gs.Constant)}
        out = {}
        for name, key in self.param_keys.items():
            v = self._params[key].detach().cpu().numpy()
            out[name] = v.astype(np.asarray(consts[name].values).dtype, copy=True)
        return out

    def write_back(self, graph: gs.Graph) -> gs.Graph:
        """Write the current parameter values into the same-named initializers of `graph` (in place; also
        returned). Shapes must match; initializers the graph lacks are an error."""
        consts = {n: t for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
        for name, value in self.state_arrays().items():
            t = consts.get(name)
            if t is None:
                raise BadInput(f"write_back: the graph has no initializer '{name}'")
            if tuple(np.asarray(t.values).shape) != value.shape:
                raise BadInput(f"write_back: initializer '{name}' has shape {tuple(t.values.shape)}, "
                               f"the trained value {value.shape}")
            t.values = value
        return graph

    def to_graph(self) -> gs.Graph:
        """A copy of the graph with the trained weights."""
        return self.write_back(copy_graph(self._graph))

    def reinitialize(self, seed: int = 0) -> "TrainableGraph":
        """Re-draw every parameter (He-uniform for conv/linear weights, zeros for biases and shifts, ones for
        norm scales, small normal for other tensors), seeded. For training a student from scratch."""
        gen = torch.Generator().manual_seed(seed)
        roles = {}
        for node in self._graph.nodes:
            for i, t in enumerate(node.inputs):
                if isinstance(t, gs.Constant) and t.name in self.param_keys:
                    roles.setdefault(self.param_keys[t.name], (node.op, i, node.attrs))
        with torch.no_grad():
            for key, p in self._params.items():
                op, i, attrs = roles.get(key, ("", -1, {}))
                family, neutral = traits(op).family, traits(op).neutral
                if family in ("conv", "linear") and p.dim() >= 2:
                    if op == "Conv":
                        fan_in = p[0].numel()
                    elif op == "ConvTranspose":
                        fan_in = p[0].numel()
                    elif op == "Gemm":
                        fan_in = p.shape[1] if int(attrs.get("transB", 0)) else p.shape[0]
                    else:
                        fan_in = p.shape[-2]
                    bound = math.sqrt(6.0 / max(1, fan_in))
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
                elif family == "norm" and i == 1:
                    p.fill_(1.0)
                elif op == "PRelu":
                    p.fill_(0.25)
                elif neutral is not None:          # Add / Sub: 0, Mul / Div: 1
                    p.fill_(neutral)
                elif family in ("conv", "linear", "norm"):
                    p.zero_()
                else:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        return self
