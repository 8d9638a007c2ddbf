"""graph.toposort: iterative (no recursion that grows with graph depth), stable, aware of subgraph reads."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

import graphopt
import onnx_builders as ob
from graphopt.errors import UnsupportedModel
from graphopt.graph import toposort

pytestmark = pytest.mark.fast


def _chain(n):
    """x -> Relu -> Relu -> ... (n nodes), with the node list reversed (every node before its producer)."""
    x = gs.Variable("x", dtype=np.float32, shape=[4])
    nodes, t = [], x
    for i in range(n):
        y = gs.Variable(f"t{i}", dtype=np.float32, shape=[4])
        nodes.append(gs.Node("Relu", f"relu{i}", inputs=[t], outputs=[y]))
        t = y
    return gs.Graph(nodes=nodes[::-1], inputs=[x], outputs=[t], opset=17)


def test_sorts_a_chain_deeper_than_the_recursion_limit():
    """onnx-graphsurgeon's toposort recurses once per level and raises RecursionError here."""
    g = toposort(_chain(5000))
    assert [n.name for n in g.nodes] == [f"relu{i}" for i in range(5000)]


def test_keeps_a_sorted_order_and_orders_independent_nodes_stably():
    x = gs.Variable("x", dtype=np.float32, shape=[4])
    outs = [gs.Variable(f"y{i}", dtype=np.float32, shape=[4]) for i in range(4)]
    nodes = [gs.Node(op, f"n{i}", inputs=[x], outputs=[outs[i]]) for i, op in enumerate(["Relu", "Neg", "Abs", "Exp"])]
    g = gs.Graph(nodes=list(nodes), inputs=[x], outputs=outs, opset=17)
    assert [n.name for n in toposort(g).nodes] == ["n0", "n1", "n2", "n3"]


def test_a_node_with_a_subgraph_follows_the_producers_of_what_the_subgraph_reads():
    """The If's branches read 'a', produced by a node listed after the If: the If must move behind it."""
    then_g = helper.make_graph([helper.make_node("Relu", ["a"], ["o"], name="then_relu")], "then", [],
                               [ob.vi("o", [4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["a"], ["o2"], name="else_neg")], "else", [],
                               [ob.vi("o2", [4])])
    nodes = [helper.make_node("Abs", ["x"], ["a"], name="abs"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    m = ob.model(nodes, [ob.vi("x", [4]), ob.vi("c", [], TensorProto.BOOL)], [ob.vi("y", [4])])
    g = graphopt.graph.from_onnx(m)
    g.nodes = g.nodes[::-1]
    assert [n.name for n in toposort(g).nodes] == ["abs", "if"]


def test_a_cycle_is_reported_by_node():
    g = _chain(3)
    g.nodes[-1].inputs[0] = g.nodes[0].outputs[0]       # relu0 now reads relu2's output
    with pytest.raises(UnsupportedModel, match="cycle through node 'relu"):
        toposort(g)
