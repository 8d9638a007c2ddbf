"""factorize-lowrank's graph rewrite: a layer replaced by its factors as a chain of nodes of its own kind, named
'<node>/lowrank_{in,core,out}'."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import Names, np_dtype

from .factorize_math import Layer

MARK = "/lowrank_"


def _with_channels(shape, c):
    if shape is None or len(shape) < 2:
        return None
    return [shape[0], c] + list(shape[2:])


def _rewrite(graph: gs.Graph, lay: Layer, nodes_spec: list, names: Names) -> None:
    """Replace lay.node by a chain. nodes_spec: [(suffix, op, inputs, attrs, out_shape)] in order; an input given
    as None is the previous node's output; the last node writes the original output tensor (names are kept)."""
    node = lay.node
    base = node.name or f"{node.op}_{node.outputs[0].name}"
    out = node.outputs[0]
    dtype = np_dtype(out) if out.dtype is not None else np.dtype(np.float32)
    prev, new_nodes = None, []
    for k, (suffix, op, inputs, attrs, shape) in enumerate(nodes_spec):
        ins = [prev if t is None else t for t in inputs]
        if k == len(nodes_spec) - 1:
            o = out
        else:
            o = gs.Variable(names(f"{base}{MARK}{suffix}_out"), dtype=dtype, shape=shape)
        new_nodes.append(gs.Node(op, names(f"{base}{MARK}{suffix}"), attrs=attrs, inputs=ins, outputs=[o]))
        prev = o
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.extend(new_nodes)


def _const_t(names: Names, base: str, value: np.ndarray, dtype) -> gs.Constant:
    return gs.Constant(names(base), np.ascontiguousarray(value.astype(dtype)))


def apply_svd(graph, lay: Layer, P: np.ndarray, Q: np.ndarray, shapes: dict, names: Names) -> None:
    node = lay.node
    base = node.name or f"{node.op}_{node.outputs[0].name}"
    r = P.shape[1]
    if node.op == "Gemm":
        B = node.inputs[1]
        dt = B.values.dtype
        tB = int(node.attrs.get("transB", 0))
        tA = int(node.attrs.get("transA", 0))
        a_shape = shapes.get(node.inputs[0].name)
        m = (a_shape[1] if tA else a_shape[0]) if a_shape is not None and len(a_shape) == 2 else None
        w1 = _const_t(names, f"{base}{MARK}in.weight", P.T if tB else P, dt)
        w2 = _const_t(names, f"{base}{MARK}out.weight", Q.T if tB else Q, dt)
        a1 = {"transA": tA, "transB": tB} if tA else {"transB": tB}
        a2 = {"transB": tB}
        ins2 = [None, w2]
        if len(node.inputs) > 2 and node.inputs[2].name:
            ins2.append(node.inputs[2])
            a2["beta"] = float(node.attrs.get("beta", 1.0))
        spec = [("in", "Gemm", [node.inputs[0], w1], a1, [m, r]), ("out", "Gemm", ins2, a2, None)]
    elif node.op == "MatMul":
        dt = node.inputs[1].values.dtype
        a_shape = shapes.get(node.inputs[0].name)
        w1 = _const_t(names, f"{base}{MARK}in.weight", P, dt)
        w2 = _const_t(names, f"{base}{MARK}out.weight", Q, dt)
        mid = list(a_shape[:-1]) + [r] if a_shape is not None and len(a_shape) >= 1 else None
        spec = [("in", "MatMul", [node.inputs[0], w1], {}, mid), ("out", "MatMul", [None, w2], {}, None)]
    else:  # pointwise Conv: lay.W = W.reshape(N, C).T ~ P Q: conv C -> r with weight P^T, then r -> N with Q^T
        Wc = node.inputs[1].values
        dt, nd = Wc.dtype, Wc.ndim - 2
        ones = [1] * nd
        w1 = _const_t(names, f"{base}{MARK}in.weight", P.T.reshape([r, Wc.shape[1]] + ones), dt)
        w2 = _const_t(names, f"{base}{MARK}out.weight", Q.T.reshape([Wc.shape[0], r] + ones), dt)
        a1 = {k: v for k, v in node.attrs.items() if k != "group"}
        a1["kernel_shape"] = ones
        ins2 = [None, w2] + ([node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2].name else [])
        spec = [("in", "Conv", [node.inputs[0], w1], a1, _with_channels(shapes.get(node.outputs[0].name), r)),
                ("out", "Conv", ins2, {"kernel_shape": ones}, None)]
    _rewrite(graph, lay, spec, names)


def apply_tucker(graph, lay: Layer, U_in, core, U_out, shapes: dict, names: Names) -> None:
    node = lay.node
    base = node.name or f"{node.op}_{node.outputs[0].name}"
    Wc = node.inputs[1].values
    dt, nd = Wc.dtype, Wc.ndim - 2
    ones = [1] * nd
    x = node.inputs[0]
    spec = []
    if U_in is not None:
        w = _const_t(names, f"{base}{MARK}in.weight", U_in.T.reshape([U_in.shape[1], U_in.shape[0]] + ones), dt)
        spec.append(("in", "Conv", [x, w], {"kernel_shape": ones},
                     _with_channels(shapes.get(x.name), U_in.shape[1])))
        x = None
    bias = [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2].name else []
    a_core = {k: v for k, v in node.attrs.items() if k != "group"}
    wc = _const_t(names, f"{base}{MARK}core.weight", core, dt)
    if U_out is not None:
        spec.append(("core", "Conv", [x, wc], a_core, _with_channels(shapes.get(node.outputs[0].name), core.shape[0])))
        w = _const_t(names, f"{base}{MARK}out.weight", U_out.reshape([U_out.shape[0], U_out.shape[1]] + ones), dt)
        spec.append(("out", "Conv", [None, w] + bias, {"kernel_shape": ones}, None))
    else:
        spec.append(("core", "Conv", [x, wc] + bias, a_core, None))
    _rewrite(graph, lay, spec, names)
