"""Structural Before/Expected tests: graphs written as onnx.parser text, a pipeline run on the first, the result
compared with the second by structure (ops, attributes, edges, constants' dtypes, shapes and values), ignoring
node names and the names of intermediate tensors and constants."""
import difflib

import onnx
import onnx.parser
from onnx import helper, numpy_helper

import graphopt
from graphopt import PassManager
from graphopt.graph import to_onnx

#: the header of every test model: ONNX opset 17
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def parse(text: str) -> onnx.ModelProto:
    """An onnx.parser model text (HEADER added when it has none), checked."""
    model = onnx.parser.parse_model(text if text.lstrip().startswith("<") else HEADER + text)
    onnx.checker.check_model(model, full_check=True)
    return model


def run_pipeline(before: str, pipeline: str, ctx=None, fold_constants: bool = True) -> onnx.ModelProto:
    """Load the `before` text as graphopt loads a file (fold_constants=False: without the loader's folding, which
    would already fold constants and drop dead nodes), run the pipeline (with its checks), return the result."""
    res = PassManager.parse(pipeline).run(graphopt.load(parse(before), fold_constants=fold_constants), ctx)
    return to_onnx(res.graph)


def _constant(t: onnx.TensorProto, values: bool = True) -> str:
    v = numpy_helper.to_array(t)
    return f"{v.dtype}{list(v.shape)}" + (f"={v.reshape(-1).tolist()}" if values else "")


def _dataflow_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes in an order that depends only on the data flow: producers first, depth first from the graph
    outputs in order, each node's inputs in order; nodes no output depends on last, in their own order."""
    producer = {o: n for n in graph.node for o in n.output if o}
    order, done = [], set()
    for out in graph.output:
        stack = [(producer.get(out.name), False)]
        while stack:
            node, expanded = stack.pop()
            if node is None or id(node) in done:
                continue
            if expanded:
                done.add(id(node))
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((producer.get(i), False) for i in reversed(node.input))
    return order + [n for n in graph.node if id(n) not in done]


def canonical(model: onnx.ModelProto, values: bool = True, any_order: bool = False) -> list[str]:
    """One line per graph input, node and graph output; tensors named by what they are (graph inputs and outputs
    by name, constants by content (values=False: by dtype and shape only), other tensors by the node that makes
    them). Nodes in the graph's order, or with any_order in an order given by the data flow alone."""
    g = model.graph
    consts = {t.name: _constant(t, values) for t in g.initializer}
    outputs = {o.name for o in g.output}
    names = {}
    lines = [f"input {i.name}: {onnx.helper.printable_type(i.type)}" for i in g.input if i.name not in consts]

    def ref(name):
        if name == "":
            return "-"
        if name in consts:
            return consts[name]
        return names.get(name, name)
    for k, node in enumerate(_dataflow_order(g) if any_order else g.node):
        ins = ", ".join(ref(n) for n in node.input)
        for j, n in enumerate(node.output):
            if n not in outputs:
                names[n] = f"%{k}.{j}"
        outs = ", ".join(ref(n) for n in node.output)
        attrs = sorted((a.name, helper.get_attribute_value(a)) for a in node.attribute)
        attrs = ", ".join(f"{a}={_constant(v) if isinstance(v, onnx.TensorProto) else v}" for a, v in attrs)
        lines.append(f"{outs} = {node.domain + '.' if node.domain else ''}{node.op_type}({ins}) {{{attrs}}}")
    lines += [f"output {ref(o.name)}" for o in g.output]
    return lines


def assert_same_graph(got: onnx.ModelProto, expected, values: bool = True, any_order: bool = False) -> None:
    """`got` has the structure of `expected` (a ModelProto or onnx.parser text); values=False compares constants by
    dtype and shape only (for weights a pass draws at random or fits to data); any_order=True ignores the order of
    independent nodes (for graphs whose node order another library decides)."""
    if isinstance(expected, str):
        expected = parse(expected)
    a, b = canonical(got, values, any_order), canonical(expected, values, any_order)
    assert a == b, "graphs differ (- got, + expected):\n" + "\n".join(difflib.unified_diff(a, b, lineterm="", n=1))
