"""Analyses computed on demand through the pass context, cached per graph object and content: an edit to the graph
(by a pass or anyone else) makes the next lookup compute afresh, so no caller has to invalidate anything."""
from __future__ import annotations

import math
import weakref
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from . import plugins
from .errors import GraphoptError
from .graph import fingerprint
from .symbolic_shapes import Poly

ANALYSES: dict[str, Callable] = {}


def analysis(name: str):
    def deco(fn):
        ANALYSES[name] = fn
        return fn
    return deco


class AnalysisManager:
    """name -> (the graph it describes (weakly), that graph's fingerprint then, value). A hit needs the same graph
    object with the same content (graph.fingerprint: nodes, tensors, constant bytes), so a stale value is never
    returned; the fingerprint costs a few ms where the analyses cost tens to hundreds."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._cache: dict[str, tuple[weakref.ref, str, object]] = {}

    def get(self, name: str, graph: gs.Graph):
        if name not in ANALYSES:        # the others register when their module loads (entry-point group)
            for ep in plugins.entry_points(plugins.ANALYSES, name):
                plugins.load(ep)
        if name not in ANALYSES:
            raise GraphoptError(f"unknown analysis '{name}'; known: {', '.join(sorted(ANALYSES))}")
        version = fingerprint(graph)
        hit = self._cache.get(name)
        if hit is not None and hit[0]() is graph and hit[1] == version:
            return hit[2]
        value = ANALYSES[name](graph, self.ctx)
        self._cache[name] = (weakref.ref(graph), version, value)
        return value

    def invalidate(self, keep=(), graph: gs.Graph | None = None) -> None:
        """After a pass changed the graph: drop every value (memory) except those named in keep (the pass's
        `preserves`), which now describe graph, its result."""
        version = fingerprint(graph) if graph is not None and any(n in self._cache for n in keep) else None
        for name in list(self._cache):
            if name in keep and version is not None:
                self._cache[name] = (weakref.ref(graph), version, self._cache[name][2])
            else:
                del self._cache[name]

    def cached(self) -> list[str]:
        return sorted(self._cache)


@analysis("shapes")
def shapes(graph: gs.Graph, ctx) -> dict[str, tuple]:
    from .shapes import infer
    g = infer(graph)
    return {name: (tuple(t.shape) if t.shape is not None else None) for name, t in g.tensors().items()}


def _known(d) -> bool:
    """A dimension MACs can be counted with: a static size, or a formula in the dynamic input dimensions (a Poly,
    which `inspect` puts in the shapes of a graph it cannot bind)."""
    return (isinstance(d, (int, np.integer)) and d >= 0) or isinstance(d, Poly)


def _numel(shape):
    """Elements of a shape (a Poly when a dimension is one); 0 when a dimension is unknown."""
    if shape is None or not all(_known(d) for d in shape):
        return 0
    return math.prod(d if isinstance(d, Poly) else int(d) for d in shape)


_QDQ = ("QuantizeLinear", "DequantizeLinear")


def weight_constant(t) -> gs.Constant | None:
    """The constant behind a node input: the input itself, or the quantized constant (int8 weight, int32 bias) that
    the DequantizeLinear producing it reads."""
    if isinstance(t, gs.Constant):
        return t
    src = t.inputs[0] if len(t.inputs) == 1 else None
    if src is not None and src.op == "DequantizeLinear" and src.inputs and isinstance(src.inputs[0], gs.Constant):
        return src.inputs[0]
    return None


def weight_tensors(graph: gs.Graph) -> dict[str, gs.Constant]:
    """The model's weights by name: float constants read by compute ops, and the constants QuantizeLinear /
    DequantizeLinear quantize or dequantize (not their scales and zero points), so a quantized graph has the
    parameters of its float original."""
    out = {}
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if not isinstance(t, gs.Constant):
                continue
            quant = node.op in _QDQ
            if (quant and i == 0) or (not quant and t.values.dtype.kind == "f"):
                out[t.name] = t
    return out


def _weight_shape(t, shapes: dict):
    if t.shape is not None:
        return t.shape
    if shapes.get(t.name) is not None:
        return shapes[t.name]
    c = weight_constant(t)
    return c.values.shape if c is not None else None


def node_macs(node: gs.Node, shapes: dict) -> int:
    """Multiply-accumulates of one node (0 for ops without a dominant multiply-add or with an unknown shape; a Poly
    when the shapes hold formulas)."""
    op = node.op
    out = shapes.get(node.outputs[0].name) if node.outputs else None
    if op in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
        w = _weight_shape(node.inputs[1], shapes)
        if w is None:
            return 0
        if op == "Conv":
            return _numel(out) * _numel(w[1:])
        x = shapes.get(node.inputs[0].name)
        return _numel(x) * _numel(w[1:])
    if op in ("Gemm", "MatMul"):
        a = shapes.get(node.inputs[0].name)
        if out is None or a is None or len(a) == 0:
            return 0
        k = a[0] if (op == "Gemm" and node.attrs.get("transA", 0)) else a[-1]
        return _numel(out) * (k if isinstance(k, Poly) else int(k)) if _known(k) else 0
    if op in ("LSTM", "GRU", "RNN") and len(node.inputs) > 2:
        # every step multiplies the input by W and the state by R, for each direction and gate
        x = shapes.get(node.inputs[0].name)
        w, r = _weight_shape(node.inputs[1], shapes), _weight_shape(node.inputs[2], shapes)
        if x is None or len(x) != 3 or w is None or r is None:
            return 0
        steps = _numel(x[:2])                                   # seq x batch, whatever the layout
        return steps * (_numel(w) + _numel(r))
    return 0


@analysis("flops")
def flops(graph: gs.Graph, ctx) -> dict:
    """MACs and parameter counts per node (a list in graph.nodes order, so nodes with equal or empty names all
    count), and totals."""
    shapes_ = ctx.analyses.get("shapes", graph) if ctx is not None else shapes(graph, None)
    per_node = []
    for node in graph.nodes:
        params = 0
        for t in node.inputs if node.op not in _QDQ else ():
            c = weight_constant(t)
            if c is not None and (c is not t or c.values.dtype.kind == "f"):
                params += int(c.values.size)
        per_node.append({"name": node.name, "op": node.op, "macs": node_macs(node, shapes_), "params": params})
    weights = weight_tensors(graph).values()
    return {"nodes": per_node, "macs": sum(v["macs"] for v in per_node),
            "params": sum(int(c.values.size) for c in weights),
            "param_bytes": sum(int(np.asarray(c.values).nbytes) for c in weights)}
