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


def is_static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def constant_value(tensor) -> np.ndarray | None:
    """The value of a tensor known at compile time (initializer or Constant node), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        v = attrs.get("value")
        if isinstance(v, gs.Constant):
            return v.values
    return None


def node_label(node) -> str:
    return f"node '{node.name or '?'}' ({node.op})"
