"""cleanup: the exact cleanup passes, run as a nested pipeline until the graph stops changing."""
from graphopt.graph import fingerprint
from graphopt.passmanager import Option, Pass, PassManager, PassResult, make_pass, register

CLEANUP_PIPELINE = ("fold-constants", "remove-identity", "fold-batchnorm", "eliminate-dead-code", "infer-shapes")


@register
class Cleanup(Pass):
    name = "cleanup"
    help = "Alias: " + ",".join(CLEANUP_PIPELINE) + " repeated to a fixed point"
    options = {"max_iterations": Option(int, 8, "stop after this many rounds", minimum=1)}

    def run(self, graph, ctx):
        # no instruments: the manager running cleanup checks it as a whole, like any pass
        rounds_pm = PassManager([make_pass(n) for n in CLEANUP_PIPELINE], instruments=[])
        changed_by, mark = {}, fingerprint(graph)
        for rounds in range(1, self.opts["max_iterations"] + 1):
            res = rounds_pm.run(graph, ctx)
            graph = res.graph
            for p, rec in zip(rounds_pm.passes, res.records):
                if rec["modified"] and p.name != "infer-shapes":      # annotating shapes computes nothing new
                    changed_by[p.name] = changed_by.get(p.name, 0) + 1
            mark, previous = fingerprint(graph), mark
            if mark == previous:
                break
        return PassResult(graph, bool(changed_by), {"rounds": rounds, "changed_by": changed_by})
