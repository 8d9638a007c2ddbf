"""Training throughput and peak memory of graphopt's trainable view against the same network as an ordinary torch
module (issue 15, item 1), and graphopt's memory estimate (graphopt.memory_estimate) beside the measured peak.

    .venv/bin/python tools/measure_training.py [--models resnet18 bert_encoder ppocr_rec jax2tf] [--batch 32]
                                               [--steps 3] [--threads 2] [--out training.md]

One distillation step = the teacher's forward (no gradients) + the student's forward and backward + an AdamW step,
student and teacher the same network, loss = MSE between their outputs. Each (model, engine) runs in a fresh
process (so peak resident memory is its own): the median step time over --steps steps after one warm-up step
(process CPU time with --threads 1, so other load on the machine does not count; wall time otherwise), and the
peak RSS increase over the process before the model was built (ru_maxrss). Engines:
  torch   the network as an ordinary torch module (tools/bench_models.py's modules). The PP-OCRv4 recognizer is
          Paddle code with no torch port here, and onnx2torch cannot stand in (it imports torchvision, which has
          no wheel for torch 2.13 on this machine, and refuses the Paddle export's BatchNorms of unknown rank):
          its row has the view's numbers only
  view    graphopt.trainable.TrainableGraph over the ONNX export (what compress trains)
  qat     (with --qat) the view of the int8 QDQ graph's fake quantization (graphopt.qat.fake_quant of the quantize
          pass's output, calibrated on the step's batch) as the student, the fp32 view as the teacher: what
          quantize{qat=true} trains in compress
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

MODELS = ("resnet18", "bert_encoder", "ppocr_rec", "jax2tf")


def _jax2tf_module():
    """A jax2tf-style model (one-hot -> Dense -> LayerNorm -> Conv -> Dense) on token ids, written in torch."""
    import torch
    import torch.nn as nn

    class Jax2tfLike(nn.Module):
        def __init__(self, vocab=64, dim=128, seq=200, classes=12):
            super().__init__()
            self.vocab = vocab
            self.dense1 = nn.Linear(vocab, dim)
            self.norm = nn.LayerNorm(dim)
            self.conv = nn.Conv1d(dim, dim, 5, padding=2)
            self.dense2 = nn.Linear(dim * seq, classes)

        def forward(self, ids):
            x = torch.nn.functional.one_hot(ids, self.vocab).float()
            x = self.norm(torch.relu(self.dense1(x)))
            x = torch.relu(self.conv(x.transpose(1, 2)))
            return self.dense2(x.flatten(1))

    torch.manual_seed(0)
    return Jax2tfLike(), torch.randint(0, 64, (1, 200))


def _export(module, example, path):
    import warnings

    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False, do_constant_folding=True)


def prepare(name: str, work: Path) -> tuple[Path, dict]:
    """(ONNX file, input shapes to bind) for a model, exported once into work."""
    import bench_models
    path = work / f"{name}.onnx"
    if name == "ppocr_rec":
        from test_third_party_models import model_path
        return model_path("ch_PP-OCRv4_rec_infer.onnx"), {"x": (1, 3, 48, 320)}
    if not path.exists():
        if name == "jax2tf":
            _export(*_jax2tf_module(), path)
        else:
            bench_models.export_onnx(name, path)
    return path, {}


def _torch_module(name: str, onnx_path: Path, shapes: dict):
    import bench_models
    if name == "jax2tf":
        return _jax2tf_module()[0]
    if name == "ppocr_rec":
        raise SystemExit("no torch module for the PP-OCRv4 recognizer (Paddle code)")
    return bench_models.build(name)[0]


def _input(name: str, batch: int, onnx_path: Path, shapes: dict):
    import numpy as np
    import torch

    import graphopt
    g = graphopt.load(onnx_path, input_shapes=shapes)
    t = g.inputs[0]
    shape = (batch,) + tuple(t.shape[1:])
    if np.dtype(t.dtype).kind in "iu":
        return torch.randint(0, 64, shape, dtype=torch.int64)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def run_one(name: str, engine: str, batch: int, steps: int, threads: int, work: Path) -> dict:
    """One (model, engine) measurement in this process."""
    import torch
    torch.set_num_threads(threads)
    onnx_path, shapes = prepare(name, work)
    x = _input(name, batch, onnx_path, shapes)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if engine == "torch":
        student = _torch_module(name, onnx_path, shapes)
        teacher = _torch_module(name, onnx_path, shapes)
        student.train()
        teacher.eval()
    else:
        import graphopt
        from graphopt.trainable import TrainableGraph
        g = graphopt.PassManager.parse("cleanup").run(graphopt.load(onnx_path, input_shapes=shapes)).graph
        teacher = TrainableGraph(g, trainable=[])
        teacher.eval()
        if engine == "qat":
            from graphopt.qat import fake_quant
            from graphopt.shapes import infer
            calib = {g.inputs[0].name: x[:8].numpy()}
            q = graphopt.PassManager.parse("quantize").run(g, graphopt.PassContext(data={"calib": calib})).graph
            g = fake_quant(infer(q))[0]
        student = TrainableGraph(g)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)

    def first(y):
        return y[0] if isinstance(y, (tuple, list)) else y

    def step():
        with torch.no_grad():
            target = first(teacher(x))
        out = first(student(x))
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    clock = time.process_time if threads == 1 else time.perf_counter    # 1 thread: CPU time, immune to other load
    times = []
    for _ in range(steps):
        t0 = clock()
        step()
        times.append(clock() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = {"model": name, "engine": engine, "batch": batch, "threads": threads,
           "step_ms": round(statistics.median(times) * 1e3, 1), "peak_mib": round((peak - base_rss) / 1024, 1)}
    if engine in ("view", "qat"):
        from graphopt.memory_estimate import FIXED_BYTES, training_bytes
        est = training_bytes(g, [g], batch) - FIXED_BYTES
        res["estimate_mib"] = round(est / 2 ** 20, 1)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "graphopt-measure-training"))
    ap.add_argument("--qat", action="store_true", help="also the fake-quantized int8 view (quantization-aware "
                    "training)")
    ap.add_argument("--out")
    ap.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args._one:
        print(json.dumps(run_one(args._one[0], args._one[1], args.batch, args.steps, args.threads, work)))
        return 0
    rows = []
    for name in args.models:
        got = {}
        for engine in ("torch", "view") + (("qat",) if args.qat else ()):
            cmd = [sys.executable, __file__, "--_one", name, engine, "--batch", str(args.batch), "--steps",
                   str(args.steps), "--threads", str(args.threads), "--work", str(work)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                got[engine] = {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:120]}
            else:
                got[engine] = json.loads(r.stdout.strip().splitlines()[-1])
            print(name, engine, got[engine], file=sys.stderr, flush=True)
        rows.append((name, got))
    lines = [f"Training step (teacher forward + student forward/backward + AdamW), batch {args.batch}, "
             f"{args.threads} threads, {platform.processor() or platform.machine()}, "
             f"{time.strftime('%Y-%m-%d')}; command: `.venv/bin/python tools/measure_training.py "
             f"--batch {args.batch} --threads {args.threads}`", "",
             "| model | torch module ms | view ms | time ratio | torch peak MiB | view peak MiB | memory ratio "
             "| estimate MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    if args.qat:
        lines[0] = lines[0].replace("--threads", "--qat --threads")
        lines[2] = lines[2] + " QAT view ms | QAT view peak MiB | QAT estimate MiB |"
        lines[3] = lines[3] + "---:|---:|---:|"
    for name, got in rows:
        t, v = got["torch"], got["view"]
        qat = got.get("qat")
        tail = "" if qat is None else (f" {qat['step_ms']} | {qat['peak_mib']} | {qat['estimate_mib']} |"
                                       if "error" not in qat else f" {qat['error']} | | |")
        if "error" in t or "error" in v:
            lines.append(f"| {name} | {t.get('step_ms', t.get('error'))} | {v.get('step_ms', v.get('error'))} | "
                         f"| {t.get('peak_mib', '')} | {v.get('peak_mib', '')} | | {v.get('estimate_mib', '')} |"
                         + tail)
            continue
        lines.append(f"| {name} | {t['step_ms']} | {v['step_ms']} | {v['step_ms'] / t['step_ms']:.2f} | "
                     f"{t['peak_mib']} | {v['peak_mib']} | {v['peak_mib'] / max(t['peak_mib'], 1e-9):.2f} | "
                     f"{v.get('estimate_mib')} |" + tail)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
