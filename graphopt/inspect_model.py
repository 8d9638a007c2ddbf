"""`graphopt inspect`: ops, shapes, params and MACs per layer, and totals."""
from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs

from .analyses import flops
from .graph import input_specs
from .loading import load


def inspect_model(source, input_shapes: dict | None = None) -> dict:
    graph = load(source, input_shapes=input_shapes, require_static=False)
    f = flops(graph, None)
    layers = []
    for node in graph.nodes:
        out = node.outputs[0] if node.outputs else None
        shape = "x".join(str(d) for d in out.shape) if out is not None and out.shape is not None else "?"
        n = f["nodes"].get(node.name, {"macs": 0, "params": 0})
        layers.append({"name": node.name, "op": node.op, "output_shape": shape, "params": n["params"], "macs": n["macs"]})
    dynamic = [name for name, shape, _ in input_specs(graph) if any(not isinstance(d, int) for d in shape)]
    return {
        "source": str(source),
        "opset": graph.opset,
        "inputs": [{"name": n, "shape": [d if isinstance(d, int) else str(d) for d in s], "dtype": dt.name}
                   for n, s, dt in input_specs(graph)],
        "outputs": [{"name": t.name, "shape": [d if isinstance(d, int) else str(d) for d in (t.shape or [])]}
                    for t in graph.outputs],
        "dynamic_inputs": dynamic,
        "nodes": len(graph.nodes),
        "op_counts": dict(Counter(n.op for n in graph.nodes)),
        "params": f["params"],
        "macs": f["macs"],
        "macs_complete": not dynamic,
        "initializers": sum(1 for t in graph.tensors().values() if isinstance(t, gs.Constant)),
        "layers": layers,
    }
