"""remove-identity: remove ops that pass a tensor through unchanged."""
import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import constant_value, toposort
from graphopt.op_traits import traits
from graphopt.passmanager import Pass, PassResult, register
from graphopt.rewrite import bypass


def _same_shape(a, b) -> bool:
    return (a.shape is not None and b.shape is not None and len(a.shape) == len(b.shape)
            and all(isinstance(x, int) and x == y for x, y in zip(a.shape, b.shape)))


def _is_noop(node: gs.Node) -> bool:
    op, tr = node.op, traits(node.op)
    if op == "Identity":
        return True
    if op == "Dropout":
        return len(node.outputs) == 1 or not node.outputs[1].outputs
    x, y = node.inputs[0] if node.inputs else None, node.outputs[0] if node.outputs else None
    if x is None or y is None:
        return False
    if op == "Cast":
        return x.dtype is not None and y.dtype is not None and np.dtype(x.dtype) == np.dtype(y.dtype)
    if tr.noop_if_same_shape:
        return _same_shape(x, y)
    if op == "Transpose":
        perm = node.attrs.get("perm")
        return perm is not None and list(perm) == list(range(len(perm)))
    if op == "Concat":
        return len(node.inputs) == 1
    if tr.neutral is not None and len(node.inputs) == 2:
        c = constant_value(node.inputs[1])
        return c is not None and c.size > 0 and np.all(c == tr.neutral) and _same_shape(x, y) and x.dtype == y.dtype
    if op == "Pad":
        pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        return pads is not None and not np.any(pads)
    return False


@register
class RemoveIdentity(Pass):
    name = "remove-identity"
    help = "Remove Identity, inference Dropout, same-type Cast, shape-preserving Reshape/Expand, identity Transpose, x+0, x*1"

    def run(self, graph, ctx):
        removed = 0
        for node in list(graph.nodes):
            if (node.domain or "") not in ("", "ai.onnx") or not node.outputs:
                continue
            if _is_noop(node) and bypass(graph, node):
                removed += 1
        if removed:
            toposort(graph.cleanup(remove_unused_graph_inputs=False))
        return PassResult(graph, removed > 0, {"removed": removed})
