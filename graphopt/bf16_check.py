"""The self-check for artifacts compiled with precision bf16.

bf16 keeps 8 significant bits: rounding one operand moves it by at most 2^-9 of its value, so a product of two
rounded operands by about 2^-8, and a sum of K such products, with independent rounding errors, by about
2^-8 * sqrt(K) of the sum of their magnitudes. The check compares the compiled library with onnxruntime's fp32
result (whose own rounding, ~1e-6, is nothing at this scale; a float64 run of the model was tried as the reference
and costs minutes on depthwise convs), per output normalized by the reference's largest magnitude, and accepts

    max |graphopt - onnxruntime| / max |onnxruntime|  <=  BF16_UNIT * sqrt(K)

with K the longest reduction (input channels x kernel window, or the inner dimension) among the model's Conv /
MatMul / Gemm nodes with constant weights and its MatMuls of two activations (attention's, which run in bf16 too;
their inner dimension from shape inference). Outputs of a Sigmoid or a Softmax compare in logit space
(probabilities clipped to PROBABILITY_FLOOR; api.compare_with_onnxruntime does that before calling compare_bf16):
normalized by its largest value, a probability map that is near 0 everywhere on the check's inputs magnifies the
error by the size of its logits. The bound is loose for a single layer and meant for whole networks,
where the errors of successive layers add; the kernels themselves are tested against numpy on the same bf16
operands to fp32 accuracy (tests/targets/test_cpu_bf16.py). The error found goes into report.json.
"""
from __future__ import annotations

import math

import numpy as np
import onnx

#: relative spacing of bf16 numbers (8 significant bits)
BF16_UNIT = 2.0 ** -8
#: outputs of a Sigmoid or Softmax compare in logit space (api.logit_space), their probabilities clipped to this
#: floor: onnxruntime's own Sigmoid is accurate to about 1.2e-7 absolute (MLAS), 0.05% of a probability of 1e-4
#: but 350% of one of 1e-9, so below the floor the reference carries no relative accuracy to compare with
PROBABILITY_FLOOR = 1e-4


def reduction_length(model: onnx.ModelProto) -> int:
    """The longest reduction of a Conv / MatMul / Gemm with a constant weight or a MatMul of two activations whose
    first operand's shape is known (1 when there is none)."""
    inits = {i.name: i for i in model.graph.initializer}
    longest = 1
    act_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2
                   and n.input[1] not in inits]
    if act_matmuls:
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # noqa: BLE001 - shapes unknown: those matmuls add nothing to the bound
            inferred = None
        if inferred is not None:
            dims = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
                    for vi in (*inferred.input, *inferred.value_info, *inferred.output)}
            for n in act_matmuls:
                k = (dims.get(n.input[0]) or [0])[-1]
                longest = max(longest, int(k))
    for n in model.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        shape = list(inits[n.input[1]].dims)
        if n.op_type == "Conv":
            k = int(np.prod(shape[1:]))
        elif n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute):
            k = shape[-1]
        else:
            k = shape[0] if shape else 1
        longest = max(longest, k)
    return longest


def relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        return math.inf
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = np.abs(got - ref)
    if not np.all(np.isfinite(err)):
        return math.inf
    return float(err.max() / scale) if scale > 0 else float(err.max(initial=0.0))


def compare_bf16(model: onnx.ModelProto, ref: dict, got: dict) -> dict:
    """api.compile's check for bf16 artifacts: ref is onnxruntime's fp32 result, got the library's, on the same
    inputs. Returns {"ok", "max_abs_error", "worst_output", "max_relative_error", "bound", "reduction_length",
    "criterion", "reference", "outputs": {name: {"relative_error"}}}."""
    k = reduction_length(model)
    bound = BF16_UNIT * math.sqrt(k)
    outputs, worst, worst_name, max_abs = {}, -1.0, None, 0.0
    for name, r in ref.items():
        g = got.get(name)
        rel = relative_error(r, g) if g is not None else math.inf
        outputs[name] = {"relative_error": rel}
        if g is not None and np.shape(g) == np.shape(r):
            max_abs = max(max_abs, float(np.max(np.abs(np.asarray(g, np.float64) - r), initial=0.0)))
        if rel > worst:
            worst, worst_name = rel, name
    return {"ok": bool(worst <= bound), "max_abs_error": max_abs, "worst_output": worst_name,
            "max_relative_error": worst, "bound": bound, "reduction_length": k,
            "criterion": f"bf16: max |graphopt - onnxruntime| / max |onnxruntime| <= 2^-8 * sqrt(K), K = {k} the "
                         f"longest reduction: {bound:.3g}",
            "reference": "onnxruntime fp32", "outputs": outputs}
