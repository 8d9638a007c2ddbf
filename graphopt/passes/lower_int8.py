"""lower-int8: exact rewrites that move data-movement ops of a QDQ graph onto the integer tensors.

A QDQ graph (from `quantize{scheme=int8}`) wraps every op in DequantizeLinear -> op -> QuantizeLinear. For ops
that only move or select values, with the same scale and zero point on both sides, that round trip is the
identity on the integers, so the op can run on the quantized tensor itself:

    DequantizeLinear(q, s, z) -> MaxPool | Reshape | Flatten | Transpose | Squeeze | Unsqueeze
        | Resize (mode nearest) -> QuantizeLinear(s, z)   ==>  the op on q
    DequantizeLinear(q, s, z) -> Relu -> QuantizeLinear(s, z)   ==>  Max(q, z)   (z is zero for s8: plain max)

Exactness: DequantizeLinear then QuantizeLinear with the same (s, z) returns q exactly, MaxPool / Max commute
with the monotone dequantization, and integer MaxPool's padding (the type's lowest value) never wins, like
fp32's -inf. Then every quantized elementwise chain (hardswish, sigmoid, a scalar multiply... between a
DequantizeLinear of one 8-bit tensor and a QuantizeLinear) becomes a 256-entry table lookup computed by
onnxruntime (lower_int8_tables.py). The PassManager checks the outputs in onnxruntime (an exact pass). The
result is standard ONNX that onnxruntime runs (integer MaxPool / Max / Reshape ..., Gather of a table).

Why: the cpu target (targets/int8/) lowers DequantizeLinear -> Conv/MatMul/Gemm -> QuantizeLinear chains to
integer kernels that keep activations NHWC; an integer MaxPool between two of them runs in that layout with no
dequantize / quantize / layout conversion. The pass changes nothing in graphs without QuantizeLinear, so the cpu
target can run it as part of its legalization.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import constant_value, toposort
from graphopt.op_traits import traits
from graphopt.passmanager import Pass, PassResult, register

from .lower_int8_tables import qparams as _qparams, rewrite_tables


def _same(a, b) -> bool:
    return (np.array_equal(a[0].reshape(()), b[0].reshape(())) and a[1].dtype == b[1].dtype
            and np.array_equal(a[1].reshape(()), b[1].reshape(())))


def _consumers(graph_consumers, tensor):
    return graph_consumers.get(tensor.name, [])


def _nearest_resize(node: gs.Node) -> bool:
    """A Resize in mode nearest (ONNX's default): it copies input values, so it runs on the integers as they are."""
    mode = node.attrs.get("mode", "nearest")
    return node.op == "Resize" and (mode.decode() if isinstance(mode, bytes) else mode) == "nearest"


@register
class LowerInt8(Pass):
    name = "lower-int8"
    help = ("Run MaxPool/Reshape/Flatten/Transpose/Relu/nearest Resize between QDQ pairs on the integer tensors "
            "(exact)")
    options = {}

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        if not any(n.op == "QuantizeLinear" for n in graph.nodes):
            return PassResult(graph, False, {"rewritten": {}})
        out_names = {t.name for t in graph.outputs}
        counts: dict[str, int] = {}
        changed = True
        while changed:
            changed = False
            cons: dict[str, list] = {}
            for n in graph.nodes:
                for t in n.inputs:
                    cons.setdefault(t.name, []).append(n)
            for node in list(graph.nodes):
                if not (traits(node.op).int8_passthrough or node.op == "Relu" or _nearest_resize(node)) \
                        or not node.inputs or len(node.outputs) != 1:
                    continue
                x = node.inputs[0]
                if len(x.inputs) != 1 or x.inputs[0].op != "DequantizeLinear":
                    continue
                dq = x.inputs[0]
                y = node.outputs[0]
                users = _consumers(cons, y)
                if y.name in out_names or len(users) != 1 or users[0].op != "QuantizeLinear":
                    continue
                q = users[0]
                pin, pout = _qparams(dq), _qparams(q)
                if pin is None or pout is None or not _same(pin, pout):
                    continue
                if q.inputs[0] is not y:
                    continue
                qin = dq.inputs[0]
                qout = q.outputs[0]
                if node.op == "Relu":
                    zp = pout[1].reshape(())
                    new = gs.Node("Max", f"{node.name}/int8", inputs=[qin, gs.Constant(f"{node.name}/int8_zero_point",
                                                                                        np.array(zp, zp.dtype))],
                                  outputs=[qout])
                else:
                    if node.op == "MaxPool" and (len(node.outputs) != 1 or int(node.attrs.get("storage_order", 0))):
                        continue
                    new = gs.Node(node.op, f"{node.name}/int8", attrs=dict(node.attrs),
                                  inputs=[qin] + list(node.inputs[1:]), outputs=[qout])
                q.outputs.clear()
                node.outputs.clear()
                graph.nodes.append(new)
                counts[node.op] = counts.get(node.op, 0) + 1
                changed = True
            if changed:
                toposort(graph.cleanup(remove_unused_graph_inputs=False))
        tables = rewrite_tables(graph)
        if tables:
            counts["table"] = tables
        return PassResult(graph, bool(counts), {"rewritten": counts})
