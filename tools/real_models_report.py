"""Survey of the real third-party models in tests/real_models.py: for each installed one, graphopt loads it with its
dynamic dimensions bound, then four jobs, each in its own subprocess with a time limit (one stuck compile does not
stop the survey):

    fp32   graphopt.compile(graph, target="cpu")                         (the compile's own self-check decides ok)
    prune  pipeline "cleanup,prune-channels{flops=0.7}"
    int8   pipeline "cleanup,quantize{scheme=int8}", calibrated on the model's own inputs (8 samples, in the
           layout `graphopt compile --calib` takes: graphopt.samples)
    bf16   graphopt.compile(graph, target="cpu", target_options={"precision": "bf16"}) (on a CPU with AVX512-BF16;
           the self-check is the bf16 check against onnxruntime fp32)

Every artifact is also run on one of the model's realistic inputs (seed 100, not a calibration sample) and compared
with onnxruntime on the original file: the largest error (scaled by max(1, max |output|)), the cosine, and, for
classifiers and CTC recognizers, the top-1 agreement along the last axis (for prune and int8 these are the accuracy
cost, not a compiler error). For int8 the same numbers are given for onnxruntime's own optimized run of the QDQ
model.onnx, the bar a compiled int8 library should clear. Latency: the artifact against onnxruntime on
its model.onnx, one thread, median of a 2 s budget (machine shared: indicative only).

    .venv/bin/python tools/real_models_report.py [--models NAME ...] [--jobs fp32 prune int8 bf16] [--timeout 900]
                                                 [--out report.md]   (JSON details beside it: report.json)
    .venv/bin/python tools/real_models_report.py --render report.json [--out report.md]   (redraw the tables)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import real_models  # noqa: E402

PIPELINES = {"fp32": None, "prune": "cleanup,prune-channels{flops=0.7}", "int8": "cleanup,quantize{scheme=int8}",
             "bf16": None}
TARGET_OPTIONS = {"bf16": {"precision": "bf16"}}
CALIB_SAMPLES = 8
TOP1_KINDS = ("classifier", "ocr-ctc")      # kinds whose last axis is classes: top-1 agreement means something
CHECK_SEED = 100


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def _where(e: BaseException) -> str:
    """The innermost frame inside graphopt (else the innermost frame): file:line in function."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/graphopt/" in f.filename]
    f = (ours or frames or [None])[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}" if f else ""


def _compare(ref: dict, got: dict) -> dict:
    """Per output: max |err| / max(1, max |ref|) (graphopt's own atol scaling), cosine, top-1 agreement on the
    last axis (float outputs)."""
    import numpy as np
    out = {}
    for name, r in ref.items():
        g = got.get(name)
        if g is None:
            continue
        r, g = np.asarray(r), np.asarray(g)
        if r.shape != g.shape:
            out[name] = {"shape_ref": list(r.shape), "shape_got": list(g.shape)}
            continue
        if r.dtype.kind not in "fc":
            out[name] = {"equal": float(np.mean(r == g))}
            continue
        r64, g64 = r.astype(np.float64).ravel(), g.astype(np.float64).ravel()
        nan = bool(np.isnan(r64).any() or np.isnan(g64).any())
        r64, g64 = np.nan_to_num(r64), np.nan_to_num(g64)
        scale = max(float(np.abs(r64).max()) if r64.size else 0.0, 1.0)
        denom = float(np.linalg.norm(r64) * np.linalg.norm(g64))
        item = {"max_error_scaled": float(np.abs(r64 - g64).max() / scale) if r64.size else 0.0,
                "cosine": float(r64 @ g64 / denom) if denom > 0 else float(np.array_equal(r64, g64)),
                "nan": nan}
        if r.ndim >= 1 and r.shape[-1] > 1:
            item["top1"] = float(np.mean(r.argmax(-1) == g.argmax(-1)))
        out[name] = item
    return out


def run_job(name: str, job: str, result_path: Path, phase_path: Path) -> None:
    """One model, one job, in this process; writes a JSON result."""
    def phase(text: str) -> None:
        phase_path.write_text(text)

    m = real_models.MODELS[name]
    res = {"model": name, "job": job, "ok": False}
    t0 = time.perf_counter()
    try:
        import graphopt
        from graphopt import ort as gort
        from graphopt.api import measure_latency
        phase("loading")
        t = time.perf_counter()
        graph = graphopt.load(m.path(), input_shapes=m.shapes, input_values=m.values or None)
        res["load_s"] = round(time.perf_counter() - t, 2)
        res["nodes_loaded"] = len(graph.nodes)
        data = ({"calib": {k: v for k, v in m.calibration(CALIB_SAMPLES).items() if k not in m.values}}
                if job == "int8" else None)
        phase("compiling")
        with tempfile.TemporaryDirectory(prefix="realmodel-") as d:
            t = time.perf_counter()
            art = graphopt.compile(graph, target="cpu", out=Path(d) / "art", pipeline=PIPELINES[job], measure=False,
                                   data=data, target_options=TARGET_OPTIONS.get(job),
                                   log=lambda msg: phase(f"compiling: {msg}"))
            res["compile_wall_s"] = round(time.perf_counter() - t, 1)
            rep = art.report
            res["check"] = rep.get("check")
            for k in ("compile_seconds", "macs_before", "macs_after", "params_before", "params_after",
                      "model_bytes", "ops"):
                res[k] = rep.get(k)
            if rep.get("pruning"):
                res["pruning"] = [{k: p.get(k) for k in ("macs", "params", "budget_met", "oracle_max_error",
                                                         "frozen", "notes")} for p in rep["pruning"]]
            res["source_bytes"] = m.path().stat().st_size
            phase("real-input check")
            feeds = m.inputs(CHECK_SEED)
            ref = gort.run(m.path().read_bytes(), feeds)           # the original file, no optimizations
            got = art.run({i["name"]: feeds[i["name"]] for i in art.inputs})
            res["real_input"] = _compare(ref, got)
            if job == "int8":
                qdq = gort.run((art.path / "model.onnx").read_bytes(),
                               {i["name"]: feeds[i["name"]] for i in art.inputs}, optimize=True)
                res["real_input_ort_qdq"] = _compare(ref, qdq)
            phase("latency")
            res["latency"] = measure_latency(art, threads=1, repeat=20, budget_s=2.0)
        res["ok"] = bool(res["check"] and res["check"].get("ok") is not False)
    except BaseException as e:  # noqa: BLE001  (the survey records every failure, whatever it is)
        res["error"] = _first_line(e)
        res["error_class"] = type(e).__name__
        res["where"] = _where(e)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    result_path.write_text(json.dumps(res, default=str))


def run_subprocess(name: str, job: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="realjob-") as d:
        result, phase, log = Path(d) / "result.json", Path(d) / "phase.txt", Path(d) / "log.txt"
        env = dict(os.environ, TVM_NUM_THREADS="1", OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        with open(log, "w") as logf:
            proc = subprocess.Popen([sys.executable, __file__, "--_job", name, job, str(result), str(phase)],
                                    stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        wall = round(time.perf_counter() - t0, 1)
        if result.is_file():
            return json.loads(result.read_text())
        last_phase = phase.read_text() if phase.is_file() else "starting"
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        if rc is None:
            err = f"TIMEOUT after {timeout:.0f} s while {last_phase}"
        else:
            err = f"process died (exit {rc}) while {last_phase}"
        return {"model": name, "job": job, "ok": False, "error": err, "error_class": "Timeout" if rc is None
                else "Died", "wall_s": wall, "log_tail": tail}


# ------------------------------------------------------------------------------------------------------ the tables

def _fmt_err(r: dict) -> str:
    text = r.get("error", "")
    if r.get("where"):
        text += f" [{r['where']}]"
    return text.replace("|", "\\|").replace("\n", " ")


def _main_output(r: dict, key: str = "real_input") -> dict:
    """The first float output's figures (a shape mismatch counts: it is worth showing)."""
    outs = list((r.get(key) or {}).values())
    return next((o for o in outs if "cosine" in o or "shape_got" in o), outs[0] if outs else {})


def _real(r: dict, kind: str, key: str = "real_input") -> str:
    o = _main_output(r, key)
    if not o:
        return ""
    if "shape_got" in o:
        return f"shape {o['shape_got']} vs {o['shape_ref']}"
    if "equal" in o:
        return f"equal {o['equal']:.0%}"
    s = f"err {o['max_error_scaled']:.1e}, cos {o['cosine']:.4f}"
    if "top1" in o and kind in TOP1_KINDS:
        s += f", top1 {o['top1']:.1%}"
    if o.get("nan"):
        s += ", NaN"
    return s


def _lat(r: dict) -> str:
    lat = r.get("latency") or {}
    if not lat:
        return ""
    return f"{lat['graphopt_ms']:.2f} / {lat['onnxruntime_ms']:.2f}"


def _check(r: dict) -> str:
    c = r.get("check") or {}
    if "max_abs_error" in c:
        return f"{c['max_abs_error']:.1e}" + (" (fp64 arbiter)" if "note" in c else "")
    keys = [k for k in c if k not in ("ok",)]
    return ", ".join(f"{k}={c[k]:.3g}" if isinstance(c[k], float) else f"{k}={c[k]}" for k in keys[:3])


def _provenance() -> str:
    """Which graphopt ran (the survey may run against a snapshot of another commit via PYTHONPATH)."""
    import onnxruntime
    import graphopt
    src = Path(graphopt.__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "graphopt"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "", ""
    where = f"{src} at {rev}{' + uncommitted changes' if dirty else ''}" if rev else f"{src} (not a git checkout)"
    return (f"graphopt from {where}; onnxruntime {onnxruntime.__version__}; "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def tables(models, results: dict) -> str:
    meta = results.get("_meta") or {}
    lines = [meta.get("provenance", ""), "", "## Models", "",
             "| model | package | file | kind | MB | inputs bound | notes |", "|---|---|---|---|---|---|---|"]
    for m in models:
        p = m.path()
        shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in m.shapes.items()) or "(static)"
        lines.append(f"| {m.name} | {m.requirement} | {m.file} | {m.kind} | {p.stat().st_size / 1e6:.1f} | {shapes} "
                     f"| {m.notes} |")
    lines += ["", "## Survey", "",
              "ok / FAIL per job (wall seconds: load + compile + checks); real input = the "
              "artifact against onnxruntime on the original model, one realistic input (main output); latency = "
              "graphopt / onnxruntime ms, 1 thread.", "",
              "| model | fp32 | fp32 real input | fp32 latency | prune{flops=0.7} | MACs, params after/before "
              "| pruned real input | int8 | int8 real input (graphopt) | int8 real input (onnxruntime QDQ) "
              "| int8 latency | bf16 | bf16 real input | bf16 latency |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        r = results.get(m.name, {})
        f, p, q, b = r.get("fp32", {}), r.get("prune", {}), r.get("int8", {}), r.get("bf16", {})

        def status(x):
            if not x:
                return "not run"
            return f"ok ({x.get('wall_s', '?')} s)" if x.get("ok") else f"FAIL ({x.get('wall_s', '?')} s)"
        ratio = lambda a, b: f"{a / b:.2f}" if a is not None and b else ""  # noqa: E731
        sizes = (f"{ratio(p.get('macs_after'), p.get('macs_before'))}, "
                 f"{ratio(p.get('params_after'), p.get('params_before'))}" if p.get("macs_before") else "")
        k = m.kind
        lines.append(f"| {m.name} | {status(f)} | {_real(f, k)} | {_lat(f)} | {status(p)} | {sizes} | {_real(p, k)} "
                     f"| {status(q)} | {_real(q, k)} | {_real(q, k, 'real_input_ort_qdq')} | {_lat(q)} "
                     f"| {status(b)} | {_real(b, k)} | {_lat(b)} |")
    lines += ["", "## Failures", "", "| model | job | error (where) |", "|---|---|---|"]
    for m in models:
        for job in PIPELINES:
            x = results.get(m.name, {}).get(job)
            if x and not x.get("ok"):
                err = _fmt_err(x) or f"check failed: {_check(x)}"
                lines.append(f"| {m.name} | {job} | {err} |")
    lines += ["", "## Self-check details", "", "| model | job | check | size source -> model.onnx MB |",
              "|---|---|---|---|"]
    for m in models:
        for job in PIPELINES:
            x = results.get(m.name, {}).get(job)
            if x and x.get("check"):
                size = (f"{x['source_bytes'] / 1e6:.1f} -> {x['model_bytes'] / 1e6:.1f}"
                        if x.get("model_bytes") and x.get("source_bytes") else "")
                lines.append(f"| {m.name} | {job} | {_check(x)} | {size} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_job":
        run_job(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", help="names from tests/real_models.py (default: every installed one)")
    p.add_argument("--jobs", nargs="*", default=list(PIPELINES), choices=list(PIPELINES))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per job (default 900)")
    p.add_argument("--out", type=Path, help="write the markdown here (and the JSON details beside it)")
    p.add_argument("--render", type=Path, metavar="JSON", help="only redraw the tables of an earlier run's JSON")
    a = p.parse_args()
    if a.render:
        results = json.loads(a.render.read_text())
        text = tables([real_models.MODELS[n] for n in results if n in real_models.MODELS], results)
        if a.out:
            a.out.write_text(text)
        print(text)
        return 0
    unknown = [n for n in a.models or [] if n not in real_models.MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(real_models.MODELS)}")
    models = [real_models.MODELS[n] for n in a.models] if a.models else list(real_models.MODELS.values())
    missing = [m.name for m in models if m.path() is None]
    if missing:
        print(f"not installed (run tools/setup.sh): {', '.join(missing)}", file=sys.stderr)
    models = [m for m in models if m.path() is not None]
    results: dict = {"_meta": {"provenance": _provenance()}}
    json_path = a.out.with_suffix(".json") if a.out else None
    for m in models:
        for job in a.jobs:
            r = run_subprocess(m.name, job, a.timeout)
            results.setdefault(m.name, {})[job] = r
            print(f"{m.name:24s} {job:6s} {'ok' if r.get('ok') else 'FAIL'} {r.get('wall_s', '?')} s "
                  f"{_fmt_err(r)}", file=sys.stderr, flush=True)
            if a.out:                                   # written as it goes: a long survey can be read midway
                a.out.write_text(tables(models, results))
                json_path.write_text(json.dumps(results, indent=1, default=str))
    text = tables(models, results)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
