"""Control flow: If nodes whose condition is known at compile time become the branch they take; If and Loop
nodes that stay dynamic are refused by name before lowering.

Exported VADs and detectors often branch on a shape (`if x.shape[0] == 1: squeeze ...`); once the input shapes
are bound, folding makes such a condition a constant and inline_constant_ifs replaces the If by its taken
branch. A condition that depends on input data cannot be resolved: TVM 0.27's ONNX importer would evaluate both
branches eagerly (an untaken branch's out-of-range Gather would read out of bounds) and it has no Loop, so
refuse_dynamic_control_flow stops such graphs with one line naming the node."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import UnsupportedModel, printable
from .graph import constant_value, toposort

CONTROL_FLOW_OPS = ("If", "Loop", "Scan")
LOOP_WHY = "graphopt does not compile loops; unroll it when exporting (a Python loop of fixed length)"


def refuse_unshaped_loops(graph: gs.Graph, where: str) -> None:
    """A Loop / Scan in a graph whose outputs have unknown or symbolic shapes (a decoder looping until an end
    token): nothing downstream can be checked or compiled, so refuse it by name now rather than fail a pass's
    structural check later. Loops with known output shapes pass (passes leave them alone; compile refuses them)."""
    loops = [n for n in graph.nodes if n.op in ("Loop", "Scan")]
    if loops and any(t.shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in t.shape)
                     for t in graph.outputs):
        n = loops[0]
        raise UnsupportedModel(f"{where}: node '{printable(n.name or '?')}' ({n.op}): the shapes of its results "
                               f"cannot be inferred and {LOOP_WHY}")


def _all_graphs(graph: gs.Graph) -> list[gs.Graph]:
    graphs, stack = [], [graph]
    while stack:
        g = stack.pop()
        graphs.append(g)
        for n in g.nodes:
            stack.extend(n.subgraphs())
    return graphs


def _detach(graph: gs.Graph) -> None:
    """Disconnect every node of graph (and of its subgraphs) from the tensors it reads and writes, so tensors of
    an outer graph no longer list them as consumers."""
    for g in _all_graphs(graph):
        for n in g.nodes:
            n.inputs.clear()
            n.outputs.clear()


def _names_outside(graph: gs.Graph, node: gs.Node) -> set[str]:
    """Tensor and node names used in graph and all its subgraphs except node's own branches."""
    skip = {id(g) for sg in node.subgraphs() for g in _all_graphs(sg)}
    used = set()
    for g in _all_graphs(graph):
        if id(g) not in skip:
            used |= {n.name for n in g.nodes} | set(g.tensors().keys())
    return used


def _fresh(used: set[str], base: str) -> str:
    name, k = base, 0
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


def _taken_branch(node: gs.Node) -> tuple[gs.Graph, gs.Graph] | None:
    """(taken, other) for an If whose condition is a one-element constant, else None."""
    if node.op != "If" or (node.domain or "") not in ("", "ai.onnx") or not node.inputs:
        return None
    cond = constant_value(node.inputs[0])
    if cond is None or np.asarray(cond).size != 1:
        return None
    then_b, else_b = node.attrs.get("then_branch"), node.attrs.get("else_branch")
    if not isinstance(then_b, gs.Graph) or not isinstance(else_b, gs.Graph):
        return None
    return (then_b, else_b) if bool(np.asarray(cond).reshape(-1)[0]) else (else_b, then_b)


def inline_constant_ifs(graph: gs.Graph) -> int:
    """Replace every If of graph (not of its subgraphs) whose condition is a constant by the nodes of the branch
    it takes; the branch's tensors and nodes are renamed where their name is used elsewhere in the model, and its
    outputs feed the If's outputs through Identity nodes (remove-identity folds them away). Branches read tensors
    of the outer graph directly (onnx-graphsurgeon shares them). Nested Ifs moved up are handled in the same
    call. Returns how many Ifs were inlined."""
    inlined = 0
    work = [n for n in graph.nodes if n.op == "If"]
    while work:
        node = work.pop()
        branches = _taken_branch(node)
        if branches is None:
            continue
        taken, other = branches
        used = _names_outside(graph, node)
        main = {id(t) for t in graph.tensors().values()}
        local = {id(t): t for n in taken.nodes for t in list(n.inputs) + list(n.outputs)
                 if t.name and id(t) not in main}
        for t in local.values():
            t.name = _fresh(used, t.name)
        for n in taken.nodes:
            n.name = _fresh(used, n.name or n.op)
        moved, outs, results = list(taken.nodes), list(node.outputs), list(taken.outputs)
        node.inputs.clear()
        node.outputs.clear()
        _detach(other)
        at = next(i for i, n in enumerate(graph.nodes) if n is node)
        graph.nodes[at:at + 1] = moved
        for out, res in zip(outs, results):
            graph.nodes.append(gs.Node("Identity", _fresh(used, f"{node.name or 'If'}_out"), inputs=[res],
                                       outputs=[out]))
        taken.nodes.clear()
        work.extend(n for n in moved if n.op == "If")
        inlined += 1
    if inlined:
        toposort(graph)
    return inlined


def _source_inputs(graph: onnx.GraphProto, tensor: str) -> list[str]:
    """The graph inputs whose values tensor is computed from (walking producers back, without recursion)."""
    producer = {o: n for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    found, seen, todo = [], set(), [tensor]
    while todo:
        t = todo.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in inputs:
            found.append(t)
        elif t in producer:
            todo.extend(producer[t].input)
    return sorted(found)


def refuse_dynamic_control_flow(model: onnx.ModelProto, where: str) -> None:
    """Raise UnsupportedModel naming the first If / Loop / Scan node left in the graph (subgraphs included) and,
    for an If of the main graph, the inputs its condition is computed from."""
    stack = [model.graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            if node.op_type in CONTROL_FLOW_OPS and node.domain in ("", "ai.onnx"):
                label = f"node '{printable(node.name or '?')}' ({node.op_type})"
                if node.op_type == "If":
                    src = _source_inputs(g, node.input[0]) if g is model.graph else []
                    whose = f"the values of input(s) {', '.join(repr(printable(n)) for n in src)}" if src else \
                        "values computed at run time"
                    fix = (" ".join(f"--input-value {printable(n)}=VALUE" for n in src) if src else
                           "export without the branch")
                    why = (f"its condition depends on {whose}; graphopt compiles an If only when its condition is a "
                           f"constant once the input shapes are bound: fix such inputs to a value ({fix}) or export "
                           f"without the branch")
                else:
                    why = LOOP_WHY
                raise UnsupportedModel(f"{where}: {label}: {why}")
            for a in node.attribute:
                stack.extend([a.g] if a.HasField("g") else list(a.graphs))
