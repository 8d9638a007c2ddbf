"""onnxruntime: the numerical oracle. Reference runs use no graph optimizations."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from .errors import BadInput


def session(model: onnx.ModelProto | bytes | str, optimize: bool = False, threads: int | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def run(model, feeds: dict[str, np.ndarray], optimize: bool = False) -> dict[str, np.ndarray]:
    sess = session(model, optimize=optimize)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))



def random_inputs(specs, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for (name, shape, numpy dtype) specs: normal floats, small non-negative ints."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in specs:
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise BadInput(f"input '{name}' has dynamic shape {list(shape)}; bind it with --input-shape {name}=D0,D1,...")
        dt = np.dtype(dtype)
        if dt.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            feeds[name] = rng.integers(0, 2, shape).astype(dt)
        else:
            feeds[name] = rng.integers(0, 4, shape).astype(dt)
    return feeds


def max_error(ref: np.ndarray, got: np.ndarray) -> float:
    ref = np.asarray(ref)
    got = np.asarray(got)
    if ref.shape != got.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    if ref.dtype.kind in "fc" or got.dtype.kind in "fc":
        return float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
    return float(np.max(ref.astype(np.int64) != got.astype(np.int64)))


def allclose(ref, got, rtol: float, atol: float, scale_atol: bool = False) -> bool:
    ref = np.asarray(ref)
    got = np.asarray(got)
    if ref.shape != got.shape:
        return False
    if ref.dtype.kind not in "fc":
        return bool(np.array_equal(ref, got))
    if scale_atol and ref.size:
        atol = atol * max(1.0, float(np.max(np.abs(ref))))
    return bool(np.allclose(got.astype(np.float64), ref.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True))
