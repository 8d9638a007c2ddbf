"""The self-check criterion for quantized graphs: a compiled QDQ model is right when at least 99% of every
output's elements lie within one quantization step of onnxruntime's (rounding ties in requantization may move an
element by one step on any target). Core verification: graphopt.api applies it to every artifact whose
model.onnx contains QuantizeLinear."""
from __future__ import annotations

import numpy as np
import onnx

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
STEP_FRACTION = 0.99


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
    """Compare compiled outputs with onnxruntime's under the int8 criterion: at least criterion['fraction'] of
    every output's elements within one quantization step (plus float slack). Returns api.compile's check dict:
    {"ok", "max_abs_error", "worst_output", "criterion", "outputs": {name: {...}}}."""
    outputs, ok, worst, worst_name = {}, True, 0.0, None
    for name, r in ref.items():
        g = got.get(name)
        r = np.asarray(r, np.float64)
        if g is None or np.shape(g) != r.shape:
            return {"ok": False, "max_abs_error": float("inf"), "worst_output": name,
                    "criterion": "quant_step", "outputs": outputs}
        g = np.asarray(g, np.float64)
        stp = criterion["steps"].get(name) or 0.0
        tol = stp * (1 + 1e-3) + 1e-5 * max(1.0, float(np.max(np.abs(r))) if r.size else 1.0)
        err = np.abs(r - g)
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


def compare_quantized(model, ref: dict, got: dict) -> dict | None:
    """api.compile's self-check for quantized graphs. model: the artifact's model.onnx (path or ModelProto).
    None when the graph has no QuantizeLinear (keep the fp32 tolerances); else within_quant_steps' check dict.
    Any target that compiles a QDQ graph needs it: rounding ties in intermediate requantizations may move an
    element by one step whether the target computes in integers (cpu int8 kernels) or in fp32."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    crit = check_criterion(model)
    if crit is None:
        return None
    return within_quant_steps(ref, got, crit)
