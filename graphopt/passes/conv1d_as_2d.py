"""conv1d-as-2d: a 1-D convolution, written either as a 1-D Conv ([N, C, L] input) or as a 2-D Conv down a
column (input [N, C, H, 1], kernel [kH, 1]: jax2tf and keras exports), becomes a 2-D Conv along a row of height 1:
Reshape -> Conv with a 1 x K kernel -> Reshape.

The cpu target's convolution schedules (targets/cpu_conv.py) vectorize along the output width; TVM's conv1d is
left unscheduled (an audio front end's 512-tap conv: 11 ms against onnxruntime's 0.3 ms) and a column conv has a
width of 1 to vectorize over (magika's 5-tap conv over 512 positions: 8x slower than onnxruntime). Along a row both
take the scheduled path. The rewrite is exact: the same products summed in the same order; moving an axis of
length 1 is a free reshape. Only convs with static shapes and constant weights are rewritten: float, or in a QDQ
graph an integer constant read through a per-output-channel DequantizeLinear, whose reshaped copy gets the same
DequantizeLinear; there a dequantized activation is reshaped on its integers, so the int8 lowering still sees
DequantizeLinear -> Conv and runs the conv as an integer kernel (silero-vad's quantized STFT and encoder convs
ran as TVM's unscheduled fp32 conv1d: 5.4 of 6.4 ms).

A 1-D conv over one input channel with a long kernel (an STFT or filterbank front end) is a GEMM of overlapping
frames instead: Reshape -> Gather of the frames -> MatMul with the transposed weight [-> + bias] -> Transpose, the
Reshape and Gather on the integers of a quantized activation (FRAMES_MIN_TAPS)."""
import numpy as np
import onnx_graphsurgeon as gs

from graphopt.passmanager import Pass, PassResult, register
from graphopt.graph import Names


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)


def _dequantized(t):
    """(DequantizeLinear node, its integer constant) when t is a DequantizeLinear of a constant (a QDQ graph's
    weight), else None."""
    if len(t.inputs) != 1 or t.inputs[0].op != "DequantizeLinear":
        return None
    dq = t.inputs[0]
    q = dq.inputs[0] if dq.inputs else None
    return (dq, q) if isinstance(q, gs.Constant) and q.values.dtype.kind in "iu" else None


def _per_tensor(dq: gs.Node) -> bool:
    """The DequantizeLinear has one scale (its axis attribute, if any, means nothing)."""
    return isinstance(dq.inputs[1], gs.Constant) and dq.inputs[1].values.size == 1


def _weight_values(w):
    """The weight's array: a float constant, or the integer constant of a quantized weight; else None."""
    if isinstance(w, gs.Constant):
        return w.values if w.values.dtype.kind == "f" else None
    dq = _dequantized(w)
    if dq is None:
        return None
    q = dq[1].values
    return q if _per_tensor(dq[0]) or int(dq[0].attrs.get("axis", 1)) % q.ndim == 0 else None


#: a 1-D conv over one input channel with at least this many taps (an STFT or filterbank front end: 256-512) is a
#: GEMM of overlapping frames: written as Gather + MatMul (oww-melspectrogram's two 512-tap, stride-160 convs to 257
#: channels: 1.73 -> 0.59 ms as row convs -> frames, 1 thread, AMD EPYC; onnxruntime 0.55)
FRAMES_MIN_TAPS = 64


def _kind(node: gs.Node) -> str | None:
    """'frames' for a Conv over [N, 1, L] with at least FRAMES_MIN_TAPS taps and no padding or dilation, '1d' for
    another Conv over [N, C, L], 'column' for a 2-D Conv over [N, C, H, 1] (H > 1) with a [kH, 1] kernel that
    does not pad or stride the width; else None. The weight is a float constant, or (a QDQ graph) a
    DequantizeLinear of an integer constant, per output channel. An input of height 1 is a row already: this
    pass's own output is never rewritten again."""
    if node.op != "Conv" or len(node.inputs) < 2 or len(node.outputs) != 1:
        return None
    x, y = node.inputs[0], node.outputs[0]
    wv = _weight_values(node.inputs[1])
    if wv is None or not (_static(x.shape) and _static(y.shape)):
        return None
    if len(x.shape) == 3 and wv.ndim == 3:
        if (wv.shape[1] == 1 and wv.shape[2] >= FRAMES_MIN_TAPS and int(node.attrs.get("group", 1)) == 1
                and all(int(p) == 0 for p in node.attrs.get("pads", [0, 0]))
                and all(int(d) == 1 for d in node.attrs.get("dilations", [1]))
                and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")):
            return "frames"
        return "1d"
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    if (len(x.shape) == 4 and wv.ndim == 4 and x.shape[2] > 1 and x.shape[3] == 1 and wv.shape[3] == 1
            and y.shape[3] == 1 and pads[1] == 0 and pads[3] == 0
            and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")):
        return "column"
    return None


def _reweighted(graph: gs.Graph, w, values: np.ndarray, suffix: str, names: Names, axis: int = 0):
    """The weight w laid out as `values` (its array, reshaped / transposed by the caller): a float constant, or for
    a quantized weight the integers under a DequantizeLinear with the same scale and zero point, per channel along
    `axis` of the new layout."""
    values = np.ascontiguousarray(values)
    if isinstance(w, gs.Constant):
        return gs.Constant(names(f"{w.name}_{suffix}"), values)
    dq, q = _dequantized(w)
    attrs = dict(dq.attrs) if _per_tensor(dq) else dict(dq.attrs, axis=axis)
    out = gs.Variable(names(f"{w.name}_{suffix}"), dtype=w.dtype, shape=list(values.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", name=names(f"{dq.name}_{suffix}"), attrs=attrs,
                               inputs=[gs.Constant(names(f"{q.name}_{suffix}"), values)] + list(dq.inputs[1:]),
                               outputs=[out]))
    return out


def _reshape(graph: gs.Graph, x, shape, name: str, names: Names, out=None):
    out = out or gs.Variable(names(name), dtype=x.dtype, shape=list(shape))
    shape_const = gs.Constant(names(f"{name}_shape"), np.array(shape, np.int64))
    graph.nodes.append(gs.Node("Reshape", name=names(f"{name}_reshape"), inputs=[x, shape_const], outputs=[out]))
    return out


def _on_integers(graph: gs.Graph, x, op: str, shape, name: str, names: Names, extra_inputs=(), attrs=None,
                 keeps_channel_axis: bool = False):
    """op(x, *extra_inputs) of output shape `shape` for a data-movement op (a Reshape: to `shape`; a Gather); when x
    is a dequantized activation, on its integers and dequantized again: an op between a DequantizeLinear and the
    Conv / MatMul would hide it from the int8 lowering. A per-channel DequantizeLinear (axis 1) qualifies only when
    the op keeps_channel_axis."""
    if op == "Reshape":
        extra_inputs = [gs.Constant(names(f"{name}_shape"), np.array(shape, np.int64))]
    dq = x.inputs[0] if len(x.inputs) == 1 and x.inputs[0].op == "DequantizeLinear" else None
    movable = dq is not None and not isinstance(dq.inputs[0], gs.Constant) and (
        _per_tensor(dq) or keeps_channel_axis and int(dq.attrs.get("axis", 1)) % len(x.shape) == 1)
    src = dq.inputs[0] if movable else x
    out = gs.Variable(names(name), dtype=src.dtype, shape=list(shape))
    graph.nodes.append(gs.Node(op, name=names(f"{name}_{op.lower()}"), attrs=attrs or {},
                               inputs=[src, *extra_inputs], outputs=[out]))
    if src is x:
        return out
    deq = gs.Variable(names(f"{name}_dequantized"), dtype=x.dtype, shape=list(shape))
    graph.nodes.append(gs.Node("DequantizeLinear", name=names(f"{dq.name}_{name}"), attrs=dict(dq.attrs),
                               inputs=[out] + list(dq.inputs[1:]), outputs=[deq]))
    return deq


def _as_frames(graph: gs.Graph, node: gs.Node, weights: dict, names: Names) -> None:
    """Conv [N, 1, L] (K taps, stride s, no padding) -> y [N, O, OL] as Reshape [N, L] -> Gather of the OL frames
    (indices o*s + k) -> [N, OL, K] -> MatMul W^T [K, O] [-> + bias] -> Transpose -> y: the same products."""
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    name = node.name or "conv1d_frames"
    n, length = x.shape[0], x.shape[2]
    o, ol = y.shape[1], y.shape[2]
    k = _weight_values(w).shape[2]
    s = int(list(node.attrs.get("strides", [1]))[0])
    flat = _on_integers(graph, x, "Reshape", [n, length], f"{name}_flat", names)
    index = gs.Constant(names(f"{name}_frame_index"),
                        (np.arange(ol)[:, None] * s + np.arange(k)[None, :]).astype(np.int64))
    frames = _on_integers(graph, flat, "Gather", [n, ol, k], f"{name}_frames", names, [index], {"axis": 1})
    wt = weights.get(("frames", w.name))
    if wt is None:              # [O, 1, K] as the MatMul's [K, O]: the output channels move to axis 1
        v = _weight_values(w)
        wt = weights[("frames", w.name)] = _reweighted(graph, w, v.reshape(v.shape[0], k).T, "frames", names, 1)
    cur = gs.Variable(names(f"{name}_frames_out"), dtype=y.dtype, shape=[n, ol, o])
    graph.nodes.append(gs.Node("MatMul", name=names(f"{name}_frames_matmul"), inputs=[frames, wt], outputs=[cur]))
    if len(node.inputs) > 2:
        biased = gs.Variable(names(f"{name}_frames_biased"), dtype=y.dtype, shape=[n, ol, o])
        graph.nodes.append(gs.Node("Add", name=names(f"{name}_frames_bias"), inputs=[cur, node.inputs[2]],
                                   outputs=[biased]))
        cur = biased
    graph.nodes.append(gs.Node("Transpose", name=names(f"{name}_frames_transpose"), attrs={"perm": [0, 2, 1]},
                               inputs=[cur], outputs=[y]))
    node.inputs.clear()
    node.outputs.clear()


@register
class Conv1dAs2d(Pass):
    name = "conv1d-as-2d"
    help = ("Rewrite 1-D convolutions (1-D Convs, and 2-D Convs down a width-1 column) as 2-D Convs along a row, "
            "which the cpu target schedules; long single-channel ones (STFT front ends) as frames and a MatMul")

    def run(self, graph, ctx):
        count, frames, weights = 0, 0, {}       # one row weight per original weight (convs may share one)
        names = Names(graph)                    # new names never clash with the graph's (it may be our own output)
        for node in list(graph.nodes):
            kind = _kind(node)
            if kind is None:
                continue
            if kind == "frames":
                _as_frames(graph, node, weights, names)
                count += 1
                frames += 1
                continue
            x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
            name = node.name or f"conv1d_{count}"
            n, c, length = x.shape[0], x.shape[1], x.shape[2]
            out_len = y.shape[2]
            x2 = _on_integers(graph, x, "Reshape", [n, c, 1, length], f"{name}_row_in", names,
                              keeps_channel_axis=True)
            w2 = weights.get(w.name)
            if w2 is None:              # [O, I, K] or [O, I, K, 1] as [O, I, 1, K]
                v = _weight_values(w)
                w2 = weights[w.name] = _reweighted(graph, w, v.reshape(v.shape[0], v.shape[1], 1, v.shape[2]),
                                                   "row", names)
            attrs = dict(node.attrs)
            for key in ("kernel_shape", "strides", "dilations"):
                if key in attrs:
                    attrs[key] = [1, int(attrs[key][0])]
            if "pads" in attrs:
                pads = list(attrs["pads"])
                begin, end = (pads[0], pads[1]) if kind == "1d" else (pads[0], pads[2])
                attrs["pads"] = [0, begin, 0, end]
            y2 = gs.Variable(names(f"{y.name}_row"), dtype=y.dtype, shape=[n, y.shape[1], 1, out_len])
            node.attrs = attrs
            node.inputs = [x2, w2] + list(node.inputs[2:])
            node.outputs = [y2]
            _reshape(graph, y2, list(y.shape), f"{name}_row_out", names, out=y)
            count += 1
        if count:       # a quantized conv's old DequantizeLinear nodes may be left without readers
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, count > 0, {"rewritten": count, "as_frames": frames})
