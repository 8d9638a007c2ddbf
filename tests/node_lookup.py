"""Find nodes of a torch-exported graph by the module they apply, not by the names the exporter gave them.

torch's state-dict names (`layer1.conv1.weight`) are a torch contract, kept as initializer names by the exporter;
node names (`/layer1/conv1/Conv`) are the exporter's own choice. Passes keep node names but may rename the
constants they rewrite, so look a node up before the pass runs and find it afterwards by its name."""
from __future__ import annotations

import onnx_graphsurgeon as gs


def _readers(graph: gs.Graph, constant: str) -> list[gs.Node]:
    return [n for n in graph.nodes if any(isinstance(t, gs.Constant) and t.name == constant for t in n.inputs)]


def node_of(graph: gs.Graph, module_path: str) -> gs.Node:
    """The node applying torch module `module_path`: the one reading the constant `<module_path>.weight`, or, for an
    nn.Linear the exporter wrote as MatMul (its weight transposed under a name of its own) + Add, the MatMul whose
    result that Add adds `<module_path>.bias` to."""
    weight, bias = f"{module_path}.weight", f"{module_path}.bias"
    found = _readers(graph, weight)
    if not found:
        found = [p for add in _readers(graph, bias) if add.op == "Add"
                 for t in add.inputs if not isinstance(t, gs.Constant) for p in t.inputs if p.op == "MatMul"]
    assert len(found) == 1, (f"module {module_path!r}: expected one node reading the constant {weight!r} (or one "
                             f"MatMul whose Add reads {bias!r}), found {[n.name for n in found]}")
    return found[0]


def _nearest(start: gs.Node, op: str, step) -> gs.Node:
    level, seen = [start], {id(start)}
    while level:
        nearer, level = level, []
        for n in nearer:
            for m in step(n):
                if id(m) not in seen:
                    seen.add(id(m))
                    level.append(m)
        hits = [m for m in level if m.op == op]
        assert len(hits) <= 1, f"{len(hits)} {op} nodes equally near {start.name!r}: {[m.name for m in hits]}"
        if hits:
            return hits[0]
    raise AssertionError(f"no {op} node is connected to {start.name!r} in that direction")


def after(node: gs.Node, op: str) -> gs.Node:
    """The nearest node of type `op` that reads, directly or through other nodes, what `node` computes."""
    return _nearest(node, op, lambda n: [c for t in n.outputs for c in t.outputs])


def before(node: gs.Node, op: str) -> gs.Node:
    """The nearest node of type `op` whose result `node` reads, directly or through other nodes."""
    return _nearest(node, op, lambda n: [p for t in n.inputs for p in t.inputs])
