"""The Python API: load, from_torch, compile, bench. The CLI is a thin layer over these."""
from __future__ import annotations

import importlib
import statistics
from dataclasses import dataclass
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import __version__, ort, verify
from .artifact import MODEL, Artifact, Staging, sha256, write_json, MANIFEST, REPORT
from .errors import BadInput, CheckFailed
from .graph import copy as copy_graph, input_specs, output_specs, to_onnx
from .loading import load
from .passmanager import PassContext, PassManager
from .quant_check import compare_quantized

COMPILED_RTOL, COMPILED_ATOL = 1e-4, 1e-5   # atol scaled by max(1, max|ref|)


def get_target(name: str, **options):
    return importlib.import_module("graphopt.targets").get_target(name, **options)


def _versions() -> dict:
    import onnxruntime
    v = {"graphopt": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import tvm
        v["tvm"] = tvm.__version__
    except Exception:  # pragma: no cover - tvm is a dependency
        pass
    return v


def _as_pipeline(pipeline) -> PassManager:
    if pipeline is None:
        return PassManager([])
    if isinstance(pipeline, PassManager):
        return pipeline
    if isinstance(pipeline, (str, Path)) and str(pipeline).endswith(".toml"):
        return PassManager.from_toml(Path(pipeline))
    return PassManager.parse(str(pipeline))


def _io(specs) -> list[dict]:
    return [{"name": n, "shape": [int(d) for d in s], "dtype": np.dtype(dt).name} for n, s, dt in specs]


def time_call(fn, repeat: int, warmup: int = 2, budget_s: float | None = None) -> list[float]:
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return times


def measure_latency(art: Artifact, threads: int | None = None, repeat: int = 20, budget_s: float | None = None,
                    seed: int = 0) -> dict:
    """Median latency of graphopt's library and of onnxruntime (all optimizations on) running the artifact's
    own model.onnx, same inputs, same thread count."""
    model_path = art.path / MODEL
    specs = [(i["name"], tuple(i["shape"]), i["dtype"]) for i in art.inputs]
    feeds = ort.random_inputs(specs, seed)
    arrays = art.check_inputs(feeds)
    runner = art.runner(threads)
    sess = ort.session(model_path.read_bytes(), optimize=True, threads=threads)
    t_ours = time_call(lambda: runner(arrays), repeat, budget_s=budget_s)
    t_ort = time_call(lambda: sess.run(None, feeds), repeat, budget_s=budget_s)
    ours, theirs = statistics.median(t_ours) * 1e3, statistics.median(t_ort) * 1e3
    return {"threads": threads, "graphopt_ms": round(ours, 4), "onnxruntime_ms": round(theirs, 4),
            "ratio_to_onnxruntime": round(ours / theirs, 3) if theirs > 0 else None,
            "repeats": min(len(t_ours), len(t_ort))}


def compare_with_onnxruntime(art: Artifact, seed: int = 0, feeds: dict | None = None) -> dict:
    """Run the compiled library and onnxruntime (no optimizations) on the artifact's model.onnx."""
    specs = [(i["name"], tuple(i["shape"]), i["dtype"]) for i in art.inputs]
    feeds = feeds if feeds is not None else ort.random_inputs(specs, seed)
    ref = ort.run((art.path / MODEL).read_bytes(), feeds)
    got = art.run(feeds)
    # quantized graphs: >= 99% of elements within one output quantization step (rounding ties may differ)
    q = compare_quantized(art.path / MODEL, ref, got)
    if q is not None:
        return q
    ok, err, name = verify.compare(ref, got, COMPILED_RTOL, COMPILED_ATOL, scale_atol=True)
    res = {"ok": ok, "max_abs_error": err, "worst_output": name}
    if not ok:
        res.update(_fp64_arbiter(art, feeds, ref, got, seed))
    return res


#: a compiled library outside the fp32 tolerance still passes when, against the float64 result, it is at most
#: this many times as far off as onnxruntime itself (graphs that amplify float32 rounding: freshly pruned ones)
FP64_ARBITER_FACTOR = 2.0
FP64_ARBITER_RUNS = 3      # the worst element of a single input is noisy: average the max errors of a few


def _fp64_arbiter(art: Artifact, feeds: dict, ref: dict, got: dict, seed: int) -> dict:
    """Tell float32 rounding from a wrong result: compare both engines with the model run in float64, on the
    failing input and a few more (mean of the per-input max errors)."""
    from .graph import from_onnx
    graph = from_onnx(onnx.load(str(art.path / MODEL)))
    specs = [(i["name"], tuple(i["shape"]), i["dtype"]) for i in art.inputs]
    e_ort, e_go = [], []
    for i in range(FP64_ARBITER_RUNS):
        if i:
            feeds = ort.random_inputs(specs, seed + 1000 + i)
            ref, got = ort.run((art.path / MODEL).read_bytes(), feeds), art.run(feeds)
        exact = verify.fp64_outputs(graph, feeds)
        if exact is None:
            return {}
        e_ort.append(max((ort.max_error(exact[k], r) for k, r in ref.items()), default=0.0))
        e_go.append(max((ort.max_error(exact[k], got[k]) for k in ref), default=0.0))
    m_ort, m_go = float(np.mean(e_ort)), float(np.mean(e_go))
    return {"ok": bool(m_go <= FP64_ARBITER_FACTOR * m_ort), "fp64_error_onnxruntime": m_ort,
            "fp64_error_graphopt": m_go,
            "note": f"outside the fp32 tolerance; against float64 (mean max error over {FP64_ARBITER_RUNS} inputs) "
                    f"graphopt is off by {m_go:.3g} and onnxruntime by {m_ort:.3g} (accepted up to "
                    f"{FP64_ARBITER_FACTOR:g}x): the model amplifies float32 rounding"}


@dataclass
class Prepared:
    graph: gs.Graph
    original: gs.Graph
    target: object
    pm: PassManager
    legal: PassManager
    ctx: PassContext
    records: list
    legal_records: list
    model_proto: onnx.ModelProto


def prepare(model, target: str, pipeline=None, input_shapes=None, target_options=None, verify_level="full", seed=0,
            log=None, data: dict | None = None, progress=None) -> Prepared:
    """Load, run the user's pipeline, then the target's legalization: the graph the target will lower.
    compile and tune both start here, so tuning records match what compile builds."""
    log = log or (lambda msg: None)
    where = str(model) if isinstance(model, (str, Path)) else "model"
    graph = copy_graph(model) if isinstance(model, gs.Graph) else load(model, input_shapes=input_shapes)
    tgt = get_target(target, **(target_options or {}))
    pm = _as_pipeline(pipeline)
    ctx = PassContext(target=target, hw=tgt.hw(), seed=seed, verify=verify_level, data=data, progress=progress)
    original = copy_graph(graph)
    log(f"running pipeline: {pm.resolved() or '(empty)'}")
    result = pm.run(graph, ctx)
    legal = PassManager.parse(tgt.legalize) if tgt.legalize else PassManager([])
    lres = legal.run(result.graph, ctx)
    model_proto = to_onnx(lres.graph)
    tgt.check_supported(model_proto, where)
    return Prepared(lres.graph, original, tgt, pm, legal, ctx, result.records, lres.records, model_proto)


def tune(model, target: str = "cpu", db: str = "tuning-db", trials: int = 64, pipeline=None,
         input_shapes: dict | None = None, rpc: str | None = None, key: str | None = None, progress=False,
         target_options: dict | None = None) -> dict:
    """Tune the graph compile would lower (same pipeline) with MetaSchedule into a persistent database.
    rpc ("HOST:PORT" of a TVM RPC tracker) and key: measure on the device registered under key; target_options
    (e.g. mcpu, cores) should then describe that device, and compile must get the same ones."""
    if trials < 1:
        raise BadInput("--trials must be at least 1")
    if (rpc is None) != (key is None) or (rpc is not None and not str(key).strip()):
        raise BadInput("--rpc and --key go together: give both (a non-empty key) or neither")
    if rpc is not None:
        from .targets.cpu_tuning import parse_rpc
        parse_rpc(rpc)  # a malformed HOST:PORT fails before the model is loaded
    prep = prepare(model, target, pipeline, input_shapes, target_options=target_options)
    Path(db).mkdir(parents=True, exist_ok=True)
    return prep.target.tune(prep.model_proto, str(db), trials, rpc=rpc, key=key, progress=progress)


def compile(model, target: str = "cpu", out: str | Path | None = None, pipeline=None, input_shapes: dict | None = None,
            tuning_db: str | None = None, target_options: dict | None = None, verify_level: str = "full",
            seed: int = 0, measure: bool = True, threads: int | None = None, log=None,
            data: dict | None = None, progress=None) -> Artifact:
    """Run the pipeline on model (a Graph, a ModelProto or a path), lower it for target and write the artifact
    atomically into out (a temporary folder when None). Raises CheckFailed when the compiled library does not
    match onnxruntime on the artifact's own model.onnx. data: user data for passes, e.g. {"calib": {input: array}}.
    Targets that cannot run on this machine (runs_here() False) are built and published without the run check."""
    log = log or (lambda msg: None)
    where = str(model) if isinstance(model, (str, Path)) else "model"
    prep = prepare(model, target, pipeline, input_shapes, target_options, verify_level, seed, log, data, progress)
    graph, original, tgt, pm, legal = prep.graph, prep.original, prep.target, prep.pm, prep.legal
    records, lres, model_proto = prep.records, prep.legal_records, prep.model_proto

    dest = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="graphopt-")) / "artifact"
    with Staging(dest) as stage:
        onnx.save_model(model_proto, str(stage.path / MODEL))
        log(f"lowering for {target} ({tgt.describe()})")
        facts = tgt.lower(model_proto, stage.path, tuning_db=tuning_db)
        files = [MODEL, tgt.library]
        manifest = {
            "format": 1,
            "versions": _versions(),
            "target": {**tgt.describe(), "options": dict(target_options or {})},
            "pipeline": {"text": str(pm), "resolved": pm.resolved(), "legalize": legal.resolved()},
            "tuning_db": str(tuning_db) if tuning_db else None,
            "inputs": _io(input_specs(graph)),
            "outputs": _io(output_specs(graph)),
            "passes": records + [dict(r, legalize=True) for r in lres],
            "files": {f: sha256(stage.path / f) for f in files},
        }
        write_json(stage.path / MANIFEST, manifest)
        art = Artifact(stage.path)
        runs_here = tgt.runs_here()
        check = compare_with_onnxruntime(art, seed) if runs_here else \
            {"ok": None, "skipped": f"target {target} cannot run on this machine"}
        if check["ok"] is False:
            raise CheckFailed(f"{where}: compiled library differs from onnxruntime on output '{check['worst_output']}' "
                              f"(max abs error {check['max_abs_error']:.3g}"
                              + (f"; against float64 {check['fp64_error_graphopt']:.3g}, onnxruntime "
                                 f"{check['fp64_error_onnxruntime']:.3g}" if "fp64_error_graphopt" in check else "")
                              + "); please report this model")
        report = {"source": where, "target": target, **facts, "check": check,
                  **_size_report(original, graph, stage.path / MODEL)}
        report.update(structural_report(records))
        if measure and runs_here and tgt.measures_here():
            report["latency"] = measure_latency(art, threads=threads, repeat=20, budget_s=2.0, seed=seed)
            if report["macs_after"] != report["macs_before"]:
                log("compiling the original (cleanup only) to measure the latency change")
                report["latency"].update(_baseline_latency(original, target, target_options, tuning_db, threads,
                                                           seed, report["latency"]["graphopt_ms"]))
        write_json(stage.path / REPORT, report)
        stage.publish()
    return Artifact(dest)


#: pass records that change the graph's structure and what the report keeps of each
_STRUCTURAL_KEYS = {"prune-channels": ("criterion", "layers", "macs", "params", "frozen", "oracle_max_error",
                                       "oracle_fp64_max_error", "oracle_note", "budget_met", "notes"),
                    "factorize-lowrank": ("selection", "factorized", "layers", "macs_ratio", "params_ratio",
                                          "skipped", "drift")}


def structural_report(records: list[dict]) -> dict:
    """report.json sections for structural passes: {"pruning": [...], "factorization": [...]} (one entry per
    run of the pass), each with the per-layer changes, MAC/param ratios and the checks' numbers."""
    out = {}
    for rec in records:
        name = str(rec.get("pass", "")).split("{")[0]
        if name in _STRUCTURAL_KEYS and rec.get("modified"):
            section = "pruning" if name == "prune-channels" else "factorization"
            out.setdefault(section, []).append({"pass": rec["pass"], **{k: rec[k] for k in _STRUCTURAL_KEYS[name]
                                                                       if k in rec}})
    return out


def _baseline_latency(original: gs.Graph, target, target_options, tuning_db, threads, seed, now_ms) -> dict:
    """The latency change a structural pipeline bought: the original graph (cleanup only) compiled for the same
    target and timed the same way."""
    with tempfile.TemporaryDirectory(prefix="graphopt-baseline-") as d:
        base = compile(original, target, Path(d) / "a", pipeline="cleanup", target_options=target_options,
                       tuning_db=tuning_db, seed=seed, measure=False, verify_level="structural")
        lat = measure_latency(base, threads=threads, repeat=20, budget_s=2.0, seed=seed)
    return {"original_graphopt_ms": lat["graphopt_ms"], "original_onnxruntime_ms": lat["onnxruntime_ms"],
            "speedup_vs_original": round(lat["graphopt_ms"] / now_ms, 3) if now_ms else None}


def _size_report(original: gs.Graph, graph: gs.Graph, model_path: Path) -> dict:
    from .evaluate import graph_size
    before, after = graph_size(original, with_bytes=False), graph_size(graph, with_bytes=False)
    return {"macs_before": before["macs"], "macs_after": after["macs"], "params_before": before["params"],
            "params_after": after["params"], "model_bytes": model_path.stat().st_size,
            "ops": len(graph.nodes)}


def bench(source, threads: int | None = None, repeat: int = 50, input_shapes: dict | None = None,
          target: str = "cpu") -> dict:
    """graphopt vs onnxruntime on the same model with the same thread count. source: artifact folder or model."""
    p = Path(source)
    if p.is_dir():
        art = Artifact(p)
        if not art.target().measures_here():
            raise BadInput(f"{p}: a {art.manifest['target']['name']} artifact cannot be timed on this machine; "
                           f"benchmark it on its device")
        res = measure_latency(art, threads=threads, repeat=repeat)
    else:
        with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as d:
            art = compile(p, target=target, out=Path(d) / "artifact", input_shapes=input_shapes, measure=False)
            res = measure_latency(art, threads=threads, repeat=repeat)
    res["model"] = str(source)
    return res


def run(artifact: str | Path, feeds: dict, threads: int | None = None) -> dict[str, np.ndarray]:
    return Artifact(artifact).run(feeds, threads=threads)
