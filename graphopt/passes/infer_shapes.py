"""infer-shapes: annotate every tensor with its shape and dtype (onnx shape inference, data propagation)."""
from graphopt.passmanager import Pass, PassResult, register
from graphopt.shapes import infer


@register
class InferShapes(Pass):
    name = "infer-shapes"
    help = "Annotate every tensor with its inferred shape and dtype"
    in_place = False        # shapes.infer returns an annotated copy

    def run(self, graph, ctx):
        known_before = {n for n, t in graph.tensors().items() if t.shape is not None}
        graph = infer(graph)
        newly = [n for n, t in graph.tensors().items() if t.shape is not None and n not in known_before]
        return PassResult(graph, bool(newly), {"annotated_tensors": len(newly)})
