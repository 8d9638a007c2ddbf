"""Layouts of a graph's activations (channels first, channels last, vectors), read from its ops: where
insert-adapters may put an adapter and which axis distillation's attention transfer pools over."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .op_traits import traits


def tensor_layouts(graph: gs.Graph) -> dict[str, str]:
    """Best-effort layout of every float activation: 'cf' (channels at axis 1, spatial after), 'cl' (channels
    last, sequence/spatial in between) or 'vec' (rank 2, batch x features). Tensors left out have no known layout."""
    lay: dict[str, str] = {}
    for t in graph.inputs:
        r = len(t.shape or ())
        if r >= 4:
            lay[t.name] = "cf"
        elif r == 3:
            lay[t.name] = "cl"
        elif r == 2:
            lay[t.name] = "vec"
    for node in graph.nodes:
        outs = [o for o in node.outputs if o.name]
        if not outs:
            continue
        out = outs[0]
        r = len(out.shape) if out.shape is not None else None
        tr = traits(node.op)
        got = None
        if r is None:
            pass
        elif r == 2 and not (tr.layout or tr.opaque_layout):
            got = "vec"
        elif tr.channels_first:
            got = "cf"
        elif node.op in ("MatMul", "Gemm") and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) \
                and node.inputs[1].values.ndim == 2:
            got = "cl"
        elif node.op == "Transpose":
            src = node.inputs[0]
            perm = [int(p) for p in node.attrs.get("perm", [])]
            if lay.get(src.name) == "cf" and perm == [0] + list(range(2, r)) + [1]:
                got = "cl"
            elif lay.get(src.name) == "cl" and perm == [0, r - 1] + list(range(1, r - 1)):
                got = "cf"
        elif node.op in ("Reshape", "Flatten"):
            src = node.inputs[0]
            if lay.get(src.name) == "cf" and r >= 3 and src.shape is not None \
                    and list(out.shape[:2]) == list(src.shape[:2]):
                got = "cf"
        elif tr.layout or tr.opaque_layout:
            got = None
        else:  # elementwise, activations, Concat, LayerNormalization, Softmax...: follow a same-rank input
            for t in node.inputs:
                if isinstance(t, gs.Variable) and t.shape is not None and len(t.shape) == r and t.name in lay:
                    got = lay[t.name]
                    break
        if got is not None:
            for o in outs:
                if o.shape is not None and len(o.shape) == r:
                    lay[o.name] = got
    return lay
