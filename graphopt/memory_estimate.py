"""How much memory distillation will take, estimated from the graph's static shapes before any allocation, and
the micro-batch that fits a budget (compress then accumulates gradients over micro-batches: same global batch,
same result, less memory).

The estimate, in bytes:
  weights: student parameters x 4 copies (the weights, their gradients, Adam's two moments) + the teachers' weights
  activations: per example, every float tensor the student computes (autograd keeps most of them for the backward
    pass; the gradients flowing back reuse memory freed on the way: ACTIVATION_FACTOR), times the micro-batch; the teachers run without gradients: their largest tensors, twice, times the micro-batch
  teacher cache: the teachers' outputs (and features) for every training example when they are cached
  fixed: the runtime itself (torch, onnxruntime, the loaded graphs)
The factors were measured against the peak resident memory of real training steps (tools/measure_training.py).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .errors import BadInput

ACTIVATION_FACTOR = 1.0        # measured (tools/measure_training.py, batch 32): the estimate is 1.07x the real peak
#                                on ResNet-18, 1.15x on the BERT-style encoder, 1.30x on the PP-OCRv4 recognizer
#                                (AMD, 2026-12-05); the recognizer's 1.85x since the view fuses its HardSwish
#                                chains (Intel, 2026-12-06; see per_example_activation_bytes)
FIXED_BYTES = 600 * 2 ** 20    # torch + onnxruntime + graphs, resident before training starts
SAFETY = 0.8                   # of the budget the estimate may use
QUANTIZE_TEMPORARIES = 3       # float tensors the trainable view keeps per QuantizeLinear output (x / scale, clamped,
#                                rounded), whatever its integer type: quantization-aware training (graphopt.qat)
FUSED_QUANTIZE_BYTES = 1       # per element of a QuantizeLinear the view fuses with its DequantizeLinear: one bool


def _numel(shape) -> int | None:
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return int(np.prod(shape)) if len(shape) else 1


def _batch0(graph: gs.Graph) -> int:
    """The batch the graph was exported with (axis 0 of its first input), at least 1."""
    for t in graph.inputs:
        if t.shape and isinstance(t.shape[0], (int, np.integer)) and t.shape[0] > 0:
            return int(t.shape[0])
    return 1


def per_example_activation_bytes(graph: gs.Graph) -> int:
    """Bytes of every float tensor the graph computes in the trainable view, per example (QuantizeLinear: its float
    temporaries; tensors of unknown shape count nothing; the inner tensors of the HardSwish chains the view runs as
    one op are never computed: graphopt.trainable.fused_away_tensors).

    Every tensor rather than what autograd saves: a count of the saved tensors by torch's derivative rules (tried
    2026-12-06) came to 0.85x the measured peak on ResNet-18, 0.55x on the BERT-style encoder and 0.41x on PP-OCRv4's
    recognizer (channels-last copies, oneDNN workspaces and the forward's transients are not in it), and an estimate
    must not fall short: this one is 1.0x, 1.1x and 1.85x."""
    from .trainable import fused_away_tensors
    skip = fused_away_tensors(graph)
    total = 0
    for node in graph.nodes:
        for t in node.outputs:
            n = _numel(t.shape)
            if t.name in skip:
                if n is not None and node.op == "QuantizeLinear":
                    total += n * FUSED_QUANTIZE_BYTES
                continue
            if n is not None and node.op == "QuantizeLinear":
                total += n * 4 * QUANTIZE_TEMPORARIES
                continue
            if n is None or t.dtype is None or np.dtype(t.dtype).kind != "f":
                continue
            total += n * np.dtype(t.dtype).itemsize
    return total // _batch0(graph)


def largest_tensor_bytes(graph: gs.Graph) -> int:
    best = 0
    for node in graph.nodes:
        for t in node.outputs:
            n = _numel(t.shape)
            if n is not None and t.dtype is not None:
                best = max(best, n * np.dtype(t.dtype).itemsize)
    return best // _batch0(graph)


def weight_bytes(graph: gs.Graph) -> int:
    return sum(int(np.asarray(t.values).nbytes) for t in graph.tensors().values()
               if isinstance(t, gs.Constant) and np.asarray(t.values).dtype.kind == "f")


def output_bytes(graph: gs.Graph) -> int:
    total = 0
    for t in graph.outputs:
        n = _numel(t.shape)
        if n is not None and t.dtype is not None:
            total += n * np.dtype(t.dtype).itemsize
    return total // _batch0(graph)


def training_bytes(student: gs.Graph, teachers: list[gs.Graph], micro_batch: int, cached_examples: int = 0) -> int:
    """Peak memory of distilling `student` from `teachers` with micro-batches of `micro_batch` examples."""
    return _estimator(student, teachers, cached_examples)(micro_batch)


def _estimator(student: gs.Graph, teachers: list[gs.Graph], cached_examples: int):
    """training_bytes as a function of the micro-batch, the graphs read once (fit_micro_batch tries several)."""
    weights = 4 * weight_bytes(student) + sum(weight_bytes(t) for t in teachers)
    acts = ACTIVATION_FACTOR * per_example_activation_bytes(student)
    teacher_acts = sum(2 * largest_tensor_bytes(t) for t in teachers)
    cache = sum(output_bytes(t) for t in teachers) * cached_examples
    return lambda micro_batch: int(FIXED_BYTES + weights + acts * micro_batch + teacher_acts * micro_batch + cache)


def fit_micro_batch(student: gs.Graph, teachers: list[gs.Graph], micro_batch: int, budget: int,
                    cached_examples: int = 0) -> tuple[int, int]:
    """(the largest micro-batch <= micro_batch whose estimate fits SAFETY * budget, its estimate). BadInput when
    not even one example fits."""
    m = max(1, int(micro_batch))
    estimate = _estimator(student, teachers, cached_examples)
    while True:
        need = estimate(m)
        if need <= SAFETY * budget:
            return m, need
        if m == 1:
            raise BadInput(f"training needs about {need / 2 ** 30:.1f} GiB even one example at a time, more than "
                           f"{SAFETY:.0%} of the {budget / 2 ** 30:.1f} GiB budget; free memory or raise "
                           f"--max-memory")
        m = max(1, m // 2)

