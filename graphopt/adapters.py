"""The adapters insert-adapters leaves in a student graph, as distillation reads and removes them: found by their
tags (graphopt.metadata.adapter_tags) and their "<tensor>__adapted" outputs."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from . import metadata

ADAPTED_SUFFIX = "__adapted"


def adapter_pairs(graph: gs.Graph) -> list[dict]:
    """[{student, teacher, output, kind}] for the adapters in `graph`, in insertion order."""
    tags = metadata.adapter_tags(graph)
    found, order = {}, []
    for node in graph.nodes:
        meta = tags.get(node.name)
        if meta is None:
            continue
        key = (meta.student, meta.teacher)
        if key not in found:
            found[key] = {"student": meta.student, "teacher": meta.teacher, "output": None, "kind": None}
            order.append(key)
        for o in node.outputs:
            if o.name.endswith(ADAPTED_SUFFIX) or ADAPTED_SUFFIX + "_" in o.name:
                found[key]["output"] = o.name
        if meta.part in ("conv", "matmul", "identity"):
            found[key]["kind"] = {"conv": "conv1x1", "matmul": "linear", "identity": "identity"}[meta.part]
    return [found[k] for k in order]


def remove_adapters(graph: gs.Graph) -> gs.Graph:
    """Take every adapter node and its "__adapted" output out of the graph (in place; also returned). Nothing
    else is touched: no cleanup, no reordering, so the student comes back exactly as it was before insertion."""
    tags = metadata.adapter_tags(graph)
    if tags:
        metadata.set_adapter_tags(graph, {})
    adapters = [n for n in graph.nodes if n.name in tags]
    if not adapters:
        return graph
    produced = {id(t) for n in adapters for t in n.outputs}
    graph.outputs = [t for t in graph.outputs if id(t) not in produced]
    for n in adapters:
        n.inputs.clear()
        n.outputs.clear()
    dead = {id(n) for n in adapters}
    graph.nodes = [n for n in graph.nodes if id(n) not in dead]
    return graph
