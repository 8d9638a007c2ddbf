"""Constant folding, shared by the loader (shape-subgraph folding after binding) and the fold-constants pass."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .control_flow import inline_constant_ifs
from .graph import constant_node_value, toposort
from .limits import MAX_FOLD_BYTES
from .shapes import infer, tensor_bytes


def constants_to_initializers(graph: gs.Graph) -> bool:
    """Turn Constant nodes into initializers (gs.Constant tensors). Returns whether anything changed."""
    changed = False
    for node in list(graph.nodes):
        if node.op != "Constant" or (node.domain or "") not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if out in graph.outputs:
            continue
        values = constant_node_value(node)
        if values is None:
            continue
        out.to_constant(values)
        node.outputs.clear()
        changed = True
    if changed:
        graph.cleanup()
    return changed


def fold_static_shapes(graph: gs.Graph) -> bool:
    """Shape of a statically shaped tensor -> constant, honouring Shape-15's start/end. onnx-graphsurgeon's own
    shape folding ignores them and folds the whole shape, so fold() runs it with fold_shapes=False. A Shape that
    is itself a graph output becomes a Constant node."""
    import numpy as np
    changed = False
    for node in list(graph.nodes):
        if node.op != "Shape" or not node.inputs or len(node.outputs) != 1:
            continue
        shape = node.inputs[0].shape
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            continue
        start = int(node.attrs.get("start", 0))
        end = node.attrs.get("end")
        dims = list(shape)[start:] if end is None else list(shape)[start:int(end)]   # python slicing clamps like ONNX
        values = np.array(dims, dtype=np.int64)
        if node.outputs[0] in graph.outputs:      # an output cannot be an initializer: keep a Constant node
            node.op, node.attrs = "Constant", {"value": gs.Constant(node.outputs[0].name + "_value", values)}
            node.inputs.clear()
        else:
            node.outputs[0].to_constant(values)
            node.outputs.clear()
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def _signature(graph: gs.Graph):
    return (len(graph.nodes), tuple(n.op for n in graph.nodes))


#: ops whose output can be far larger than their inputs: not folded while the size of their output is unknown
GROWING_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot",
                         "EyeLike"})


def _outputs_too_big(max_bytes: int):
    """should_exclude_node for fold_constants: a node with an output over max_bytes (from the inferred shapes),
    or a growing op whose output size is unknown, is left to run time, so folding never allocates more."""
    def exclude(node: gs.Node) -> bool:
        sizes = [tensor_bytes(t) for t in node.outputs]
        return any(n > max_bytes if n is not None else node.op in GROWING_OPS for n in sizes)
    return exclude


def fold(graph: gs.Graph, max_rounds: int = 32, max_bytes: int = MAX_FOLD_BYTES) -> tuple[gs.Graph, bool]:
    """Fold every subgraph whose inputs are all known at compile time, shapes of static tensors included.
    onnx-graphsurgeon evaluates the foldable subgraphs with onnxruntime; we iterate with shape inference
    in between, since folding a shape computation can make more shapes (and more subgraphs) static.
    Nodes whose output would exceed max_bytes stay in the graph (onnxruntime's own folding stops at 1 GB too)."""
    changed = constants_to_initializers(graph)
    for _ in range(max_rounds):
        before = _signature(graph)
        graph = infer(graph)
        fold_static_shapes(graph)
        prev_level = gs.logger.G_LOGGER.severity
        gs.logger.G_LOGGER.severity = max(prev_level, gs.logger.G_LOGGER.ERROR)
        try:
            graph.fold_constants(fold_shapes=False, partitioning=None, error_ok=True, flatten_subgraphs=False,
                                 size_threshold=max_bytes, should_exclude_node=_outputs_too_big(max_bytes))
        finally:
            gs.logger.G_LOGGER.severity = prev_level
        toposort(graph.cleanup(remove_unused_graph_inputs=False))
        constants_to_initializers(graph)
        inline_constant_ifs(graph)          # an If whose condition folded to a constant becomes its branch
        if _signature(graph) == before:
            break
        changed = True
    return graph, changed

