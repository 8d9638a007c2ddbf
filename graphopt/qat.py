"""Quantization-aware training (QAT) on a QDQ graph: the trainable form and the export back to QDQ.

`quantize{scheme=int8,qat=true}` in `graphopt compress` / `graphopt build` runs the post-training quantize pass
first (onnxruntime's calibrators: the scales and zero points), then:

* `fake_quant(qdq)`: every DequantizeLinear of a constant int8 / uint8 tensor (the weights) gets a float
  initializer holding its dequantized value (named NAME + FLOAT_SUFFIX) read through QuantizeLinear with that
  DequantizeLinear's own scale and zero point: float weight -> QuantizeLinear -> DequantizeLinear -> op. The
  trainable view (graphopt.trainable) rounds in QuantizeLinear with straight-through gradients, so the float
  weights train while the forward pass computes what the int8 graph computes (the activation QuantizeLinear /
  DequantizeLinear pairs stay as they are). An int32 bias (scale = input scale x weight scale, a step far below
  anything that matters, and QuantizeLinear to int32 is not ONNX before opset 21) becomes its dequantized float
  value feeding the op directly; its DequantizeLinear is recorded in the graph metadata (graphopt.metadata
  qat_biases). A bias already beyond +-BIAS_LIMIT (onnxruntime saturates the bias of a channel whose weight scale
  is near 0 at the int32 edge) stays integer: its step is far too fine to train. Before training, the
  fake-quantized graph computes the QDQ graph's outputs (exactly, in the tests).
* `export_qdq(fake)`: each such QuantizeLinear is evaluated on its trained float weight (onnxruntime's rounding:
  x / scale in float32, half to even, saturated) and its integers become the initializer under the original name;
  the QuantizeLinear and the float weight go; each recorded bias is quantized to int32 with its kept scale
  (saturated at +-BIAS_LIMIT) and read through its DequantizeLinear again. The result has the QDQ graph's structure
  node for node, name for name (only integer weight and bias values differ), which is what lower-int8 and the cpu
  target's int8 lowering (targets/int8/) consume: int8 constants + DequantizeLinear for weights, int32 +
  DequantizeLinear for biases.

Scales: the weight scales and every zero point stay those of the PTQ calibration. The activation scales are kept
too (`quantize{qat_scales=kept}`, the default), or learned (`qat_scales=learned`): `activation_scales(fake)` names
the float per-tensor scale initializers of the QuantizeLinear nodes on activations, and compress trains them as
parameters beside the weights (graphopt.distill, DistillConfig.scale_params: each in its own Adam group at a step
relative to its initial value). The trainable view's QuantizeLinear / DequantizeLinear then give the learned step
size quantization (LSQ) gradient: round(x / s) - x / s inside the range, the range's edge where x is clipped. A
scale initializer that onnxruntime's quantizer shares between the tensors on both sides of MaxPool / Reshape /
Transpose is one parameter, so those scales stay equal and lower-int8 still runs those ops on the integers. Since
an int32 bias's scale is input scale x weight scale, export_qdq recomputes it from the trained input scale (the bias
record names both scales and their values when fake_quant ran; unchanged scales keep the recorded bias scale, so an
untrained export is the PTQ graph bit for bit). With kept scales the weights (and biases) learn to live on the
fixed grid, and activations clipped by a calibrated range pass no gradient there (straight-through, zero where
saturated).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .errors import UnsupportedModel
from .graph import copy as copy_graph, toposort
from .metadata import qat_biases, set_qat_biases

#: suffix of the float initializer that stands for an integer constant while training
FLOAT_SUFFIX = "/qat_float"
_WEIGHT_TYPES = (np.dtype(np.int8), np.dtype(np.uint8))
_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255), np.dtype(np.int32): (-2 ** 31, 2 ** 31 - 1)}
#: trained int32 biases stay within +-BIAS_LIMIT: the int8 kernels add -zero point x weight column sum to the bias
#: in int32, which needs the other half of the range
BIAS_LIMIT = 2 ** 30


def _param(values: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """A per-tensor or per-axis scale / zero point shaped to broadcast against a tensor of `rank`."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[axis % rank] = -1
    return values.reshape(shape)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1) -> np.ndarray:
    """DequantizeLinear as onnxruntime computes it: (q - zero point) in int32, then times the scale in float32."""
    d = q.astype(np.int64)
    if zero_point is not None:
        d = d - _param(zero_point.astype(np.int64), axis, q.ndim)
    return np.asarray(d.astype(np.float32) * _param(scale.astype(np.float32), axis, q.ndim), np.float32)


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 1) -> np.ndarray:
    """QuantizeLinear as onnxruntime (and the trainable view) computes it: x / scale in float32, rounded half to
    even, plus the zero point, saturated to the zero point's type."""
    dtype = np.dtype(zero_point.dtype)
    lo, hi = _RANGES[dtype]
    z = _param(zero_point.astype(np.float64), axis, x.ndim)
    y = np.asarray(x, np.float32) / _param(scale.astype(np.float32), axis, x.ndim)
    return np.asarray(np.clip(np.rint(y.astype(np.float64)) + z, lo, hi), dtype)


def _integer_constant(t) -> bool:
    return isinstance(t, gs.Constant) and np.asarray(t.values).dtype in _WEIGHT_TYPES + (np.dtype(np.int32),)


def _as_record(t: gs.Constant) -> list:
    v = np.asarray(t.values)
    return [t.name, v.dtype.str, list(v.shape), v.reshape(-1).tolist()]


def _from_record(rec: list, tensors: dict) -> gs.Constant:
    """The constant a record names: the graph's own when it still has it, else rebuilt from the record."""
    name, dtype, shape, values = rec
    t = tensors.get(name)
    if isinstance(t, gs.Constant):
        return t
    return gs.Constant(name, np.asarray(values, dtype=np.dtype(dtype)).reshape(shape))


def _replace_input(node: gs.Node, old, new) -> None:
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def _scale_of(t) -> gs.Constant | None:
    """The constant scale of the DequantizeLinear that produces `t`, else None."""
    dq = t.inputs[0] if len(t.inputs) == 1 else None
    if dq is None or dq.op != "DequantizeLinear" or len(dq.inputs) < 2 or not isinstance(dq.inputs[1], gs.Constant):
        return None
    return dq.inputs[1]


def _operand_scales(bias_out) -> dict:
    """{"x_scale", "w_scale": [name, values]} of the op reading the bias `bias_out` as its third input (Conv / Gemm:
    the scales of the DequantizeLinear nodes producing its input and its weight), or {} when it is not that form."""
    readers = list(bias_out.outputs)
    if len(readers) != 1 or len(readers[0].inputs) < 3 or readers[0].inputs[2] is not bias_out:
        return {}
    sx, sw = _scale_of(readers[0].inputs[0]), _scale_of(readers[0].inputs[1])
    if sx is None or sw is None:
        return {}
    return {"x_scale": [sx.name, np.asarray(sx.values).reshape(-1).tolist()],
            "w_scale": [sw.name, np.asarray(sw.values).reshape(-1).tolist()]}


def activation_scales(g: gs.Graph) -> list[str]:
    """Names of the scales qat_scales=learned trains: the float per-tensor (one-value, positive) scale initializers
    of the QuantizeLinear nodes that quantize activations (not the weights' fake quantization), once each."""
    names = []
    for n in g.nodes:
        if n.op != "QuantizeLinear" or len(n.inputs) < 2 or isinstance(n.inputs[0], gs.Constant):
            continue
        s = n.inputs[1]
        if isinstance(s, gs.Constant) and np.asarray(s.values).dtype.kind == "f" and np.asarray(s.values).size == 1 \
                and float(np.asarray(s.values).reshape(-1)[0]) > 0 and s.name not in names:
            names.append(s.name)
    return names


def _bias_scale(rec: dict, tensors: dict) -> gs.Constant:
    """The bias scale to export with: the recorded one while the input and weight scales are the recorded values,
    else input scale x weight scale (float32, as onnxruntime's quantizer computes it) from the trained graph."""
    kept = _from_record(rec["scale"], tensors)
    if "x_scale" not in rec:
        return kept
    current, changed = [], False
    for key in ("x_scale", "w_scale"):
        name, values = rec[key]
        t = tensors.get(name)
        if not isinstance(t, gs.Constant):
            return kept
        v = np.asarray(t.values, np.float32).reshape(-1)
        changed |= not np.array_equal(v, np.asarray(values, np.float32))
        current.append(v)
    product = current[0] * current[1]
    shape = np.asarray(kept.values).shape
    if not changed or product.size != int(np.prod(shape)):
        return kept
    return gs.Constant(kept.name, product.astype(np.float32).reshape(shape))


def fake_quant(qdq: gs.Graph) -> tuple[gs.Graph, dict]:
    """(trainable copy of the QDQ graph, info): every DequantizeLinear of a constant integer tensor reads a float
    initializer through QuantizeLinear (see the module docstring). info: {"weights": names made trainable,
    "biases": names trained as floats, "kept": [(name, why)] integer constants left as they are}."""
    g = copy_graph(qdq)
    users: dict[str, int] = {}
    for n in g.nodes:
        for t in n.inputs:
            users[t.name] = users.get(t.name, 0) + 1
    done, biases, kept = [], {}, []
    outputs = {t.name for t in g.outputs}
    for dq in list(g.nodes):
        if dq.op != "DequantizeLinear" or not dq.inputs or not _integer_constant(dq.inputs[0]):
            continue
        c = dq.inputs[0]
        if users.get(c.name, 0) != 1:
            kept.append((c.name, "read by more than one node"))
            continue
        if int(dq.attrs.get("block_size", 0) or 0) or any(not isinstance(t, gs.Constant) for t in dq.inputs[1:]):
            kept.append((c.name, "blocked or non-constant scale"))
            continue
        q = np.asarray(c.values)
        scale = np.asarray(dq.inputs[1].values)
        zp = np.asarray(dq.inputs[2].values) if len(dq.inputs) > 2 and dq.inputs[2].name else None
        axis = int(dq.attrs.get("axis", 1))
        w = gs.Constant(c.name + FLOAT_SUFFIX, dequantize(q, scale, zp, axis))
        if q.dtype == np.int32:
            out = dq.outputs[0]
            if out.name in outputs:
                kept.append((c.name, "a graph output"))
                continue
            if np.abs(q.astype(np.int64)).max(initial=0) > BIAS_LIMIT:
                kept.append((c.name, "int32 bias beyond 2**30 (a weight scale near 0)"))
                continue
            zp_t = dq.inputs[2] if zp is not None else gs.Constant(c.name + "/qat_zero_point", np.zeros(scale.shape,
                                                                                                          np.int32))
            biases[w.name] = {"node": dq.name, "output": out.name, "int": c.name, "scale": _as_record(dq.inputs[1]),
                              "zero_point": _as_record(zp_t), "attrs": {k: int(v) for k, v in dq.attrs.items()},
                              **_operand_scales(out)}
            for n in list(out.outputs):
                _replace_input(n, out, w)
            dq.outputs.clear()
            continue
        if zp is None:
            zp_t = gs.Constant(c.name + "/qat_zero_point", np.zeros(scale.shape, q.dtype))
        else:
            zp_t = dq.inputs[2]
        fake = gs.Variable(c.name + "/qat_fake", dtype=q.dtype, shape=list(q.shape))
        attrs = {"axis": axis} if "axis" in dq.attrs else {}
        g.nodes.append(gs.Node("QuantizeLinear", dq.name + "/qat_quantize", attrs=attrs,
                               inputs=[w, dq.inputs[1], zp_t], outputs=[fake]))
        dq.inputs[0] = fake
        done.append(c.name)
    set_qat_biases(g, biases)
    toposort(g.cleanup(remove_unused_graph_inputs=False))
    return g, {"weights": done, "biases": sorted(biases), "kept": kept}


def export_qdq(fake: gs.Graph) -> gs.Graph:
    """The QDQ graph of a fake-quantized graph (trained or not): each QuantizeLinear of a float initializer named
    NAME + FLOAT_SUFFIX becomes the integer initializer NAME (its trained values quantized with the kept scale and
    zero point) read by the same DequantizeLinear nodes; the QuantizeLinear and the float initializer go."""
    g = copy_graph(fake)
    cons: dict[str, list] = {}
    for n in g.nodes:
        for t in n.inputs:
            cons.setdefault(t.name, []).append(n)
    for qn in [n for n in g.nodes if n.op == "QuantizeLinear"]:
        w = qn.inputs[0]
        if not isinstance(w, gs.Constant) or not w.name.endswith(FLOAT_SUFFIX):
            continue
        if len(qn.inputs) < 3 or not isinstance(qn.inputs[1], gs.Constant) or not isinstance(qn.inputs[2], gs.Constant):
            raise UnsupportedModel(f"QAT export: QuantizeLinear '{qn.name}' lacks a constant scale or zero point")
        out = qn.outputs[0]
        readers = cons.get(out.name, [])
        if not readers or any(r.op != "DequantizeLinear" for r in readers):
            raise UnsupportedModel(f"QAT export: the fake-quantized '{w.name}' is read by something other than "
                                   f"DequantizeLinear")
        ints = quantize(np.asarray(w.values), np.asarray(qn.inputs[1].values), np.asarray(qn.inputs[2].values),
                        int(qn.attrs.get("axis", 1)))
        c = gs.Constant(w.name[:-len(FLOAT_SUFFIX)], ints)
        for r in readers:
            r.inputs[0] = c
        qn.outputs.clear()
    tensors = g.tensors()
    for name, rec in qat_biases(g).items():
        w = tensors.get(name)
        if not isinstance(w, gs.Constant):
            raise UnsupportedModel(f"QAT export: the trained bias '{name}' is not in the graph")
        scale, zp = _bias_scale(rec, tensors), _from_record(rec["zero_point"], tensors)
        axis = int(rec["attrs"].get("axis", 1))
        ints = np.clip(quantize(np.asarray(w.values), np.asarray(scale.values), np.asarray(zp.values), axis),
                       -BIAS_LIMIT, BIAS_LIMIT)
        out = gs.Variable(rec["output"], dtype=np.float32, shape=list(ints.shape))
        for n in [n for n in g.nodes if any(t is w for t in n.inputs)]:
            _replace_input(n, w, out)
        g.nodes.append(gs.Node("DequantizeLinear", rec["node"], attrs=dict(rec["attrs"]),
                               inputs=[gs.Constant(rec["int"], ints), scale, zp], outputs=[out]))
    set_qat_biases(g, {})
    toposort(g.cleanup(remove_unused_graph_inputs=False))
    return g
