"""conv1d-as-2d: a 1-D convolution, written either as a 1-D Conv ([N, C, L] input) or as a 2-D Conv down a
column (input [N, C, H, 1], kernel [kH, 1]: jax2tf and keras exports), becomes a 2-D Conv along a row of height 1:
Reshape -> Conv with a 1 x K kernel -> Reshape.

The cpu target's convolution schedules (targets/cpu_conv.py) vectorize along the output width; TVM's conv1d is
left unscheduled (an audio front end's 512-tap conv: 11 ms against onnxruntime's 0.3 ms) and a column conv has a
width of 1 to vectorize over (magika's 5-tap conv over 512 positions: 8x slower than onnxruntime). Along a row both
take the scheduled path. The rewrite is exact: the same products summed in the same order; moving an axis of
length 1 is a free reshape. Only convs with constant float weights and static shapes are rewritten (a weight read
through DequantizeLinear is lower-int8's)."""
import numpy as np
import onnx_graphsurgeon as gs

from graphopt.passmanager import Pass, PassResult, register
from graphopt.graph import Names


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)


def _kind(node: gs.Node) -> str | None:
    """'1d' for a Conv over [N, C, L], 'column' for a 2-D Conv over [N, C, H, 1] (H > 1) with a [kH, 1] kernel that
    does not pad or stride the width; else None. An input of height 1 is a row already: this pass's own output is
    never rewritten again."""
    if node.op != "Conv" or len(node.inputs) < 2 or len(node.outputs) != 1:
        return None
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    if not (isinstance(w, gs.Constant) and w.values.dtype.kind == "f" and _static(x.shape) and _static(y.shape)):
        return None
    if len(x.shape) == 3 and w.values.ndim == 3:
        return "1d"
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    if (len(x.shape) == 4 and w.values.ndim == 4 and x.shape[2] > 1 and x.shape[3] == 1 and w.values.shape[3] == 1
            and y.shape[3] == 1 and pads[1] == 0 and pads[3] == 0
            and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")):
        return "column"
    return None


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
            x2 = _reshape(graph, x, [n, c, 1, length], f"{name}_row_in", names)
            w2 = weights.get(w.name)
            if w2 is None:
                k = w.values.shape[2]
                w2 = weights[w.name] = gs.Constant(names(f"{w.name}_row"), np.ascontiguousarray(
                    w.values.reshape(w.values.shape[0], w.values.shape[1], 1, k)))
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
        if count:
            graph.toposort()
        return PassResult(graph, count > 0, {"rewritten": count})
