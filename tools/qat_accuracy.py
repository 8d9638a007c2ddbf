#!/usr/bin/env python3
"""Quantization-aware training against post-training quantization, measured on the compiled int8 libraries.

For one model: the fp32 model (onnxruntime), the PTQ graph (`quantize`, onnxruntime's calibrators) compiled for the
cpu target, and the QAT graph (`graphopt compress` with `quantize{qat=true}`: the same PTQ scales, weights trained
through fake quantization with distillation from the fp32 model, exported as the same QDQ graph) compiled the same
way. Accuracy on held-out data, and the median latency (--repeat runs, --threads threads) of each: onnxruntime on
the fp32 model, graphopt's compiled int8 libraries:

* digits-cnn (tests/fixtures/digits_cnn.onnx), digits-mobilenet (a MobileNetV2-style depthwise net trained here),
  digits-vit (tools/make_example.DigitsViT, a 2-layer ViT encoder trained here): top-1 on the 450 held-out
  scikit-learn digits;
* ppocr-rec (PP-OCRv4 recognizer from the rapidocr wheel, 1x3x48x320): text lines rendered by tools/ocr_data.py,
  exact-match accuracy of the decoded text (the model's own character table) and sequence agreement with fp32.

    .venv/bin/python tools/qat_accuracy.py --model digits-mobilenet --epochs 10
    .venv/bin/python tools/qat_accuracy.py --model ppocr-rec --train 256 --eval 100 --epochs 2 --lr 1e-3 \\
        --quantize "calibration=percentile,calib_samples=16" --json out/qat_ocr.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
REC = ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def digits_task(model: str, out: Path):
    """(graph, train {x, labels}, eval inputs, score(outputs) -> {metric: value})."""
    import graphopt
    from graphopt.datasets import digits_split
    x_tr, y_tr, x_te, y_te = digits_split()
    if model == "digits-cnn":
        path = ROOT / "tests" / "fixtures" / "digits_cnn.onnx"
    elif model == "digits-vit":
        from compress_digits import train_teacher
        path = out / "vit_digits.onnx"
        train_teacher(path, x_tr, y_tr, arch="vit")
    else:
        from targets.test_cpu_int8 import _train_mobilenet_v2_digits
        path = out / "mobilenet_v2_digits.onnx"
        _train_mobilenet_v2_digits(path, epochs=30)

    def score(outputs):
        return {"top1": float(np.mean(outputs.argmax(1) == y_te))}
    return graphopt.load(str(path)), {"x": x_tr, "labels": y_tr}, {"x": x_te}, score


def ocr_task(n_train: int, n_eval: int, source: str = "catalogs"):
    import importlib.metadata

    import onnx

    import graphopt
    import ocr_data
    from graphopt.task_metrics import ctc_decode, sequence_agreement
    from ocr_lines import SEEDS
    path = Path(importlib.metadata.distribution(REC[0]).locate_file(REC[1]))
    chars = {x.key: x.value for x in onnx.load(str(path), load_external_data=False).metadata_props}["character"]
    table = [""] + chars.splitlines() + [" "]           # CTC blank, the dictionary, the space PaddleOCR appends
    train, _ = ocr_data.render_lines(n_train, SEEDS["train"], source)
    evaluation, texts = ocr_data.render_lines(n_eval, SEEDS["eval"], source)
    graph = graphopt.load(str(path), input_shapes={"x": (1, 3, 48, 320)})
    ref = {}

    def score(outputs):
        got = ["".join(table[i] if i < len(table) else "?" for i in seq).strip() for seq in ctc_decode(outputs)]
        ref.setdefault("fp32", outputs)                     # the first call scores the fp32 model
        return {"exact_match": float(np.mean([g == t for g, t in zip(got, texts)])),
                "sequence_agreement": sequence_agreement(outputs, ref["fp32"])}
    return graph, train, evaluation, score


def run_artifact(art, data: dict) -> np.ndarray:
    x = data["x"]
    return np.concatenate([next(iter(art.run({"x": x[i:i + 1]}).values())) for i in range(len(x))])


def run_onnxruntime(graph, data: dict, optimize: bool = True) -> np.ndarray:
    """The graph in onnxruntime: optimized (a QDQ graph runs its int8 kernels) or not (a QDQ graph runs as the float
    arithmetic of its QuantizeLinear / DequantizeLinear nodes, what the trainable view computes and QAT trains)."""
    from graphopt import ort
    from graphopt.graph import to_onnx
    sess = ort.session(to_onnx(graph), optimize=optimize)
    x = data["x"]
    return np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("digits-cnn", "digits-mobilenet", "digits-vit", "ppocr-rec"),
                    default="digits-mobilenet")
    ap.add_argument("--epochs", type=int, default=10, help="QAT epochs")
    ap.add_argument("--lr", type=float, default=None, help="compress lr (QAT uses Schedule.qat_lr_scale of it)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--quantize", default="", help="extra quantize options, e.g. 'calibration=percentile'")
    ap.add_argument("--max-drop", type=float, default=None,
                    help="mixed precision: PTQ with quantize{max_drop=...} (points of the metric) scored on the first "
                         "--fallback-lines training examples; the layers it leaves in fp32 stay fp32 in QAT too")
    ap.add_argument("--fallback-lines", type=int, default=256, help="training examples --max-drop scores on")
    ap.add_argument("--qat-scales", choices=("kept", "learned"), default="kept",
                    help="QAT: activation scales kept from the calibration or learned (quantize{qat_scales=...})")
    ap.add_argument("--schedule", action="append", default=[], metavar="KEY=VALUE",
                    help="compress's schedule settings (repeatable), e.g. decisions=true")
    ap.add_argument("--train", type=int, default=256, help="ppocr-rec: rendered training lines")
    ap.add_argument("--eval", type=int, default=100, help="ppocr-rec: rendered evaluation lines")
    ap.add_argument("--text", choices=("catalogs", "random"), default="catalogs",
                    help="ppocr-rec: the lines' text (tools/ocr_data.py; random: the generator before 2026-12-06 21:00)")
    ap.add_argument("--seed", type=int, default=0, help="compress's seed (QAT's batch order and sampling)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=20, help="latency: timed runs of each model")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-qat", action="store_true", help="fp32 and PTQ rows only (compare quantize settings)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from graphopt.cli import key_values
    from graphopt.compress import Schedule
    from graphopt.errors import BadInput
    try:   # before minutes of work: a malformed or unknown setting is one line
        schedule = (Schedule.from_options(key_values(a.schedule, "--schedule", "decisions=true"), "--schedule")
                    if a.schedule else None)
    except BadInput as e:
        print(f"qat_accuracy: {e}", file=sys.stderr)
        return 2

    import graphopt
    from graphopt import PassContext, PassManager
    from graphopt.api import measure_latency
    from graphopt.compress import compress
    from graphopt.evaluate import ort_latency_ms
    from graphopt.graph import copy as copy_graph, input_specs, to_onnx
    from graphopt.progress import Progress
    out = a.out or Path(tempfile.mkdtemp(prefix="qat-accuracy-"))
    out.mkdir(parents=True, exist_ok=True)
    if a.model == "ppocr-rec":
        graph, train, evaluation, score = ocr_task(a.train, a.eval, a.text)
    else:
        graph, train, evaluation, score = digits_task(a.model, out)
    opts = "scheme=int8" + (f",{a.quantize}" if a.quantize else "")
    rows, t0 = {}, time.perf_counter()
    rows["fp32 (onnxruntime)"] = score(run_onnxruntime(graph, evaluation))
    latency = {"fp32 (onnxruntime)": round(ort_latency_ms(to_onnx(graph), input_specs(graph), a.threads,
                                                          a.repeat), 4)}
    _log(f"fp32: {rows['fp32 (onnxruntime)']}")

    calib = {"x": train["x"]}
    qat_pipeline = f"quantize{{{opts},qat=true,qat_scales={a.qat_scales}}}"
    if a.max_drop is None:
        ptq = PassManager.parse(f"quantize{{{opts}}}").run(copy_graph(graph), PassContext(data={"calib": calib})).graph
        fallback = []
    else:
        # training examples, not the evaluation lines: the fallback is chosen without the held-out data
        res = PassManager.parse(f"quantize{{{opts},max_drop={a.max_drop}}}").run(
            copy_graph(graph), PassContext(data={"calib": calib, "eval": {"x": train["x"][:a.fallback_lines]}},
                                           progress=Progress("lines")))
        ptq, q_info = res.graph, res.records[0]["info"]
        fallback = q_info.get("fallback_excluded", [])
        _log(f"max_drop {a.max_drop}: {len(q_info.get('fallback', []))} layers in fp32 ({q_info.get('fallback')}); "
             f"score on {a.fallback_lines} training examples {q_info.get('int8_score')} "
             f"(all int8: {q_info.get('int8_score_all_layers')})")
        from graphopt.passmanager import make_pass
        given = dict(PassManager.parse(qat_pipeline).passes[0].given)
        given["ops"] = q_info.get("ops", given.get("ops", "all"))     # max_drop may have chosen ops=compute
        qat_pipeline = PassManager([make_pass("quantize", **given, exclude_nodes=fallback)])
    simulated = {"PTQ int8 (onnxruntime, float QDQ)": score(run_onnxruntime(ptq, evaluation, optimize=False))}
    art = graphopt.compile(ptq, target="cpu", out=out / "ptq.cpu", measure=False, threads=a.threads)
    rows["PTQ int8 (compiled)"] = score(run_artifact(art, evaluation))
    latency["PTQ int8 (compiled)"] = measure_latency(art, threads=a.threads, repeat=a.repeat)["graphopt_ms"]
    _log(f"PTQ: {rows['PTQ int8 (compiled)']} ({art.report.get('int8_kernels')} int8 kernels)")

    run = {"quantize": opts, "rows": rows, "fp32_fallback": fallback, "float_qdq": simulated, "latency_ms": latency,
           "qat_training_seconds": None, "quantization": None}
    if a.no_qat:
        _log(f"float QDQ arithmetic: {simulated}")
        return _report(a, run, t0)
    t = time.perf_counter()
    qat, info = compress(copy_graph(graph), train, qat_pipeline,
                         epochs=a.epochs, schedule=schedule,
                         batch_size=a.batch_size, lr=a.lr, seed=a.seed, threads=a.threads, log=_log,
                         progress=Progress("lines"),
                         **({"micro_batch": a.micro_batch} if a.micro_batch else {}))
    train_s = time.perf_counter() - t
    # the same graphs as QAT trains them (float QDQ arithmetic): how much of a gap is the int8 kernels' rounding
    simulated["QAT int8 (onnxruntime, float QDQ)"] = score(run_onnxruntime(qat, evaluation, optimize=False))
    art = graphopt.compile(qat, target="cpu", out=out / "qat.cpu", measure=False, threads=a.threads)
    rows["QAT int8 (compiled)"] = score(run_artifact(art, evaluation))
    latency["QAT int8 (compiled)"] = measure_latency(art, threads=a.threads, repeat=a.repeat)["graphopt_ms"]
    _log(f"QAT: {rows['QAT int8 (compiled)']} ({art.report.get('int8_kernels')} int8 kernels, {train_s:.0f} s "
         f"training)")
    _log(f"float QDQ arithmetic: {simulated}")
    run.update(qat_training_seconds=round(train_s, 1), quantization=info.get("quantization"))
    return _report(a, run, t0)


def _report(a, run: dict, t0: float) -> int:
    """The JSON (--json: the arguments, run's rows, latencies, fallback and QAT facts, the seconds since t0) and
    the markdown table of run's rows."""
    rows, latency = run["rows"], run["latency_ms"]
    result = {"model": a.model, "qat_scales": a.qat_scales, "schedule": a.schedule, "epochs": a.epochs, "lr": a.lr,
              "seed": a.seed, "max_drop": a.max_drop, "threads": a.threads, **run,
              "seconds": round(time.perf_counter() - t0, 1)}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2, default=str))
    metrics = list(rows["fp32 (onnxruntime)"])
    print(f"| {a.model} | " + " | ".join(metrics) + f" | latency ms ({a.threads} thread(s)) |")
    for name, r in rows.items():
        fp = rows["fp32 (onnxruntime)"]
        print(f"| {name} | " + " | ".join(f"{100 * r[k]:.2f}% ({100 * (r[k] - fp[k]):+.2f})" if k in r else "-"
                                         for k in metrics) + f" | {latency[name]:.4g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
