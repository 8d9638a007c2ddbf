"""Checks on user data and weights that stop garbage before it is used: non-finite values in training, calibration
or evaluation arrays (refused up front, naming the array and the first bad row; graphopt does not silently drop
rows), labels outside the model's classes, and non-finite weights (never trained on, never written)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .errors import BadInput

#: rows checked at a time, so a check on a large array does not allocate a full-size boolean copy
_ROWS_PER_CHUNK = 4096

#: ops whose constant inputs after the first are weights (a NaN there makes every output garbage)
WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "LayerNormalization",
              "InstanceNormalization", "GroupNormalization", "PRelu", "LSTM", "GRU", "RNN"}


def first_nonfinite_row(a: np.ndarray) -> tuple[int, int] | None:
    """(index of the first row holding NaN or Inf, number of such rows), or None when every value is finite.
    Axis 0 is the row (the sample); a 0-d array is one row."""
    a = np.asarray(a)
    if a.dtype.kind not in "fc":
        return None
    if a.ndim == 0:
        return None if np.isfinite(a) else (0, 1)
    first, count = None, 0
    for i in range(0, len(a), _ROWS_PER_CHUNK):
        part = a[i:i + _ROWS_PER_CHUNK].reshape(min(_ROWS_PER_CHUNK, len(a) - i), -1)
        bad = ~np.isfinite(part).all(axis=1)
        if bad.any():
            count += int(bad.sum())
            if first is None:
                first = i + int(np.argmax(bad))
    return None if first is None else (first, count)


def check_finite(arrays: dict, what: str) -> None:
    """BadInput naming the first array (and row) that holds NaN or Inf."""
    for name, a in arrays.items():
        hit = first_nonfinite_row(a)
        if hit is not None:
            row, count = hit
            raise BadInput(f"{what}: array '{name}' holds NaN or Inf in row {row} ({count} row(s) in all); "
                           f"fix or remove those rows (graphopt does not skip them silently)")


def check_labels(labels, n_classes: int | None, what: str) -> np.ndarray:
    """Labels as int64, refused (BadInput) unless whole numbers in [0, n_classes) (n_classes None: only >= 0)."""
    y = np.asarray(labels)
    if y.dtype.kind == "b" or y.dtype.kind not in "iuf":
        raise BadInput(f"{what}: labels must be class indices (integers), not {y.dtype}")
    if y.dtype.kind == "f":
        hit = first_nonfinite_row(y)
        if hit is not None or (y.size and not np.all(np.equal(np.mod(y, 1), 0))):
            raise BadInput(f"{what}: labels must be whole class indices; found NaN, Inf or fractions")
    if y.size == 0:
        return y.astype(np.int64)
    lo, hi = y.min(), y.max()
    if lo < 0 or (n_classes is not None and hi >= n_classes):
        out_of_range = (y < 0) | (y >= n_classes) if n_classes is not None else (y < 0)
        where = int(np.flatnonzero(out_of_range)[0])
        span = f"0..{n_classes - 1}" if n_classes is not None else "0 or more"
        raise BadInput(f"{what}: labels range from {lo:g} to {hi:g}, but the model's output has classes {span} "
                       f"(first bad label at flat index {where})")
    return y.astype(np.int64)


def nonfinite_weights(graph: gs.Graph) -> list[str]:
    """Names of the weight initializers (constant inputs of WEIGHT_OPS after the data input) that hold NaN or Inf."""
    bad, seen = [], set()
    for node in graph.nodes:
        if node.op not in WEIGHT_OPS:
            continue
        for t in node.inputs[1:]:
            if isinstance(t, gs.Constant) and t.name not in seen:
                seen.add(t.name)
                v = np.asarray(t.values)
                if v.dtype.kind in "fc" and not np.isfinite(v).all():
                    bad.append(t.name)
    return bad


def class_count(graph: gs.Graph, output: int = 0, axis: int = 1) -> int | None:
    """The size of axis `axis` of the graph's output number `output` (the classes labels index), when static."""
    from .graph import output_specs
    specs = output_specs(graph)
    if output >= len(specs):
        return None
    shape = specs[output][1]
    if shape is None or len(shape) <= axis or not isinstance(shape[axis], (int, np.integer)):
        return None
    return int(shape[axis])
