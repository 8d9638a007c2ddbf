"""onnxruntime: the numerical oracle. Reference runs use no graph optimizations."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as NotImplementedByOrt

from .errors import BadInput, UnsupportedModel, printable


def session(model: onnx.ModelProto | bytes | str, optimize: bool = False, threads: int | None = None,
            profile_prefix: str | None = None) -> ort.InferenceSession:
    """A CPU session; profile_prefix turns onnxruntime's profiler on (its JSON trace starts with that path)."""
    so = ort.SessionOptions()
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 4      # failures surface as exceptions (one graphopt line); no coloured log
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except NotImplementedByOrt as e:    # no CPU kernel for an op and dtype (bfloat16 Relu, ...): graphopt cannot check
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModel(f"onnxruntime, graphopt's reference, cannot run this model on the CPU "
                               f"({printable(first)})") from None


def run(model, feeds: dict[str, np.ndarray], optimize: bool = False) -> dict[str, np.ndarray]:
    sess = session(model, optimize=optimize)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))



def tensor_values(graph, names: list[str], runs: list[dict]):
    """Per run (feeds), {name: float64 value} of a gs.Graph's named tensors, outputs or intermediate, from one
    onnxruntime session; feeds the graph does not take are dropped. For statistics (importance scores, pruning's
    reconstruction), not as the oracle: the session optimizes the graph (the named tensors stay, as outputs), which
    runs PP-OCRv4's recognizer in 18 ms a line where the unoptimized reference takes 33-51."""
    from .graph import copy, to_onnx
    m = copy(graph)
    have = {o.name for o in m.outputs}
    tensors = m.tensors()
    m.outputs.extend(tensors[n] for n in names if n not in have)
    sess = session(to_onnx(m), optimize=True)
    keep = {t.name for t in m.inputs}
    for feeds in runs:
        yield {n: v.astype(np.float64) for n, v in zip(names, sess.run(names, {k: v for k, v in feeds.items()
                                                                            if k in keep}))}


def random_inputs(specs, seed: int = 0, ranges: dict | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs for (name, shape, numpy dtype) specs: normal floats, small non-negative ints. ranges
    (check_inputs.input_ranges): {name: {"kind": "index", "high": n}} draws integers from [0, n);
    {name: {"kind": "mask"}} draws 0/1 with at least one 1 along the last axis."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in specs:
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise BadInput(f"input '{name}' has dynamic shape {list(shape)}; bind it with --input-shape {name}=D0,D1,...")
        dt = np.dtype(dtype)
        r = (ranges or {}).get(name)
        if r is not None and r["kind"] == "index" and dt.kind in "iu":
            feeds[name] = rng.integers(0, r["high"], shape).astype(dt)
        elif r is not None and r["kind"] == "mask":
            m = rng.integers(0, 2, shape)
            if m.ndim:
                m[..., 0] = 1
            feeds[name] = m.astype(dt)
        elif dt.kind == "f":
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
        r, g = ref.astype(np.float64), got.astype(np.float64)
        same = (np.isnan(r) & np.isnan(g)) | (np.isinf(r) & (r == g))    # non-finite at the same place in both
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.abs(r - g))
        return float(np.max(np.where(np.isnan(diff), np.inf, diff)))
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
