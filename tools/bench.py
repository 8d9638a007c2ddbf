"""Benchmark graphopt's CPU target against onnxruntime and OpenVINO on the models in tools/bench_models.py.

    .venv/bin/python tools/bench.py [--models resnet18 mobilenet_v2 ...] [--threads 1 2] [--tuned-db DIR]
                                    [--out bench.md] [--rounds 5] [--pipeline cleanup] [--precision fp32 bf16]
                                    [--in-process] [--target-variant direct=winograd=off]

For every model: write its ONNX file (cached in --work; the PP-OCR models with their input shape bound, the
`<model>_int8` rows the QDQ model of tools/bench_int8.quantize_qdq), compile it with graphopt's default schedules
(and, when a tuning database exists for it, with the database: DIR/<model>/ or DIR itself), then for each thread
count time, on the artifact's model.onnx (one file for every engine): onnxruntime (all graph optimizations,
intra-op threads = N), OpenVINO (the `bench` extra; INFERENCE_NUM_THREADS = N, latency hint) with
INFERENCE_PRECISION_HINT=f32 and with its default precision (the precision its compute layers ran in is reported,
from the execution graph), and each graphopt build (TVM thread pool = N), interleaved round by round, so that load
from other processes hits every engine alike; medians (and minima) over all rounds. Each engine runs in a worker
process of its own (tools/bench_worker.py; started fresh for every model and thread count, thread env vars set
before its engine is imported): it loads its engine once on the same seeded inputs as every other engine, and
each round the driver has every worker in turn run its block while the others wait idle on a pipe, so that no
engine's idle thread pool, allocator or caches share a process with the one being timed. `--in-process` times
every engine in this one process instead (how this tool worked before; to compare). An engine that fails to load
or run on a model, or whose worker dies, gets an error cell; the run goes on.

The tables report median latency, the ratio to onnxruntime and to the faster fp32 engine, achieved GFLOP/s
(2 * MACs / latency, MACs from graphopt.analyses.flops) and its fraction of this machine's peak with the same thread
count, measured in the same run by tools/peak_flops.py (register-only vfmadd231ps / vdpbf16ps loops, AMX tdpbf16ps
on four tiles where the CPU has AMX): the bf16 peak (AMX's where the CPU has it) for rows whose precision is bf16
(graphopt bf16, OpenVINO with bf16 compute layers) where the CPU has avx512_bf16, else the fp32 peak (int8 rows
too); the header also gives numpy's sgemm 2048^3 rate for reference. They also give the compile time of each
graphopt build, and CPU time / wall time while each engine ran (shows whether the requested thread count really
took effect; the CPU time is the worker's own). The header names the CPU, its
AVX-512/AMX flags, the date and the load average. Thread counts are timed from the fewest up (each in fresh workers);
with `--in-process` from the largest down: in one process TVM's thread pool can be shrunk after its first
configuration but not grown again. Compiled models are checked against onnxruntime by
graphopt.compile itself. `--precision fp32 bf16` also builds and times each model with the cpu target's precision bf16
(the summary then compares it with OpenVINO's default precision). Rows are also written as JSON beside --out.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_models  # noqa: E402
from bench_worker import Worker, WorkerError, input_specs, load_engine, one_line, run_block  # noqa: E402
from peak_flops import peak_gflops  # noqa: E402

INT8 = "_int8"     # "<model>_int8": the QDQ model of bench_int8.quantize_qdq
DEFAULT_MODELS = ["resnet18", "resnet18_b8", "resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny",
                  "bert_encoder", "yolo_320", "ppocr_det_640", "ppocr_rec_48x320", "resnet18_int8",
                  "mobilenet_v2_int8", "ppocr_rec_48x320_int8"]
MODEL_NAMES = bench_models.NAMES + [n + INT8 for n in bench_models.NAMES]
CPU_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def sgemm_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    """Best-of-reps sgemm throughput through numpy's BLAS with `threads` threads (threadpoolctl)."""
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    with threadpool_limits(limits=threads):
        a @ b
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def row_peak(peak: dict, engine: str, precision: str | None, int8: bool = False) -> float:
    """The peak GFLOP/s a row is measured against: int8 for the int8 (QDQ) models (when the CPU has an int8 peak),
    bf16 for graphopt bf16 and engines whose compute layers ran in bf16 (when the CPU has a bf16 peak), else fp32."""
    if int8 and peak.get("int8"):
        return peak["int8"]
    bf16 = engine == "graphopt bf16" or "bf16" in (precision or "")
    return peak["bf16"] if bf16 and peak["bf16"] else peak["fp32"]


def peak_text(peaks: dict) -> str:
    """One line: the measured fp32 / bf16 peaks and numpy's sgemm rate per thread count."""
    return ("Peak (register-only multiply-add loops, tools/peak_flops.py): "
            + "; ".join(f"{t} thread(s) {p['isa']} fp32 {p['fp32']:.1f}"
                        + (f", bf16 ({p.get('bf16_isa') or 'avx512'}) {p['bf16']:.1f}" if p["bf16"] else "")
                        + (f", int8 ({p.get('int8_isa')}) {p['int8']:.1f}" if p.get("int8") else "")
                        + " GFLOP/s" for t, p in peaks.items())
            + ". numpy sgemm 2048^3 (reference): "
            + "; ".join(f"{t} thread(s) {p['sgemm']:.1f} GFLOP/s" for t, p in peaks.items()))


def find_db(tuned_db: str | None, model: str) -> str | None:
    if not tuned_db:
        return None
    for d in (Path(tuned_db) / model, Path(tuned_db)):
        if (d / "database_workload.json").is_file() and (d / "database_tuning_record.json").is_file():
            return str(d)
    return None


def cpu_info() -> tuple[str, dict[str, bool]]:
    """(CPU model name, {flag: present} for CPU_FLAGS) from /proc/cpuinfo."""
    name, flags = platform.processor() or "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("?", "x86_64", ""):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return name, {f: f in flags for f in CPU_FLAGS}


def write_model(name: str, path: Path, work: Path) -> None:
    """The ONNX file every engine runs for model `name`."""
    if name.endswith(INT8):
        import onnx
        from bench_int8 import quantize_qdq
        base = work / f"{name[:-len(INT8)]}.onnx"
        if not base.is_file():
            bench_models.export_onnx(name[:-len(INT8)], base)
        onnx.save(quantize_qdq(base)[1], str(path))
    else:
        bench_models.export_onnx(name, path)


def compile_model(path: Path, out: Path, pipeline: str | None, tuning_db: str | None,
                  precision: str = "fp32", options: dict | None = None) -> tuple[object, float]:
    import graphopt
    t0 = time.perf_counter()
    opts = {**({} if precision == "fp32" else {"precision": precision}), **(options or {})}
    art = graphopt.compile(str(path), out=str(out), pipeline=pipeline or None, tuning_db=tuning_db, measure=False,
                           target_options=opts or None)
    return art, time.perf_counter() - t0


def interleave(blocks: dict, rounds: int):
    """blocks: name -> zero-argument call that times one round's block of an engine, returning (latencies, CPU
    seconds, wall seconds) (bench_worker.run_block). Every round calls each block in turn. Returns per-engine
    latency samples, CPU time / wall time while each engine ran (about the number of threads it really kept busy),
    CPU time per call, and {engine: error} for engines that raised (dropped from then on)."""
    blocks, errors = dict(blocks), {}
    samples = {k: [] for k in blocks}
    cpu = {k: 0.0 for k in blocks}
    wall = {k: 0.0 for k in blocks}
    for _ in range(rounds):
        for name, block in list(blocks.items()):
            try:
                times, c, w = block()
            except Exception as e:  # noqa: BLE001 - an engine failing on a model is a result, not the end of the run
                errors[name] = one_line(e)
                del blocks[name], samples[name]
                continue
            samples[name] += times
            cpu[name] += c
            wall[name] += w
    return (samples, {k: cpu[k] / wall[k] if wall[k] else 0.0 for k in samples},
            {k: cpu[k] / len(v) if v else 0.0 for k, v in samples.items()}, errors)


def time_engines(engines: dict, rounds: int, per_round_s: float, min_iters: int = 3):
    """engines: name -> zero-argument callable, all in this process (--in-process). Two warm-up calls each, then
    interleave's rounds of about per_round_s (at least min_iters calls) per engine; returns what interleave does
    (CPU time is this whole process's)."""
    engines, errors = dict(engines), {}
    for name, fn in list(engines.items()):  # warm-up (first call allocates)
        try:
            fn()
            fn()
        except Exception as e:  # noqa: BLE001
            errors[name] = one_line(e)
            del engines[name]
    samples, busy, cpu_per_call, run_errors = interleave(
        {k: functools.partial(run_block, fn, per_round_s, min_iters) for k, fn in engines.items()}, rounds)
    return samples, busy, cpu_per_call, {**errors, **run_errors}


def time_in_process(specs: dict, rounds: int, per_round_s: float):
    """Load every engine of specs (label -> bench_worker.load_engine spec) in this process and time_engines them:
    (samples, busy, CPU per call, label -> facts, label -> error)."""
    engines, facts, errors = {}, {}, {}
    for label, spec in specs.items():
        try:
            engines[label], facts[label] = load_engine(spec)
        except Exception as e:  # noqa: BLE001
            errors[label] = one_line(e)
    samples, busy, cpu_per_call, run_errors = time_engines(engines, rounds, per_round_s)
    return samples, busy, cpu_per_call, facts, {**errors, **run_errors}


def time_in_workers(specs: dict, rounds: int, per_round_s: float, min_iters: int = 3):
    """Start one worker process per engine of specs (label -> bench_worker.load_engine spec), all loading at once;
    then interleave: each round every worker in turn runs its block while the others wait idle on their pipes.
    Returns what time_in_process does (CPU time is the worker's own). Every worker is gone when this returns or
    raises (Ctrl-C included)."""
    workers, facts, errors = {}, {}, {}
    try:
        for label, spec in specs.items():
            workers[label] = Worker(spec)
        for label, w in list(workers.items()):
            try:
                facts[label] = w.loaded()
            except WorkerError as e:
                errors[label] = one_line(e)
                w.close()
                del workers[label]
        samples, busy, cpu_per_call, run_errors = interleave(
            {k: functools.partial(w.block, per_round_s, min_iters) for k, w in workers.items()}, rounds)
    finally:
        for w in workers.values():
            w.close()
    return samples, busy, cpu_per_call, facts, {**errors, **run_errors}


def engine_specs(model_file: Path, builds: dict, variants, threads: int, openvino: bool) -> dict:
    """label -> bench_worker.load_engine spec of every engine timed for one model and thread count, on the feeds
    of model_file (seed 0): onnxruntime and OpenVINO (f32 hint and default) on model_file, onnxruntime on each
    variant's model.onnx, and each graphopt build."""
    base = {"feeds_from": str(model_file), "seed": 0, "threads": threads}
    specs = {"onnxruntime": {**base, "engine": "onnxruntime", "model": str(model_file)}}
    if openvino:
        for label, hint in (("openvino fp32", "f32"), ("openvino default", None)):
            specs[label] = {**base, "engine": "openvino", "model": str(model_file), "hint": hint}
    for label in variants:
        specs[f"onnxruntime {label}"] = {**base, "engine": "onnxruntime",
                                         "model": str(builds[f"graphopt {label}"][0].path / "model.onnx")}
    for label, (art, _) in builds.items():
        specs[label] = {**base, "engine": "graphopt", "model": str(art.path)}
    return specs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=MODEL_NAMES)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--tuned-db", default=None, help="tuning database: DIR/<model>/ or DIR itself")
    ap.add_argument("--out", default="bench.md")
    ap.add_argument("--work", default=None, help="folder for exported models and artifacts (default: a temp dir)")
    ap.add_argument("--pipeline", default="", help="graphopt pipeline run before lowering (default: none)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=PIPELINE",
                    help="also build the model through PIPELINE (e.g. pruned='cleanup,prune-channels{flops=0.5}') "
                         "and time it, and onnxruntime on its model.onnx, beside the unchanged model (repeatable)")
    ap.add_argument("--target-variant", action="append", default=[], metavar="LABEL=KEY=VALUE[,KEY=VALUE]",
                    help="also build the model with these cpu target options (e.g. direct=winograd=off) and time it "
                         "beside the default build (repeatable)")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                    help="graphopt builds to time: fp32 (the default build) and/or bf16 (`--precision bf16`: "
                         "conv / matmul with bf16 inputs, fp32 accumulation; the int8 rows are always built as QDQ)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-seconds", type=float, default=0.4)
    ap.add_argument("--in-process", action="store_true",
                    help="time every engine in this one process, as before the worker processes (to compare)")
    args = ap.parse_args(argv)

    import onnxruntime

    versions = {"onnxruntime": onnxruntime.__version__}
    try:
        import openvino
        versions["openvino"] = openvino.get_version()
    except ImportError:
        openvino = None
        print("openvino is not installed (pip install -e '.[bench]'): no OpenVINO columns", flush=True)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="graphopt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    peaks = {t: {**peak_gflops(t), "sgemm": sgemm_gflops(t)} for t in args.threads}
    print(peak_text(peaks), flush=True)
    rows, notes = [], []
    for name in args.models:
        try:
            model_rows, model_notes = bench_model(name, args, work, peaks, openvino is not None)
        except Exception as e:  # noqa: BLE001 - the model could not be written or read: one error row, go on
            print(f"{name}: {one_line(e)}", flush=True)
            model_rows, model_notes = [{"model": name, "threads": t, "engine": "all", "error": one_line(e)}
                                       for t in args.threads], []
        rows += model_rows
        notes += model_notes
        write_markdown(Path(args.out), rows, peaks, notes, args, versions, (load_start, os.getloadavg()))
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")
    return 0


def bench_model(name: str, args, work: Path, peaks: dict, openvino: bool) -> tuple[list[dict], list[str]]:
    """Rows (one per thread count and engine; an engine that failed gets {"error": ...}) and notes for one model."""
    import graphopt
    from bench_int8 import precision_text
    from graphopt.cli import key_values
    from graphopt.analyses import flops

    onnx_path = work / f"{name}.onnx"
    if not onnx_path.is_file():
        write_model(name, onnx_path, work)
    macs = flops(graphopt.load(str(onnx_path)), None)["macs"]
    builds, build_errors, notes = {}, {}, []
    db = find_db(args.tuned_db, name)
    bf16 = "bf16" in args.precision and not name.endswith(INT8)
    target_variants = {f"graphopt {v.partition('=')[0]}":
                       key_values(v.partition("=")[2].split(","), "--target-variant", "direct=winograd=off")
                       for v in getattr(args, "target_variant", ())}
    for label, pipeline, tuning_db, precision in (
            [("graphopt default", args.pipeline, None, "fp32")]
            + ([("graphopt bf16", args.pipeline, None, "bf16")] if bf16 else [])
            + ([("graphopt tuned", args.pipeline, db, "fp32")] if db else [])
            + [(f"graphopt {v.partition('=')[0]}", v.partition("=")[2], None, "fp32") for v in args.variant]
            + [(label, args.pipeline, None, "fp32") for label in target_variants]):
        try:
            art, secs = compile_model(onnx_path, work / f"{name}.{label.split()[1]}", pipeline, tuning_db, precision,
                                      target_variants.get(label))
        except Exception as e:  # noqa: BLE001 - graphopt failing on a model is a result too
            build_errors[label] = one_line(e)
            print(f"{name}: {label} failed: {build_errors[label]}", flush=True)
            continue
        builds[label] = (art, secs)
        print(f"{name}: {label} compiled in {secs:.1f} s (target lowering {art.report.get('compile_seconds')} s)",
              flush=True)
    variant_macs = {label.split()[1]: flops(graphopt.load(str(a.path / "model.onnx")), None)["macs"]
                    for label, (a, _) in builds.items()
                    if label.split()[1] not in ("default", "tuned", "bf16") and label not in target_variants}
    # one file for every engine: the artifact's model.onnx (the graph graphopt compiled), else the written model
    model_file = builds["graphopt default"][0].path / "model.onnx" if "graphopt default" in builds else onnx_path
    rows = []
    # in one process TVM's thread pool can shrink after it was configured, but not grow again: most threads first
    for threads in sorted(args.threads, reverse=args.in_process):
        specs = engine_specs(model_file, builds, variant_macs, threads, openvino)
        timer = time_in_process if args.in_process else time_in_workers
        samples, busy, cpu_per_call, facts, run_errors = timer(specs, args.rounds, args.round_seconds)
        errors = {**build_errors, **run_errors}
        precision = {label: precision_text(f) + ("" if f["threads"] == threads else f" ({f['threads']} threads)")
                     for label, f in facts.items() if f}
        med = {k: statistics.median(v) for k, v in samples.items()}
        fp32 = [med[k] for k in ("onnxruntime", "openvino fp32") if k in med]
        for label, t in med.items():
            own = next((m for v, m in variant_macs.items() if label.endswith(f" {v}")), macs)
            gflops = 2.0 * own / t / 1e9
            rows.append({
                "model": name, "threads": threads, "engine": label, "ms": t * 1e3, "min_ms": min(samples[label]) * 1e3,
                "ratio": t / med["onnxruntime"] if "onnxruntime" in med else None,
                "vs_best_fp32": t / min(fp32) if fp32 else None, "gflops": gflops,
                "peak": gflops / row_peak(peaks[threads], label, precision.get(label), name.endswith(INT8)),
                "compile_s": builds[label][1] if label in builds else None, "n": len(samples[label]),
                "busy": busy[label], "cpu_ms": cpu_per_call[label] * 1e3, "precision": precision.get(label),
            })
        rows += [{"model": name, "threads": threads, "engine": label, "error": err} for label, err in errors.items()]
        print(f"{name} x{threads}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in med.items())
              + "".join(f"; {k} failed: {v}" for k, v in errors.items()), flush=True)
        for label, m in variant_macs.items():
            if {"graphopt default", f"graphopt {label}", "onnxruntime", f"onnxruntime {label}"} <= med.keys():
                gain = med["onnxruntime"] / med[f"onnxruntime {label}"]
                notes.append(f"{name} x{threads}: {label} (MACs x{m / macs:.3f}) compiled is "
                             f"{med['graphopt default'] / med[f'graphopt {label}']:.2f}x faster than the unchanged "
                             f"model compiled; onnxruntime gains {gain:.2f}x")
    if len(args.threads) > 1:
        t_lo, t_hi = min(args.threads), max(args.threads)
        lo = [r for r in rows if r["threads"] == t_lo and r["engine"] == "graphopt default" and "ms" in r]
        hi = [r for r in rows if r["threads"] == t_hi and r["engine"] == "graphopt default" and "ms" in r]
        if lo and hi:
            notes.append(f"{name}: graphopt default {t_lo} -> {t_hi} threads: {lo[0]['ms'] / hi[0]['ms']:.2f}x faster")
    return rows, notes


SUMMARY = ("onnxruntime", "openvino fp32", "openvino default", "graphopt default", "graphopt bf16")


def _cell(row: dict | None, precision: bool = False) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "error: " + row["error"].replace("|", "/")
    return f"{row['ms']:.2f}" + (f" ({row['precision']})" if precision and row.get("precision") else "")


def write_markdown(path: Path, rows, peaks, notes, args, versions: dict, load: tuple) -> None:
    import graphopt
    cpu, flags = cpu_info()
    ok = [r for r in rows if "error" not in r]
    lines = [
        "# graphopt CPU benchmark",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node()}: {cpu}, "
        f"{os.cpu_count()} logical CPUs; flags " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items())
        + ".",
        "",
        f"graphopt {graphopt.__version__}, " + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f". Load average (1 min) {load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end.",
        "",
        f"Command: `.venv/bin/python tools/bench.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        peak_text(peaks) + ". % of peak = GFLOP/s / the bf16 peak for rows whose precision is bf16 (graphopt bf16, "
        "OpenVINO with bf16 compute layers) where the CPU has one, / the int8 peak (GOP/s) for the int8 models' "
        "rows, else / the fp32 peak.",
        "",
        f"Latency: median over {args.rounds} interleaved rounds of ~{args.round_seconds} s per engine, every engine "
        + ("in this one process (--in-process)" if getattr(args, "in_process", False)
           else "in a worker process of its own (the others idle meanwhile)")
        + " on the same ONNX file with the same thread count. OpenVINO fp32 = INFERENCE_PRECISION_HINT f32; OpenVINO "
        "default = its own choice; in brackets the precision its compute layers (convolutions, matmuls) ran in, from "
        "the execution graph. `<model>_int8` rows run the same QDQ file in every engine (graphopt: its int8 "
        "lowering). graphopt / fp32 best = graphopt latency / the faster of onnxruntime and OpenVINO fp32.",
    ]
    bf16 = "bf16" in getattr(args, "precision", ())
    for threads in sorted({r["threads"] for r in rows}):
        lines += ["", f"## {threads} thread(s)", "",
                  "| model | onnxruntime ms | OpenVINO fp32 ms | OpenVINO default ms | graphopt ms | graphopt / ORT "
                  "| graphopt / fp32 best | graphopt compile s |"
                  + (" graphopt bf16 ms | graphopt bf16 / OpenVINO default |" if bf16 else ""),
                  "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if bf16 else "")]
        for model in args.models:
            cells = {e: next((r for r in rows if r["model"] == model and r["threads"] == threads
                              and r["engine"] in (e, "all")), None) for e in SUMMARY}
            if not any(cells.values()):
                continue
            g = cells["graphopt default"]
            done = g is not None and "error" not in g
            ratio = f"{g['ratio']:.2f}" if done and g["ratio"] else "-"
            vs_best = f"{g['vs_best_fp32']:.2f}" if done and g["vs_best_fp32"] else "-"
            compile_s = f"{g['compile_s']:.1f}" if done else "-"
            line = (f"| {model} | {_cell(cells['onnxruntime'])} | {_cell(cells['openvino fp32'], True)} | "
                    f"{_cell(cells['openvino default'], True)} | {_cell(g)} | {ratio} | {vs_best} | {compile_s} |")
            if bf16:
                b, ov = cells["graphopt bf16"], cells["openvino default"]
                both = all(c is not None and "error" not in c for c in (b, ov))
                line += f" {_cell(b)} | {b['ms'] / ov['ms']:.2f} |" if both else f" {_cell(b)} | - |"
            lines.append(line)
    lines += ["", "## All engines", "",
              "Min ms = fastest single call (least disturbed by other processes). CPU/wall = the engine's process "
              "CPU time / wall "
              "time while the engine ran (about the number of busy threads: shows the thread count took effect; "
              "below it when other processes compete for the cores). CPU ms = process CPU time per call: with one "
              "thread about the latency without competition; with more, it adds every thread's work and spinning.",
              "", "| model | threads | engine | median ms | min ms | CPU ms | ratio to ORT | GFLOP/s | % of peak | "
              "CPU/wall | precision | compile s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    order = {m: i for i, m in enumerate(args.models)}
    for r in sorted(ok, key=lambda r: (order.get(r["model"], 0), r["threads"])):
        cs = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else ""
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        lines.append(f"| {r['model']} | {r['threads']} | {r['engine']} | {r['ms']:.2f} | {r['min_ms']:.2f} | "
                     f"{r['cpu_ms']:.2f} | {ratio} | "
                     f"{r['gflops']:.1f} | {100 * r['peak']:.0f}% | {r['busy']:.2f} | {r['precision'] or ''} | {cs} |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Errors:", ""]
        lines += [f"- {r['model']} x{r['threads']} {r['engine']}: {r['error']}" for r in failed]
    if notes:
        lines += ["", "Notes (variants; thread scaling, which checks that the thread count takes effect):", ""]
        lines += [f"- {n}" for n in notes]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
