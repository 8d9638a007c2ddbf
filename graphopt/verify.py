"""Verification: structural checks after every pass, numerical comparison with onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import ort
from .errors import CheckFailed, reraise_if_strict
from .graph import input_specs, np_dtype, to_onnx

EXACT_RTOL, EXACT_ATOL = 1e-5, 1e-6   # atol is scaled by max(1, max|ref|) of each output: float reassociation
                                      # error grows with the output's magnitude (logits of 10 differ by ~6e-6)


def structural_problems(graph: gs.Graph) -> list[str]:
    """Dangling tensors, non-topological order, and onnx.checker with full shape inference."""
    problems = []
    produced = {t.name for t in graph.inputs} | {n for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    for node in graph.nodes:
        for t in node.inputs:
            if t.name and t.name not in produced and not isinstance(t, gs.Constant):
                problems.append(f"node '{node.name}' ({node.op}) reads '{t.name}', which nothing produces before it")
        for t in node.outputs:
            produced.add(t.name)
    for t in graph.outputs:
        if t.name not in produced:
            problems.append(f"graph output '{t.name}' is never produced")
    if problems:
        return problems
    try:
        onnx.checker.check_model(to_onnx(graph), full_check=True)
    except Exception as e:
        msg = str(e).strip().splitlines()
        problems.append(msg[0] if msg else type(e).__name__)
    return problems


def seeded_inputs(graph: gs.Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs the graph can take (index inputs bounded by their tables, masks 0/1: check_inputs)."""
    from .check_inputs import seeded_inputs as bounded
    return bounded(graph, input_specs(graph), seed)


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], rtol: float, atol: float,
            scale_atol: bool = False) -> tuple[bool, float, str | None]:
    """(all close, worst max-abs error, name of the worst output)."""
    ok, worst, worst_name = True, 0.0, None
    for name, r in ref.items():
        if name not in got:
            return False, float("inf"), name
        err = ort.max_error(r, got[name])
        if err > worst or worst_name is None:
            worst, worst_name = err, name
        r_tol, a_tol = (max(rtol, 1e-3), max(atol, 1e-3)) if np.asarray(r).dtype.itemsize <= 2 and \
            np.asarray(r).dtype.kind == "f" else (rtol, atol)          # half precision: its own epsilon
        if not ort.allclose(r, got[name], r_tol, a_tol, scale_atol):
            ok = False
    return ok, worst, worst_name


#: ops whose output compresses their input's float error: an exact pass's rounding shows at the scale of the input
SQUASHING = ("Sigmoid", "Softmax", "LogSoftmax", "Tanh")


def _squashing_producers(graph: gs.Graph) -> dict[int, gs.Node]:
    """{output position: node} for the graph outputs a SQUASHING op produces."""
    found = {}
    for i, t in enumerate(graph.outputs):
        if len(t.inputs) == 1 and t.inputs[0].op in SQUASHING and t.inputs[0].inputs:
            found[i] = t.inputs[0]
    return found


def compare_before_squashing(before: gs.Graph, after: gs.Graph, feeds: dict, names: list[str], rtol: float,
                             atol: float) -> tuple[bool, float, str | None] | None:
    """An exact pass's outputs that miss the tolerance where a Sigmoid / Softmax / Tanh produces them, judged at
    that op's input instead: float reassociation error is relative to the magnitude of the logits, which the
    output's own scale (probabilities at most 1) no longer shows (PP-OCRv4's detector: logits up to 50, a BN folded
    into the ConvTranspose before its Sigmoid moves the logits by 1.4e-6 of their largest and a probability of 0.36
    by 5e-6). Applies only when both graphs produce each such output with the same op and attributes; returns
    (ok, worst error, output name) for the logits compared (scaled atol), or None when some output in names is
    not of that form."""
    pos = {t.name: i for i, t in enumerate(before.outputs)}
    sb, sa = _squashing_producers(before), _squashing_producers(after)
    pairs = []
    for name in names:
        i = pos.get(name)
        nb, na = sb.get(i), sa.get(i)
        if nb is None or na is None or nb.op != na.op or dict(nb.attrs) != dict(na.attrs):
            return None
        pairs.append((name, nb.inputs[0].name, na.inputs[0].name))

    def run(graph, extra):
        model, tensors = to_onnx(graph), graph.tensors()
        known = {o.name for o in model.graph.output}
        model.graph.output.extend(
            onnx.helper.make_tensor_value_info(t, onnx.helper.np_dtype_to_tensor_dtype(np_dtype(tensors[t])), None)
            for t in dict.fromkeys(extra) if t not in known)
        names_in = {i.name for i in model.graph.input}
        return ort.run(model, {k: v for k, v in feeds.items() if k in names_in})

    ref = run(before, [b for _, b, _ in pairs])
    got = run(after, [a for _, _, a in pairs])
    return compare({n: ref[b] for n, b, _ in pairs}, {n: got[a] for n, _, a in pairs}, rtol, atol, scale_atol=True)


def nonfinite_agreement(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, dict]:
    """For outputs where both engines give NaN or infinity at exactly the same elements (which compare() counts
    as agreeing): {output: {"nonfinite": count, "elements": size}}, so reports can say so."""
    out = {}
    for name, r in ref.items():
        r, g = np.asarray(r), np.asarray(got.get(name))
        if r.dtype.kind != "f" or g.shape != r.shape:
            continue
        bad = ~np.isfinite(r)
        if bad.any() and np.array_equal(bad, ~np.isfinite(g)):
            out[name] = {"nonfinite": int(bad.sum()), "elements": int(r.size)}
    return out


def fp64_outputs(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The graph's outputs computed in float64 (the trainable view, run by torch; onnxruntime has no float64 Conv),
    for telling float32 rounding from a real difference on graphs that amplify rounding. None when the view
    cannot run the graph."""
    import torch

    from .trainable import TrainableGraph
    try:
        view = TrainableGraph(graph).double()
        names = {t.name for t in graph.inputs}
        xs = {}
        for k, v in feeds.items():
            if k in names:
                a = np.asarray(v)
                xs[k] = torch.from_numpy(a.astype(np.float64) if a.dtype.kind == "f" else a)
        with torch.no_grad():
            out = view(xs)
    except Exception as e:  # an op the view lacks, or a dtype it cannot run in float64
        reraise_if_strict(e)
        return None
    out = out if isinstance(out, tuple) else (out,)
    return {name: o.numpy() for name, o in zip(view.output_names, out)}


def outputs_by_position(graph_a: gs.Graph, outs_a: dict, graph_b: gs.Graph, outs_b: dict) -> dict:
    """Map graph B's outputs onto graph A's output names by position (passes may rename outputs' producers,
    never the outputs themselves, but compare by position to be safe)."""
    names_a = [t.name for t in graph_a.outputs]
    names_b = [t.name for t in graph_b.outputs]
    return {a: outs_b[b] for a, b in zip(names_a, names_b)}


def equivalent(before: gs.Graph, after: gs.Graph, seed: int = 0, rtol: float = EXACT_RTOL, atol: float = EXACT_ATOL,
               feeds: dict | None = None) -> tuple[bool, float, str | None]:
    feeds = feeds if feeds is not None else seeded_inputs(before, seed)
    ref = ort.run(to_onnx(before), feeds)
    got = ort.run(to_onnx(after), {k: v for k, v in feeds.items() if k in {t.name for t in after.inputs}})
    if len(before.outputs) != len(after.outputs):
        return False, float("inf"), "outputs"
    return compare(ref, outputs_by_position(before, ref, after, got), rtol, atol, scale_atol=True)


def drift(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict:
    """Error figures for lossy changes: max/mean abs error, cosine similarity, top-1 agreement (2-D outputs)."""
    out = {}
    for name, r in ref.items():
        g = np.asarray(got[name], dtype=np.float64)
        r = np.asarray(r, dtype=np.float64)
        d = {"max_abs": float(np.max(np.abs(r - g))) if r.size else 0.0,
             "mean_abs": float(np.mean(np.abs(r - g))) if r.size else 0.0}
        denom = np.linalg.norm(r) * np.linalg.norm(g)
        d["cosine"] = float(np.dot(r.ravel(), g.ravel()) / denom) if denom > 0 else 1.0
        if r.ndim == 2 and r.shape[1] > 1:
            d["top1_agreement"] = float(np.mean(np.argmax(r, 1) == np.argmax(g, 1)))
        out[name] = d
    return out


def require(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)
