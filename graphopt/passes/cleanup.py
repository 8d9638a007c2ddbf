"""cleanup: the exact cleanup passes run in order until none of them changes the graph."""
from graphopt.passmanager import Option, Pass, PassResult, make_pass, register

CLEANUP_PIPELINE = ("fold-constants", "remove-identity", "fold-batchnorm", "eliminate-dead-code", "infer-shapes")


@register
class Cleanup(Pass):
    name = "cleanup"
    help = "Alias: " + ",".join(CLEANUP_PIPELINE) + " repeated to a fixed point"
    options = {"max_iterations": Option(int, 8, "stop after this many rounds", minimum=1)}

    def run(self, graph, ctx):
        passes = [make_pass(n) for n in CLEANUP_PIPELINE]
        modified, rounds, changed_by = False, 0, {}
        for rounds in range(1, self.opts["max_iterations"] + 1):
            round_changed = False
            for p in passes:
                r = p.run(graph, ctx)
                graph = r.graph
                if r.modified:
                    ctx.analyses.invalidate(keep=p.preserves, graph=graph)
                    if p.name != "infer-shapes":
                        round_changed = True
                        changed_by[p.name] = changed_by.get(p.name, 0) + 1
            modified = modified or round_changed
            if not round_changed:
                break
        return PassResult(graph, modified, {"rounds": rounds, "changed_by": changed_by})
