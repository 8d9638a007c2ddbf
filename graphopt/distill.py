"""Knowledge distillation on ONNX graphs: losses, schedules, the training loop, evaluation.

`distill(student, teachers, train, labels, config)` trains the student graph's TrainableGraph against one or more
teacher graphs and returns the trained student graph (same structure, new weights) and metrics. The loss is

    kd_weight * KD  +  teacher_hard_weight * CE(teacher arg-max)  +  hard_weight(t) * CE(labels)
    +  feature_weight * FEAT  +  attention_weight * AT

* KD (Hinton et al.): KL(teacher || student) of the outputs softened by the temperature T(t), times T^2. The
  teachers' softened probabilities are averaged (weighted; or their logits, ensemble="logits") and then label-
  smoothed (teacher_label_smoothing, 0.1: p = 0.9 p + 0.1 / K). Softmax runs over `class_axis` (1) of every
  original output whose shape matches the teacher's output at the same position.
* CE(teacher arg-max): cross-entropy against the first teacher's arg-max class at every position of the distilled
  outputs (teacher_hard_weight, default 0). KD at a temperature spends most of its signal on the teacher's tail of
  unlikely classes; this term weighs the decision itself, what a CTC recognizer decodes frame by frame.
* T(t) follows `temperature`: phases (until_fraction, T_at_phase_start, T_at_phase_end), linear inside a phase.
  The default anneals 10 -> 5 over the first 30% of the steps, 5 -> 3 until 70%, 2 -> 1 after: the brief's bands
  "5 to 10", "3 to 5", "1 to 2", each traversed from its high end to its low end.
* CE: cross-entropy with the hard labels on output `label_output`, weighted hard_weight(t), linear from
  hard_weight[0] at the start to hard_weight[1] at the end (default 0.5 -> 0.1: lean on the labels while the
  student is far from the teacher, on the teacher's soft targets later). Zero without labels.
* FEAT (FitNets): MSE between each adapter output "<s>__adapted" (inserted by the insert-adapters pass) and the
  first teacher's paired tensor, divided by the teacher feature's mean square (feature_normalize), averaged over
  pairs. Extra pairs of equal shape can be given without adapters (feature_pairs).
* AT (Zagoruyko & Komodakis): for the same pairs, when they have spatial positions, the squared L2 distance
  between the L2-normalized attention maps mean_c |x|^p (p = 2) of the student tensor and of the teacher tensor,
  averaged over the batch (in [0, 2] whatever the resolution; the paper's beta = 1000 on the per-position mean
  is this with weight 1000 / positions). Default weight 0.3 (on digits, a half-width student with adapters:
  0.3 agreed with the teacher slightly more often than 0, 1 or the paper's scale).

Optimization: AdamW (or SGD with momentum), linear learning-rate warmup over `warmup` of the steps then cosine
decay to lr * min_lr, gradient-norm clipping at clip_grad_norm. The student's adapters train with it and are
removed from the returned graph (keep_adapters=False), so they never reach an artifact.

Micro-batches and several processes (graphopt.micro_batching): every step's global batch of batch_size examples
is cut into micro-batches of at most micro_batch examples (default 32), whose gradients are accumulated. With
`shard=(rank, world_size)` (graphopt.distributed sets it) each process computes every world_size-th micro-batch,
and the micro-batches' gradients are exchanged and summed in micro-batch order, so N processes take bit for bit
the steps one process takes (same micro_batch, same torch thread count). `device` moves student, teachers and
batches to a torch device ("cuda:0").
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F

from .adapters import adapter_pairs, remove_adapters
from .allocator import kept_freed_memory
from .data_checks import check_finite, check_labels, class_count
from .errors import BadInput, CheckFailed
from .micro_batching import (DEFAULT_MICRO_BATCH, SlotSum, micro_batches, ordered_sum, owned,
                             reduce_gradients)
from .layouts import tensor_layouts
from .trainable import TrainableGraph, parameter_names

__all__ = ["DistillConfig", "distill", "evaluate", "linear_cka", "kd_loss", "attention_map", "attention_loss",
           "feature_loss", "temperature_at", "hard_weight_at", "lr_at", "predict"]

DEFAULT_TEMPERATURE = ((0.3, 10.0, 5.0), (0.7, 5.0, 3.0), (1.0, 2.0, 1.0))


@dataclass
class DistillConfig:
    # length and batches
    epochs: int = 10
    steps: int | None = None                 # total optimizer steps; overrides epochs
    batch_size: int = 64
    micro_batch: int | None = DEFAULT_MICRO_BATCH   # examples per forward/backward (None: the whole batch)
    # optimizer
    optimizer: str = "adamw"                 # "adamw" | "sgd"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9                    # sgd only
    warmup: float = 0.05                     # fraction of the steps with linear warmup
    decay: str = "cosine"                    # "cosine" | "linear" | "constant" after warmup
    min_lr: float = 0.0                      # final lr as a fraction of lr
    clip_grad_norm: float | None = 1.0      # over the weights (scale_params are left out)
    scale_params: Sequence[str] = ()         # positive scale initializers trained too (QAT's learned quantization
    #                                          steps, graphopt.qat.activation_scales): each in its own AdamW group
    #                                          whose peak step is scale_lr x its initial value, no weight decay, kept
    #                                          above 1% of its initial value
    scale_lr: float = 1e-3
    # knowledge distillation
    temperature: Any = DEFAULT_TEMPERATURE   # phases (until, T_start, T_end), or a number
    kd_weight: float = 1.0
    teacher_label_smoothing: float = 0.1
    ensemble: str = "probs"                  # average the teachers' "probs" or "logits"
    teacher_weights: Sequence[float] | None = None
    teacher_hard_weight: float = 0.0         # cross-entropy against the (first) teacher's arg-max class at every
    #                                          position of the distilled outputs: the decision itself (a CTC
    #                                          recognizer's frames decode by arg-max); no labels needed
    map_balance: str = "half"                # binary_kd_loss's balance of a one-channel map's positives and
    #                                          negatives: "half" each, or "hard" (DB's 1:3 hard negatives)
    map_threshold: float = 0.5               # a one-channel map's positives: the teacher's probability above this
    #                                          (the balance's split and the decisions' targets); a detector whose
    #                                          map is read at DB's 0.3 (task_metrics.map_iou) can split there
    frame_balance: str = "none"              # "half": a CTC output's ([N, T, C], class_axis 2, blank 0) frames the
    #                                          teacher decodes as blank and those it decodes as a symbol weigh half
    #                                          the KD each (kd_loss's balance_blank); "none": every frame alike
    class_axis: int = 1
    outputs: str = "logits"                  # "logits", or "probs": the outputs already are probabilities over
    #                                          class_axis (a final Softmax, PP-OCR's recognizer): KD and the hard
    #                                          loss take their logs as logits
    # hard labels
    hard_weight: Any = (0.5, 0.1)            # (start, end), linear; or a number
    label_smoothing: float = 0.0
    label_output: int = 0
    # features
    feature_weight: float = 1.0
    feature_normalize: bool = True
    attention_weight: float = 0.3
    attention_p: float = 2.0
    feature_pairs: Sequence[tuple[str, str]] = ()   # (student tensor, teacher tensor) of equal shape, no adapter
    # misc
    seed: int = 0
    keep_adapters: bool = False
    cache_teacher: bool = True               # precompute teacher outputs for array data (up to cache_limit_mb)
    cache_limit_mb: float = 512.0
    eval_samples: int = 2048                 # training examples for metrics["train"] (0: none; compress skips it)
    progress: Callable | None = field(default=None, repr=False)   # progress(step, total, record)
    # checkpoints: checkpoint(steps_done, state_fn) after every optimizer step (state_fn() -> the state to save);
    # resume: such a state, to continue from (weights, optimizer, step, loss history; the data stream is replayed)
    checkpoint: Callable | None = field(default=None, repr=False)
    resume: dict | None = field(default=None, repr=False)
    # several processes / devices
    device: str | None = None                # torch device of student, teachers and batches (None: CPU)
    shard: tuple[int, int] | None = None     # (rank, world size): compute micro-batches rank, rank + world, ...

    def validate(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise BadInput(f"DistillConfig.optimizer must be 'adamw' or 'sgd', not '{self.optimizer}'")
        if self.decay not in ("cosine", "linear", "constant"):
            raise BadInput(f"DistillConfig.decay must be 'cosine', 'linear' or 'constant', not '{self.decay}'")
        if self.outputs not in ("logits", "probs"):
            raise BadInput(f"DistillConfig.outputs must be 'logits' or 'probs', not '{self.outputs}'")
        if self.ensemble not in ("probs", "logits"):
            raise BadInput(f"DistillConfig.ensemble must be 'probs' or 'logits', not '{self.ensemble}'")
        if self.micro_batch is not None and (isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int)
                                             or self.micro_batch < 1):
            raise BadInput(f"DistillConfig.micro_batch must be a positive integer or None, not {self.micro_batch!r}")
        if self.batch_size < 1 or self.epochs < 0 or (self.steps is not None and self.steps < 1):
            raise BadInput("DistillConfig: batch_size and steps must be positive, epochs non-negative")
        if not self.scale_lr > 0:
            raise BadInput("DistillConfig.scale_lr must be above 0")
        if not self.teacher_hard_weight >= 0:
            raise BadInput("DistillConfig.teacher_hard_weight must be a non-negative number")
        check_balances(self, "DistillConfig.")
        if not 0 < self.map_threshold < 1:
            raise BadInput(f"DistillConfig.map_threshold must be a probability in (0, 1), not {self.map_threshold!r}")
        if not 0 <= self.teacher_label_smoothing < 1 or not 0 <= self.label_smoothing < 1:
            raise BadInput("DistillConfig: label smoothing must be in [0, 1)")
        if not 0 <= self.warmup <= 1:
            raise BadInput("DistillConfig.warmup is a fraction of the steps, in [0, 1]")
        if self.shard is not None:
            rank, world = self.shard
            if not (world >= 1 and 0 <= rank < world):
                raise BadInput(f"DistillConfig.shard=(rank, world size) needs 0 <= rank < world size, "
                               f"not {self.shard}")
            if self.batch_size < world:
                raise BadInput(f"DistillConfig: batch_size {self.batch_size} is smaller than the {world} processes")
        _check_phases(self.temperature)


# ----------------------------------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------------------------------

def _check_phases(schedule) -> None:
    if isinstance(schedule, (int, float)):
        if schedule <= 0:
            raise BadInput("the temperature must be positive")
        return
    try:
        phases = [(float(u), float(a), float(b)) for u, a, b in schedule]
    except (TypeError, ValueError):
        raise BadInput("the temperature schedule is a number or phases (until_fraction, T_start, T_end)") from None
    if not phases or any(a <= 0 or b <= 0 for _, a, b in phases):
        raise BadInput("the temperature schedule needs phases with positive temperatures")
    untils = [u for u, _, _ in phases]
    if untils != sorted(untils) or untils[-1] < 1.0 or untils[0] <= 0:
        raise BadInput("temperature phases must end at increasing fractions, the last at 1.0")


def temperature_at(fraction: float, schedule=DEFAULT_TEMPERATURE) -> float:
    """The KD temperature at `fraction` (0..1) of training."""
    if isinstance(schedule, (int, float)):
        return float(schedule)
    fraction = min(max(float(fraction), 0.0), 1.0)
    begin = 0.0
    for until, t0, t1 in schedule:
        if fraction <= until or until >= 1.0:
            span = until - begin
            x = (fraction - begin) / span if span > 0 else 1.0
            return float(t0 + (t1 - t0) * min(max(x, 0.0), 1.0))
        begin = until
    return float(schedule[-1][2])


def hard_weight_at(fraction: float, weight=(0.5, 0.1)) -> float:
    """The hard-label cross-entropy weight at `fraction` of training (linear from start to end)."""
    if isinstance(weight, (int, float)):
        return float(weight)
    a, b = weight
    fraction = min(max(float(fraction), 0.0), 1.0)
    return float(a + (b - a) * fraction)


def lr_at(step: int, total: int, config: DistillConfig) -> float:
    """Learning rate at optimizer step `step` (0-based) of `total`: linear warmup, then decay."""
    warm = int(math.ceil(config.warmup * total))
    if step < warm:
        return config.lr * (step + 1) / warm
    if config.decay == "constant":
        return config.lr
    progress = (step - warm) / max(1, total - warm - 1) if total - warm > 1 else 1.0
    progress = min(max(progress, 0.0), 1.0)
    low = config.lr * config.min_lr
    if config.decay == "linear":
        return config.lr - (config.lr - low) * progress
    return low + (config.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------------------

def useful_temperature(outputs: np.ndarray, axis: int, probs: bool, min_top: float = 0.2,
                       highest: float = 16.0) -> float:
    """The highest temperature (1 at least, `highest` at most) at which the teacher's soft targets still put
    min_top of their mass, on average, on the teacher's own top class. Soft targets exist to show the student
    the teacher's secondary choices, not to erase its first: over PP-OCRv4's 6625 characters, temperature 8 turns
    every frame's target into a near-uniform distribution (0.3% on the teacher's character), the KD loss carries
    almost no signal and a pruned student's decoded lines never matched (cap: 2.7); the digits CNN's 10 classes
    keep a fifth of the mass up to temperature 10."""
    z = np.asarray(outputs, np.float64)
    if probs:
        z = np.log(np.clip(z, 1e-12, None))
    z = np.moveaxis(z, axis, -1).reshape(-1, z.shape[axis])
    if z.shape[1] < 2:
        return highest
    z = z - z.max(axis=1, keepdims=True)

    def top(T):
        return float(np.mean(1.0 / np.exp(z / T).sum(axis=1)))

    if top(1.0) < min_top:
        return 1.0
    if top(highest) >= min_top:
        return highest
    lo, hi = 1.0, highest
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if top(mid) >= min_top else (lo, mid)
    return lo


def capped_temperature(schedule, cap: float):
    """A temperature (a number or distill phases (until, T_start, T_end)) with every value at most cap."""
    if isinstance(schedule, (int, float)):
        return min(float(schedule), cap)
    return tuple((until, min(a, cap), min(b, cap)) for until, a, b in schedule)


def teacher_targets(teacher_logits: Sequence[torch.Tensor], T: float, axis: int = 1, smoothing: float = 0.1,
                    weights: Sequence[float] | None = None, ensemble: str = "probs") -> torch.Tensor:
    """The teachers' soft targets at temperature T: averaged, then label-smoothed."""
    w = np.asarray(weights if weights is not None else [1.0] * len(teacher_logits), dtype=np.float64)
    if len(w) != len(teacher_logits) or np.any(w < 0) or w.sum() <= 0:
        raise BadInput("teacher_weights: one non-negative weight per teacher, not all zero")
    w = w / w.sum()
    if ensemble == "logits":
        z = sum(float(wi) * t for wi, t in zip(w, teacher_logits))
        p = torch.softmax(z / T, dim=axis)
    else:
        p = sum(float(wi) * torch.softmax(t / T, dim=axis) for wi, t in zip(w, teacher_logits))
    if smoothing:
        k = p.shape[axis]
        p = (1.0 - smoothing) * p + smoothing / k
    return p


def _as_logits(out: torch.Tensor, config: "DistillConfig") -> torch.Tensor:
    """An output as logits: itself, or the log of a probability output (DistillConfig.outputs="probs")."""
    return torch.log(out.clamp_min(1e-12)) if config.outputs == "probs" else out


MAP_BALANCES = ("half", "hard")         # DistillConfig.map_balance (and compress's Schedule.map_balance)
FRAME_BALANCES = ("none", "half")       # DistillConfig.frame_balance (and Schedule.frame_balance)


def check_balances(config, prefix: str) -> None:
    """BadInput unless config's map_balance and frame_balance are values distill knows (DistillConfig, Schedule)."""
    for key, allowed in (("map_balance", MAP_BALANCES), ("frame_balance", FRAME_BALANCES)):
        if getattr(config, key) not in allowed:
            raise BadInput(f"{prefix}{key} must be " + " or ".join(f"'{a}'" for a in allowed) +
                           f", not '{getattr(config, key)}'")


def kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, T: float, axis: int = 1,
            balance_blank: int | None = None) -> torch.Tensor:
    """Hinton KD: T^2 * KL(target || softmax(student / T)), averaged over every position but the class axis.
    balance_blank: the positions whose target's top class is that one (a CTC recognizer's blank) and the others
    weigh half the loss each (where both occur). PP-OCRv4's recognizer decodes a symbol in 17% of its frames; at
    0.5x MACs a student distilled with every frame alike kept 99.1% of the blank frames and 95% of the symbol frames,
    and most of its misread lines lost a character ('database' -> 'dataase')."""
    log_q = torch.log_softmax(student_logits / T, dim=axis)
    kl = (torch.xlogy(target_probs, target_probs) - target_probs * log_q).sum(dim=axis)
    if balance_blank is not None:
        blank = target_probs.argmax(dim=axis) == balance_blank
        n_blank = int(blank.sum())
        if 0 < n_blank < blank.numel():
            return (kl[blank].mean() + kl[~blank].mean()) * 0.5 * (T * T)
    return kl.mean() * (T * T)


def teacher_hard_loss(student_outs: Sequence[torch.Tensor], teacher_outs: Sequence[torch.Tensor],
                      config: "DistillConfig") -> torch.Tensor:
    """Mean over the outputs of the cross-entropy of the student against the teacher's arg-max class along
    class_axis, at every other position (one-channel maps: the map thresholded at config.map_threshold, as binary
    cross-entropy)."""
    total = 0.0
    for s, t in zip(student_outs, teacher_outs):
        axis = config.class_axis
        if s.ndim > axis and s.shape[axis] == 1:
            p = s.clamp(1e-6, 1 - 1e-6) if config.outputs == "probs" else torch.sigmoid(s)
            cut = config.map_threshold if config.outputs == "probs" else _logit(config.map_threshold)
            total = total + F.binary_cross_entropy(p, (t.detach() > cut).to(p.dtype))
            continue
        target = t.detach().argmax(dim=axis)
        total = total + F.cross_entropy(_as_logits(s, config).movedim(axis, 1), target)
    return total / max(1, len(student_outs))


def batches_per_epoch(train, batch_size: int) -> int | None:
    """Optimizer steps in one epoch of `train`: arrays by name (ceil(examples / batch_size)), a DataLoader (its
    length), or None (an iterable of unknown length)."""
    if isinstance(train, dict):
        return -(-len(next(iter(train.values()))) // batch_size)
    try:
        return len(train)
    except TypeError:
        return None


def _logit(p: float) -> float:
    """The logit of a probability in (0, 1): where a map's logits cross a probability threshold."""
    return math.log(p / (1 - p))


def binary_kd_loss(student_out: torch.Tensor, teacher_outs: Sequence[torch.Tensor], T: float,
                   probs: bool, weights: Sequence[float] | None = None, balance: str = "half",
                   threshold: float = 0.5) -> torch.Tensor:
    """KD for a one-channel map (a detector's probability map, a binary mask): every element is a Bernoulli
    distribution, so the softmax over a class axis of size one (constant 1, no gradient) becomes the binary KL of
    the teachers' probabilities at temperature T (averaged with `weights`) and the student's, times T^2. probs: the
    outputs are probabilities (a final Sigmoid), distilled through their logits.
    balance="none": a plain mean over the elements.
    balance="half": the elements the teachers call positive (p > threshold at T=1) and the negatives weigh half the
    loss each (where both occur), as detectors are trained (DB's balanced BCE): text covers a few percent of a page,
    and with a plain mean a pruned PP-OCRv4 detector lowered its whole map below threshold (empty map, IoU 0) while
    the loss fell.
    balance="hard": DB's own balance instead: the positives and the 3 x as many negatives of highest loss (all
    when fewer), one mean over them. The hardest negatives are the pixels just outside the text, where the
    half-and-half balance (a positive pixel weighing ~15x a background one on a page) let the student's regions
    grow: PP-OCRv4's 0.5x detector drew them 23% taller than the teacher (map IoU 0.758, every region found)."""
    def logits(out):
        if not probs:
            return out
        p = out.clamp(1e-6, 1 - 1e-6)
        return torch.log(p) - torch.log1p(-p)
    w = np.asarray(weights if weights is not None else [1.0] * len(teacher_outs), dtype=np.float64)
    w = w / w.sum()
    p = sum(float(wi) * torch.sigmoid(logits(t) / T) for wi, t in zip(w, teacher_outs))
    z = logits(student_out) / T
    kl = torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p) - p * F.logsigmoid(z) - (1 - p) * F.logsigmoid(-z)
    if balance not in ("none", "half", "hard"):
        raise ValueError(f"binary_kd_loss: balance {balance!r} is not none, half or hard")
    if balance != "none":
        pos = sum(float(wi) * (logits(t) > _logit(threshold)).to(kl.dtype) for wi, t in zip(w, teacher_outs)) > 0.5
        n_pos = int(pos.sum())
        if 0 < n_pos < pos.numel():
            if balance == "hard":
                neg = kl[~pos]
                k = min(neg.numel(), 3 * n_pos)
                return (kl[pos].sum() + torch.topk(neg, k, sorted=False).values.sum()) / (n_pos + k) * (T * T)
            return (kl[pos].mean() + kl[~pos].mean()) * 0.5 * (T * T)
    return kl.mean() * (T * T)


def _sigmoid_logit_taps(student: gs.Graph, teachers, student_outputs: list[str], teacher_outputs: list[str]) -> dict:
    """{kd position: (student tensor, teacher tensor)}: the inputs of the Sigmoids whose results are the output at
    that position in the student and the (single) teacher."""
    def sigmoid_input(graph, name):
        node = next((n for n in graph.nodes if any(o.name == name for o in n.outputs)), None)
        return node.inputs[0].name if node is not None and node.op == "Sigmoid" else None
    if len(teachers) != 1:
        return {}
    taps = {}
    for i, (sn, tn) in enumerate(zip(student_outputs, teacher_outputs)):
        s_in, t_in = sigmoid_input(student, sn), sigmoid_input(teachers[0], tn)
        if s_in and t_in:
            taps[i] = (s_in, t_in)
    return taps


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, normalize: bool = True,
                 mean_square: torch.Tensor | None = None) -> torch.Tensor:
    """FitNets hint loss: MSE, divided by the teacher feature's mean square when normalize (`mean_square` when
    given: the whole global batch's, in distributed training). Tensors of equal size per example but different
    ranks ((B, C, 1, 1) against (B, C)) are compared flattened."""
    if student_feat.shape != teacher_feat.shape and student_feat.numel() == teacher_feat.numel() \
            and student_feat.shape[0] == teacher_feat.shape[0]:
        student_feat = student_feat.reshape(teacher_feat.shape)
    if student_feat.shape != teacher_feat.shape:
        raise BadInput(f"feature loss: student {tuple(student_feat.shape)} vs teacher {tuple(teacher_feat.shape)}")
    mse = F.mse_loss(student_feat, teacher_feat)
    if normalize:
        ms = teacher_feat.detach().pow(2).mean() if mean_square is None else mean_square
        mse = mse / (ms + 1e-8)
    return mse


def attention_map(feat: torch.Tensor, channel_axis: int = 1, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: mean over channels of |x|^p, flattened and L2-normalized."""
    a = feat.abs().pow(p).mean(dim=channel_axis)
    return F.normalize(a.reshape(a.shape[0], -1), dim=1)


def attention_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, channel_axis: int = 1,
                   p: float = 2.0) -> torch.Tensor:
    a, b = attention_map(student_feat, channel_axis, p), attention_map(teacher_feat, channel_axis, p)
    if a.shape != b.shape:
        raise BadInput(f"attention transfer: maps of {tuple(a.shape)} and {tuple(b.shape)} positions")
    return (a - b).pow(2).sum(1).mean()


def linear_cka(X, Y) -> float:
    """Linear CKA of two representations (numpy arrays or tensors); see graphopt.evaluate.linear_cka."""
    from .evaluate import linear_cka as _cka
    if torch.is_tensor(X):
        X = X.detach().cpu().numpy()
    if torch.is_tensor(Y):
        Y = Y.detach().cpu().numpy()
    return _cka(X, Y)


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------

_LABEL_KEYS = ("labels", "label", "y", "target", "targets")


def _array_inputs(data: dict, names: list[str], where: str) -> list[np.ndarray]:
    if all(n in data for n in names):
        arrays = [np.asarray(data[n]) for n in names]
    else:
        values = [v for k, v in data.items() if k not in _LABEL_KEYS]
        if len(values) != len(names):
            raise BadInput(f"{where}: the data has inputs {sorted(data)}, the graph needs {names}")
        arrays = [np.asarray(v) for v in values]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise BadInput(f"{where}: the data's arrays have different lengths (axis 0)")
    return arrays


def _split_batch(batch, n_inputs: int, names: list[str]):
    """(inputs, labels or None) from a DataLoader batch: dict, tuple/list (inputs..., [labels]) or one tensor."""
    if isinstance(batch, dict):
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        rest = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
        return _array_inputs(rest, names, "train batch"), labels
    if isinstance(batch, (tuple, list)):
        if len(batch) == n_inputs:
            return list(batch), None
        if len(batch) == n_inputs + 1:
            return list(batch[:n_inputs]), batch[n_inputs]
        raise BadInput(f"train batch: {len(batch)} items, the graph takes {n_inputs} input(s) (+ labels)")
    return [batch], None


def _tensor(x) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(np.asarray(x)))


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def predict(graph: gs.Graph | TrainableGraph, data, batch_size: int = 256, features: Sequence[str] = ()):
    """Run a graph on {input name: array} data in batches; returns a list of output arrays (and a dict of
    features when asked)."""
    tg = graph if isinstance(graph, TrainableGraph) else TrainableGraph(graph)
    arrays = _array_inputs(data, tg.input_names, "predict") if isinstance(data, dict) else [np.asarray(data)]
    n = len(arrays[0])
    outs, feats = [], {f: [] for f in features}
    was = tg.training
    tg.eval()
    with torch.no_grad():
        for i in range(0, n, batch_size):
            xs = [a[i:i + batch_size] for a in arrays]
            if features:
                o, fd = tg(*xs, features=list(features))
                for k, v in fd.items():
                    feats[k].append(v.cpu().numpy())
            else:
                o = tg(*xs)
            outs.append([t.cpu().numpy() for t in _tuple(o)])
    tg.train(was)
    result = [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))] if outs else []
    if features:
        return result, {k: np.concatenate(v) for k, v in feats.items()}
    return result


def evaluate(graph: gs.Graph, data, labels=None, teacher: gs.Graph | None = None, batch_size: int = 256,
             output: int = 0, task: str | None = None) -> dict:
    """{top1, agreement, cka, n, task, agreement_metric}: top-1 accuracy against `labels` (classes on axis 1), and,
    with a teacher graph, the agreement with the teacher in the terms of the task (graphopt.task_metrics: top-1
    agreement for a classifier, decoded-sequence agreement for a CTC recognizer, IoU of thresholded maps for a
    segmentation or detection map; `task` overrides the guess from the output) and the linear CKA of the
    outputs. Figures that need what was not given are None."""
    from .task_metrics import agreement
    out = predict(graph, data, batch_size)[output]
    res = {"n": int(len(out)), "top1": None, "agreement": None, "cka": None, "task": task,
           "agreement_metric": None}
    if labels is not None:
        pred = out.argmax(1)
        labels = np.asarray(labels).reshape(len(out), *pred.shape[1:])
        res["top1"] = float(np.mean(pred == labels))
    if teacher is not None:
        tout = predict(teacher, data, batch_size)[output]
        a = agreement(out, tout, task)
        res.update(agreement=a["value"], task=a["kind"], agreement_metric=a["metric"])
        res["cka"] = linear_cka(out, tout)
    return res


# ----------------------------------------------------------------------------------------------------------------
# the training loop
# ----------------------------------------------------------------------------------------------------------------

class _Pair:
    __slots__ = ("student", "teacher", "adapted", "channel_axis")

    def __init__(self, student, teacher, adapted, channel_axis):
        self.student, self.teacher, self.adapted, self.channel_axis = student, teacher, adapted, channel_axis


def _feature_pairs(student: gs.Graph, teacher: gs.Graph, config: DistillConfig) -> list[_Pair]:
    s_lay = tensor_layouts(student)
    s_tensors, t_names = student.tensors(), set(teacher.tensors())

    def channel_axis(name):
        """Axis of the channels for attention transfer; None when the tensor has no spatial positions."""
        lay, shape = s_lay.get(name), s_tensors[name].shape
        if shape is None or lay not in ("cf", "cl") or len(shape) < 3:
            return None
        spatial = shape[2:] if lay == "cf" else shape[1:-1]
        if all(isinstance(d, (int, np.integer)) and d == 1 for d in spatial):
            return None
        return 1 if lay == "cf" else -1

    pairs = []
    for rec in adapter_pairs(student):
        if rec["teacher"] not in t_names:
            raise BadInput(f"distill: the student's adapter for '{rec['student']}' pairs it with teacher tensor "
                           f"'{rec['teacher']}', which the first teacher does not have")
        pairs.append(_Pair(rec["student"], rec["teacher"], rec["output"], channel_axis(rec["student"])))
    for s, t in config.feature_pairs:
        if s not in s_tensors or t not in t_names:
            raise BadInput(f"distill: feature pair ('{s}', '{t}') names a tensor the student or teacher lacks")
        pairs.append(_Pair(s, t, None, channel_axis(s)))
    return pairs


def _batches(train, labels, names: list[str], n_inputs: int, config: DistillConfig, rng,
             n_classes: int | None = None):
    """Yields (inputs list, labels or None, index array or None) forever, epoch after epoch: whole global batches
    (every process sees the same batch and computes its own micro-batches of it; see graphopt.micro_batching)."""
    if isinstance(train, dict):
        arrays = _array_inputs(train, names, "distill")
        n = len(arrays[0])
        while True:
            order = rng.permutation(n)
            for i in range(0, n, config.batch_size):
                idx = order[i:i + config.batch_size]
                yield [a[idx] for a in arrays], (labels[idx] if labels is not None else None), idx
    else:
        while True:
            got = False
            for k, batch in enumerate(train):
                got = True
                xs, ys = _split_batch(batch, n_inputs, names)
                check_finite({n: (x.detach().cpu().numpy() if torch.is_tensor(x) else x) for n, x in zip(names, xs)},
                             f"training DataLoader batch {k}")
                if ys is not None:
                    ys = check_labels(ys.detach().cpu().numpy() if torch.is_tensor(ys) else ys, n_classes,
                                      f"training DataLoader batch {k}")
                yield xs, ys, None
            if not got:
                raise BadInput("distill: the training DataLoader yielded no batch")


def distill(student: gs.Graph, teachers: Sequence[gs.Graph] | gs.Graph, train, labels=None,
            config: DistillConfig | None = None, eval_data=None, eval_labels=None) -> tuple[gs.Graph, dict]:
    """Train `student` against `teachers` (see _distill); meanwhile each step reuses the memory the step before
    freed instead of faulting it in again (graphopt.allocator)."""
    with kept_freed_memory():
        return _distill(student, teachers, train, labels, config, eval_data, eval_labels)


def _distill(student: gs.Graph, teachers: Sequence[gs.Graph] | gs.Graph, train, labels=None,
             config: DistillConfig | None = None, eval_data=None, eval_labels=None) -> tuple[gs.Graph, dict]:
    """Train `student` against `teachers` on `train` ({input name: array}, batch first, or a DataLoader whose
    batches are dicts, (inputs..., labels) tuples or tensors). Returns (trained student graph, metrics).
    The student may carry adapters from insert-adapters (feature loss on "<s>__adapted" outputs); they are removed
    from the returned graph unless config.keep_adapters."""
    config = config or DistillConfig()
    config.validate()
    if isinstance(teachers, gs.Graph):
        teachers = [teachers]
    teachers = list(teachers)
    if not teachers:
        raise BadInput("distill needs at least one teacher graph")
    if config.teacher_weights is not None and len(config.teacher_weights) != len(teachers):
        raise BadInput(f"DistillConfig.teacher_weights has {len(config.teacher_weights)} weights for "
                       f"{len(teachers)} teachers")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    device = torch.device(config.device) if config.device else None
    s_tg = TrainableGraph(student, trainable=(parameter_names(student) + list(config.scale_params)
                                              if config.scale_params else None))
    t_tgs = [TrainableGraph(t, trainable=[]) for t in teachers]
    for t in t_tgs:
        t.eval()
        t.requires_grad_(False)
    if device is not None:
        s_tg.to(device)
        for t in t_tgs:
            t.to(device)
    if not list(s_tg.parameters()):
        raise BadInput("distill: the student graph has no trainable weights")
    adapted_outputs = {rec["output"] for rec in adapter_pairs(student)}
    s_out_idx = [i for i, n in enumerate(s_tg.output_names) if n not in adapted_outputs]
    pairs = _feature_pairs(student, teachers[0], config)
    s_feat_names = sorted({p.student for p in pairs
                           if config.attention_weight and p.channel_axis is not None} |
                          {p.student for p in pairs if p.adapted is None and config.feature_weight})
    t_feat_names = sorted({p.teacher for p in pairs})
    # one-channel maps out of a final Sigmoid are distilled on the Sigmoid's input: a saturated student map (0.0 after
    # a prune step) has no gradient through the probabilities, its logits do
    logit_taps = _sigmoid_logit_taps(student, teachers, [s_tg.output_names[i] for i in s_out_idx],
                                     t_tgs[0].output_names) if config.outputs == "probs" else {}
    s_feat_names = sorted(set(s_feat_names) | {sn for sn, _ in logit_taps.values()})
    t_feat_names = sorted(set(t_feat_names) | {tn for _, tn in logit_taps.values()})
    n_inputs = len(s_tg.input_names)
    for t in t_tgs:
        if len(t.input_names) != n_inputs:
            raise BadInput("distill: every teacher must take the same inputs as the student")

    n_classes = class_count(student, config.label_output, config.class_axis)
    if labels is not None:
        labels = check_labels(labels, n_classes, "distill")
        if isinstance(train, dict) and len(labels) != len(_array_inputs(train, s_tg.input_names, "distill")[0]):
            raise BadInput("distill: labels and the training data have different lengths")
    if isinstance(train, dict):
        check_finite(dict(zip(s_tg.input_names, _array_inputs(train, s_tg.input_names, "distill"))),
                     "training data")
    per_epoch = batches_per_epoch(train, config.batch_size)
    total = config.steps if config.steps is not None else (config.epochs * per_epoch if per_epoch else None)
    if not total:
        raise BadInput("distill: set DistillConfig.steps (the DataLoader has no length) or epochs > 0")

    def run_teachers(xs):
        outs, feats = [], {}
        with torch.no_grad():
            for k, t in enumerate(t_tgs):
                if k == 0 and t_feat_names:
                    o, feats = t(*xs, features=t_feat_names)
                else:
                    o = t(*xs)
                outs.append(_tuple(o))
        return outs, feats

    cache = None
    if isinstance(train, dict) and config.cache_teacher:
        cache = _teacher_cache(train, s_tg.input_names, run_teachers, config)

    params = list(s_tg.parameters())
    weights, scales = _split_scales(s_tg, config)
    groups = [{"params": weights, "lr_mult": 1.0}] + [
        {"params": [p], "lr_mult": config.scale_lr * s0 / config.lr, "weight_decay": 0.0} for p, s0 in scales]
    if config.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)

    history = {k: [] for k in ("loss", "kd", "teacher_hard", "hard", "feature", "attention", "T", "lr", "hard_weight",
                               "grad_norm")}
    kd_pairs_checked = False
    kd_positions: list[int] = []
    t0 = time.perf_counter()
    s_tg.train()
    stream = _batches(train, labels, s_tg.input_names, n_inputs, config, rng, n_classes)
    start = 0
    if config.resume is not None:
        start = _restore(config.resume, s_tg, opt, history, total)
        for _ in range(start):                  # the same batches as the uninterrupted run from here on
            next(stream)

    def state():
        return {"step": step + 1, "params": {k: v.detach().cpu().clone() for k, v in s_tg.named_parameters()},
                "optimizer": opt.state_dict(), "history": {k: list(v) for k, v in history.items()}}
    at_pairs = [p for p in pairs if p.channel_axis is not None] if config.attention_weight else []
    feat_pairs = pairs if config.feature_weight else []
    rank, world = config.shard or (0, 1)
    term_names = ("loss", "kd", "teacher_hard", "hard", "feature", "attention")
    for step in range(start, total):
        xs, ys, idx = next(stream)
        xs = [_tensor(x) for x in xs]
        if device is not None:
            xs = [x.to(device) for x in xs]
        frac = step / total
        T = temperature_at(frac, config.temperature)
        hw = hard_weight_at(frac, config.hard_weight) if ys is not None else 0.0
        lr = lr_at(step, total, config)
        for gp in opt.param_groups:
            gp["lr"] = lr * gp.get("lr_mult", 1.0)     # a checkpoint's groups from before lr_mult: one group
        n = len(xs[0])
        chunks = micro_batches(n, config.micro_batch)
        mine = owned(len(chunks), rank, world)
        y_all = _tensor(ys).long() if (hw and ys is not None) else None

        # teacher outputs of this process's micro-batches
        t_chunk = {}
        for j in mine:
            a, b = chunks[j]
            if cache is not None and idx is not None:
                sel = idx[a:b]
                t_chunk[j] = ([[cached_rows(o, sel).to(device or "cpu") for o in outs] for outs in cache["outputs"]],
                              {k: cached_rows(v, sel).to(device or "cpu") for k, v in cache["features"].items()})
            else:
                t_chunk[j] = run_teachers([x[a:b] for x in xs])
        # the feature loss divides by the teacher feature's mean square over the whole global batch
        mean_sq = {}
        if feat_pairs:
            names_t = sorted({p.teacher for p in feat_pairs})
            dev = device or "cpu"
            slots = SlotSum(len(chunks), world)
            for j in mine:
                slots.put(j, torch.stack([t_chunk[j][1][t].detach().double().pow(2).sum() for t in names_t]))
            sums = ordered_sum(slots.gather(torch.zeros(len(names_t), dtype=torch.float64, device=dev)))
            for i, t in enumerate(names_t):
                if mine:                        # elements in the global batch: per example x examples
                    a0, b0 = chunks[mine[0]]
                    count = t_chunk[mine[0]][1][t].numel() // (b0 - a0) * n
                    mean_sq[t] = (sums[i] / count).to(torch.float32)

        terms_slot = SlotSum(len(chunks), world)
        grads = {}
        for j in mine:
            a, b = chunks[j]
            share = (b - a) / n                 # every term is a mean over examples: weigh micro-batches by size
            t_outs, t_feats = t_chunk[j]
            xc = [x[a:b] for x in xs]
            if s_feat_names:
                s_out, s_feats = s_tg(*xc, features=s_feat_names)
            else:
                s_out, s_feats = s_tg(*xc), {}
            s_out = _tuple(s_out)
            s_orig = [s_out[i] for i in s_out_idx]
            if not kd_pairs_checked:
                kd_positions = [i for i in range(min(len(s_orig), len(t_outs[0])))
                                if all(tuple(s_orig[i].shape) == tuple(to[i].shape) for to in t_outs)]
                if not kd_positions and config.kd_weight:
                    raise BadInput("distill: no student output has the shape of the teacher output at the same "
                                   "position")
                kd_pairs_checked = True
            terms = {}
            loss = s_orig[0].new_zeros(())
            if config.kd_weight:
                kd = 0.0
                for i in kd_positions:
                    if s_orig[i].ndim > config.class_axis and s_orig[i].shape[config.class_axis] == 1:
                        if i in logit_taps:
                            sn, tn = logit_taps[i]
                            kd = kd + binary_kd_loss(s_feats[sn], [t_feats[tn]], T, probs=False,
                                                     balance=config.map_balance, threshold=config.map_threshold)
                        else:
                            kd = kd + binary_kd_loss(s_orig[i], [to[i] for to in t_outs], T,
                                                     config.outputs == "probs", config.teacher_weights,
                                                     balance=config.map_balance, threshold=config.map_threshold)
                        continue
                    target = teacher_targets([_as_logits(to[i], config) for to in t_outs], T, config.class_axis,
                                             config.teacher_label_smoothing, config.teacher_weights, config.ensemble)
                    frames = config.frame_balance == "half" and s_orig[i].ndim == 3 and config.class_axis in (2, -1)
                    kd = kd + kd_loss(_as_logits(s_orig[i], config), target, T, config.class_axis,
                                      balance_blank=0 if frames else None)
                terms["kd"] = kd / len(kd_positions)
                loss = loss + config.kd_weight * terms["kd"]
            if config.teacher_hard_weight:
                terms["teacher_hard"] = teacher_hard_loss([s_orig[i] for i in kd_positions],
                                                          [t_outs[0][i] for i in kd_positions], config)
                loss = loss + config.teacher_hard_weight * terms["teacher_hard"]
            if y_all is not None:
                terms["hard"] = F.cross_entropy(_as_logits(s_orig[config.label_output], config),
                                                y_all[a:b].to(s_orig[0].device),
                                                label_smoothing=config.label_smoothing)
                loss = loss + hw * terms["hard"]
            if feat_pairs:
                fl = 0.0
                for p in feat_pairs:
                    s_feat = s_out[s_tg.output_names.index(p.adapted)] if p.adapted else s_feats[p.student]
                    fl = fl + feature_loss(s_feat, t_feats[p.teacher], config.feature_normalize, mean_sq[p.teacher])
                terms["feature"] = fl / len(feat_pairs)
                loss = loss + config.feature_weight * terms["feature"]
            if at_pairs:
                al = 0.0
                for p in at_pairs:
                    al = al + attention_loss(s_feats[p.student], t_feats[p.teacher], p.channel_axis,
                                             config.attention_p)
                terms["attention"] = al / len(at_pairs)
                loss = loss + config.attention_weight * terms["attention"]
            terms["loss"] = loss
            (loss * share).backward()
            terms_slot.put(j, torch.stack([terms[k].detach().double() * share if k in terms
                                           else torch.zeros((), dtype=torch.float64, device=loss.device)
                                           for k in term_names]))
            if world > 1:                       # keep this micro-batch's gradient apart (summed in order below)
                grads[j] = [q.grad for q in params]
                for q in params:
                    q.grad = None
        if world > 1:
            reduce_gradients(params, grads, len(chunks), world)
        values = ordered_sum(terms_slot.gather(torch.zeros(len(term_names), dtype=torch.float64,
                                                           device=device or "cpu"))).tolist()
        parts = dict(zip(term_names, values))
        loss_value = parts.pop("loss")
        if not math.isfinite(loss_value):
            raise CheckFailed(f"distill: the loss became {loss_value} at optimizer step {step + 1} of {total} "
                              f"(lr {lr:.3g}); lower the learning rate or check the data for extreme values")
        if config.clip_grad_norm:
            gn = torch.nn.utils.clip_grad_norm_(weights, config.clip_grad_norm)
        else:
            gn = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in weights if p.grad is not None))
        gn_scales = sum(float((p.grad.detach() ** 2).sum()) for p, _ in scales if p.grad is not None)
        if not math.isfinite(float(gn)) or not math.isfinite(gn_scales):
            raise CheckFailed(f"distill: the gradient became {float(gn)} at optimizer step {step + 1} of {total} "
                              f"(lr {lr:.3g}); lower the learning rate or check the data for extreme values")
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, s0 in scales:
                p.clamp_(min=0.01 * s0)
        record = {"loss": loss_value, "T": T, "lr": lr, "hard_weight": hw, "grad_norm": float(gn), **parts}
        for k, v in record.items():
            history[k].append(v)
        if config.progress is not None:
            config.progress(step + 1, total, record)
        if config.checkpoint is not None and step + 1 < total:
            config.checkpoint(step + 1, state)
    s_tg.eval()
    if device is not None:
        s_tg.cpu()
    trained = s_tg.to_graph()
    if not config.keep_adapters:
        remove_adapters(trained)
    metrics = {"steps": total, "epochs": (total / per_epoch) if per_epoch else None,
               "seconds": round(time.perf_counter() - t0, 3), "history": history,
               "loss_first": float(np.mean(history["loss"][:loss_window(total)])),
               "loss_last": float(np.mean(history["loss"][-loss_window(total):])),
               "feature_pairs": [{"student": p.student, "teacher": p.teacher, "adapted": p.adapted} for p in pairs],
               "config": {f.name: getattr(config, f.name) for f in fields(config)
                          if f.name not in ("progress", "checkpoint", "resume")}}
    if isinstance(train, dict) and config.eval_samples > 0:
        arrays = _array_inputs(train, s_tg.input_names, "distill")
        n = min(len(arrays[0]), config.eval_samples)
        sub = dict(zip(s_tg.input_names, (a[:n] for a in arrays)))
        metrics["train"] = evaluate(trained, sub, labels[:n] if labels is not None else None, teachers[0])
    if eval_data is not None:
        metrics["eval"] = evaluate(trained, eval_data, eval_labels, teachers[0])
    return trained, metrics


def loss_window(steps: int) -> int:
    """How many first / last steps metrics' loss_first and loss_last average over (a tenth, 1 to 10)."""
    return max(1, min(10, steps // 10))


def _split_scales(s_tg: TrainableGraph, config: DistillConfig) -> tuple[list, list]:
    """(the weights, [(scale parameter, its initial value)]) of the student's parameters, the scales being
    config.scale_params (positive initializers)."""
    named = s_tg.graph_parameters()
    scales, seen = [], set()
    for name in config.scale_params:
        p = named.get(name)
        if p is None or id(p) in seen:
            continue
        s0 = float(p.detach().abs().min())
        if not s0 > 0:
            raise BadInput(f"distill: scale parameter '{name}' is not positive")
        seen.add(id(p))
        scales.append((p, s0))
    return [p for p in s_tg.parameters() if id(p) not in seen], scales


def _restore(state: dict, s_tg: TrainableGraph, opt, history: dict, total: int) -> int:
    """Load a checkpointed training state (weights, optimizer, loss history) and return the step to go on from."""
    try:
        step = int(state["step"])
        params = dict(s_tg.named_parameters())
        if set(state["params"]) != set(params) or not 0 < step < total:
            raise ValueError("the checkpoint does not fit this training phase")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state["params"][k])
        opt.load_state_dict(state["optimizer"])
        for k in history:
            history[k][:] = list(state["history"][k])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise BadInput(f"distill: cannot resume from the checkpoint ({e}); remove the checkpoint folder to start "
                       f"over") from None
    return step


def _teacher_cache(train: dict, names: list[str], run_teachers, config: DistillConfig) -> dict | None:
    """Teacher outputs and features for every training example, when they fit in cache_limit_mb: as float32 numpy
    arrays, or, where only half of that fits, float tensors as bfloat16 (torch tensors; float32's exponent range,
    so a CTC recognizer's 1e-30 probabilities stay > 0, and 3 significant digits, a 0.4% error on a KD target:
    PP-OCRv4's recognizer holds 1.06 MB of outputs per line, and 2048 lines train to 91.5% of lines decoded as
    the teacher where 1024 reach 87.5%). Rows are read with cached_rows."""
    arrays = _array_inputs(train, names, "distill")
    n = len(arrays[0])
    probe_outs, probe_feats = run_teachers([_tensor(a[:1]) for a in arrays])
    per_example = sum(o.numel() for outs in probe_outs for o in outs) + sum(f.numel() for f in probe_feats.values())
    itemsize = cache_itemsize(per_example * 4 * n, config.cache_limit_mb)
    if not itemsize:
        return None
    half = itemsize == 2

    def keep(t: torch.Tensor):
        return t.detach().to(torch.bfloat16).cpu() if half and t.is_floating_point() else t.cpu().numpy()

    def join(parts):
        return torch.cat(parts) if torch.is_tensor(parts[0]) else np.concatenate(parts)
    outs_acc, feats_acc = None, {}
    bs = max(config.batch_size, 256)
    for i in range(0, n, bs):
        o, f = run_teachers([_tensor(a[i:i + bs]) for a in arrays])
        if outs_acc is None:
            outs_acc = [[[] for _ in outs] for outs in o]
        for k, outs in enumerate(o):
            for j, t in enumerate(outs):
                outs_acc[k][j].append(keep(t))
        for k, v in f.items():
            feats_acc.setdefault(k, []).append(keep(v))
    return {"outputs": [[join(x) for x in outs] for outs in outs_acc],
            "features": {k: join(v) for k, v in feats_acc.items()}}


def cache_itemsize(float32_bytes: int, limit_mb: float) -> int:
    """Bytes per cached value: 4 (float32) where the cache fits limit_mb, 2 (bfloat16) where half of it does, else 0
    (no cache)."""
    limit = limit_mb * 2 ** 20
    return 4 if float32_bytes <= limit else 2 if float32_bytes <= 2 * limit else 0


def cached_rows(cached, rows) -> torch.Tensor:
    """Rows of a _teacher_cache array (numpy, or a bfloat16 tensor read back as float32)."""
    if torch.is_tensor(cached):
        return cached[torch.as_tensor(rows, dtype=torch.long)].float()
    return torch.from_numpy(cached[rows])
