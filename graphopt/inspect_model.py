"""`graphopt inspect`: ops, shapes, params and MACs per layer, and totals."""
from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs

from .analyses import flops, node_macs
from .graph import input_specs
from .loading import load
from .symbolic_shapes import Poly, dim_json, shape_text, symbolic_shapes

#: ops whose MACs the flops analysis counts: an unknown shape makes theirs unknown ('?'), not 0
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def inspect_model(source, input_shapes: dict | None = None, input_values: dict | None = None) -> dict:
    """Ops, shapes, params and MACs per layer and in total. Dimensions left dynamic (no --input-shape) are symbols:
    shapes and MACs are then formulas in them (graphopt.symbolic_shapes), `symbols` says what each stands for and
    `shapes_note` how the formulas were found; a layer's MACs are an int, a formula (str), or '?' (unknown)."""
    graph = load(source, input_shapes=input_shapes, require_static=False, input_values=input_values)
    f = flops(graph, None)
    dynamic = [name for name, shape, _ in input_specs(graph) if any(not isinstance(d, int) or d < 0 for d in shape)]
    sym = symbolic_shapes(graph) if dynamic else None
    layers, total, unknown = [], 0, 0
    for node, n in zip(graph.nodes, f["nodes"]):
        out = node.outputs[0] if node.outputs else None
        if sym is None:
            shape = "x".join(str(d) for d in out.shape) if out is not None and out.shape is not None else "?"
            macs = n["macs"]
        else:
            shape = shape_text(sym.shapes.get(out.name)) if out is not None else "?"
            macs = _symbolic_macs(node, sym.shapes)
        if macs is None:
            unknown += 1
        else:
            total = total + macs
        layers.append({"name": node.name, "op": node.op, "output_shape": shape, "params": n["params"],
                       "macs": _number_or_text(macs)})
    info = {
        "source": str(source),
        "opset": graph.opset,
        "inputs": [{"name": t.name, "shape": sym.input_shape(t) if sym else [dim_json(d) for d in t.shape or []],
                    "dtype": dt.name} for t, (_, _, dt) in zip(graph.inputs, input_specs(graph))],
        "outputs": [{"name": t.name, "shape": sym.input_shape(t) if sym else [dim_json(d) for d in t.shape or []]}
                    for t in graph.outputs],
        "dynamic_inputs": dynamic,
        "nodes": len(graph.nodes),
        "op_counts": dict(Counter(n.op for n in graph.nodes)),
        "params": f["params"],
        "macs": _number_or_text(total),
        "macs_complete": not unknown,
        "initializers": sum(1 for t in graph.tensors().values() if isinstance(t, gs.Constant)),
        "layers": layers,
    }
    if sym is not None:
        info["symbols"] = [{"name": s.name, "inputs": [{"input": i, "axis": a} for i, a in s.where],
                            "dim_param": s.dim_param, "fixed": None if s.fitted else s.first} for s in sym.symbols]
        info["shapes_note"] = sym.note
        info["macs_unknown_nodes"] = unknown
    return info


def _symbolic_macs(node, shapes):
    """A node's MACs over formula shapes: an int, a Poly, or None when a shape it needs is unknown."""
    macs = node_macs(node, shapes)
    if node.op in MAC_OPS and not macs:
        tensors = [t for t in list(node.inputs[:2]) + list(node.outputs[:1]) if t.name]
        if any(shapes.get(t.name) is None or any(d is None for d in shapes[t.name]) for t in tensors):
            return None
    return macs


def _number_or_text(macs):
    if isinstance(macs, Poly):
        c = macs.constant()
        return c if c is not None else str(macs)
    return "?" if macs is None else int(macs)
