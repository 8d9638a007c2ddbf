"""eliminate-dead-code: drop nodes and initializers that no graph output depends on."""
import onnx_graphsurgeon as gs

from graphopt.graph import toposort
from graphopt.passmanager import Pass, PassResult, register


@register
class EliminateDeadCode(Pass):
    name = "eliminate-dead-code"
    help = "Remove nodes and initializers no output depends on (graph inputs are kept: they are the interface)"

    def run(self, graph, ctx):
        def count(g):
            return len(g.nodes), sum(1 for t in g.tensors().values() if isinstance(t, gs.Constant))
        before = count(graph)
        toposort(graph.cleanup(remove_unused_graph_inputs=False, remove_unused_node_outputs=False))
        after = count(graph)
        return PassResult(graph, after != before, {"removed_nodes": before[0] - after[0]})
