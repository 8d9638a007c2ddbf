"""Inputs the model can take, for the self-checks (pass verification, compile's check against onnxruntime) and the
latency runs: the user's samples when given, else seeded random values within ranges read off the graph.

input_ranges(graph) finds, by following each graph input through layout-only ops (Cast, Reshape, Unsqueeze, ...):

* index inputs: an integer input that a Gather / GatherElements uses as indices draws from [0, n), n being the
  size of the indexed axis of the table (the smallest, when it indexes several): token_type_ids into an embedding
  of 2 rows get 0 and 1, never 3;
* masks: an input whose name contains "mask", or that reaches a comparison, the condition of a Where or the
  right-hand side of `1 - x`, draws 0 or 1 with at least one 1 along its last axis (a random attention mask with
  an all-zero row makes a softmax over nothing: NaN).

Other integer inputs keep ort.random_inputs' small non-negative values.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import ort

#: ops that only move or retype an input's values (followed through their first input)
_LAYOUT_OPS = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Transpose", "Slice",
               "CastLike")
#: ops whose output has the shape of their first input (a Gather table computed from a constant through them)
_VALUE_OPS = ("DequantizeLinear", "QuantizeLinear", "Cast", "Mul", "Identity")
_COMPARE_OPS = ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor")


def _is_one(t) -> bool:
    return isinstance(t, gs.Constant) and t.values.size > 0 and bool(np.all(np.asarray(t.values) == 1))


def _uses(t: gs.Variable):
    """(node, input index) for every use of t and of what layout-only ops make of it."""
    seen, stack = set(), [t]
    while stack:
        cur = stack.pop()
        for node in cur.outputs:
            for i, inp in enumerate(node.inputs):
                if inp is not cur:
                    continue
                yield node, i
                if node.op in _LAYOUT_OPS and i == 0:
                    for out in node.outputs:
                        if out.name not in seen:
                            seen.add(out.name)
                            stack.append(out)


def _table_shape(t):
    """The shape of a Gather's table; when shape inference left it unknown (a quantized table read through
    DequantizeLinear, an int8 table dequantized by Cast and Mul), the shape of the constant it is computed from."""
    for _ in range(8):
        if t.shape is not None or isinstance(t, gs.Constant) or len(t.inputs) != 1:
            break
        node = t.inputs[0]
        if node.op not in _VALUE_OPS or not node.inputs:
            break
        t = node.inputs[0]
    return tuple(t.values.shape) if isinstance(t, gs.Constant) else t.shape


def input_ranges(graph: gs.Graph) -> dict[str, dict]:
    """{input name: {"kind": "index", "high": n} or {"kind": "mask"}} for the inputs whose values matter."""
    out = {}
    for t in graph.inputs:
        highs, mask = [], "mask" in t.name.lower()
        for node, i in _uses(t):
            if node.op in ("Gather", "GatherElements") and i == 1:
                shape = _table_shape(node.inputs[0])
                axis = int(node.attrs.get("axis", 0))
                if shape is not None and -len(shape) <= axis < len(shape) and isinstance(shape[axis], int):
                    highs.append(int(shape[axis]))
            elif node.op in _COMPARE_OPS or (node.op == "Where" and i == 0) or \
                    (node.op == "Sub" and i == 1 and _is_one(node.inputs[0])):
                mask = True
        if mask:
            out[t.name] = {"kind": "mask"}
        elif highs and min(highs) > 0:
            out[t.name] = {"kind": "index", "high": min(highs)}
    return out


def file_input_ranges(path) -> dict[str, dict]:
    """input_ranges of the ONNX file at path (an artifact's model.onnx), weights not read."""
    import onnx

    from .graph import from_onnx
    return input_ranges(from_onnx(onnx.load(str(path), load_external_data=False)))


def describe(ranges: dict[str, dict]) -> str:
    """One line for reports: how the seeded inputs were bounded."""
    parts = [f"{n} in [0, {r['high']})" if r["kind"] == "index" else f"{n} 0/1 mask" for n, r in ranges.items()]
    return "seeded random inputs" + (f" ({', '.join(parts)})" if parts else "")


def seeded_inputs(graph: gs.Graph, specs, seed: int = 0) -> dict[str, np.ndarray]:
    """ort.random_inputs for specs [(name, shape, dtype)] within the graph's input_ranges."""
    return ort.random_inputs(specs, seed, input_ranges(graph))
