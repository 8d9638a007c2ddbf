"""The one IR: an onnx-graphsurgeon Graph. Helpers to move between it and ModelProto and to read its I/O."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

# onnxruntime 1.18+ reads IR 10; newer onnx writes newer IR versions by default.
MAX_IR_VERSION = 10


def from_onnx(model: onnx.ModelProto) -> gs.Graph:
    g = gs.import_onnx(model)
    g.producer_name = model.producer_name or "graphopt"
    return g


def to_onnx(graph: gs.Graph, check: bool = False) -> onnx.ModelProto:
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    if not model.producer_name:
        model.producer_name = "graphopt"
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def copy(graph: gs.Graph) -> gs.Graph:
    return from_onnx(to_onnx(graph))


def np_dtype(t) -> np.dtype:
    dt = t.dtype
    if dt is None:
        return np.dtype(np.float32)
    if isinstance(dt, int):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dt))
    return np.dtype(dt)


def input_specs(graph: gs.Graph) -> list[tuple[str, tuple, np.dtype]]:
    return [(t.name, tuple(t.shape or ()), np_dtype(t)) for t in graph.inputs]


def output_specs(graph: gs.Graph) -> list[tuple[str, tuple, np.dtype]]:
    return [(t.name, tuple(t.shape) if t.shape is not None else None, np_dtype(t)) for t in graph.outputs]


def constant_node_value(node: gs.Node) -> np.ndarray | None:
    """The value a Constant node produces (value / value_float(s) / value_int(s) forms), else None."""
    attrs = node.attrs
    if "value" in attrs:
        v = attrs["value"]
        return v.values if isinstance(v, gs.Constant) else np.asarray(v)
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    return None


def constant_value(tensor) -> np.ndarray | None:
    """The value of a tensor known at compile time (initializer or Constant node), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        return constant_node_value(tensor.inputs[0])
    return None


def node_label(node) -> str:
    return f"node '{node.name or '?'}' ({node.op})"
