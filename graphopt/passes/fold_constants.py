"""fold-constants: evaluate every subgraph whose inputs are known at compile time."""
from graphopt.folding import fold
from graphopt.passmanager import Option, Pass, PassResult, register


@register
class FoldConstants(Pass):
    name = "fold-constants"
    help = "Evaluate subgraphs whose inputs are all constants (shape computations included) into initializers"
    options = {"max_rounds": Option(int, 32, "at most this many folding rounds with shape inference in between", minimum=1)}

    def run(self, graph, ctx):
        nodes_before = len(graph.nodes)
        graph, changed = fold(graph, self.opts["max_rounds"])
        return PassResult(graph, changed, {"folded_nodes": nodes_before - len(graph.nodes)})
