"""The one IR: an onnx-graphsurgeon Graph. Helpers to move between it and ModelProto and to read its I/O."""
from __future__ import annotations

import hashlib
import heapq

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import UnsupportedModel

# onnxruntime 1.18+ reads IR 10; newer onnx writes newer IR versions by default.
MAX_IR_VERSION = 10


def from_onnx(model: onnx.ModelProto) -> gs.Graph:
    g = gs.import_onnx(model)
    g.producer_name = model.producer_name or "graphopt"
    return g


def to_onnx(graph: gs.Graph, check: bool = False) -> onnx.ModelProto:
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    if not model.producer_name:
        model.producer_name = "graphopt"
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def copy(graph: gs.Graph) -> gs.Graph:
    return from_onnx(to_onnx(graph))


class Names:
    """Fresh tensor / node names for a graph: base, else base_1, base_2, ... (none a name the graph has)."""
    def __init__(self, graph: gs.Graph):
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def np_dtype(t) -> np.dtype:
    dt = t.dtype
    if dt is None:
        return np.dtype(np.float32)
    if isinstance(dt, int):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dt))
    return np.dtype(dt)


def input_specs(graph: gs.Graph) -> list[tuple[str, tuple, np.dtype]]:
    return [(t.name, tuple(t.shape or ()), np_dtype(t)) for t in graph.inputs]


def output_specs(graph: gs.Graph) -> list[tuple[str, tuple, np.dtype]]:
    return [(t.name, tuple(t.shape) if t.shape is not None else None, np_dtype(t)) for t in graph.outputs]


def constant_node_value(node: gs.Node) -> np.ndarray | None:
    """The value a Constant node produces (value / value_float(s) / value_int(s) forms), else None."""
    attrs = node.attrs
    if "value" in attrs:
        v = attrs["value"]
        return v.values if isinstance(v, gs.Constant) else np.asarray(v)
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    return None


def constant_value(tensor) -> np.ndarray | None:
    """The value of a tensor known at compile time (initializer or Constant node), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        return constant_node_value(tensor.inputs[0])
    return None


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node (subgraphs included) a unique name, deterministically: an unnamed node becomes
    `<op>_<index>` (its position in its graph), and a name already taken gets the first free `_<n>` suffix.
    Named, unique nodes keep their names; passes, reports and metadata refer to nodes by name."""
    graphs, stack = [], [graph]
    while stack:                                 # every graph, parents before their subgraphs
        g = stack.pop(0)
        graphs.append(g)
        for node in g.node:
            for a in node.attribute:
                stack.extend([a.g] if a.HasField("g") else list(a.graphs))
    taken = {n.name for g in graphs for n in g.node if n.name}
    kept = set()                                 # names whose first holder keeps them
    for g in graphs:
        for i, node in enumerate(g.node):
            if node.name and node.name not in kept:
                kept.add(node.name)
                continue
            base = node.name or f"{node.op_type}_{i}"
            name, k = base, 0
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            taken.add(name)
            node.name = name


def node_label(node) -> str:
    return f"node '{node.name or '?'}' ({node.op})"


def _reads(node: gs.Node) -> list[int]:
    """Ids of the tensors a node reads: its inputs and whatever its subgraphs (at any depth) use. By identity, not
    name: onnx-graphsurgeon shares an outer tensor with the subgraphs that read it, while a subgraph's own tensor
    is a different object even where it reuses an outer name."""
    ids = [id(t) for t in node.inputs if t.name]
    stack = list(node.subgraphs())
    while stack:
        sg = stack.pop()
        for n in sg.nodes:
            ids.extend(id(t) for t in n.inputs if t.name)
            stack.extend(n.subgraphs())
    return ids


def toposort(graph: gs.Graph) -> gs.Graph:
    """Sort the nodes of graph and of every subgraph topologically, in place, without recursion (Kahn's
    algorithm): among ready nodes the one earlier in the current order comes first, so a sorted graph keeps its
    order. A node holding subgraphs comes after the producers of every outer tensor its subgraphs read.
    onnx-graphsurgeon's own toposort recurses once per node of depth and overflows on unrolled RNNs."""
    graphs = [graph]
    while graphs:
        g = graphs.pop()
        nodes = list(g.nodes)
        producer = {id(t): i for i, n in enumerate(nodes) for t in n.outputs if t.name}
        users = [[] for _ in nodes]
        pending = [0] * len(nodes)
        for i, n in enumerate(nodes):
            graphs.extend(n.subgraphs())
            for j in {producer[t] for t in _reads(n) if t in producer}:
                users[j].append(i)
                pending[i] += 1
        ready = [i for i, k in enumerate(pending) if k == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            i = heapq.heappop(ready)
            order.append(nodes[i])
            for j in users[i]:
                pending[j] -= 1
                if pending[j] == 0:
                    heapq.heappush(ready, j)
        if len(order) != len(nodes):
            stuck = next(nodes[i] for i, k in enumerate(pending) if k)
            raise UnsupportedModel(f"the graph has a cycle through {node_label(stuck)}")
        g.nodes = order
    return graph


def fingerprint(graph: gs.Graph) -> str:
    """A digest of everything a pass could change: nodes (op, name, tensors, attributes, subgraphs), every tensor's
    name, dtype and shape, the bytes of every constant, the graph's inputs, outputs and doc_string. For checking
    that a pass left a graph alone (PassManager with strict checks)."""
    h = hashlib.blake2b(digest_size=16)

    def value(v):
        if isinstance(v, gs.Graph):
            return fingerprint(v)
        if isinstance(v, gs.Constant):
            return (v.name, hashlib.blake2b(np.ascontiguousarray(v.values).tobytes(), digest_size=16).hexdigest())
        return repr(v)
    for n in graph.nodes:
        h.update(repr((n.op, n.domain, n.name, [t.name for t in n.inputs], [t.name for t in n.outputs],
                       sorted((k, value(v)) for k, v in n.attrs.items()))).encode())
    for name, t in sorted(graph.tensors().items()):
        h.update(repr((name, str(t.dtype), None if t.shape is None else tuple(t.shape))).encode())
        if isinstance(t, gs.Constant):
            h.update(np.ascontiguousarray(t.values).tobytes())
    h.update(repr(([t.name for t in graph.inputs], [t.name for t in graph.outputs], graph.doc_string,
                   graph.opset)).encode())
    return h.hexdigest()
