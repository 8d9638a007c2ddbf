#!/usr/bin/env python3
"""Real pretrained models compressed end to end with `graphopt compress` on real unlabeled data (issue 15, item 3):
the data is made or collected, the CLI distills a pruned student from the fp32 original (no labels), the student's
agreement with the teacher is measured on held-out data with onnxruntime (graphopt.task_metrics), and teacher and
student are compiled for the cpu target and timed side by side. Prints one markdown row (and --json writes all).

    .venv/bin/python tools/compress_real.py --model ppocr-rec      # PP-OCRv4 recognizer on rendered text lines
    .venv/bin/python tools/compress_real.py --model ppocr-det      # PP-OCRv4 detector on rendered pages
    .venv/bin/python tools/compress_real.py --model magika         # magika on the bytes of files of this machine

Models (from the wheels tools/setup.sh installs):
  ppocr-rec  rapidocr_onnxruntime's ch_PP-OCRv4_rec_infer.onnx, [1, 3, 48, 320]; lines by tools/ocr_data.py
             (render_lines: real phrases from Debian's message catalogs; --text random for the older random
             characters); metric: decoded-sequence agreement (greedy CTC) with the teacher
  ppocr-det  ch_PP-OCRv4_det_infer.onnx at [1, 3, S, S] (--page-size, default 320); pages by
             tools/ocr_data.render_pages; metric: IoU of the probability maps thresholded at 0.3, and the
             region F1 (graphopt.task_metrics.region_f1: the maps' regions matched at box IoU >= 0.5)
  magika     magika's standard_v3_3 model, [1, 2048] byte tokens: first and last 1024 bytes of files under
             /usr/share and /usr/lib (train and held-out files disjoint); metric: top-1 agreement

Images (ppocr-rec, ppocr-det): the row also gives the teacher's agreement with itself under Gaussian pixel noise of
1/255, the metric's own noise floor; for the recognizer also the symbol agreement (1 - character error rate against
the teacher) and the agreement on the lines whose decoding that noise leaves unchanged.

Latency: both artifacts are compiled with `graphopt compile --target cpu --pipeline cleanup`, then timed in
interleaved rounds with one thread on process CPU time (graphopt.timing.time_interleaved), so the other load on a
shared machine does not count. Compress time: wall clock and the CPU time of the compress process.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

GRAPHOPT = str(ROOT / ".venv" / "bin" / "graphopt")
FILE_ROOTS = ("/usr/share", "/usr/lib")
DEFAULTS = {   # per model: train/eval examples, epochs, batch, lr, threads
    "ppocr-rec": dict(train=256, eval=200, epochs=7, batch=16, lr=1e-4),
    "ppocr-det": dict(train=96, eval=48, epochs=7, batch=8, lr=1e-4),
    "magika": dict(train=2048, eval=1000, epochs=7, batch=64, lr=1e-4),
}


def model_file(model: str) -> Path:
    from test_third_party_models import model_path
    if model == "magika":
        import magika
        return Path(magika.__file__).parent / "models" / "standard_v3_3" / "model.onnx"
    return Path(model_path("ch_PP-OCRv4_rec_infer.onnx" if model == "ppocr-rec" else "ch_PP-OCRv4_det_infer.onnx"))


def input_shape(model: str, page: int) -> tuple[str, tuple]:
    if model == "ppocr-rec":
        return "x", (1, 3, 48, 320)
    if model == "ppocr-det":
        return "x", (1, 3, page, page)
    return "bytes", (1, 2048)


def task(model: str) -> str:
    return {"ppocr-rec": "ctc", "ppocr-det": "map", "magika": "classifier"}[model]


# ------------------------------------------------------------------------------------------------------- data

def _magika_row(data: bytes) -> list[int]:
    """magika's features: the first and last 1024 bytes (whitespace stripped), padded with token 256."""
    beg = list(data[:4096].lstrip()[:1024])
    end = list(data[-4096:].rstrip()[-1024:])
    return beg + [256] * (1024 - len(beg)) + [256] * (1024 - len(end)) + end


def real_files(n: int, seed: int) -> list[Path]:
    """n distinct regular files (>= 64 bytes) under FILE_ROOTS, drawn at random from a sorted walk."""
    files = []
    for root in FILE_ROOTS:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for f in sorted(filenames):
                p = Path(dirpath) / f
                try:
                    if p.is_file() and not p.is_symlink() and p.stat().st_size >= 64:
                        files.append(p)
                except OSError:
                    pass
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(files))[:n]
    return [files[i] for i in pick]


def make_data(model: str, n_train: int, n_eval: int, page: int, seed: int, source: str) -> tuple[dict, dict]:
    import ocr_data
    if model == "ppocr-rec":
        return ocr_data.render_lines(n_train, seed, source)[0], ocr_data.render_lines(n_eval, seed + 1000, source)[0]
    if model == "ppocr-det":
        return (ocr_data.render_pages(n_train, seed, size=(page, page), source=source),
                ocr_data.render_pages(n_eval, seed + 1000, size=(page, page), source=source))
    files = real_files(n_train + n_eval, seed)      # disjoint: no file in both splits
    rows = []
    for p in files:
        try:
            rows.append(_magika_row(p.read_bytes()))
        except OSError:
            rows.append([256] * 2048)
    x = np.array(rows, np.int32)
    return {"bytes": x[:n_train]}, {"bytes": x[n_train:]}


# ------------------------------------------------------------------------------------------------------- steps

def run_compress(model_path: Path, name: str, shape: tuple, train: Path, eval_: Path, out: Path, args) -> dict:
    """The CLI run, progress streamed to stderr; its JSON report with wall and CPU seconds added."""
    cmd = [GRAPHOPT, "compress", str(model_path), "--train", str(train), "--eval", str(eval_),
           "--pipeline", f"cleanup,prune-channels{{flops={args.flops},criterion={args.criterion}}}", "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--micro-batch", str(args.batch_size), "--lr", str(args.lr),
           "--threads", str(args.threads), "--input-shape", f"{name}=" + ",".join(map(str, shape)),
           "-o", str(out), "--json"]
    for setting in args.schedule:
        cmd += ["--schedule", setting]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    ck = out.with_name(out.name + ".ckpt")
    if ck.exists() and not args.resume:
        import shutil
        shutil.rmtree(ck)
    if args.resume:
        cmd.append("--resume")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"compress failed (exit {proc.returncode}): {proc.stdout.strip()[-500:]}")
    rep = json.loads(proc.stdout)
    rep["wall_s"] = round(wall, 1)
    rep["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
    rep["command"] = " ".join(cmd)
    return rep


def outputs(path: Path, data: dict, name: str) -> np.ndarray:
    """The model's first output on every example (onnxruntime, one example at a time: the graphs are batch 1)."""
    from graphopt import ort
    sess = ort.session(path.read_bytes(), optimize=True, threads=1)
    x = data[name]
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def agreement(teacher: Path, student: Path, data: dict, name: str, kind: str, seed: int, images: bool) -> dict:
    """The student's agreement with the teacher on held-out data (graphopt.task_metrics). For images also the
    metric's own noise floor: the teacher's agreement with itself when every pixel gets Gaussian noise of 1/255
    of a grey level (invisible); for a CTC recognizer the symbol agreement (one minus the character error rate),
    the sequence agreement on the lines whose decoding that noise leaves unchanged and the agreement without spaces
    at the lines' ends; for a map the region F-measure (graphopt.task_metrics.region_f1), with its noise floor."""
    from graphopt.task_metrics import (agreement as task_agreement, ctc_decode, region_f1, sequence_agreement,
                                       symbol_agreement)
    t_out, s_out = outputs(teacher, data, name), outputs(student, data, name)
    res = task_agreement(s_out, t_out, kind)
    if not images:
        return res
    # one grey level in the model's input units: the recognizer's preprocessing is (p / 255 - 0.5) / 0.5, the
    # detector's ImageNet mean / std
    std = np.float32(0.5) if kind == "ctc" else np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    x = data[name]
    noisy = (x + np.random.default_rng(seed).normal(0, 1 / 255, x.shape).astype(np.float32) / std).astype(np.float32)
    n_out = outputs(teacher, {name: noisy}, name)
    res["teacher_under_noise"] = task_agreement(n_out, t_out, kind)["value"]
    if kind == "ctc":
        res["symbol_agreement"] = symbol_agreement(s_out, t_out)
        stable = [i for i, (a, b) in enumerate(zip(ctc_decode(n_out), ctc_decode(t_out))) if a == b]
        res["stable_lines"] = len(stable)
        res["on_stable_lines"] = task_agreement(s_out[stable], t_out[stable], kind)["value"] if stable else None
        # PP-OCR's classes: blank, the dictionary, then the space; a space the model emits at a line's end (where
        # the text meets the padding) is no text: the agreement of the decodings without spaces at their ends
        space = (t_out.shape[-1] - 1,)
        res["trimmed"] = sequence_agreement(s_out, t_out, strip=space)
        res["teacher_under_noise_trimmed"] = sequence_agreement(n_out, t_out, strip=space)
    else:
        res["region_f1"] = region_f1(s_out, t_out)
        res["teacher_under_noise_region_f1"] = region_f1(n_out, t_out)
    return res


def compile_cpu(model_path: Path, name: str, shape: tuple, out: Path) -> float:
    t0 = time.perf_counter()
    cmd = [GRAPHOPT, "compile", str(model_path), "--target", "cpu", "--pipeline", "cleanup", "--input-shape",
           f"{name}=" + ",".join(map(str, shape)), "-o", str(out), "--no-bench"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compile failed (exit {proc.returncode}): {proc.stdout.strip()[-500:]}")
    return time.perf_counter() - t0


def latency(teacher_art: Path, student_art: Path) -> tuple[float, float]:
    """Median ms of teacher and student, one thread, process CPU time, interleaved rounds."""
    from graphopt.artifact import Artifact
    from graphopt.timing import time_interleaved, timer
    calls = [timer(Artifact(teacher_art), 1), timer(Artifact(student_art), 1)]
    return tuple(time_interleaved(calls, threads=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=sorted(DEFAULTS))
    ap.add_argument("--train", type=int, help="training examples")
    ap.add_argument("--eval", type=int, help="held-out examples")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--flops", type=float, default=0.5, help="prune-channels MACs budget (kept fraction)")
    ap.add_argument("--criterion", default="activation", help="prune-channels' importance criterion")
    ap.add_argument("--schedule", action="append", default=[], metavar="KEY=VALUE",
                    help="compress's --schedule settings (repeatable), e.g. light_fraction=0.2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while training (1 on a busy machine)")
    ap.add_argument("--page-size", type=int, default=320, help="ppocr-det: page side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", choices=("catalogs", "random"), default="catalogs",
                    help="OCR models: the text rendered (tools/ocr_data.py; random: the generator before 2026-12-06 21:00)")
    ap.add_argument("--out-dir", default=str(ROOT / "out" / "compress_real"))
    ap.add_argument("--resume", action="store_true", help="continue an interrupted compress run")
    ap.add_argument("--no-bench", action="store_true", help="skip compiling and timing")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    d = DEFAULTS[args.model]
    args.train = args.train or d["train"]
    args.eval = args.eval or d["eval"]
    args.epochs = args.epochs or d["epochs"]
    args.batch_size = args.batch_size or d["batch"]
    args.lr = args.lr or d["lr"]

    out = Path(args.out_dir) / args.model
    out.mkdir(parents=True, exist_ok=True)
    src = model_file(args.model)
    name, shape = input_shape(args.model, args.page_size)
    t0 = time.perf_counter()
    train, held = make_data(args.model, args.train, args.eval, args.page_size, args.seed, args.text)
    np.savez(out / "train.npz", **train)
    np.savez(out / "eval.npz", **held)
    data_s = time.perf_counter() - t0
    print(f"data: {args.train} training / {args.eval} held-out examples in {data_s:.0f} s", file=sys.stderr)

    student = out / "student.onnx"
    rep = run_compress(src, name, shape, out / "train.npz", out / "eval.npz", student, args)
    # the teacher as compress saw it (shapes bound): the same file with the input shape fixed, for timing
    from graphopt.graph import to_onnx
    from graphopt.loading import load
    import onnx
    teacher = out / "teacher.onnx"
    onnx.save(to_onnx(load(str(src), input_shapes={name: shape})), str(teacher))
    agree = agreement(teacher, student, held, name, task(args.model), args.seed,
                      images=args.model in ("ppocr-rec", "ppocr-det"))
    res = {"model": args.model, "file": str(src), "input": {name: list(shape)}, "train": args.train,
           "eval": args.eval, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
           "flops": args.flops, "threads": args.threads, "schedule": args.schedule, "macs": rep["macs"] if "macs" in rep else rep.get("info", {}).get("macs"),
           "agreement": agree, "compress_wall_s": rep["wall_s"], "compress_cpu_s": rep["cpu_s"],
           "compress_command": rep["command"], "report": rep}
    if not args.no_bench:
        compile_cpu(teacher, name, shape, out / "teacher.cpu")
        compile_cpu(student, name, shape, out / "student.cpu")
        t_ms, s_ms = latency(out / "teacher.cpu", out / "student.cpu")
        res.update(teacher_ms=round(t_ms, 3), student_ms=round(s_ms, 3), speedup=round(t_ms / s_ms, 3))
    macs = res["macs"] or {}
    row = (f"| {args.model} | {macs.get('before', 0) / 1e6:.1f} M -> {macs.get('after', 0) / 1e6:.1f} M "
           f"({macs.get('after', 0) / max(macs.get('before', 1), 1):.2f}x) | {agree['metric']} "
           f"{agree['value']:.3f}" + (f" (teacher under 1/255 noise: {agree['teacher_under_noise']:.3f})"
                                      if "teacher_under_noise" in agree else "")
           + (f"; symbols {agree['symbol_agreement']:.3f}; {agree['on_stable_lines']:.3f} of the "
              f"{agree['stable_lines']} lines the noise leaves unchanged; without spaces at the ends "
              f"{agree['trimmed']:.3f} (teacher under noise {agree['teacher_under_noise_trimmed']:.3f})"
              if "symbol_agreement" in agree else "")
           + (f"; region F1 {agree['region_f1']:.3f} (teacher under noise {agree['teacher_under_noise_region_f1']:.3f})"
              if "region_f1" in agree else "")
           + f" | {rep['wall_s'] / 60:.1f} min / {rep['cpu_s'] / 60:.1f} min CPU | "
           + (f"{res['teacher_ms']:.2f} | {res['student_ms']:.2f} | {res['speedup']:.2f}x |"
              if "speedup" in res else "- | - | - |"))
    print("| model | MACs | agreement with teacher (held out) | compress wall / CPU | teacher ms | student ms | "
          "speedup |\n|---|---|---|---|---|---|---|\n" + row)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
