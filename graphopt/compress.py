"""`graphopt compress`: the pipeline's lossy passes, applied progressively, with the original model as teacher.

Schedule (issue 5, the defaults): light pruning first (40% of the target reduction, distilled at a high temperature),
then finer steps (15% of the target each, feature loss through insert-adapters), then fine-tuning with no more
pruning while the temperature falls to 1. Other lossy passes (factorize-lowrank, sparsify) are applied whole and
distilled after; quantize is post-training and runs last, after fine-tuning. Exact passes run where they stand."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from .errors import BadInput
from .graph import copy as copy_graph, input_specs, output_specs
from .passmanager import PassContext, PassManager, make_pass

LIGHT_FRACTION = 0.4       # of the target reduction, in the first step
FINE_FRACTION = 0.15       # of the target reduction, in each later step
POST_TRAINING = ("quantize",)


def _prune_steps(p) -> list[dict]:
    """Cumulative keep-fractions for each budget of a prune-channels pass: [{"flops": 0.8}, {"flops": 0.7}, ...]."""
    budgets = {k: p.opts[k] for k in ("flops", "params") if p.opts[k] < 1.0}
    if p.opts.get("ratio", 0.0) > 0:
        budgets["ratio"] = p.opts["ratio"]
    if not budgets:
        return [{}]
    fractions = [LIGHT_FRACTION]
    while fractions[-1] < 1.0 - 1e-9:
        fractions.append(min(1.0, fractions[-1] + FINE_FRACTION))
    steps = []
    for f in fractions:
        step = {}
        for k, target in budgets.items():
            step[k] = f * target if k == "ratio" else 1.0 - f * (1.0 - target)
        steps.append(step)
    return steps


def _metrics(graph, ctx) -> dict:
    from .analyses import flops
    f = flops(graph, None)
    return {"macs": int(f["macs"]), "params": int(f["params"])}


def compress(original: gs.Graph, train, pipeline, labels=None, eval_data=None, epochs: int = 12,
             batch_size: int = 64, lr: float = 2e-3, seed: int = 0, log=None, distill_config=None,
             distributed: bool = False) -> tuple[gs.Graph, dict]:
    """Run `pipeline` on `original` with distillation from it. train: {input: array, "labels": optional} or a torch
    DataLoader. Returns (compressed graph with the original's input/output names and shapes, info)."""
    from .distill import DistillConfig, distill, evaluate

    log = log or (lambda m: None)
    pm = pipeline if isinstance(pipeline, PassManager) else PassManager.parse(str(pipeline))
    if isinstance(train, dict):
        train = dict(train)
        if labels is None and "labels" in train:
            labels = train.pop("labels")
        names = [n for n, _, _ in input_specs(original)]
        missing = [n for n in names if n not in train]
        if missing:
            raise BadInput(f"training data lacks input(s) {', '.join(missing)}; it has: {', '.join(sorted(train))}")
    eval_labels = None
    if eval_data is not None:
        eval_data = dict(eval_data)
        eval_labels = eval_data.pop("labels", None)
    base = distill_config or DistillConfig(batch_size=batch_size, lr=lr, seed=seed)
    teacher = copy_graph(original)
    calib = train if isinstance(train, dict) else None
    ctx = PassContext(seed=seed, data={"calib": calib, "train": calib, "teacher": teacher})

    prune_passes = [p for p in pm.passes if p.name == "prune-channels" and not p.exact]
    n_train_phases = sum(len(_prune_steps(p)) for p in prune_passes) + \
        sum(1 for p in pm.passes if not p.exact and p.name not in POST_TRAINING and p.name != "prune-channels") + 1
    per_phase = max(1, epochs // (n_train_phases + 1))
    final_epochs = max(1, epochs - per_phase * (n_train_phases - 1))
    graph = copy_graph(original)
    history, step_no = [], 0
    post = []

    def train_phase(g, kind: str, n_epochs: int, temperature, features: bool):
        nonlocal step_no
        step_no += 1
        cfg = replace(base, epochs=n_epochs, temperature=temperature,
                      feature_weight=base.feature_weight if features else 0.0,
                      attention_weight=base.attention_weight if features else 0.0)
        if features:
            try:
                g = PassManager([make_pass("insert-adapters")]).run(g, PassContext(seed=seed, verify="structural",
                                                                                   data=ctx.data)).graph
            except Exception as e:   # no pairable layers: distill on logits only
                log(f"compress: no feature adapters ({str(e).splitlines()[0]}); logits only")
        g, m = distill(g, [teacher], train, labels=labels, config=cfg, eval_data=eval_data, eval_labels=eval_labels)
        rec = {"step": step_no, "phase": kind, "epochs": n_epochs, "temperature": temperature, **_metrics(g, ctx),
               **{k: v for k, v in m.items() if isinstance(v, (int, float, str)) or v is None}}
        history.append(rec)
        log(f"compress: step {step_no} ({kind}): " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                              for k, v in rec.items() if k not in ("step", "phase")))
        return g

    original_macs = _metrics(original, ctx)
    for p in pm.passes:
        if p.exact:
            graph = PassManager([p]).run(graph, ctx).graph
            continue
        if p.name in POST_TRAINING:
            post.append(p)
            continue
        if p.name == "prune-channels":
            for i, step in enumerate(_prune_steps(p)):
                cur = _metrics(graph, ctx)
                opts = dict(p.given)
                if "flops" in step:
                    opts["flops"] = min(1.0, step["flops"] * original_macs["macs"] / max(cur["macs"], 1))
                if "params" in step:
                    opts["params"] = min(1.0, step["params"] * original_macs["params"] / max(cur["params"], 1))
                if "ratio" in step:
                    opts["ratio"] = step["ratio"] if i == 0 else FINE_FRACTION * p.opts["ratio"]
                if opts.get("flops", 1.0) >= 1.0 and opts.get("params", 1.0) >= 1.0 and not opts.get("ratio"):
                    continue
                graph = PassManager([make_pass("prune-channels", **opts)]).run(graph, ctx).graph
                light = i == 0
                graph = train_phase(graph, "prune-light" if light else "prune-fine", per_phase,
                                    8.0 if light else 4.0, features=not light)
        else:
            graph = PassManager([p]).run(graph, ctx).graph
            graph = train_phase(graph, p.name, per_phase, 4.0, features=True)
    # fine-tune: no more structural change, temperature falling to 1
    graph = train_phase(graph, "fine-tune", final_epochs, [(0.5, 2.0, 1.5), (1.0, 1.5, 1.0)], features=False)
    for p in post:
        graph = PassManager([p]).run(graph, ctx).graph
    if [t.name for t in graph.inputs] != [t.name for t in original.inputs] or \
            [o[0] for o in output_specs(graph)] != [o[0] for o in output_specs(original)]:
        raise BadInput("compress changed the model's input or output names; this is a bug in a pass")
    final = evaluate(graph, eval_data, eval_labels, teacher=teacher) if eval_data is not None else {}
    info = {"history": history, "epochs": epochs, "final": final,
            "macs_ratio": _metrics(graph, ctx)["macs"] / max(original_macs["macs"], 1),
            "params_ratio": _metrics(graph, ctx)["params"] / max(original_macs["params"], 1)}
    return graph, info


def as_arrays(d) -> dict:
    return {k: np.asarray(v) for k, v in d.items()}
