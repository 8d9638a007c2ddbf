"""prune-channels' removal: a Plan (which channel units go) applied to a graph. Every parameter slice the
channel-groups analysis recorded is cut (a shared constant once, shared still), then each rule's rewrite edits its
node through an Edit (graphopt/prune_rules), and shapes are inferred again."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import channel_groups as cg
from graphopt.errors import BadInput, CheckFailed, GraphoptError
from graphopt.graph import Names as FreshNames, constant_value, toposort
from graphopt.prune_rules import Edit
from graphopt.shapes import infer


@dataclass
class Plan:
    """What to remove: the analysis (records by node index and tensor name) and a removed flag per unit."""
    groups: cg.ChannelGroups
    removed: np.ndarray

    def keep(self, slots) -> np.ndarray:
        return ~self.removed[self.groups.classes(slots)]


class Names(FreshNames):
    """graph.Names, with `made` to share pruned constants."""
    def __init__(self, graph):
        super().__init__(graph)
        self.made = {}      # (source constant, edit) -> its pruned constant, shared by every consumer that agrees


def nodes_for(graph: gs.Graph, groups: cg.ChannelGroups) -> list[gs.Node]:
    """The graph's nodes, which must be those the analysis indexed."""
    nodes = list(graph.nodes)
    if len(nodes) != len(groups.nodes) or any(a.op != b.op for a, b in zip(nodes, groups.nodes)):
        raise GraphoptError("prune-channels: the plan was made for another graph (node lists differ)")
    return nodes


def _set_const(node, i, values, names, base, key=None):
    """Make input i a constant holding values (an array; or, with a key, a function making it, called for the first
    consumer only). Consumers of one constant that get the same edit (key, by default the new values) share one new
    constant, so a shared initializer stays shared and is sliced once."""
    if key is None:
        values = np.ascontiguousarray(values)
        key = (values.dtype.str, values.shape, values.tobytes())
    key = (node.inputs[i].name, key)
    if key not in names.made:
        names.made[key] = gs.Constant(names(base), np.ascontiguousarray(values() if callable(values) else values))
    node.inputs[i] = names.made[key]


def apply_removal(graph: gs.Graph, plan: Plan) -> gs.Graph:
    """Remove the plan's channels from `graph` (edited in place; shapes re-inferred into the returned graph)."""
    g = plan.groups
    nodes = nodes_for(graph, g)
    names = Names(graph)
    edits = defaultdict(list)
    for p in g.params:
        k = plan.keep(p.slots)
        if not k.all():
            edits[(p.node, p.input)].append((p.axis, k))
    for (ni, ii), lst in edits.items():
        node = nodes[ni]
        t = node.inputs[ii]
        keep = {}
        for axis, k in lst:
            keep.setdefault(axis, k)

        def sliced(node=node, ii=ii, t=t, keep=keep):
            v = constant_value(t)
            for axis, k in keep.items():
                if v.shape[axis] != len(k):
                    raise CheckFailed(f"prune-channels: internal error: {cg.ChannelGroups.label(None, node)} input "
                                      f"{ii} axis {axis} has {v.shape[axis]} positions, the plan {len(k)}")
                v = np.compress(k, v, axis=axis)
            return v
        _set_const(node, ii, sliced, names, (t.name or node.name) + "_pruned",
                   key=tuple(sorted((a, k.tobytes()) for a, k in keep.items())))
    opset = int(getattr(graph, "opset", 17) or 17)
    edit = Edit(plan.keep, lambda node, i, values, base: _set_const(node, i, values, names, base), names, opset)
    for r in g.rewrites:
        r.rule.rewrite(nodes[r.node], r.data, edit)
    keep_shapes = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in keep_shapes:
            t.shape = None
    toposort(graph.cleanup(remove_unused_graph_inputs=False))
    try:
        return infer(graph, "pruned graph")
    except BadInput as e:
        raise CheckFailed(f"prune-channels produced a graph that fails shape inference: {e}") from None
