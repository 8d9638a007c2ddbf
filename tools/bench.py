"""Benchmark graphopt's CPU target against onnxruntime on the models in tools/bench_models.py.

    .venv/bin/python tools/bench.py [--models resnet18 mobilenet_v2 ...] [--threads 1 2] [--tuned-db DIR]
                                    [--out bench.md] [--rounds 5] [--pipeline cleanup]

For every model: export to ONNX (cached in --work), compile with graphopt's default schedules (and, when a
tuning database exists for it, with the database: DIR/<model>/ or DIR itself), then for each thread count time
onnxruntime (all graph optimizations, intra-op threads = N) and each graphopt build (TVM thread pool = N)
interleaved round by round, so that load from other processes hits every engine alike; medians over all rounds.

The table reports median latency, the ratio to onnxruntime, achieved GFLOP/s (2 * MACs / latency, MACs from
graphopt.analyses.flops) and its fraction of this machine's fp32 peak, estimated in the same run as the best of a
few 2048^3 sgemm calls through numpy's BLAS limited to the same thread count (threadpoolctl), and the compile
time of each graphopt build, and CPU time / wall time while each engine ran (shows whether the requested
thread count really took effect). Thread counts are timed from the largest down: in one process TVM's thread
pool can be shrunk after its first configuration but not grown again. Compiled models are checked against onnxruntime by graphopt.compile itself.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
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

DEFAULT_MODELS = ["resnet18", "resnet18_b8", "mobilenet_v2", "bert_encoder", "yolo_320"]


def fp32_peak_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    """Best-of-reps sgemm throughput through numpy's BLAS with `threads` threads."""
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


def find_db(tuned_db: str | None, model: str) -> str | None:
    if not tuned_db:
        return None
    for d in (Path(tuned_db) / model, Path(tuned_db)):
        if (d / "database_workload.json").is_file() and (d / "database_tuning_record.json").is_file():
            return str(d)
    return None


def compile_model(path: Path, out: Path, pipeline: str | None, tuning_db: str | None) -> tuple[object, float]:
    import graphopt
    t0 = time.perf_counter()
    art = graphopt.compile(str(path), out=str(out), pipeline=pipeline or None, tuning_db=tuning_db, measure=False)
    return art, time.perf_counter() - t0


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def time_engines(engines: dict, rounds: int, per_round_s: float, min_iters: int = 3):
    """engines: name -> zero-argument callable. Interleaved: every round runs each engine for about
    per_round_s (at least min_iters calls) after one warm-up call. Returns per-engine latency samples and the
    process CPU time / wall time while each engine ran (about the number of threads it really kept busy)."""
    samples = {k: [] for k in engines}
    cpu = {k: 0.0 for k in engines}
    wall = {k: 0.0 for k in engines}
    for fn in engines.values():  # warm-up (first call allocates)
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in engines.items():
            fn()
            c0, t_start = _cpu_seconds(), time.perf_counter()
            n = 0
            while n < min_iters or time.perf_counter() - t_start < per_round_s:
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
                n += 1
            cpu[name] += _cpu_seconds() - c0
            wall[name] += time.perf_counter() - t_start
    return samples, {k: cpu[k] / wall[k] if wall[k] else 0.0 for k in engines}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(bench_models.MODELS))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--tuned-db", default=None, help="tuning database: DIR/<model>/ or DIR itself")
    ap.add_argument("--out", default="bench.md")
    ap.add_argument("--work", default=None, help="folder for exported models and artifacts (default: a temp dir)")
    ap.add_argument("--pipeline", default="", help="graphopt pipeline run before lowering (default: none)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=PIPELINE",
                    help="also build the model through PIPELINE (e.g. pruned='cleanup,prune-channels{flops=0.5}') "
                         "and time it, and onnxruntime on its model.onnx, beside the unchanged model (repeatable)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round-seconds", type=float, default=0.4)
    args = ap.parse_args(argv)

    import onnxruntime

    import graphopt
    from graphopt import ort as gort
    from graphopt.analyses import flops

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="graphopt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    peaks = {t: fp32_peak_gflops(t) for t in args.threads}
    print("fp32 peak (numpy sgemm 2048^3): " + ", ".join(f"{t} thread(s) {p:.1f} GFLOP/s" for t, p in peaks.items()),
          flush=True)
    rows, notes = [], []
    for name in args.models:
        onnx_path = work / f"{name}.onnx"
        if not onnx_path.is_file():
            bench_models.export_onnx(name, onnx_path)
        macs = flops(graphopt.load(str(onnx_path)), None)["macs"]
        builds = {}
        art, secs = compile_model(onnx_path, work / f"{name}.default", args.pipeline, None)
        builds["graphopt default"] = (art, secs)
        print(f"{name}: compiled in {secs:.1f} s (target lowering {art.report.get('compile_seconds')} s)", flush=True)
        db = find_db(args.tuned_db, name)
        if db:
            art_t, secs_t = compile_model(onnx_path, work / f"{name}.tuned", args.pipeline, db)
            builds["graphopt tuned"] = (art_t, secs_t)
            print(f"{name}: compiled with {db} in {secs_t:.1f} s", flush=True)
        variant_macs = {}
        for spec in args.variant:
            label, _, pipeline = spec.partition("=")
            art_v, secs_v = compile_model(onnx_path, work / f"{name}.{label}", pipeline, None)
            builds[f"graphopt {label}"] = (art_v, secs_v)
            variant_macs[label] = flops(graphopt.load(str(art_v.path / "model.onnx")), None)["macs"]
            print(f"{name}: {label} ({pipeline}) compiled in {secs_v:.1f} s, MACs x{variant_macs[label] / macs:.3f}",
                  flush=True)
        model_bytes = (art.path / "model.onnx").read_bytes()
        specs = [(i["name"], tuple(i["shape"]), i["dtype"]) for i in art.inputs]
        feeds = gort.random_inputs(specs, 0)
        # most threads first: TVM's thread pool can shrink after it was configured, but not grow again
        for threads in sorted(args.threads, reverse=True):
            sess = gort.session(model_bytes, optimize=True, threads=threads)
            engines = {"onnxruntime": lambda s=sess: s.run(None, feeds)}
            for label in variant_macs:
                vs = gort.session((builds[f"graphopt {label}"][0].path / "model.onnx").read_bytes(), optimize=True,
                                  threads=threads)
                engines[f"onnxruntime {label}"] = lambda s=vs: s.run(None, feeds)
            for label, (a, _) in builds.items():
                runner = a.runner(threads)
                arrays = a.check_inputs(feeds)
                engines[label] = lambda r=runner, x=arrays: r(x)
            samples, busy = time_engines(engines, args.rounds, args.round_seconds)
            med = {k: statistics.median(v) for k, v in samples.items()}
            for label, t in med.items():
                own = next((m for v, m in variant_macs.items() if label.endswith(f" {v}")), macs)
                gflops = 2.0 * own / t / 1e9
                rows.append({
                    "model": name, "threads": threads, "engine": label, "ms": t * 1e3,
                    "ratio": t / med["onnxruntime"], "gflops": gflops, "peak": gflops / peaks[threads],
                    "compile_s": builds[label][1] if label in builds else None, "n": len(samples[label]),
                    "busy": busy[label],
                })
            print(f"{name} x{threads}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in med.items()), flush=True)
            for label, m in variant_macs.items():
                notes.append(f"{name} x{threads}: {label} (MACs x{m / macs:.3f}) compiled is "
                             f"{med['graphopt default'] / med[f'graphopt {label}']:.2f}x faster than the unchanged "
                             f"model compiled; onnxruntime gains {med['onnxruntime'] / med[f'onnxruntime {label}']:.2f}x")
        if len(args.threads) > 1:
            t_lo, t_hi = min(args.threads), max(args.threads)
            lo = [r for r in rows if r["model"] == name and r["threads"] == t_lo and r["engine"] == "graphopt default"]
            hi = [r for r in rows if r["model"] == name and r["threads"] == t_hi and r["engine"] == "graphopt default"]
            if lo and hi:
                notes.append(f"{name}: graphopt default {t_lo} -> {t_hi} threads: "
                             f"{lo[0]['ms'] / hi[0]['ms']:.2f}x faster")
    write_markdown(Path(args.out), rows, peaks, notes, args, onnxruntime.__version__)
    print(f"wrote {args.out}")
    return 0


def write_markdown(path: Path, rows, peaks, notes, args, ort_version: str) -> None:
    import graphopt
    lines = [
        "# graphopt CPU benchmark",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node()}, "
        f"{os.cpu_count()} logical CPUs, graphopt {graphopt.__version__}, onnxruntime {ort_version}.",
        "",
        f"Command: `.venv/bin/python tools/bench.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "fp32 peak (numpy sgemm 2048^3, same thread count): "
        + ", ".join(f"{t} thread(s): {p:.1f} GFLOP/s" for t, p in peaks.items()),
        "",
        f"Latency: median over {args.rounds} interleaved rounds of ~{args.round_seconds} s per engine. "
        "GFLOP/s = 2 x MACs / latency. Ratio = latency / onnxruntime latency on the unchanged model (same threads). "
        "CPU/wall = process CPU time / wall time while the engine ran (about the number of busy threads: "
        "shows the thread count took effect; below the thread count when other processes compete for cores).",
        "",
        "| model | threads | engine | median ms | ratio to ORT | GFLOP/s | % of peak | CPU/wall | compile s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = sorted(rows, key=lambda r: (args.models.index(r["model"]), r["threads"]))
    for r in rows:
        cs = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else ""
        lines.append(f"| {r['model']} | {r['threads']} | {r['engine']} | {r['ms']:.2f} | {r['ratio']:.2f} | "
                     f"{r['gflops']:.1f} | {100 * r['peak']:.0f}% | {r['busy']:.2f} | {cs} |")
    if notes:
        lines += ["", "Notes (variants; thread scaling, which checks that the thread count takes effect):", ""]
        lines += [f"- {n}" for n in notes]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
