"""The self-check for compiled quantized (QDQ) graphs.

The reference is onnxruntime with no graph optimizations on the artifact's model.onnx: it runs every
QuantizeLinear / DequantizeLinear as written, in float. No engine that computes in integers matches it exactly
(rounding ties in requantization move elements by a step), onnxruntime's own optimized engine (ORT_ENABLE_ALL,
which fuses QDQ into integer kernels) included. So a compiled library is correct when it is at least as close to
the reference as onnxruntime's optimized session is on the same model and inputs (compare_quantized):

* element level, per output: the fraction of elements within one quantization step of the reference may be at
  most FRACTION_SLACK below onnxruntime-optimized's, and the largest error, in steps, at most MAX_STEPS_FACTOR times
  onnxruntime-optimized's (at least one step); both engines' figures are recorded. When the optimized session cannot
  run the model, the fixed rule applies: at least STEP_FRACTION of the elements within one step;
* task level, when samples are given (eval or calibration data) and the model is a classifier (one [batch, classes]
  output): top-1 agreement with the fp32 model may be at most AGREEMENT_SLACK below onnxruntime-optimized's (and
  top-1 accuracy the same, with labels).

graphopt.api applies it to every artifact whose model.onnx contains QuantizeLinear."""
from __future__ import annotations

import numpy as np
import onnx

from .errors import reraise_if_strict

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
STEP_FRACTION = 0.99          # the fixed rule, when onnxruntime's optimized session cannot run the model
FRACTION_SLACK = 0.005        # half a percent of the elements
MAX_STEPS_FACTOR = 4.0
AGREEMENT_SLACK = 0.01        # one sample in a hundred


def check_criterion(model: onnx.ModelProto) -> dict | None:
    """None for graphs without QuantizeLinear (use the fp32 tolerances). Otherwise the quantization step of
    every graph output: the scale of the DequantizeLinear that produces it; for an fp32 output computed by a
    Conv/MatMul/Gemm from dequantized operands, the change one input step makes: input scale times the largest
    L1 norm of a dequantized weight row; else the step of the nearest quantized tensor upstream."""
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        return None
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}

    def const(name):
        if name in inits:
            return onnx.numpy_helper.to_array(inits[name])
        p = producers.get(name)
        if p is not None and p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return onnx.numpy_helper.to_array(a.t)
        return None

    def dq_of(name):
        p = producers.get(name)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    def step(name, depth=0):
        p = producers.get(name)
        if p is None or depth > 50:
            return None
        if p.op_type == "DequantizeLinear":
            s = const(p.input[1])
            return float(np.max(s)) if s is not None else None
        if p.op_type in COMPUTE_OPS and len(p.input) > 1:
            xdq, wdq = dq_of(p.input[0]), dq_of(p.input[1])
            if xdq is not None and wdq is not None:
                sx, wq, sw = const(xdq.input[1]), const(wdq.input[0]), const(wdq.input[1])
                zw = const(wdq.input[2]) if len(wdq.input) > 2 and wdq.input[2] else None
                if sx is not None and wq is not None and sw is not None:
                    w = _dequantize_np(wq, sw, zw, wdq)
                    if p.op_type == "Conv":
                        norm = np.abs(w.reshape(w.shape[0], -1)).sum(1).max()
                    elif p.op_type == "Gemm" and any(a.name == "transB" and a.i for a in p.attribute):
                        norm = np.abs(w).sum(1).max()
                    else:
                        norm = np.abs(w).sum(0).max()
                    return float(np.max(sx)) * float(norm)
        steps = [s for s in (step(i, depth + 1) for i in p.input if i) if s is not None]
        return max(steps) if steps else None

    steps = {}
    for o in model.graph.output:
        s = step(o.name)
        steps[o.name] = s
    return {"kind": "quant_step", "fraction": STEP_FRACTION, "steps": steps}


def _dequantize_np(q, scale, zp, node) -> np.ndarray:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
    q = q.astype(np.float64)
    zp = np.zeros_like(scale) if zp is None else zp.astype(np.float64)
    scale = scale.astype(np.float64)
    if scale.size == 1:
        return (q - zp.reshape(())) * scale.reshape(())
    if block:
        scale = np.repeat(scale, block, axis=axis)
        zp = np.repeat(zp, block, axis=axis)
        sl = tuple(slice(0, d) for d in q.shape)
        return (q - zp[sl]) * scale[sl]
    shape = [1] * q.ndim
    shape[axis % q.ndim] = -1
    return (q - zp.reshape(shape)) * scale.reshape(shape)


def within_quant_steps(ref: dict, got: dict, criterion: dict) -> dict:
    """Compare outputs with onnxruntime's reference in quantization steps: per output the fraction of elements
    within one step (plus float slack; NaN or infinity where the reference has the same counts as exact) and the
    largest error. "ok" applies the fixed rule (at least criterion['fraction'] within one step). Returns
    {"ok", "max_abs_error", "worst_output", "criterion", "outputs": {name: {"step", "within_one_step",
    "max_abs_error", "max_steps"}}}."""
    outputs, ok, worst, worst_name = {}, True, 0.0, None
    for name, r in ref.items():
        g = got.get(name)
        r = np.asarray(r, np.float64)
        if g is None or np.shape(g) != r.shape:
            return {"ok": False, "max_abs_error": float("inf"), "worst_output": name,
                    "criterion": "quant_step", "outputs": outputs}
        g = np.asarray(g, np.float64)
        stp = criterion["steps"].get(name) or 0.0
        finite = np.isfinite(r)
        tol = stp * (1 + 1e-3) + 1e-5 * max(1.0, float(np.max(np.abs(r[finite]))) if finite.any() else 1.0)
        err = np.where(finite, np.abs(r - g), np.where(np.isnan(r), np.where(np.isnan(g), 0.0, np.inf),
                                                       np.where(r == g, 0.0, np.inf)))
        err = np.where(np.isnan(err), np.inf, err)     # a NaN only graphopt gives is as far off as it gets
        frac = float(np.mean(err <= tol)) if r.size else 1.0
        e = float(err.max()) if r.size else 0.0
        outputs[name] = {"step": stp, "within_one_step": round(frac, 6), "max_abs_error": e,
                         "max_steps": round(e / stp, 3) if stp else None}
        if frac < criterion["fraction"]:
            ok = False
        if worst_name is None or e > worst:
            worst, worst_name = e, name
    return {"ok": ok, "max_abs_error": worst, "worst_output": worst_name,
            "criterion": f"quant_step: >= {criterion['fraction']:.0%} of elements within one quantization step",
            "outputs": outputs}


def compare_quantized(model, feeds: dict, ref: dict, got: dict) -> dict | None:
    """api.compile's element-level self-check for quantized graphs (see the module docstring). model: the artifact's
    model.onnx (path or ModelProto); ref: onnxruntime without optimizations on feeds; got: the compiled library's
    outputs. None when the graph has no QuantizeLinear (keep the fp32 tolerances). Returns {"ok", "max_abs_error",
    "worst_output", "criterion", "reference", "outputs": {name: {"step", "graphopt": {...},
    "onnxruntime_optimized": {...}}}}."""
    from . import ort
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    crit = check_criterion(model)
    if crit is None:
        return None
    mine = within_quant_steps(ref, got, crit)
    try:
        theirs = within_quant_steps(ref, ort.run(model, feeds, optimize=True), crit)
    except Exception as e:  # noqa: BLE001 - an optimized session that cannot run the model: the fixed rule
        reraise_if_strict(e)
        mine.update(reference="onnxruntime, no graph optimizations, on model.onnx",
                    note=f"onnxruntime's optimized session could not run the model ({type(e).__name__}); "
                         f"fixed rule applied")
        return mine
    ok, outputs = True, {}
    for name, m in mine["outputs"].items():
        t = theirs["outputs"].get(name, {})
        frac_ok = m["within_one_step"] >= t.get("within_one_step", 1.0) - FRACTION_SLACK
        steps = [x.get("max_steps") for x in (m, t)]
        max_ok = steps[0] is None or steps[0] <= MAX_STEPS_FACTOR * max(steps[1] or 0.0, 1.0)
        outputs[name] = {"step": m["step"], "ok": bool(frac_ok and max_ok),
                         "graphopt": {k: m[k] for k in ("within_one_step", "max_abs_error", "max_steps")},
                         "onnxruntime_optimized": {k: t.get(k) for k in ("within_one_step", "max_abs_error",
                                                                          "max_steps")}}
        ok = ok and outputs[name]["ok"]
    if len(outputs) < len(ref):          # an output missing or of the wrong shape
        ok = False
    return {"ok": bool(ok), "max_abs_error": mine["max_abs_error"], "worst_output": mine["worst_output"],
            "criterion": f"quant_step: within one quantization step at least as often as onnxruntime's optimized "
                         f"session (slack {FRACTION_SLACK:.1%} of the elements), largest error at most "
                         f"{MAX_STEPS_FACTOR:g}x its own (at least one step)",
            "reference": "onnxruntime, no graph optimizations, on model.onnx", "outputs": outputs}


def task_check(fp32, model, run_compiled, feeds: list[dict], labels=None) -> dict | None:
    """api.compile's task-level self-check for quantized classifiers: top-1 agreement with the fp32 model (ModelProto)
    over feeds, for the compiled library (run_compiled(feed) -> {output: array}) and for onnxruntime's optimized
    session on the QDQ model; with labels (one per sample, in feed order) also top-1 accuracy. None when the model
    is not a classifier (one output of shape [batch, classes > 1]) or there are no feeds."""
    from . import ort
    if not feeds or len(model.graph.output) != 1:
        return None
    out = model.graph.output[0].name
    ref_sess, q_sess = ort.session(fp32, optimize=True), ort.session(model, optimize=True)
    ref_name = ref_sess.get_outputs()[0].name
    first = np.asarray(ref_sess.run([ref_name], feeds[0])[0])
    if first.ndim != 2 or first.shape[1] < 2:
        return None
    top = {"fp32": [], "graphopt": [], "onnxruntime_optimized": []}
    for feed in feeds:
        top["fp32"].append(np.argmax(ref_sess.run([ref_name], feed)[0], 1))
        top["onnxruntime_optimized"].append(np.argmax(q_sess.run([out], feed)[0], 1))
        top["graphopt"].append(np.argmax(np.asarray(run_compiled(feed)[out]).reshape(first.shape), 1))
    top = {k: np.concatenate(v) for k, v in top.items()}
    res = {"samples": int(len(top["fp32"])), "agreement_with_fp32": {
        k: round(float(np.mean(top[k] == top["fp32"])), 6) for k in ("graphopt", "onnxruntime_optimized")}}
    ok = res["agreement_with_fp32"]["graphopt"] >= res["agreement_with_fp32"]["onnxruntime_optimized"] - AGREEMENT_SLACK
    if labels is not None:
        y = np.asarray(labels).reshape(-1)[:len(top["fp32"])]
        if len(y) == len(top["fp32"]):
            res["top1"] = {k: round(float(np.mean(v == y)), 6) for k, v in top.items()}
            ok = ok and res["top1"]["graphopt"] >= res["top1"]["onnxruntime_optimized"] - AGREEMENT_SLACK
    res["ok"] = bool(ok)
    res["criterion"] = (f"top-1 agreement with the fp32 model (and accuracy, with labels) at most "
                        f"{AGREEMENT_SLACK:.0%} below onnxruntime's optimized session on the QDQ model")
    return res
