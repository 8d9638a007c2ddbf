"""Analyses computed on demand through the pass context and cached until a pass invalidates them."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .errors import GraphoptError

ANALYSES: dict[str, Callable] = {}


def analysis(name: str):
    def deco(fn):
        ANALYSES[name] = fn
        return fn
    return deco


class AnalysisManager:
    def __init__(self, ctx):
        self.ctx = ctx
        self._cache: dict[str, tuple[int, object]] = {}

    def get(self, name: str, graph: gs.Graph):
        if name not in ANALYSES:        # analyses of concrete passes register when the pass package loads
            from .passmanager import load_builtin_passes
            load_builtin_passes()
        if name not in ANALYSES:
            raise GraphoptError(f"unknown analysis '{name}'; known: {', '.join(sorted(ANALYSES))}")
        hit = self._cache.get(name)
        if hit is not None and hit[0] == id(graph):
            return hit[1]
        value = ANALYSES[name](graph, self.ctx)
        self._cache[name] = (id(graph), value)
        return value

    def invalidate(self, keep=(), graph: gs.Graph | None = None) -> None:
        for name in list(self._cache):
            if name in keep and graph is not None:
                self._cache[name] = (id(graph), self._cache[name][1])
            else:
                del self._cache[name]

    def cached(self) -> list[str]:
        return sorted(self._cache)


@analysis("shapes")
def shapes(graph: gs.Graph, ctx) -> dict[str, tuple]:
    from .shapes import infer
    g = infer(graph)
    return {name: (tuple(t.shape) if t.shape is not None else None) for name, t in g.tensors().items()}


@analysis("use-def")
def use_def(graph: gs.Graph, ctx) -> dict:
    producers, consumers = {}, defaultdict(list)
    for node in graph.nodes:
        for t in node.outputs:
            producers[t.name] = node
        for t in node.inputs:
            consumers[t.name].append(node)
    return {"producers": producers, "consumers": dict(consumers)}


def _numel(shape) -> int:
    if shape is None or any(not isinstance(d, int) for d in shape):
        return 0
    return int(np.prod(shape)) if len(shape) else 1


def node_macs(node: gs.Node, shapes: dict) -> int:
    """Multiply-accumulates of one node (0 for ops without a dominant multiply-add)."""
    op = node.op
    out = shapes.get(node.outputs[0].name) if node.outputs else None
    if op in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
        w = node.inputs[1].shape
        if w is None:
            return 0
        if op == "Conv":
            return _numel(out) * int(np.prod(w[1:]))
        x = shapes.get(node.inputs[0].name)
        return _numel(x) * int(np.prod(w[1:]))
    if op in ("Gemm", "MatMul"):
        a = shapes.get(node.inputs[0].name)
        if out is None or a is None or len(a) == 0:
            return 0
        k = a[0] if (op == "Gemm" and node.attrs.get("transA", 0)) else a[-1]
        return _numel(out) * int(k) if isinstance(k, int) else 0
    return 0


@analysis("flops")
def flops(graph: gs.Graph, ctx) -> dict:
    """Per-node MACs and parameter counts, and totals."""
    shapes_ = ctx.analyses.get("shapes", graph) if ctx is not None else shapes(graph, None)
    per_node = {}
    for node in graph.nodes:
        params = sum(int(t.values.size) for t in node.inputs if isinstance(t, gs.Constant) and t.values.dtype.kind == "f")
        per_node[node.name] = {"op": node.op, "macs": node_macs(node, shapes_), "params": params}
    total_params = sum(int(t.values.size) for t in graph.tensors().values()
                       if isinstance(t, gs.Constant) and t.values.dtype.kind == "f")
    return {"nodes": per_node, "macs": sum(v["macs"] for v in per_node.values()), "params": total_params}
