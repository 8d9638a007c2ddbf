#!/usr/bin/env python3
"""The distillation acceptance experiment on real data, end to end: scikit-learn digits (graphopt.datasets'
stratified, seeded split: 1347 training / 450 held-out test images), a trained CNN teacher, and one student per
training mode compressed with the same pipeline and epochs:

* distilled: `graphopt compress` (progressive pruning, KD + feature hints from the teacher, fine-tuning);
* plain: the same pruning schedule with plain cross-entropy fine-tuning on the labels (no teacher signal).

It prints a markdown table (MACs/params ratios, top-1 on the test split, its drop from the teacher, agreement with
the teacher, linear CKA of the penultimate layers and of the logits, seconds) and checks the acceptance: budget met,
distilled drop <= 1.5 points, penultimate CKA >= 0.9. Exit code 1 when a check fails.

    .venv/bin/python tools/compress_digits.py                  # the acceptance run (about a minute on 1 core)
    .venv/bin/python tools/compress_digits.py --teacher tests/fixtures/digits_teacher.onnx --seeds 0 1 2
    .venv/bin/python tools/compress_digits.py --pipeline "cleanup,prune-channels{flops=0.5}" --epochs 20 \\
        --json out/compress_digits.json --out-dir out/students

The same experiment from the command line (what the distilled row runs):

    .venv/bin/python -c "from graphopt.datasets import digits_split as s; import numpy as np; \\
        a, b, c, d = s(); np.savez('train.npz', x=a, labels=b); np.savez('test.npz', x=c, labels=d)"
    .venv/bin/graphopt compress tests/fixtures/digits_cnn.onnx --train train.npz --eval test.npz \\
        --pipeline "cleanup,prune-channels{flops=0.25,params=0.18}" --epochs 60 --lr 1e-2 -o student.onnx

The teacher (default tests/fixtures/digits_cnn.onnx, tools/make_example.py's CNN) must have been trained on the
same split's training part; with --train-teacher PATH (or when the file is missing) one is trained and written.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEACHER = ROOT / "tests" / "fixtures" / "digits_cnn.onnx"
DEFAULT_PIPELINE = "cleanup,prune-channels{flops=0.25,params=0.18}"
MAX_DROP = 0.015
MIN_CKA = 0.9
MIN_TEACHER = 0.97


def train_teacher(path: Path, x, y, epochs: int = 15) -> None:
    import warnings

    import torch
    sys.path.insert(0, str(ROOT / "tools"))
    import make_example
    from graphopt.datasets import train_classifier
    torch.manual_seed(0)
    model = train_classifier(make_example.build(), x, y, epochs=epochs, lr=3e-3, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["x"], output_names=["logits"],
                          dynamo=False, opset_version=17, training=torch.onnx.TrainingMode.PRESERVE)


def budgets(pipeline: str) -> dict:
    """{"flops": f, "params": p} of the pipeline's prune-channels passes (the tightest of each)."""
    from graphopt.passmanager import PassManager
    out = {}
    for p in PassManager.parse(pipeline).passes:
        if p.name == "prune-channels":
            for k in ("flops", "params"):
                if k in p.given:
                    out[k] = min(out.get(k, 1.0), p.opts[k])
    return out


def fmt(v, digits=4):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER, help="teacher ONNX (trained on the split)")
    ap.add_argument("--train-teacher", type=Path, help="train a teacher on the training split, write it here, use it")
    ap.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: compress's)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a busy machine)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--out-dir", type=Path, help="write the students here")
    ap.add_argument("--quiet", action="store_true", help="no per-step log")
    args = ap.parse_args(argv)

    import torch

    import graphopt
    from graphopt.compress import compress
    from graphopt.datasets import digits_split
    from graphopt.graph import to_onnx

    torch.set_num_threads(args.threads)
    x_tr, y_tr, x_te, y_te = digits_split()
    teacher_path = args.train_teacher or args.teacher
    if args.train_teacher or not teacher_path.exists():
        print(f"training a teacher on {len(x_tr)} images -> {teacher_path}", file=sys.stderr)
        train_teacher(teacher_path, x_tr, y_tr)
    teacher = graphopt.load(teacher_path)
    train, test = {"x": x_tr, "labels": y_tr}, {"x": x_te, "labels": y_te}
    budget = budgets(args.pipeline)
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))

    rows, results, ok = [], [], True
    t_all = time.perf_counter()
    for seed in args.seeds:
        for mode, flag in (("distilled", True), ("plain CE", False)):
            if log:
                log(f"== {mode}, seed {seed}")
            t0 = time.perf_counter()
            graph, info = compress(teacher, train, args.pipeline, eval_data=test, epochs=args.epochs, lr=args.lr,
                                   batch_size=args.batch_size, seed=seed, distill=flag, log=log)
            seconds = time.perf_counter() - t0
            f = info["final"]
            res = {"mode": mode, "seed": seed, "seconds": round(seconds, 1), "macs_ratio": info["macs_ratio"],
                   "params_ratio": info["params_ratio"], "channels": info["channels"], **f,
                   "history": info["history"]}
            results.append(res)
            if args.out_dir:
                args.out_dir.mkdir(parents=True, exist_ok=True)
                import onnx
                name = re.sub(r"[^a-z]+", "_", mode) + f"_seed{seed}.onnx"
                onnx.save(to_onnx(graph), str(args.out_dir / name))
            checks = []
            if "flops" in budget and info["macs_ratio"] > budget["flops"] + 1e-9:
                checks.append("MACs over budget")
            if "params" in budget and info["params_ratio"] > budget["params"] + 1e-9:
                checks.append("params over budget")
            if flag:
                if f["teacher_top1"] < MIN_TEACHER:
                    checks.append(f"teacher below {MIN_TEACHER:.0%}")
                if f["top1_drop"] > MAX_DROP + 1e-9:
                    checks.append(f"drop > {MAX_DROP * 100:.1f} points")
                if f["cka_penultimate"] is None or f["cka_penultimate"] < MIN_CKA:
                    checks.append(f"penultimate CKA < {MIN_CKA}")
                ok = ok and not checks
            res["checks_failed"] = checks
            drop = round(-f["top1_drop"] * 100, 2) + 0.0
            rows.append([f"{mode} (seed {seed})", f"{info['macs_ratio']:.4f}", f"{info['params_ratio']:.4f}",
                         f"{f['top1'] * 100:.2f}", f"{drop:+.2f}", f"{f['agreement'] * 100:.2f}",
                         fmt(f["cka_penultimate"]), fmt(f["cka_logits"]), f"{seconds:.0f}",
                         ("met" if not checks else "NOT met: " + "; ".join(checks)) if flag else
                         ("baseline" if not checks else "; ".join(checks))])
    first = results[0]
    head = ["student", "MACs ratio", "params ratio", "top-1 %", "vs teacher (points)", "agreement %",
            "CKA penultimate", "CKA logits", "seconds", "acceptance"]
    lines = [f"teacher {teacher_path.name}: top-1 {first['teacher_top1'] * 100:.2f}% on {first['n']} held-out "
             f"images; pipeline `{args.pipeline}`, {args.epochs} epochs, train {len(x_tr)} images", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if len(args.seeds) > 1:
        for mode in ("distilled", "plain CE"):
            rs = [r for r in results if r["mode"] == mode]
            mean = {k: float(np.mean([r[k] for r in rs])) for k in ("top1", "agreement", "cka_penultimate")}
            delta = round((mean["top1"] - first["teacher_top1"]) * 100, 2) + 0.0
            lines.append(f"| {mode} (mean of {len(rs)}) | | | {mean['top1'] * 100:.2f} | {delta:+.2f} | "
                         f"{mean['agreement'] * 100:.2f} | {mean['cka_penultimate']:.4f} | | | |")
    lines += ["", f"total {time.perf_counter() - t_all:.0f} s; acceptance (distilled): "
              f"{'met' if ok else 'NOT met'}"]
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"teacher": str(teacher_path), "pipeline": args.pipeline,
                                         "epochs": args.epochs, "results": results, "accepted": ok},
                                        indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
