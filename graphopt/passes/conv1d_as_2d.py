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
ran as TVM's unscheduled fp32 conv1d: 5.4 of 6.4 ms)."""
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


def _weight_values(w):
    """The weight's array: a float constant, or the integer constant of a quantized weight; else None."""
    if isinstance(w, gs.Constant):
        return w.values if w.values.dtype.kind == "f" else None
    dq = _dequantized(w)
    if dq is None:
        return None
    q, scale = dq[1].values, dq[0].inputs[1]
    per_tensor = isinstance(scale, gs.Constant) and scale.values.size == 1
    return q if per_tensor or int(dq[0].attrs.get("axis", 1)) % q.ndim == 0 else None


def _kind(node: gs.Node) -> str | None:
    """'1d' for a Conv over [N, C, L], 'column' for a 2-D Conv over [N, C, H, 1] (H > 1) with a [kH, 1] kernel that
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
        return "1d"
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    if (len(x.shape) == 4 and wv.ndim == 4 and x.shape[2] > 1 and x.shape[3] == 1 and wv.shape[3] == 1
            and y.shape[3] == 1 and pads[1] == 0 and pads[3] == 0
            and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")):
        return "column"
    return None


def _row_weight(graph: gs.Graph, w, names: Names):
    """The weight [O, I, K] or [O, I, K, 1] as [O, I, 1, K]: a float constant, or for a quantized weight its integer
    constant reshaped and read through a DequantizeLinear with the same scale, zero point and axis."""
    v = _weight_values(w)
    k = v.shape[2]
    row = np.ascontiguousarray(v.reshape(v.shape[0], v.shape[1], 1, k))
    if isinstance(w, gs.Constant):
        return gs.Constant(names(f"{w.name}_row"), row)
    dq, q = _dequantized(w)
    out = gs.Variable(names(f"{w.name}_row"), dtype=w.dtype, shape=list(row.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", name=names(f"{dq.name}_row"), attrs=dict(dq.attrs),
                               inputs=[gs.Constant(names(f"{q.name}_row"), row)] + list(dq.inputs[1:]),
                               outputs=[out]))
    return out


def _row_input(graph: gs.Graph, x, shape, name: str, names: Names):
    """x reshaped to the row shape; a dequantized activation is reshaped on its integers (a Reshape between a
    DequantizeLinear and the Conv would hide the quantized conv from the int8 lowering) and dequantized again."""
    dq = x.inputs[0] if len(x.inputs) == 1 and x.inputs[0].op == "DequantizeLinear" else None
    if dq is None or isinstance(dq.inputs[0], gs.Constant) or \
            int(dq.attrs.get("axis", 1)) % len(x.shape) != 1:      # per channel: the channel axis stays axis 1
        return _reshape(graph, x, shape, name, names)
    qx = _reshape(graph, dq.inputs[0], shape, name, names)
    out = gs.Variable(names(f"{name}_dequantized"), dtype=x.dtype, shape=list(shape))
    graph.nodes.append(gs.Node("DequantizeLinear", name=names(f"{dq.name}_row"), attrs=dict(dq.attrs),
                               inputs=[qx] + list(dq.inputs[1:]), outputs=[out]))
    return out


def _reshape(graph: gs.Graph, x, shape, name: str, names: Names, out=None):
    out = out or gs.Variable(names(name), dtype=x.dtype, shape=list(shape))
    shape_const = gs.Constant(names(f"{name}_shape"), np.array(shape, np.int64))
    graph.nodes.append(gs.Node("Reshape", name=names(f"{name}_reshape"), inputs=[x, shape_const], outputs=[out]))
    return out


@register
class Conv1dAs2d(Pass):
    name = "conv1d-as-2d"
    help = ("Rewrite 1-D convolutions (1-D Convs, and 2-D Convs down a width-1 column) as 2-D Convs along a row, "
            "which the cpu target schedules")

    def run(self, graph, ctx):
        count, weights = 0, {}                  # one row weight per original weight (convs may share one)
        names = Names(graph)                    # new names never clash with the graph's (it may be our own output)
        for node in list(graph.nodes):
            kind = _kind(node)
            if kind is None:
                continue
            x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
            name = node.name or f"conv1d_{count}"
            n, c, length = x.shape[0], x.shape[1], x.shape[2]
            out_len = y.shape[2]
            x2 = _row_input(graph, x, [n, c, 1, length], f"{name}_row_in", names)
            w2 = weights.get(w.name)
            if w2 is None:
                w2 = weights[w.name] = _row_weight(graph, w, names)
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
        return PassResult(graph, count > 0, {"rewritten": count})
