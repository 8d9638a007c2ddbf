"""`graphopt compress`: the pipeline's lossy passes, applied progressively, with the original model as teacher.

Schedule (issue 5; the defaults are `Schedule`'s, picked on digits with a validation split carved out of the
training set and a teacher trained on the rest):

1. light pruning: 40% of the target reduction, distilled at temperature 8 on the logits only;
2. finer steps: 15% of the target each, temperature 4, feature loss on: FitNets adapters from insert-adapters
   plus the penultimate hint (below);
3. fine-tuning with no more pruning, the temperature falling 4 -> 2 -> 1, feature loss on the penultimate hint.

`epochs` (default 60) covers all of it: fine-tuning gets `fine_tune_share` (half), the pruning steps share the rest
equally, at least one epoch each (`phase_unit="steps"`: the same shares in optimizer steps, fractions of an epoch,
for data of many batches and few epochs). Other lossy passes (factorize-lowrank, sparsify) are applied whole and
trained like a fine step; quantize is post-training and runs last. Exact passes run where they stand.

`quantize{qat=true}` (quantization-aware training): after the fine-tuning, the post-training quantize pass
calibrates and writes the QDQ graph, graphopt.qat turns its integer weights and biases back into float weights read
through QuantizeLinear (activation scales kept, or trained as well with `qat_scales=learned`), one more phase ("qat": Schedule.qat_share of the epochs, all of them when no
other pass trains; lr x qat_lr_scale; logits distilled from the fp32 original at qat_temperature, 1, without label
smoothing of the teacher's targets: QAT should match the teacher, not regularize) trains them with
straight-through gradients, and the trained weights are quantized again into the same QDQ graph. info["quantization"]
has the PTQ graph's top-1 / agreement on eval_data beside the final (QAT) figures.

Prune steps: every budget of a prune-channels pass (flops, params, latency, ratio) is cut into cumulative fractions of the
target reduction (in the kept fraction: 1 - f * (1 - target); or geometric), each step re-ranking the channels of
the student as trained so far. Budgets are relative to the original model. When the pipeline does not set
`round_to`, compress rounds kept channel counts to the largest power of two (up to the target's vector width)
that leaves the narrowest prunable layer at least 8 widths: on a 16/32-channel network the pass's default (16)
lets a layer be only 32 or 16 wide, and the budget steps jump.

The penultimate hint: FitNets adapters map the student's features to the teacher's through a free linear map, so
they constrain the student's representation only up to any invertible linear map, and the student's penultimate
layer drifts away from the teacher's as measured by linear CKA (on digits, 0.85 at 0.18x params). The hint pairs
the student's penultimate vector (the input of the last Gemm/MatMul) directly, with no adapter, with the
teacher's penultimate vector projected on its top-k principal components (k: the student's width), rotated and
scaled onto the student's current features (orthogonal Procrustes) and shifted non-negative; see
pca_hint_teacher. Models without a vector penultimate layer use the adapters only.

`distill=False` trains the same schedule with plain cross-entropy on the labels (no teacher signal at all): the
baseline distillation is measured against. info["final"] reports top-1, the teacher's top-1 and the drop,
agreement with the teacher, and linear CKA of the logits and of the penultimate layers, on eval_data.

Data: {input name: array, "labels": optional} (batch first), or a torch DataLoader whose batches are dicts,
(inputs..., labels) tuples or tensors. Passes that need arrays (taylor importance, the pruning oracle, adapter
initialization, the hint) get the first `calib_samples` examples of the loader.

Distributed: compress(..., distributed=True) in processes launched by torchrun (see graphopt.distributed): every
process runs the same passes (the graph is broadcast from rank 0 after each), the processes share the micro-batches
of every global batch and sum their gradients in micro-batch order (graphopt.micro_batching), so the result is the
one process's result bit for bit; every rank returns the same graph (write it from rank 0).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np
import onnx_graphsurgeon as gs

from .data_checks import check_finite, check_labels, class_count, nonfinite_weights
from .errors import BadInput, CheckFailed, printable, reraise_if_strict
from .graph import copy as copy_graph, input_specs, output_specs, toposort
from .passmanager import PassContext, PassManager, make_pass
from .micro_batching import DEFAULT_MICRO_BATCH
from .progress import Progress

POST_TRAINING = ("quantize",)
DEFAULT_EPOCHS = 60
_LABEL_KEYS = ("labels", "label", "y", "target", "targets")


FEATURE_MODES = ("none", "adapters", "hint", "both")


@dataclass
class Schedule:
    """How compress shares out the epochs and sets the distillation of each phase. Feature modes: "none" (logits
    only), "adapters" (FitNets hints through insert-adapters, weight DistillConfig.feature_weight), "hint" (the
    penultimate-layer PCA hint alone, weight hint_weight; "adapters" where the graph has no vector penultimate
    layer), "both"."""
    light_fraction: float = 0.4          # of the target reduction, in the first prune step
    fine_fraction: float = 0.15          # of the target reduction, in each later prune step
    spacing: str = "linear"              # steps as fractions of the reduction: "linear" in the kept fraction, or
    #                                      "geometric" (fractions of log(kept): equal ratios per step)
    fine_tune_share: float = 0.5         # of the epochs, for the final fine-tuning
    phase_unit: str = "epochs"           # "epochs": whole epochs per phase, at least one per prune step (5 steps in
    #                                      7 epochs leave the fine-tuning 2, not its share); "steps" (array data):
    #                                      the shares exactly, in optimizer steps (fractions of an epoch). Opt-in:
    #                                      short runs get phases of a few batches (digits: 9), too short for the
    #                                      divergence rule (divergence_steps) to judge
    light_temperature: float = 8.0
    fine_temperature: float = 4.0
    final_temperature: tuple = ((0.5, 4.0, 2.0), (1.0, 2.0, 1.0))   # distill.temperature_at phases
    light_features: str = "none"
    step_features: str = "both"
    fine_tune_features: str = "hint"
    hint_align: bool = True              # rotate the hint onto the student's features (orthogonal Procrustes)
    hint_weight: float = 3.0             # of the PCA hint's MSE relative to the hint's variance (see pca_hint_teacher)
    criterion: str = "activation"        # prune-channels' criterion where the pipeline does not set one: compress
    #                                      always has data, and l1 (the data-free default) removes channels whose
    #                                      small weights hide a large folded bias (PP-OCRv4's recognizer lost 17% of
    #                                      its decoded frames to 4 of 480 such channels; activation: none)
    reconstruct: str = "none"            # prune-channels' reconstruct where the pipeline does not set it (none,
    #                                      bias, lsq): the removed channels compensated on the training data before
    #                                      each step trains. Not the default: on the digits CNN at 0.23x MACs and
    #                                      60 epochs lsq gave 99.11% distilled (none: 98.67%), but at 0.5x and 8
    #                                      epochs 97.78% distilled against plain fine-tuning's 98.67% (with lsq
    #                                      too); on PP-OCRv4's models it pays (README)
    teacher_hard_weight: float = 0.0     # distill's cross-entropy against the original's arg-max decisions (CTC
    #                                      frames, classes), beside KD
    decisions: bool = False              # the decision rule below (opt-in: its one full-length recognizer run,
    #                                      with other changes, ended at 38.5% of lines against 50.5% without it)
    decision_temperature: float = 1.0    # outputs whose task metric reads decisions (a CTC recognizer's [N, T, C]
    #                                      frames decoded by arg-max, a one-channel probability map thresholded)
    #                                      distill at most at this temperature in every phase, without label
    #                                      smoothing, and with decision_teacher_hard_weight: PP-OCRv4's recognizer
    #                                      48 steps after a 0.8x prune (0% of lines untrained) decoded 0.5% of
    #                                      held-out lines as the original at T=2.68, 17.5% at T=1, 22% with the
    #                                      frame decisions; its detector 96 steps after an lsq 0.5x prune (map IoU
    #                                      0.839): 0.841 at T=8, 0.798 at T=1, 0.850 at T=1 with the decisions
    decision_teacher_hard_weight: float = 1.0
    map_balance: str = "half"            # DistillConfig.map_balance: a one-channel map's positives and negatives
    #                                      weigh "half" the loss each, or "hard": DB's positives + 3x hardest
    #                                      negatives (README: PP-OCRv4's detector)
    map_threshold: float = 0.5           # DistillConfig.map_threshold: where a one-channel map's positives start
    frame_balance: str = "none"          # DistillConfig.frame_balance: "half": a CTC recognizer's blank and symbol
    #                                      frames (the teacher's decisions) weigh half the KD each
    narrow_round_to: bool = True         # per-layer channel steps (prune-channels' min_widths) when the pipeline
    #                                      sets neither round_to nor min_widths: the target's vector width where a
    #                                      layer keeps min_widths counts, finer steps on narrow layers (one step
    #                                      for all, the narrowest layer's, left PP-OCRv4's detector with widths
    #                                      like 17 and 131: 0.5x the MACs ran 1.37x slower than the original)
    min_widths: int = 8                  # ... so that a layer has at least this many widths to choose from
    adapter_options: dict = field(default_factory=dict)   # options of the insert-adapters pass
    hint_samples: int = 4096             # training examples for the hint's principal components and alignment
    calib_samples: int = 512             # examples taken from a DataLoader for the passes that need arrays
    lr: float = 1e-2
    divergence_ratio: float = 1.1        # a phase that ends this much above its first step's loss is trained
    #                                      again from the same start at a tenth of the lr
    divergence_steps: int = 16           # ... when it had at least this many steps
    divergence_min_scale: float = 0.01   # ... down to this fraction of the lr (a retry that ends no lower than the
    #                                      attempt before it: that attempt and its lr are kept; 1: no retries)
    qat_share: float = 0.25              # of the epochs, for quantization-aware training (all of them when no other
    #                                      pass trains)
    qat_lr_scale: float = 0.1            # QAT's peak lr, relative to lr: the weights move on the int8 grid only
    qat_temperature: float = 1.0         # logits-only distillation from the fp32 original while training QAT (no
    #                                      label smoothing of the teacher's targets: QAT matches the teacher)

    def validate(self) -> None:
        for k in ("light_features", "step_features", "fine_tune_features"):
            if getattr(self, k) not in FEATURE_MODES:
                raise BadInput(f"Schedule.{k} must be one of {', '.join(FEATURE_MODES)}, not '{getattr(self, k)}'")
        if self.reconstruct not in ("none", "bias", "lsq"):
            raise BadInput(f"Schedule.reconstruct must be none, bias or lsq, not '{self.reconstruct}'")
        if self.phase_unit not in ("epochs", "steps"):
            raise BadInput(f"Schedule: phase_unit must be 'epochs' or 'steps', not '{self.phase_unit}'")
        from .distill import check_balances
        check_balances(self, "Schedule: ")
        if not 0 < self.map_threshold < 1:
            raise BadInput(f"Schedule: map_threshold must be a probability in (0, 1), not {self.map_threshold!r}")
        if not (self.teacher_hard_weight >= 0 and self.decision_teacher_hard_weight >= 0
                and self.decision_temperature > 0):
            raise BadInput("Schedule: teacher_hard_weight and decision_teacher_hard_weight non-negative, "
                           "decision_temperature above 0")
        if self.spacing not in ("linear", "geometric"):
            raise BadInput(f"Schedule.spacing must be 'linear' or 'geometric', not '{self.spacing}'")
        if not 0 < self.qat_share < 1 or not self.qat_lr_scale > 0:
            raise BadInput("Schedule: qat_share in (0, 1), qat_lr_scale above 0")
        if not (0 < self.light_fraction <= 1 and 0 < self.fine_fraction <= 1 and 0 <= self.fine_tune_share < 1):
            raise BadInput("Schedule: light_fraction and fine_fraction in (0, 1], fine_tune_share in [0, 1)")

    @classmethod
    def from_options(cls, options: dict, where: str = "schedule") -> "Schedule":
        """A Schedule with `options` ({field: value}, values typed or strings as `key=value` gives them) over the
        defaults; only the fields with a number, string or boolean value can be set this way."""
        settable = {f.name: type(getattr(cls(), f.name)) for f in fields(cls)
                    if isinstance(getattr(cls(), f.name), (int, float, str, bool))}
        given = {}
        for key, value in options.items():
            kind = settable.get(key)
            if kind is None:
                raise BadInput(f"{where}: unknown key '{printable(str(key))}' (one of {', '.join(sorted(settable))})")
            given[key] = _typed(value, kind, f"{where}: {key}")
        s = replace(cls(), **given)
        s.validate()
        return s


def _typed(value, kind, what: str):
    """value (a string from the command line, or a TOML value) as kind (bool, int, float or str)."""
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise BadInput(f"{what} must be true or false, got '{printable(value)}'")
            return text in ("true", "1", "yes")
        try:
            value = kind(text)
        except ValueError:
            raise BadInput(f"{what} must be {'an integer' if kind is int else 'a number'}, "
                           f"got '{printable(value)}'") from None
    ok = isinstance(value, bool) if kind is bool else \
        (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
         isinstance(value, kind) and not isinstance(value, bool))
    if not ok:
        raise BadInput(f"{what} must be {kind.__name__}, got {printable(repr(value))}")
    if kind is float and not np.isfinite(value):
        raise BadInput(f"{what} must be a finite number, got {value}")
    return kind(value)




def _prune_steps(p, schedule: Schedule | None = None) -> list[dict]:
    """Cumulative keep-fractions for each budget of a prune-channels pass: [{"flops": 0.8}, {"flops": 0.7}, ...]
    (latency too: each step then asks the pass for its share of the latency left, step / the step before)."""
    s = schedule or Schedule()
    budgets = {k: p.opts[k] for k in ("flops", "params", "latency") if p.opts[k] < 1.0}
    if p.opts.get("ratio", 0.0) > 0:
        budgets["ratio"] = p.opts["ratio"]
    if not budgets:
        return [{}]
    fractions = [s.light_fraction]
    while fractions[-1] < 1.0 - 1e-9:
        fractions.append(min(1.0, fractions[-1] + s.fine_fraction))
    steps = []
    for f in fractions:
        step = {}
        for k, target in budgets.items():
            if k == "ratio":
                step[k] = f * target
            elif s.spacing == "geometric":
                step[k] = target ** f
            else:
                step[k] = 1.0 - f * (1.0 - target)
        steps.append(step)
    return steps


def _pass_summary(rec: dict) -> dict:
    """What compress's info keeps of a pass record: the manager's facts and the pass's own summary (Pass.summary,
    of the pass the record's resolved text makes)."""
    kept = {k: rec[k] for k in ("pass", "position", "modified", "seconds") if k in rec}
    said = PassManager.parse(rec["pass"]).passes[0].summary(rec)
    return {**kept, "info": said} if said else kept


def _metrics(graph) -> dict:
    from .evaluate import graph_size
    return graph_size(graph, with_bytes=False)


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------

def _split_labels(d: dict, labels, names, what: str, n_classes: int | None = None):
    """({input: array}, labels or None) from a data dict, checked: every input present, equal lengths, finite
    values (check_finite names the first bad row), labels whole numbers in the model's class range."""
    d = dict(d)
    for k in _LABEL_KEYS:
        if k in d and k not in names:
            v = d.pop(k)
            if labels is None:
                labels = v
    missing = [n for n in names if n not in d]
    if missing:
        raise BadInput(f"{what} lacks input(s) {', '.join(missing)}; it has: {', '.join(sorted(d)) or 'nothing'}")
    arrays = {n: np.asarray(d[n]) for n in names}
    n = len(next(iter(arrays.values())))
    if any(len(a) != n for a in arrays.values()):
        raise BadInput(f"{what}: the input arrays have different lengths (axis 0)")
    check_finite(arrays, what)
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != n:
            raise BadInput(f"{what}: {len(labels)} labels for {n} examples")
        labels = check_labels(labels, n_classes, what)
    return arrays, labels


def _from_loader(loader, names, limit: int | None, what: str):
    """({input: array}, labels or None) from the first batches of a DataLoader (all of it when limit is None)."""
    from .distill import _split_batch
    xs, ys = {n: [] for n in names}, []
    got = 0
    for batch in loader:
        inputs, lab = _split_batch(batch, len(names), names)
        for n, x in zip(names, inputs):
            xs[n].append(x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x))
        if lab is not None:
            ys.append(lab.detach().cpu().numpy() if hasattr(lab, "detach") else np.asarray(lab))
        got += len(xs[names[0]][-1])
        if limit is not None and got >= limit:
            break
    if not got:
        raise BadInput(f"{what}: the DataLoader yielded no batch")
    arrays = {n: np.concatenate(v)[:limit] for n, v in xs.items()}
    labels = np.concatenate(ys)[:limit] if ys and len(ys) == len(xs[names[0]]) else None
    return arrays, labels


def _is_loader(x) -> bool:
    """A torch DataLoader or another re-iterable batch source (not an array, a string or a one-shot iterator)."""
    if isinstance(x, (dict, np.ndarray, str, bytes)) or not hasattr(x, "__iter__"):
        return False
    return not hasattr(x, "__next__")


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------

def final_metrics(graph: gs.Graph, teacher: gs.Graph, data: dict, labels=None) -> dict:
    """evaluate() (top1, agreement, logits CKA) plus the linear CKA of the penultimate layers (the input of the
    last Gemm/MatMul) of student and teacher, and the teacher's own top-1."""
    from .distill import evaluate, linear_cka, predict
    from .evaluate import penultimate_tensor
    res = evaluate(graph, data, labels, teacher=teacher)
    res["cka_logits"] = res.pop("cka")
    ps, pt = penultimate_tensor(graph), penultimate_tensor(teacher)
    res["cka_penultimate"] = None
    if ps and pt:
        _, fs = predict(graph, data, features=[ps])
        _, ft = predict(teacher, data, features=[pt])
        res["cka_penultimate"] = linear_cka(fs[ps], ft[pt])
        res["penultimate"] = ps
    if labels is not None:
        res["teacher_top1"] = evaluate(teacher, data, labels)["top1"]
        res["top1_drop"] = res["teacher_top1"] - res["top1"]
    return res


def _penultimate_features(graph: gs.Graph, data: dict):
    from .distill import predict
    from .evaluate import penultimate_tensor
    name = penultimate_tensor(graph)
    if name is None:
        return None
    return predict(graph, data, features=[name])[1][name]


def _penultimate_cka(graph: gs.Graph, data: dict, teacher_features) -> float | None:
    from .distill import linear_cka
    f = _penultimate_features(graph, data)
    return None if f is None else linear_cka(f, teacher_features)


HINT_SUFFIX = "__graphopt_pca_hint"


def _vector_width(graph: gs.Graph, name: str) -> int | None:
    t = graph.tensors().get(name)
    shape = getattr(t, "shape", None)
    if shape is None or len(shape) != 2 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        return None
    return int(shape[1])


#: Procrustes ridge toward the identity, relative to the largest singular value of the cross-covariance
PROCRUSTES_RIDGE = 1e-3


def procrustes_rotation(cross: np.ndarray, ridge: float = PROCRUSTES_RIDGE) -> np.ndarray:
    """The orthogonal R maximizing trace(R^T cross) (orthogonal Procrustes: z @ R ~ s for cross = z^T s), made
    unique. Where the student has dead or constant units, cross has (near-)zero singular values and the plain
    solution U @ Vt is arbitrary in that null space: float rounding alone then flips signs and rotations of the
    hint there (this made 2 training processes end 2% of the logit scale away from 1). A small ridge toward the
    identity, polar(cross + ridge * sigma_max * I), picks the rotation closest to the identity among the near-
    optimal ones and leaves the well-determined part as it is."""
    k = cross.shape[0]
    sig_max = float(np.linalg.norm(cross, 2)) if cross.size else 0.0
    u, _, wt = np.linalg.svd(cross + ridge * max(sig_max, 1e-30) * np.eye(k, dtype=cross.dtype))
    return u @ wt


def pca_hint_teacher(teacher: gs.Graph, features: np.ndarray, k: int,
                     student_features: np.ndarray | None = None) -> tuple[gs.Graph, str, float]:
    """A copy of `teacher` with one more tensor: its penultimate vector projected on the top-k principal components
    of `features` (the teacher's penultimate vectors on the data, n x C). With `student_features` (the student's
    penultimate vectors on the same data, n x k), the projection is then rotated and scaled onto them (orthogonal
    Procrustes), so the hint asks the student for the teacher's principal subspace in the student's own basis: the
    hint loss is then a Procrustes distance, which like linear CKA ignores rotations and scale, instead of forcing
    the ReLU features onto the signed PCA axes. The hint is shifted to be non-negative on the data. The teacher's
    outputs are unchanged. Returns (graph, hint tensor name, scale): distill's feature loss divides the MSE by the
    target's mean square; multiplying the weight by `scale` (mean square / variance of the hint on the data) makes
    it the MSE relative to the hint's variance, about 1 - R^2."""
    from .evaluate import penultimate_tensor
    name = penultimate_tensor(teacher)
    x = features.reshape(len(features), -1).astype(np.float64)
    mu = x.mean(0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    k = min(k, len(vt))
    m = vt[:k].T.copy()                               # C x k: teacher vector -> principal coordinates
    m *= np.where(mu @ m < 0, -1.0, 1.0)[None, :]
    z = (x - mu) @ m
    offset = np.zeros(k)
    if student_features is not None:
        s = student_features.reshape(len(student_features), -1).astype(np.float64)
        if s.shape == z.shape:
            sc = s - s.mean(0)
            cross = z.T @ sc
            sig = np.linalg.svd(cross, compute_uv=False)
            rot = procrustes_rotation(cross)          # k x k orthogonal: z @ rot ~ sc
            scale = float(sig.sum() / max(np.sum(z * z), 1e-12))
            m = scale * (m @ rot)
            z = (x - mu) @ m
            offset = s.mean(0)
    offset = offset - mu @ m                          # target = x @ m + offset
    target = x @ m + offset
    offset = offset + np.maximum(0.0, -target.min(0))
    target = x @ m + offset
    g = copy_graph(teacher)
    src = g.tensors()[name]
    dtype = src.dtype or np.float32
    hint = name + HINT_SUFFIX
    mid = gs.Variable(hint + "_proj", dtype=dtype, shape=[src.shape[0], k])
    out = gs.Variable(hint, dtype=dtype, shape=[src.shape[0], k])
    w = gs.Constant(hint + "_w", np.ascontiguousarray(m.astype(np.float32)))
    b = gs.Constant(hint + "_b", offset.astype(np.float32))
    g.nodes.append(gs.Node("MatMul", hint + "_matmul", inputs=[src, w], outputs=[mid]))
    g.nodes.append(gs.Node("Add", hint + "_add", inputs=[mid, b], outputs=[out]))
    toposort(g)
    scale = float(np.mean(target ** 2) / max(np.mean((target - target.mean(0)) ** 2), 1e-12))
    return g, hint, scale


def _output_form(graph: gs.Graph, calib: dict, out: np.ndarray | None = None) -> dict:
    """DistillConfig's class_axis and outputs for the graph's first output, seen on a few training examples: a CTC
    recognizer's [N, T, C] (graphopt.task_metrics.task_kind) has its classes on the last axis, and an output whose
    rows are distributions over the class axis (a final Softmax) is distilled through its logs ("probs"), as is a
    one-channel map with values in [0, 1] (a final Sigmoid: distill.binary_kd_loss)."""
    from .distill import predict
    from .task_metrics import task_kind
    if out is None:             # the first output on a few training examples
        out = predict(graph, {k: v[:4] for k, v in calib.items()})[0]
    axis = out.ndim - 1 if task_kind(out.shape, out) == "ctc" else 1
    binary = out.ndim > axis and out.shape[axis] == 1            # a one-channel map: probabilities when in [0, 1]
    probs = out.ndim > axis and bool(np.min(out) >= 0) and (bool(np.max(out) <= 1) if binary else
                                                            bool(np.allclose(out.sum(axis), 1.0, atol=1e-3)))
    return {"class_axis": axis, "outputs": "probs" if probs else "logits"}


def _diverged(m: dict, temperature, s: Schedule) -> bool:
    """A phase at one temperature (a falling temperature changes the loss's scale) of at least divergence_steps
    steps that ends with its loss (mean of its last steps) above divergence_ratio times its first step's loss (the
    model before any update), by more than the batches' noise (twice the spread of the last steps' losses, the
    first step being one batch too): training made the student worse than where it started. The PP-OCRv4
    recognizer at lr 1e-3: 83% of lines decoded as the teacher after a 0.9x prune, 0% after 24 steps (loss 5.5 ->
    11.8); at lr 1e-4 the loss fell 1.3 -> 0.3 and 78% stayed. A QAT phase over 1536 distinct lines (batch 16)
    started on a batch at 0.10 and ended at 0.14 on average while its batches ranged over 0.05-0.28: noise."""
    losses = [float(x) for x in (m.get("history") or {}).get("loss") or []]
    last, steps = m.get("loss_last"), m.get("steps") or 0
    if not isinstance(temperature, (int, float)) or not losses or last is None or steps < s.divergence_steps:
        return False
    first = losses[0]
    if not np.isfinite(first):
        return False
    if not np.isfinite(last):
        return True
    from .distill import loss_window
    n_last = loss_window(len(losses))
    # the batches' spread from at least NOISE_STEPS last steps: a phase of 16 steps averages loss_last over one,
    # whose spread of 0 made any rise divergence (PP-OCRv4's recognizer after lsq: a first batch at 0.046 took lr
    # 1e-4 down to 1e-6 for every phase, QAT included)
    spread = losses[-max(n_last, min(NOISE_STEPS, len(losses) - 1)):]
    noise = 2.0 * float(np.std(spread)) * math.sqrt(1.0 + 1.0 / n_last)
    return bool(last > s.divergence_ratio * first and last - first > noise)


def _no_lower(m: dict, before: dict) -> bool:
    """A retry (metrics m, at a tenth of the lr, same start and batches) that ended no lower than the attempt it
    replaced: both last losses finite and m's not below."""
    a, b = m.get("loss_last"), before.get("loss_last")
    return a is not None and b is not None and bool(np.isfinite(a) and np.isfinite(b) and a >= b)


#: the fewest last steps _diverged estimates the batches' spread from
NOISE_STEPS = 8


def _temperature_cap(out: np.ndarray, config) -> float:
    """distill.useful_temperature of the original's first output `out` (one-channel maps have no class axis to
    soften: no cap)."""
    from .distill import useful_temperature
    if out.ndim <= config.class_axis or out.shape[config.class_axis] < 2:
        return float("inf")
    return useful_temperature(out, config.class_axis, config.outputs == "probs")


#: the share of the memory budget compress lets distill fill with the teacher's cached outputs (when compress made
#: the DistillConfig): distill's own 512 MB held PP-OCRv4's recognizer out (1.1 MB of outputs per line), so the
#: teacher ran again on every batch of 1024 training lines
TEACHER_CACHE_SHARE = 0.125


def _fit_memory(original, config, train, max_memory, notice, student=None, grow_cache=False):
    """(config with a micro-batch whose estimated peak fits the memory budget, the figures for the report). The
    student is `original` unless given (the fake-quantized graph of QAT). grow_cache: raise the teacher-output cache
    limit to TEACHER_CACHE_SHARE of the budget (counted in the estimate like the rest)."""
    from .limits import available_memory
    from .memory_estimate import fit_micro_batch, output_bytes, training_bytes
    from .distill import cache_itemsize
    budget = int(max_memory) if max_memory is not None else available_memory()
    if grow_cache:
        config = replace(config, cache_limit_mb=max(config.cache_limit_mb, TEACHER_CACHE_SHARE * budget / 2 ** 20))
    want = min(config.micro_batch or config.batch_size, config.batch_size)   # never more than the batch
    cached = 0
    if isinstance(train, dict) and config.cache_teacher:    # distill caches the teacher's outputs up to a limit,
        n = len(next(iter(train.values())))                 # in bfloat16 where only half fits (counted as half)
        itemsize = cache_itemsize(output_bytes(original) * n, config.cache_limit_mb)
        cached = (n * itemsize + 3) // 4
    student = original if student is None else student
    m, need = fit_micro_batch(student, [original], want, budget, cached)
    if m < want:
        full = training_bytes(student, [original], want, cached)
        notice(f"compress: a micro-batch of {want} would need about {full / 2 ** 30:.1f} GiB of the "
               f"{budget / 2 ** 30:.1f} GiB budget: training {m} examples at a time instead (gradients accumulated "
               f"to the batch of {config.batch_size}: the same steps, more time)")
        config = replace(config, micro_batch=m)
    return config, {"estimate_bytes": need, "budget_bytes": budget, "micro_batch": m, "teacher_cached": cached}


def _run_key(original, train, labels, pm, config, schedule, epochs, distill, world) -> str:
    """What identifies a compress run for its checkpoints: the model, the training data, and every option that
    changes what is trained (a DataLoader cannot be hashed: its length stands in for it)."""
    from dataclasses import asdict, fields

    from .checkpoints import run_key
    from .graph import to_onnx
    # the teacher cache's limit follows the memory available at the time (_fit_memory): not part of what is trained
    cfg = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in ("progress", "checkpoint",
                                                                                      "resume", "cache_limit_mb")}
    parts = [to_onnx(original).SerializeToString(), pm.resolved(), cfg, asdict(schedule), epochs, distill, world]
    if isinstance(train, dict):
        parts += [np.asarray(v) for _, v in sorted(train.items())]
    else:
        parts.append(("loader", len(train) if hasattr(train, "__len__") else None))
    if labels is not None:
        parts.append(np.asarray(labels))
    return run_key(parts)


# ----------------------------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------------------------

def _compress_or_discard(args: dict):
    """_compress, and when it fails before its first checkpoint, no checkpoint folder left behind (it would only
    make the rerun that the error line advises refuse to start)."""
    try:
        return _compress(**args)
    except BaseException:
        if args["checkpoint_dir"] is not None and not args["resume"]:
            from .checkpoints import discard_if_empty
            discard_if_empty(args["checkpoint_dir"])
        raise


def compress(original: gs.Graph, train, pipeline, labels=None, eval_data=None, epochs: int | None = None,
             batch_size: int = 64, lr: float | None = None, seed: int = 0, log=None, distill_config=None,
             distributed: bool = False, distill: bool = True, schedule: Schedule | None = None,
             eval_labels=None, threads: int | None = None, progress=None,
             micro_batch: int | None = DEFAULT_MICRO_BATCH, checkpoint_dir=None, resume: bool = False,
             checkpoint_every_s: float = 300.0, max_memory: int | None = None,
             notice=None, after_training=None) -> tuple[gs.Graph, dict]:
    """Run `pipeline` on `original` with distillation from it.

    train: {input name: array, "labels": optional} or a torch DataLoader; labels may also be given apart.
    eval_data: held-out data in the same forms (labels inside or as eval_labels), for the reported metrics.
    epochs: over the whole schedule (default DEFAULT_EPOCHS, 60); lr: peak learning rate of every phase (default
    Schedule.lr, 1e-2: right for small models trained from their own pruned weights; lower it for large ones).
    distill=False: the no-distillation baseline (cross-entropy on the labels only, same schedule).
    distributed: train on the processes of an initialized (or torchrun-launched) process group.
    micro_batch: examples per forward/backward pass (gradients accumulated over the batch; None: the whole batch);
    runs on 1 and on N processes agree bit for bit when they use the same micro_batch (graphopt.micro_batching).
    checkpoint_dir: a folder for checkpoints (graphopt.checkpoints: after every phase and every
    checkpoint_every_s seconds within one; removed when the run completes); resume=True continues the
    interrupted run saved there, with the result of an uninterrupted run.
    max_memory: bytes training may use (default: what the machine has available). compress estimates its peak from
    the graph's shapes (graphopt.memory_estimate) and, when the micro-batch would not fit, trains fewer examples
    at a time (same global batch, gradients accumulated) and says so through notice (default: log).
    threads: torch intra-op threads while compressing (restored after); None leaves torch's setting. Small models
    gain nothing from several threads, and on a busy machine spinning OpenMP threads can make training many
    times slower (digits on 2 shared cores: 13 s with 1 thread, over 3 minutes with 2).
    after_training: called with the trained fp32 graph before the post-training passes (quantize) run, when the
    pipeline has one (build records it as a stage).
    Returns (compressed graph with the original's input/output names and shapes, info)."""
    args = dict(original=original, train=train, pipeline=pipeline, labels=labels, eval_data=eval_data,
                epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, log=log, distill_config=distill_config,
                distributed=distributed, distill=distill, schedule=schedule, eval_labels=eval_labels,
                progress=progress, micro_batch=micro_batch, checkpoint_dir=checkpoint_dir, resume=resume,
                checkpoint_every_s=checkpoint_every_s, max_memory=max_memory, notice=notice,
                after_training=after_training)
    if threads is None:
        return _compress_or_discard(args)
    import torch
    if threads < 1:
        raise BadInput("compress: threads must be at least 1")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return _compress_or_discard(args)
    finally:
        torch.set_num_threads(before)


def _compress(original, train, pipeline, labels, eval_data, epochs, batch_size, lr, seed, log, distill_config,
              distributed, distill, schedule, eval_labels, progress, micro_batch, checkpoint_dir, resume,
              checkpoint_every_s, max_memory, notice, after_training):
    from .distill import DistillConfig, batches_per_epoch, capped_temperature, distill as run_distill, predict
    from .evaluate import channels_per_layer

    t_start = time.perf_counter()
    log = log or (lambda m: None)
    s = schedule or Schedule()
    s.validate()
    epochs = DEFAULT_EPOCHS if epochs is None else int(epochs)
    if epochs < 1:
        raise BadInput("compress: epochs must be at least 1")
    pm = pipeline if isinstance(pipeline, PassManager) else PassManager.parse(str(pipeline))
    names = [n for n, _, _ in input_specs(original)]

    if isinstance(train, dict):
        train, labels = _split_labels(train, labels, names, "training data", class_count(original))
        calib = train
    elif _is_loader(train):
        calib, loader_labels = _from_loader(train, names, s.calib_samples, "training data")
    else:
        raise BadInput("compress: the training data must be {input name: array} or a torch DataLoader")
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
    if not distill and labels is None and not (_is_loader(train) and loader_labels is not None):
        raise BadInput("compress without distillation trains on labels: the training data has none")
    if eval_data is not None:
        if isinstance(eval_data, dict):
            eval_data, eval_labels = _split_labels(eval_data, eval_labels, names, "evaluation data",
                                                   class_count(original))
        elif _is_loader(eval_data):
            eval_data, got = _from_loader(eval_data, names, None, "evaluation data")
            check_finite(eval_data, "evaluation data")
            eval_labels = eval_labels if eval_labels is not None else got
            if eval_labels is not None:
                eval_labels = check_labels(eval_labels, class_count(original), "evaluation data")
        else:
            raise BadInput("compress: the evaluation data must be {input name: array} or a torch DataLoader")

    bad = nonfinite_weights(original)
    if bad:
        raise BadInput(f"compress: the model's weight '{bad[0]}' holds NaN or Inf ({len(bad)} weight(s) in all); "
                       f"there is nothing sound to distill from")

    dist_info = None
    if distributed:
        from . import distributed as dist_mod
        dist_info = dist_mod.setup()
    base = distill_config or DistillConfig(batch_size=batch_size, lr=lr if lr is not None else s.lr, seed=seed,
                                           micro_batch=micro_batch, teacher_hard_weight=s.teacher_hard_weight,
                                           map_balance=s.map_balance, frame_balance=s.frame_balance,
                                           map_threshold=s.map_threshold)
    probe = predict(original, {k: v[:16] for k, v in calib.items()})[0]   # the original's first output, once
    if distill_config is None:
        base = replace(base, **_output_form(original, calib, probe))
    t_cap = _temperature_cap(probe, base)
    from .task_metrics import task_kind
    kind = task_kind(probe.shape, probe) if distill_config is None and s.decisions else None
    if kind in ("ctc", "map"):
        t_cap = min(t_cap, s.decision_temperature)
        base = replace(base, teacher_label_smoothing=0.0,
                       teacher_hard_weight=max(base.teacher_hard_weight, s.decision_teacher_hard_weight))
        what = "a CTC recognizer (decoded frame by frame)" if kind == "ctc" else "a probability map (thresholded)"
        log(f"compress: {what}: distilled at temperature {t_cap:g}, no label smoothing, with the original's "
            f"decisions as targets (weight {base.teacher_hard_weight:g})")
    elif t_cap < s.light_temperature:
        log(f"compress: distillation temperatures capped at {t_cap:.2f} (above it the original's soft targets put "
            f"under a fifth of their mass on its top class)")
    base.validate()
    if distill_config is not None and lr is not None:
        base = replace(base, lr=lr)
    if not distill:
        base = replace(base, kd_weight=0.0, hard_weight=1.0, feature_weight=0.0, attention_weight=0.0)
    if dist_info is not None:
        base = dist_mod.configure(base, dist_info)

    def sync(g):
        """Rank 0's graph everywhere after a structural pass (distributed), so no process can diverge."""
        return dist_mod.broadcast_graph(g, dist_info) if dist_info is not None else g

    base, memory = _fit_memory(original, base, train, max_memory, notice or log, grow_cache=distill_config is None)
    ckpts = None
    if checkpoint_dir is not None:
        from .checkpoints import Checkpoints
        key = _run_key(original, train, labels, pm, base, s, epochs, distill,
                       dist_info.world_size if dist_info is not None else 1)
        ckpts = Checkpoints(checkpoint_dir, key, resume=resume, every_s=checkpoint_every_s,
                            writer=dist_info is None or dist_info.rank == 0)
    elif resume:
        raise BadInput("compress: resume needs the checkpoint folder of the interrupted run")

    teacher = copy_graph(original)
    ctx = PassContext(seed=seed, data={"calib": calib, "train": calib, "teacher": teacher}, progress=progress)

    # the phases, with their epochs
    prune_steps = {id(p): _prune_steps(p, s) for p in pm.passes if p.name == "prune-channels" and not p.exact}
    n_steps = sum(len(v) for v in prune_steps.values()) + \
        sum(1 for p in pm.passes if not p.exact and p.name not in POST_TRAINING and p.name != "prune-channels")
    qat = any(p.name == "quantize" and p.opts.get("qat") for p in pm.passes)
    qat_epochs = (max(1, int(round(epochs * s.qat_share))) if n_steps else epochs) if qat else 0
    fine_tune = bool(n_steps) or not qat          # QAT alone: no fp32 fine-tuning of an unchanged model
    train_epochs = max(1, epochs - qat_epochs)
    # phase_unit "steps" (arrays, or a DataLoader with a length): the schedule's shares of epochs x batches per
    # epoch, at least one step each
    per_epoch = batches_per_epoch(train, base.batch_size)
    in_steps = bool(n_steps) and per_epoch is not None and s.phase_unit == "steps"
    if in_steps:
        total = train_epochs * per_epoch
        final_epochs = max(1, int(round(total * s.fine_tune_share)))
        rest = max(n_steps, total - final_epochs)
        final_epochs = min(final_epochs, max(1, total - rest))
    else:
        final_epochs = max(1, int(round(train_epochs * s.fine_tune_share))) if n_steps else train_epochs
        if n_steps and train_epochs - final_epochs < n_steps:      # every step trains at least one epoch
            final_epochs = max(1, train_epochs - n_steps)
        rest = max(n_steps, train_epochs - final_epochs)
    per_step = [rest // n_steps + (1 if i < rest % n_steps else 0) for i in range(n_steps)] if n_steps else []

    original_size = _metrics(original)
    graph = copy_graph(original)
    history, records, step_no = [], [], 0
    post = []
    round_to_used = {}

    def train_phase(g, kind: str, size: int, temperature, features: str, config=None):
        """size: epochs, or optimizer steps when in_steps (the QAT phase: always epochs)."""
        nonlocal step_no
        step_no += 1
        done = ckpts.phase(step_no) if ckpts is not None else None
        if done is not None:                    # resuming: this phase completed before the interruption
            history.append(done[1])
            if done[1].get("lr"):               # a divergence lowered the lr before the interruption: keep it
                lr_scale[0] = done[1]["lr"] / (config or base).lr
            log(f"compress: step {step_no} ({kind}) read from the checkpoint")
            return done[0]
        mode = features if distill else "none"
        t_graph, pair, hint_scale = teacher, None, 1.0
        if mode in ("hint", "both"):
            t_graph, pair, hint_scale = hint_for(g)
            if pair is None:
                mode = "adapters" if mode == "hint" else mode
        # eval_samples=0: distill's metrics on the training data (student and teacher run over up to 2048 training
        # examples after every phase) are not used here; on PP-OCRv4's recognizer they took most of each phase
        temperature = capped_temperature(temperature, t_cap)
        span = dict(epochs=-(-size // per_epoch), steps=size) if in_steps and kind != "qat" else \
            dict(epochs=size)
        cfg = replace(config or base, **span, temperature=temperature, feature_weight=0.0,
                      attention_weight=0.0, eval_samples=0)
        adapters = False
        if mode in ("adapters", "both") and base.feature_weight:
            try:
                r = PassManager([make_pass("insert-adapters", **s.adapter_options)]).run(
                    g, PassContext(seed=seed, verify="structural", data=ctx.data))
                adapters = r.modified
                if adapters:
                    g = r.graph
                    cfg = replace(cfg, feature_weight=base.feature_weight, attention_weight=base.attention_weight)
            except Exception as e:   # noqa: BLE001 - no pairable layers: distill on logits (and the hint) only
                reraise_if_strict(e)
                log(f"compress: no feature adapters ({str(e).splitlines()[0]})")
        if pair is not None:
            # distill weighs every pair alike (it averages them): with adapters the hint is one more pair at their
            # weight; alone it gets hint_weight (relative to the hint's variance)
            weight = cfg.feature_weight if adapters else s.hint_weight * hint_scale
            cfg = replace(cfg, feature_weight=weight, feature_pairs=tuple(cfg.feature_pairs) + (pair,))
        t0 = time.perf_counter()
        with (progress or Progress("off")).task(f"training step {step_no} ({kind})", size) as update:
            cfg = replace(cfg, progress=lambda i, total, r: update(i, f"loss {r['loss']:.4g}", new_total=total))
            if ckpts is not None:
                k = step_no
                cfg = replace(cfg, resume=ckpts.partial(k),
                              checkpoint=lambda i, state: ckpts.save_partial(k, state()) if ckpts.due() else None)
            start, lr0 = g, (config or base).lr
            before = None               # the attempt a retry at a tenth of its lr replaced: (graph, metrics, scale)
            while True:
                cfg = replace(cfg, lr=lr0 * lr_scale[0])
                try:
                    g, m = run_distill(copy_graph(start), [t_graph], train, labels=labels, config=cfg,
                                       eval_data=eval_data, eval_labels=eval_labels)
                except CheckFailed as e:
                    raise CheckFailed(f"compress: training step {step_no} ({kind}): {e}") from None
                diverged = _diverged(m, temperature, s)
                no_lower = before is not None and _no_lower(m, before[1])
                if dist_info is not None:           # each process saw its own shard's loss: rank 0 decides
                    diverged = dist_mod.broadcast_value(diverged, dist_info)
                    no_lower = dist_mod.broadcast_value(no_lower, dist_info)
                if no_lower:
                    # a tenth of the lr ended no lower on the same batches: the rise was the batches, not the lr
                    # (PP-OCRv4's recognizer, seed 1: a prune step was judged diverged at 1e-4 and 1e-5 and still
                    # ended at 0.75 from a first batch of 0.63 at 1e-6, and the fine-tuning inherited 1e-6)
                    g, m, lr_scale[0] = before
                    cfg = replace(cfg, lr=lr0 * lr_scale[0])
                    log(f"compress: step {step_no} ({kind}) at lr {lr0 * lr_scale[0] / 10:g} ended no lower than at "
                        f"{lr0 * lr_scale[0]:g}: the rise is the batches' noise; kept the attempt at the higher lr")
                    break
                if not diverged or lr_scale[0] <= s.divergence_min_scale:
                    break
                before = (g, m, lr_scale[0])
                lr_scale[0] /= 10.0
                log(f"compress: step {step_no} ({kind}) diverged (loss {m['history']['loss'][0]:.4g} -> "
                    f"{m['loss_last']:.4g}); trained again from the same start at lr {lr0 * lr_scale[0]:g}, "
                    f"and the later steps keep it")
                cfg = replace(cfg, resume=None)
        rec = {"step": step_no, "phase": kind, "features": mode, "lr": cfg.lr,
               **({"epochs": round(size / per_epoch, 3), "steps": size} if "steps" in span
                  else {"epochs": size}),
               "temperature": temperature if isinstance(temperature, (int, float)) else "falling to 1",
               **_metrics(g), "channels": list(channels_per_layer(g).values()),
               "seconds": round(time.perf_counter() - t0, 2),
               "loss_first": m.get("loss_first"), "loss_last": m.get("loss_last")}
        for k in ("top1", "agreement"):
            if (m.get("eval") or {}).get(k) is not None:
                rec[k] = m["eval"][k]
        if pen_teacher is not None:
            rec["cka_penultimate"] = _penultimate_cka(g, eval_data, pen_teacher)
        history.append(rec)
        if ckpts is not None:
            ckpts.save_phase(step_no, g, rec)
        log(f"compress: step {step_no} ({kind}): " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                              for k, v in rec.items() if k not in ("step", "phase")))
        return g

    pen_teacher = _penultimate_features(teacher, eval_data) if eval_data is not None else None
    hint_cache = {}
    lr_scale = [1.0]                # lowered for good when a phase diverges

    def hint_for(g):
        """(teacher with the PCA hint for g's penultimate width, (student tensor, hint tensor), weight scale), or
        (teacher, None, 1) when student or teacher has no vector penultimate layer."""
        from .evaluate import penultimate_tensor
        ps, pt = penultimate_tensor(g), penultimate_tensor(teacher)
        k = _vector_width(g, ps) if ps else None
        kt = _vector_width(teacher, pt) if pt else None
        if not k or not kt or k > kt:
            return teacher, None, 1.0
        if "features" not in hint_cache:
            hint_cache["data"] = {n: a[:s.hint_samples] for n, a in calib.items()}
            hint_cache["features"] = _penultimate_features(teacher, hint_cache["data"])
        if k > min(hint_cache["features"].shape):
            return teacher, None, 1.0
        student = _penultimate_features(g, hint_cache["data"]) if s.hint_align else None
        t_graph, hint, scale = pca_hint_teacher(teacher, hint_cache["features"], k, student)
        return t_graph, (ps, hint), scale

    phase_i, carry = 0, 0
    for p in pm.passes:
        if p.exact:
            r = PassManager([p]).run(graph, ctx)
            graph = sync(r.graph)
            records += r.records
            continue
        if p.name in POST_TRAINING:
            post.append(p)
            continue
        if p.name == "prune-channels":
            extra = {} if "criterion" in p.given else {"criterion": s.criterion}
            if "reconstruct" not in p.given and s.reconstruct != "none":
                extra["reconstruct"] = s.reconstruct
            if "round_to" not in p.given and "min_widths" not in p.given and s.narrow_round_to:
                extra["min_widths"] = s.min_widths
                round_to_used[p.text()] = f"{ctx.hw.structure.channels} where a layer keeps >= {s.min_widths} widths"
            latency_before = 1.0        # latency budgets are measured on the target: relative to the step before
            for i, step in enumerate(prune_steps[id(p)]):
                cur = _metrics(graph)
                opts = {**dict(p.given), **extra}
                if "latency" in step:
                    opts["latency"] = min(1.0, step["latency"] / latency_before)
                    latency_before = step["latency"]
                if "flops" in step:
                    opts["flops"] = min(1.0, step["flops"] * original_size["macs"] / max(cur["macs"], 1))
                if "params" in step:
                    opts["params"] = min(1.0, step["params"] * original_size["params"] / max(cur["params"], 1))
                if "ratio" in step:
                    opts["ratio"] = step["ratio"] if i == 0 else s.fine_fraction * p.opts["ratio"]
                light = i == 0
                n_ep = per_step[phase_i] + carry
                phase_i += 1
                if opts.get("flops", 1.0) >= 1.0 and opts.get("params", 1.0) >= 1.0 and opts.get("latency", 1.0) >= 1.0 \
                        and not opts.get("ratio"):
                    carry = n_ep                  # nothing left to prune at this step: its epochs go to the next
                    continue
                carry = 0
                r = PassManager([make_pass("prune-channels", **opts)]).run(graph, ctx)
                graph = sync(r.graph)
                records += r.records
                graph = train_phase(graph, "prune-light" if light else "prune-fine", n_ep,
                                    s.light_temperature if light else s.fine_temperature,
                                    s.light_features if light else s.step_features)
        else:
            r = PassManager([p]).run(graph, ctx)
            graph = sync(r.graph)
            records += r.records
            n_ep = per_step[phase_i] + carry
            phase_i, carry = phase_i + 1, 0
            graph = train_phase(graph, p.name, n_ep, s.fine_temperature, s.step_features)
    # fine-tune: no more structural change, temperature falling to 1
    if fine_tune:
        graph = train_phase(graph, "fine-tune", final_epochs + carry, s.final_temperature, s.fine_tune_features)
    if post and after_training is not None:
        after_training(graph)
    quantization = None
    for p in post:
        qat_pass = p.name == "quantize" and p.opts.get("qat")
        step = make_pass(p.name, **{k: v for k, v in p.given.items() if k not in ("qat", "qat_scales")}) \
            if qat_pass else p
        if step.opts.get("max_drop", -1) >= 0 and "eval" not in ctx.data:
            # quantize{max_drop}'s fallback is chosen on training examples (their labels when there are some, else
            # agreement with the fp32 graph): the held-out data stays held out
            ctx.data["eval"] = {**{k: v[:s.calib_samples] for k, v in calib.items()},
                                **({"labels": labels[:s.calib_samples]} if labels is not None else {})}
            log(f"compress: {step.name}{{max_drop}} scores its fallback on the first "
                f"{len(next(iter(ctx.data['eval'].values())))} training examples")
        r = PassManager([step]).run(graph, ctx)
        graph = sync(r.graph)
        records += r.records
        if qat_pass:       # quantization-aware training from the PTQ graph (graphopt.qat), logits distilled
            from .distill import evaluate as evaluate_graph
            from .qat import activation_scales, export_qdq, fake_quant
            from .shapes import infer
            fake, made = fake_quant(infer(graph))
            learned = activation_scales(fake) if p.opts["qat_scales"] == "learned" else []
            qat_cfg, qat_memory = _fit_memory(original, replace(base, lr=base.lr * s.qat_lr_scale,
                                                                teacher_label_smoothing=0.0,
                                                                scale_params=tuple(learned)),
                                              train, max_memory, notice or log, student=fake)
            quantization = {"qat": True, "scales": (f"{len(learned)} activation scales learned" if learned
                                                    else "kept (PTQ calibration)"),
                            "trained_tensors": len(made["weights"]),
                            "trained_biases": len(made["biases"]), "kept_integer": made["kept"], "epochs": qat_epochs,
                            "memory": qat_memory}
            if eval_data is not None:
                ptq = evaluate_graph(graph, eval_data, eval_labels, teacher=teacher)
                quantization["ptq"] = {k: ptq[k] for k in ("top1", "agreement", "agreement_metric")}
            fake = train_phase(fake, "qat", qat_epochs, s.qat_temperature, "none", qat_cfg)
            graph = sync(export_qdq(fake))
    if [t.name for t in graph.inputs] != [t.name for t in original.inputs] or \
            [o[0] for o in output_specs(graph)] != [o[0] for o in output_specs(original)]:
        raise BadInput("compress changed the model's input or output names; this is a bug in a pass")
    bad = nonfinite_weights(graph)
    if bad:
        raise CheckFailed(f"compress: the compressed model's weight '{bad[0]}' holds NaN or Inf ({len(bad)} "
                          f"weight(s) in all); nothing was written")
    if ckpts is not None:
        ckpts.finish()
    final = final_metrics(graph, teacher, eval_data, eval_labels) if eval_data is not None else {}
    size = _metrics(graph)
    info = {"history": history, "epochs": sum(h["epochs"] for h in history), "distill": distill, "final": final,
            "macs_ratio": size["macs"] / max(original_size["macs"], 1),
            "params_ratio": size["params"] / max(original_size["params"], 1),
            "macs": {"before": original_size["macs"], "after": size["macs"]},
            "params": {"before": original_size["params"], "after": size["params"]},
            "channels": channels_per_layer(graph), "round_to": round_to_used,
            "passes": [_pass_summary(rec) for rec in records],
            "seconds": round(time.perf_counter() - t_start, 1)}
    info["memory"] = memory
    info["schedule"] = {f.name: getattr(s, f.name) for f in fields(s) if getattr(s, f.name) != getattr(Schedule(), f.name)}
    info["temperature_cap"] = None if t_cap == float("inf") else round(t_cap, 2)
    if quantization is not None:
        info["quantization"] = quantization
    if dist_info is not None:
        info["distributed"] = {"world_size": dist_info.world_size, "rank": dist_info.rank,
                               "backend": dist_info.backend}
    return graph, info
