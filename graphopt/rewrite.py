"""Small graph-editing helpers shared by passes."""
from __future__ import annotations

import onnx_graphsurgeon as gs


def bypass(graph: gs.Graph, node: gs.Node, keep_input: int = 0) -> bool:
    """Remove `node`, which passes input #keep_input through unchanged, rewiring its consumers.
    Graph outputs keep their names: when the node's output is a graph output, the producer of the input is made
    to write the output tensor instead (impossible, and refused, when the input is a graph input or a constant,
    or is itself a graph output)."""
    src = node.inputs[keep_input]
    out = node.outputs[0]
    if out in graph.outputs:
        if isinstance(src, gs.Constant) or src in graph.inputs or src in graph.outputs or len(src.inputs) != 1:
            return False
        producer = src.inputs[0]
        for c in list(src.outputs):
            if c is node:
                continue
            _replace(c.inputs, src, out)
        _replace(producer.outputs, src, out)
        node.inputs.clear()
        node.outputs.clear()
        return True
    for c in list(out.outputs):
        _replace(c.inputs, out, src)
    node.inputs.clear()
    node.outputs.clear()
    return True


def _replace(lst, old, new) -> None:
    """Replace every occurrence of old in a graphsurgeon synchronized list (slice assignment is unsupported)."""
    for i, t in enumerate(list(lst)):
        if t is old:
            lst[i] = new


def single_consumer(tensor, graph: gs.Graph) -> gs.Node | None:
    if tensor in graph.outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]
