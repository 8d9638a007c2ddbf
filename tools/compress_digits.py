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

The factorize-lowrank acceptance (<= 0.6x MACs, <= 1 point lost, compiled student faster than compiled teacher) on
the CNN and on a small ViT encoder trained here:

    .venv/bin/python tools/compress_digits.py --pipeline "cleanup,factorize-lowrank{flops=0.6}" --max-drop 0.01 --bench
    .venv/bin/python tools/compress_digits.py --train-teacher /tmp/digits_vit.onnx --arch vit --min-teacher 0.95 \\
        --pipeline "cleanup,factorize-lowrank{flops=0.6}" --max-drop 0.01 --bench

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


def train_teacher(path: Path, x, y, epochs: int = 15, arch: str = "cnn") -> None:
    import warnings

    import torch
    sys.path.insert(0, str(ROOT / "tools"))
    import make_example
    from graphopt.datasets import train_classifier
    torch.manual_seed(0)
    if arch == "vit":
        model = train_classifier(make_example.DigitsViT(), x, y, epochs=60, lr=1e-3, seed=0)
    else:
        model = train_classifier(make_example.build(), x, y, epochs=epochs, lr=3e-3, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["x"], output_names=["logits"],
                          dynamo=False, opset_version=17, training=torch.onnx.TrainingMode.PRESERVE)


def budgets(pipeline: str) -> dict:
    """{"flops": f, "params": p} of the pipeline's prune-channels / factorize-lowrank passes (the tightest)."""
    from graphopt.passmanager import PassManager
    out = {}
    for p in PassManager.parse(pipeline).passes:
        if p.name in ("prune-channels", "factorize-lowrank"):
            for k in ("flops", "params"):
                if k in p.given:
                    out[k] = min(out.get(k, 1.0), p.opts[k])
    return out


def bench_compiled(teacher, students: dict, rounds: int = 7) -> list[str]:
    """Teacher and students compiled for cpu, timed interleaved on 1 thread (graphopt and onnxruntime)."""
    import statistics
    import tempfile

    import graphopt
    from graphopt import ort
    from graphopt.graph import to_onnx
    sys.path.insert(0, str(ROOT / "tools"))
    from bench import time_engines
    engines, feeds = {}, None
    with tempfile.TemporaryDirectory() as d:
        for name, g in [("teacher", teacher)] + [(f"student seed {s}", g) for s, g in students.items()]:
            art = graphopt.compile(g, target="cpu", out=f"{d}/{len(engines)}", measure=False)
            feeds = feeds or ort.random_inputs([(i["name"], tuple(i["shape"]), i["dtype"]) for i in art.inputs], 0)
            runner, arrays = art.runner(1), art.check_inputs(feeds)
            sess = ort.session(to_onnx(g), optimize=True, threads=1)
            engines[f"graphopt {name}"] = lambda r=runner, a=arrays: r(a)
            engines[f"onnxruntime {name}"] = lambda s=sess: s.run(None, feeds)
        samples, _ = time_engines(engines, rounds, 0.3)
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    out = ["compiled for cpu, 1 thread, median of interleaved rounds (ms):", "",
           "| model | graphopt ms | speedup vs teacher (graphopt) | onnxruntime ms |", "|---|---:|---:|---:|"]
    for name in [k[len("graphopt "):] for k in med if k.startswith("graphopt ")]:
        out.append(f"| {name} | {med['graphopt ' + name]:.4f} | "
                   f"{med['graphopt teacher'] / med['graphopt ' + name]:.2f}x | {med['onnxruntime ' + name]:.4f} |")
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
    ap.add_argument("--arch", choices=("cnn", "vit"), default="cnn",
                    help="architecture of a teacher trained here (--train-teacher): the CNN or a small ViT encoder")
    ap.add_argument("--max-drop", type=float, default=MAX_DROP, help="acceptance: top-1 drop (fraction)")
    ap.add_argument("--min-teacher", type=float, default=MIN_TEACHER, help="acceptance: the teacher's own top-1")
    ap.add_argument("--bench", action="store_true",
                    help="compile teacher and each distilled student for cpu and time them (1 thread, interleaved)")
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
        train_teacher(teacher_path, x_tr, y_tr, arch=args.arch)
    teacher = graphopt.load(teacher_path)
    train, test = {"x": x_tr, "labels": y_tr}, {"x": x_te, "labels": y_te}
    budget = budgets(args.pipeline)
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))

    rows, results, ok, students = [], [], True, {}
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
            if flag:
                students[seed] = graph
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
                if f["teacher_top1"] < args.min_teacher:
                    checks.append(f"teacher below {args.min_teacher:.0%}")
                if f["top1_drop"] > args.max_drop + 1e-9:
                    checks.append(f"drop > {args.max_drop * 100:.1f} points")
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
    if args.bench:
        lines += [""] + bench_compiled(teacher, students)
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
