"""lower-int8's lookup tables: a quantized elementwise chain becomes one 256-entry table.

In a QDQ graph an activation such as hardswish between two quantized convs reads

    q (u8/s8) -> DequantizeLinear -> Add 3 -> QDQ -> Clip -> QDQ -> Div 6 -> QDQ -> Mul (the dequantized q) -> QuantizeLinear

Every value in it is a function of the one 8-bit input q (all other inputs are scalar constants), so the whole
chain is a table of 256 entries indexed by q. The table is computed by onnxruntime itself, on the chain's own
nodes with graph optimizations off (what the numerical oracle runs), so the rewrite is exact: for every q the
table holds what the chain computes. The chain becomes

    Gather(table, Cast(q, int32))          (s8: negative indices wrap to the table's end, so table[byte value])

which the cpu target's int8 lowering applies in its kernels' NHWC layout (no transposes, one load per value)
instead of about twenty float operations per value on an NCHW copy.

A chain: the tensors reached backwards from a QuantizeLinear (per-tensor scale and zero point) through
elementwise float ops whose other inputs are scalar constants, through per-tensor QuantizeLinear /
DequantizeLinear pairs (whose QuantizeLinear no op outside the chain reads), ending in DequantizeLinears of
exactly one 8-bit tensor. Nothing else (a second activation, a per-channel constant, a shape-changing broadcast)
makes a chain."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.graph import constant_value, toposort

#: elementwise ops on float tensors that a chain may contain (constant operands must be scalars)
ELEMENTWISE = frozenset({
    "Abs", "Add", "Ceil", "Celu", "Clip", "Div", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish",
    "Identity", "LeakyRelu", "Log", "Max", "Min", "Mish", "Mul", "Neg", "Pow", "Reciprocal", "Relu", "Round",
    "Selu", "Sigmoid", "Softplus", "Softsign", "Sqrt", "Sub", "Tanh", "ThresholdedRelu"})
INT8 = (np.dtype(np.uint8), np.dtype(np.int8))


def qparams(node: gs.Node):
    """(scale, zero point) of a Q/DQ node when both are per-tensor constants (no zero point: u8 zero), else None."""
    if len(node.inputs) < 2:
        return None
    s = constant_value(node.inputs[1])
    z = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if s is None or s.size != 1:
        return None
    if z is None:
        z = np.zeros((), np.uint8)
    if z.size != 1:
        return None
    return s, z


def _per_tensor(node: gs.Node) -> bool:
    """A Q/DQ node whose scale and zero point are constants with one value each (not blocked)."""
    return qparams(node) is not None and not node.attrs.get("block_size", 0)


def _out_dtype(q: gs.Node) -> np.dtype:
    z = constant_value(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2].name else None
    return np.dtype(np.uint8) if z is None else np.dtype(z.dtype)


def _const_rank(t) -> int | None:
    """Rank of a scalar-valued constant operand (initializer, Constant, or DequantizeLinear of one), else None."""
    v = constant_value(t)
    if v is None and len(t.inputs) == 1 and t.inputs[0].op == "DequantizeLinear" \
            and _per_tensor(t.inputs[0]):
        v = constant_value(t.inputs[0].inputs[0])
    return v.ndim if v is not None and v.size == 1 else None


def _int8_dtype(t) -> np.dtype | None:
    """u8 / s8 when t is an 8-bit tensor (its own type, or the zero point of the QuantizeLinear making it)."""
    dt = np.dtype(t.dtype) if t.dtype is not None else \
        _out_dtype(t.inputs[0]) if len(t.inputs) == 1 and t.inputs[0].op == "QuantizeLinear" else None
    return dt if dt in INT8 else None


def _rank(t) -> int:
    """t's rank where shape inference or the QuantizeLinear making it tells, else 1 (scalar constants of rank 0 or
    1 then still broadcast to t's shape: activations have rank >= 1)."""
    for s in (t.shape, t.inputs[0].inputs[0].shape if len(t.inputs) == 1 and t.inputs[0].inputs else None):
        if s is not None:
            return len(s)
    return 1


MAX_DEPTH = 64      # ops between a chain's source and its end


class _Walk:
    """The backward walk from a QuantizeLinear: through elementwise ops with scalar constants and through inner
    QuantizeLinear -> DequantizeLinear pairs (unless that QuantizeLinear is a boundary), down to the
    DequantizeLinears of 8-bit tensors (the sources)."""

    def __init__(self, boundary: set):
        self.boundary = boundary
        self.nodes: dict = {}
        self.sources: dict = {}
        self.consts: list = []
        self.seen: set = set()

    def tensor(self, t, depth: int) -> bool:
        if t.name in self.seen:
            return True
        self.seen.add(t.name)
        rank = _const_rank(t)
        if rank is not None:
            self.consts.append(rank)
            if not isinstance(t, gs.Constant) and t.inputs:      # Constant node / DequantizeLinear of a constant
                self.nodes[id(t.inputs[0])] = t.inputs[0]
            return True
        if len(t.inputs) != 1 or depth > MAX_DEPTH:
            return False                         # a graph input, a non-scalar constant, too long
        p = t.inputs[0]
        if p.op == "DequantizeLinear" and _per_tensor(p):
            src = p.inputs[0]
            if constant_value(src) is not None or _int8_dtype(src) is None:
                return False
            self.nodes[id(p)] = p
            q = src.inputs[0] if len(src.inputs) == 1 else None
            if q is not None and q.op == "QuantizeLinear" and _per_tensor(q) and q.name not in self.boundary:
                trial = _Walk(self.boundary)             # through the inner QuantizeLinear when all of it walks
                trial.seen = set(self.seen)
                if trial.tensor(q.inputs[0], depth + 1):
                    self.nodes.update(trial.nodes)
                    self.nodes[id(q)] = q
                    self.sources.update(trial.sources)
                    self.consts += trial.consts
                    self.seen |= trial.seen
                    return True
            self.sources[src.name] = src
            return True
        if p.op in ELEMENTWISE and len(p.outputs) == 1:
            self.nodes[id(p)] = p
            return all(self.tensor(i, depth + 1) for i in p.inputs if i.name)
        return False


def find_chain(q: gs.Node, consumers: dict) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """(the 8-bit source tensor, the chain's nodes, q among them) of the longest chain that q closes, or None.
    An inner QuantizeLinear whose result is also read outside the chain becomes a boundary (a source)."""
    if q.op != "QuantizeLinear" or not _per_tensor(q) or _out_dtype(q) not in INT8:
        return None
    boundary: set = set()
    while True:
        walk = _Walk(boundary)
        walk.nodes[id(q)] = q
        if not walk.tensor(q.inputs[0], 0) or len(walk.sources) != 1 or len(walk.nodes) < 2:
            return None
        src = next(iter(walk.sources.values()))
        if any(r > _rank(src) for r in walk.consts):
            return None                          # a constant of higher rank would broadcast the output bigger
        members = set(walk.nodes)
        leaks = [n for n in walk.nodes.values() if n is not q and n.op != "DequantizeLinear"
                 and any(id(c) not in members for o in n.outputs for c in consumers.get(o.name, []))]
        if not leaks:
            return src, list(walk.nodes.values())
        inner_q = [n.name for n in leaks if n.op == "QuantizeLinear"]
        if len(inner_q) != len(leaks):
            return None                          # an intermediate float result is read elsewhere: the chain stays
        boundary.update(inner_q)


def tables(chains: list[tuple[gs.Tensor, list[gs.Node], gs.Node]], order: dict, opset: int) -> list[np.ndarray]:
    """Every chain (src, nodes, closing QuantizeLinear) evaluated by onnxruntime (no graph optimizations) on all 256
    values of its src's type, indexed by the value's byte (u8: the value; s8: the value mod 256): one model holding
    every chain side by side, one session (a session per chain cost ~0.5 s per quantized compile)."""
    from graphopt import ort
    if not chains:
        return []
    consts: dict[str, gs.Constant] = {}
    nodes, inputs, outputs, feeds = [], [], [], {}
    for i, (src, chain, sink) in enumerate(chains):
        dtype = _int8_dtype(src)
        x = gs.Variable(f"lut_in_{i}", dtype=dtype, shape=[256])
        inputs.append(x)
        feeds[x.name] = np.arange(256, dtype=np.uint8).view(dtype)
        mapping = {src.name: x}

        def tensor(t, i=i, mapping=mapping):
            if isinstance(t, gs.Constant):
                return consts.setdefault(t.name, gs.Constant(t.name, np.asarray(t.values)))
            if t.name not in mapping:              # chains are disjoint, but two may read the same src
                mapping[t.name] = gs.Variable(f"{t.name}/lut_{i}", dtype=t.dtype)
            return mapping[t.name]

        for n in sorted(chain, key=lambda n: order[id(n)]):
            nodes.append(gs.Node(n.op, f"{n.name}/lut_{i}", attrs=dict(n.attrs),
                                 inputs=[tensor(t) if t.name else gs.Variable.empty() for t in n.inputs],
                                 outputs=[tensor(o) for o in n.outputs]))
        out = mapping[sink.outputs[0].name]
        out.dtype = _out_dtype(sink)
        outputs.append(out)
    g = gs.Graph(nodes=nodes, inputs=inputs, outputs=outputs, opset=opset)
    model = gs.export_onnx(g.cleanup())
    model.ir_version = min(model.ir_version, 9)
    res = ort.run(model, feeds)
    values = []
    for out, (_, _, sink) in zip(outputs, chains):
        v = res[out.name].reshape(-1)
        if v.size != 256:
            raise ValueError(f"chain ending at {sink.name} gave {v.size} values for 256 inputs")
        values.append(v)
    return values


def rewrite_tables(graph: gs.Graph) -> int:
    """Replace every quantized elementwise chain of graph by a table lookup (in place). Returns how many."""
    consumers: dict[str, list] = {}
    for n in graph.nodes:
        for t in n.inputs:
            consumers.setdefault(t.name, []).append(n)
    for t in graph.outputs:                      # a graph output is read outside every chain
        consumers.setdefault(t.name, []).append(graph)
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    absorbed, chains = set(), []
    for q in reversed([n for n in graph.nodes if n.op == "QuantizeLinear"]):     # the longest chains first
        if id(q) in absorbed or not q.outputs:
            continue
        found = find_chain(q, consumers)
        if found is None:
            continue
        src, chain = found
        absorbed.update(id(n) for n in chain)
        chains.append((src, chain, q))
    done = 0
    for (src, chain, q), values in zip(chains, tables(chains, order, graph.opset)):
        if _int8_dtype(src) == values.dtype and np.array_equal(values, np.arange(256, dtype=np.uint8).view(values.dtype)):
            continue                             # the identity: nothing to gain
        out = q.outputs[0]
        idx = gs.Variable(f"{q.name}/table_index", dtype=np.int32, shape=src.shape)
        out.dtype = values.dtype
        graph.nodes.append(gs.Node("Cast", f"{q.name}/table_index", attrs={"to": onnx.TensorProto.INT32},
                                   inputs=[src], outputs=[idx]))
        q.outputs.clear()
        graph.nodes.append(gs.Node("Gather", f"{q.name}/table", attrs={"axis": 0},
                                   inputs=[gs.Constant(f"{q.name}/table_values", values), idx], outputs=[out]))
        done += 1
    if done:
        toposort(graph.cleanup(remove_unused_graph_inputs=False))
    return done
