#!/usr/bin/env python
"""Benchmark graphopt's int8 lowering: compiled int8 vs compiled fp32 vs onnxruntime (fp32 and the same QDQ model),
same inputs, same thread count, timings interleaved round by round (the machine may be shared).

    .venv/bin/python tools/bench_int8.py [--model resnet18] [--threads 2] [--rounds 5] [--repeat 10]
                                         [--calib 8] [--out /tmp/bench_int8] [--json]
    .venv/bin/python tools/bench_int8.py --accuracy      # top-1 on scikit-learn digits instead of speed

Models come from tools/bench_models.py (ResNet-18 at 1x3x224x224 by default). Steps: export, fold-constants +
fold-batchnorm, then
  fp32  : graphopt.compile(..., target="cpu")                       (graphopt's fp32 schedules)
  int8  : quantize{calib_samples=N} (seeded normal calibration data), legalized (lower-int8) and lowered by
          targets/int8 through graphopt.compile (the cpu target's int8 lowering; fp32 ops left get the default
          CPU schedules)
  ort   : onnxruntime, all optimizations, on the fp32 model and on the same QDQ model.onnx
  ov    : OpenVINO (when installed: the `bench` extra) on the same QDQ file, same thread count, its default
          precision; the runtime precision of its compute layers is printed (u8/i8 when it ran int8)
The int8 library is checked against onnxruntime (>= 99% of elements within one quantization step) and its
disassembly is searched for vpdpbusd. Prints a table (or JSON) with medians in milliseconds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def build_int8(q_model, out: Path, threads: int):
    """(runner, facts, library path) for the QDQ model, through graphopt.compile (the cpu target's int8 lowering)."""
    import graphopt
    art = graphopt.compile(q_model, target="cpu", out=out / "int8_art", measure=False, verify_level="none")
    return art.runner(threads), dict(art.report), art.path / "model.so"


def quantize_qdq(src, calib_samples: int = 8, activations: str = "u8", ops: str = "all"):
    """(fp32, QDQ) ModelProtos of the ONNX file src: fold-constants + fold-batchnorm, then quantize (seeded normal
    calibration data shaped like input "x"). The QDQ model is what onnxruntime's quantizer writes, what every engine
    is given; graphopt's cpu target legalizes it with lower-int8 itself."""
    import graphopt
    from graphopt import PassContext, PassManager
    from graphopt.graph import to_onnx
    fp32 = to_onnx(PassManager.parse("fold-constants,fold-batchnorm").run(graphopt.load(src)).graph)
    dims = [d.dim_value for d in next(i for i in fp32.graph.input if i.name == "x").type.tensor_type.shape.dim]
    calib = {"x": np.random.default_rng(0).standard_normal([calib_samples] + dims[1:]).astype(np.float32)}
    res = PassManager.parse(f"quantize{{calib_samples={calib_samples},activations={activations},ops={ops}}}").run(
        graphopt.load(fp32), PassContext(data={"calib": calib}))
    return fp32, to_onnx(res.graph)


def openvino_session(path, threads: int, precision: str | None = None):
    """(run(feeds), precision facts) of the ONNX file `path` compiled by OpenVINO for the CPU with `threads`
    inference threads, latency hint, and INFERENCE_PRECISION_HINT=precision when given."""
    import openvino as ov
    core = ov.Core()
    m = core.read_model(str(path))
    cfg = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(m, "CPU", cfg)
    request = compiled.create_infer_request()
    return (lambda feeds: request.infer(feeds, share_inputs=True)), openvino_precision(compiled)


def openvino_precision(compiled) -> dict:
    """The compiled model's INFERENCE_PRECISION_HINT, its thread count, and the runtime precision of its compute
    layers (Convolution, MatMul, FullyConnected, ...) from the execution graph, e.g. {"bf16": 20, "f32": 1}."""
    from collections import Counter
    compute = ("Convolution", "GroupConvolution", "Deconvolution", "MatMul", "FullyConnected", "BinaryConvolution")
    layers = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in compute:
            layers[info["runtimePrecision"].astype(str)] += 1
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    return {"hint": getattr(hint, "get_type_name", lambda: str(hint))(),
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")), "compute_layers": dict(layers)}


def precision_text(facts: dict) -> str:
    """'bf16' or 'f32' when every compute layer ran in one precision, else e.g. 'u8 20, f32 1'."""
    layers = facts["compute_layers"]
    if len(layers) == 1:
        return next(iter(layers))
    return ", ".join(f"{k} {v}" for k, v in sorted(layers.items(), key=lambda kv: -kv[1])) or facts["hint"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--calib", type=int, default=8, help="calibration samples (seeded normal)")
    ap.add_argument("--activations", default="u8", choices=("u8", "s8"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--accuracy", action="store_true",
                    help="top-1 of the digits CNN and a MobileNetV2-style digits model: fp32, QDQ in onnxruntime, "
                         "compiled int8 library")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    if args.accuracy:
        return accuracy(args)

    import bench_models
    import graphopt
    from graphopt import ort
    from graphopt.passes.quantize import check_criterion, within_quant_steps

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-int8-"))
    out.mkdir(parents=True, exist_ok=True)
    shape = bench_models.MODELS[args.model][1]
    src = out / f"{args.model}.onnx"
    bench_models.export_onnx(args.model, src)
    rng = np.random.default_rng(1)     # the timed input; calibration draws from seed 0
    t0 = time.perf_counter()
    fp32, q = quantize_qdq(src, args.calib, args.activations)
    onnx.save(q, str(out / "qdq.onnx"))
    _log(f"quantized in {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    fp_art = graphopt.compile(fp32, target="cpu", out=out / "fp32_art", measure=False, verify_level="none")
    t_fp_compile = time.perf_counter() - t0
    _log(f"fp32 compiled in {t_fp_compile:.1f}s")
    t0 = time.perf_counter()
    int8_run, facts, so = build_int8(q, out, args.threads)
    t_q_compile = time.perf_counter() - t0
    _log(f"int8 compiled in {t_q_compile:.1f}s: {({k: v for k, v in facts.items() if k != 'check_criterion'})}")

    x = rng.standard_normal(shape).astype(np.float32)
    check = within_quant_steps(ort.run(q, {"x": x}), dict(zip([o.name for o in q.graph.output], int8_run([x]))),
                               check_criterion(q))
    vnni = None
    if shutil.which("objdump"):
        asm = subprocess.run(["objdump", "-d", str(so)], capture_output=True, text=True).stdout
        vnni = asm.count("vpdpbusd")

    fp_run = fp_art.runner(args.threads)
    s_fp = ort.session(fp32, optimize=True, threads=args.threads)
    s_q = ort.session(q, optimize=True, threads=args.threads)
    cands = {"graphopt_int8": lambda: int8_run([x]), "graphopt_fp32": lambda: fp_run([x]),
             "ort_qdq": lambda: s_q.run(None, {"x": x}), "ort_fp32": lambda: s_fp.run(None, {"x": x})}
    openvino = {}
    try:    # OpenVINO (the bench extra) on the same QDQ file, same thread count
        ov_run, openvino = openvino_session(out / "qdq.onnx", args.threads)
        cands["openvino_qdq"] = lambda: ov_run({"x": x})
        _log(f"OpenVINO on the QDQ model: {openvino}")
    except ImportError:
        _log("openvino is not installed (pip install -e '.[bench]'): no OpenVINO column")
    times = {k: [] for k in cands}
    for f in cands.values():
        f()
        f()
    for r in range(args.rounds):
        for k, f in cands.items():
            for _ in range(args.repeat):
                t = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t) * 1e3)
        _log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in times.items()))
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    best = {k: round(min(v), 3) for k, v in times.items()}
    result = {"model": args.model, "input": list(shape), "threads": args.threads, "median_ms": med, "min_ms": best,
              "int8_speedup_vs_fp32": round(med["graphopt_fp32"] / med["graphopt_int8"], 2),
              "int8_speedup_vs_ort_qdq": round(med["ort_qdq"] / med["graphopt_int8"], 2),
              "check": {k: v for k, v in check.items() if k != "outputs"} | {"outputs": check["outputs"]},
              "vpdpbusd_in_library": vnni, "int8_facts": {k: v for k, v in facts.items()
                                                          if k in ("int8_dot", "int8_kernels", "conv2d", "dense",
                                                                   "residual_fused", "maxpool_nhwc", "fp32_convs",
                                                                   "fp32_matmuls")},
              "compile_seconds": {"fp32": round(t_fp_compile, 1), "int8": round(t_q_compile, 1)},
              "openvino_qdq_precision": openvino or None,
              "cpu": _cpu_name(), "load_average": os.getloadavg()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model} {shape}, {args.threads} threads ({result['cpu']}, load {result['load_average'][0]:.1f})")
        for k in cands:
            print(f"  {k:14s} median {med[k]:9.2f} ms   min {best[k]:9.2f} ms")
        if openvino:
            print(f"  OpenVINO compute layers on the QDQ model: {precision_text(openvino)} ({openvino['threads']} "
                  f"threads)")
        print(f"  int8 vs graphopt fp32: {result['int8_speedup_vs_fp32']}x   int8 vs onnxruntime QDQ: "
              f"{result['int8_speedup_vs_ort_qdq']}x")
        print(f"  int8 check vs onnxruntime: ok={check['ok']} {check['outputs']}")
        print(f"  vpdpbusd instructions in the int8 library: {vnni}")
    return result


def accuracy(args):
    """Top-1 on the digits test split (450 images) for the models the tests use, measured three ways."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import digits
    import graphopt
    from graphopt import PassContext, PassManager, ort
    from graphopt.graph import to_onnx
    from graphopt.targets import int8, tvm_lowering
    from graphopt.targets.cpu import CpuTarget
    from targets.test_cpu_int8 import _train_mobilenet_v2_digits

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-int8-acc-"))
    out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = digits.load_digits_split()
    mnv2 = out / "mobilenet_v2_digits.onnx"
    _train_mobilenet_v2_digits(mnv2)
    rows = {}
    for name, path, pipe in [("cnn_digits", digits.teacher_path(), "quantize,lower-int8"),
                             ("mobilenet_v2_digits", mnv2, "quantize,lower-int8"),
                             ("mobilenet_v2_digits max_drop=1", mnv2, "quantize{max_drop=1.0},lower-int8")]:
        fp32 = to_onnx(graphopt.load(str(path)))
        res = PassManager.parse(pipe).run(graphopt.load(str(path)), PassContext(data={
            "calib": {"x": x_tr[:256]}, "eval": {"x": x_tr[-300:], "labels": y_tr[-300:]}}))
        q = to_onnx(res.graph)
        so = out / f"{name.split()[0]}.so"
        facts = int8.build_library(q, so, CpuTarget().tvm_target())
        run = tvm_lowering.VMRunner(so)
        s_fp, s_q = ort.session(fp32), ort.session(q)
        top = {"fp32_onnxruntime": np.mean([np.argmax(s_fp.run(None, {"x": x[None]})[0]) == y for x, y in zip(x_te, y_te)]),
               "qdq_onnxruntime": np.mean([np.argmax(s_q.run(None, {"x": x[None]})[0]) == y for x, y in zip(x_te, y_te)]),
               "int8_compiled": np.mean([np.argmax(run([x[None]])[0]) == y for x, y in zip(x_te, y_te)])}
        rows[name] = {k: round(float(v) * 100, 2) for k, v in top.items()}
        rows[name]["drop_points"] = round(rows[name]["fp32_onnxruntime"] - rows[name]["int8_compiled"], 2)
        rows[name]["fp32_fallback"] = res.records[0]["info"].get("fallback", [])
        rows[name]["int8_kernels"] = {k: facts[k] for k in ("conv2d", "dense", "fp32_convs", "residual_fused")}
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for name, r in rows.items():
            print(f"{name:34s} fp32 {r['fp32_onnxruntime']:6.2f}  QDQ/onnxruntime {r['qdq_onnxruntime']:6.2f}  "
                  f"int8 compiled {r['int8_compiled']:6.2f}  drop {r['drop_points']:+.2f} points  "
                  f"fallback {r['fp32_fallback']}  {r['int8_kernels']}")
    return rows


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    main()
