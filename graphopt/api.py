"""The Python API: load, from_torch, compile, bench. The CLI is a thin layer over these."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import ort, verify
from .version import __version__
from .artifact import (FORMAT, MANIFEST, MODEL, REPORT, Artifact, Staging, check_artifact_destination, sha256,
                       write_json)
from .data_checks import check_finite, nonfinite_weights
from .errors import BadInput, CheckFailed, printable
from .library_check import check_library
from .graph import copy as copy_graph, input_specs, output_specs, to_onnx
from .loading import load
from .passmanager import PassContext, PassManager
from .quant_check import compare_quantized
from .tuning_db import check_tuning_db

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


def measure_latency(art: Artifact, threads: int | None = None, repeat: int = 20, budget_s: float | None = None,
                    seed: int = 0, reference: onnx.ModelProto | None = None) -> dict:
    """Median latency of graphopt's library and of onnxruntime (all optimizations on) running the artifact's
    own model.onnx, same inputs, same thread count, timed in warm rounds with the same clock (timing.time_engines:
    interleaved on one thread, so load changes hit both alike; each engine apart on more, where one engine's
    spinning pool threads would slow the other). With `reference` (the original model), onnxruntime on it is timed
    in the same rounds too ("onnxruntime_reference_ms": what a speedup gate compares against)."""
    from .timing import clock_name, time_engines
    model_path = art.path / MODEL
    feeds = ort.random_inputs(_specs(art), seed, _input_ranges(art))
    arrays = art.check_inputs(feeds)
    runner = art.runner(threads)
    sess = ort.session(model_path.read_bytes(), optimize=True, threads=threads)
    calls = [lambda: runner(arrays), lambda: sess.run(None, feeds)]
    if reference is not None:
        from .check_inputs import input_ranges
        from .graph import from_onnx
        ref_graph = from_onnx(reference)
        ref_sess = ort.session(reference, optimize=True, threads=threads)
        ref_feeds = ort.random_inputs(input_specs(ref_graph), seed, input_ranges(ref_graph))
        calls.append(lambda: ref_sess.run(None, ref_feeds))
    rounds = max(3, int(repeat))
    if budget_s is not None:        # one warm call of each tells how many rounds fit the budget
        t0 = time.perf_counter()
        for fn in calls:
            fn()
        per_round = 2 * (time.perf_counter() - t0)      # a round runs every call twice at least (warm + timed)
        rounds = max(3, min(rounds, int(budget_s / max(per_round, 1e-9))))
    ms = time_engines(calls, rounds=rounds, sample_s=1e-3, threads=threads)
    ours, theirs = ms[0], ms[1]
    res = {"threads": threads, "graphopt_ms": round(ours, 4), "onnxruntime_ms": round(theirs, 4),
           "ratio_to_onnxruntime": round(ours / theirs, 3) if theirs > 0 else None,
           "repeats": rounds, "clock": clock_name(threads)}
    if reference is not None:
        res["onnxruntime_reference_ms"] = round(ms[2], 4)
    return res


def _specs(art: Artifact) -> list[tuple]:
    return [(i["name"], tuple(i["shape"]), i["dtype"]) for i in art.inputs]


def _input_ranges(art: Artifact) -> dict:
    """check_inputs.input_ranges of the artifact's model.onnx: the ranges seeded inputs are drawn from."""
    from .check_inputs import file_input_ranges
    return file_input_ranges(art.path / MODEL)


def check_feeds(graph: gs.Graph, seed: int = 0, check_inputs=None, data: dict | None = None) -> tuple[dict, str]:
    """(one feed of graph's inputs for compile's self-check, where it came from): the first sample of check_inputs
    ({input: array} or an .npz path), else of the evaluation or calibration data (graphopt.samples layout), else
    seeded random inputs within the ranges the graph takes (check_inputs.input_ranges)."""
    from .check_inputs import describe, input_ranges
    from .samples import feeds_from_samples
    specs = input_specs(graph)
    data = data or {}
    for what, arrays in (("--check-inputs", check_inputs), ("evaluation data", data.get("eval")),
                         ("calibration data", data.get("calib"))):
        if arrays is None:
            continue
        if isinstance(arrays, (str, Path)):
            from .npz import load_npz
            arrays = load_npz(arrays, what)
        return feeds_from_samples(arrays, specs, what, limit=1)[0], f"first sample of the {what}"
    ranges = input_ranges(graph)
    return ort.random_inputs(specs, seed, ranges), describe(ranges)


def compare_with_onnxruntime(art: Artifact, seed: int = 0, feeds: dict | None = None) -> dict:
    """Run the compiled library and onnxruntime (no optimizations) on the artifact's model.onnx, on feeds (default:
    seeded inputs the model takes). Quantized graphs are judged by quant_check.compare_quantized, artifacts of
    precision bf16 by bf16_check.compare_bf16. Outputs where both
    engines give NaN / infinity at the same elements count as agreeing there and are listed under "nonfinite"; an
    output with no finite element at all fails (the check would have verified nothing)."""
    feeds = feeds if feeds is not None else ort.random_inputs(_specs(art), seed, _input_ranges(art))
    ref = ort.run((art.path / MODEL).read_bytes(), feeds)
    got = art.run(feeds)
    q = compare_quantized(art.path / MODEL, feeds, ref, got)
    if q is not None:
        return q
    if art.manifest["target"].get("precision") == "bf16":
        from .bf16_check import PROBABILITY_FLOOR, compare_bf16
        from .graph import from_onnx
        # a Sigmoid / Softmax output compares in logit space (probabilities below PROBABILITY_FLOOR count as equal):
        # normalized by its largest value, a detector's probability map of 1e-4's on random inputs scales the error
        model = onnx.load(str(art.path / MODEL))
        saturating = _saturating_outputs(from_onnx(model))

        def view(outputs: dict) -> dict:
            return {k: logit_space(v, *saturating[k], tiny=PROBABILITY_FLOOR) if k in saturating else v
                    for k, v in outputs.items()}
        res = compare_bf16(model, view(ref), view(got))
        if saturating:
            res["logit_space"] = sorted(saturating)
        return res
    ok, err, name = verify.compare(ref, got, COMPILED_RTOL, COMPILED_ATOL, scale_atol=True)
    res = {"ok": ok, "max_abs_error": err, "worst_output": name}
    nonfinite = verify.nonfinite_agreement(ref, got)
    if nonfinite:
        res["nonfinite"] = nonfinite
        res["note"] = "both engines give NaN or infinity at the same elements of " + ", ".join(
            f"'{k}' ({v['nonfinite']} of {v['elements']})" for k, v in nonfinite.items())
        empty = [k for k, v in nonfinite.items() if v["nonfinite"] == v["elements"]]
        if empty:
            res.update(ok=False, worst_output=empty[0],
                       problem=f"every element of output '{printable(empty[0])}' is NaN or infinite in both "
                               f"engines on the check's inputs, so the check verified nothing; give inputs the model "
                               f"takes with --check-inputs FILE.npz")
            return res
    if not ok:
        res.update(_fp64_arbiter(art, feeds, ref, got, seed))
    return res


def _steps_text(out: dict | None) -> str:
    """'; within one step: graphopt 97.1%, onnxruntime-optimized 99.0%' for a quantized output's check entry."""
    if not out or "onnxruntime_optimized" not in out:
        return ""
    mine, theirs = out["graphopt"]["within_one_step"], out["onnxruntime_optimized"]["within_one_step"]
    return f"; within one quantization step: graphopt {mine:.1%}, onnxruntime-optimized {theirs:.1%}"


def _int8_task_check(art: Artifact, original: gs.Graph, data: dict, samples: int = 64) -> dict | None:
    """quant_check.task_check on up to `samples` samples of the evaluation (with its labels) or calibration data."""
    from .quant_check import task_check
    from .samples import feeds_from_samples
    for key in ("eval", "calib"):
        arrays = (data or {}).get(key)
        if arrays is not None:
            feeds = feeds_from_samples(arrays, _specs(art), f"{'evaluation' if key == 'eval' else 'calibration'} "
                                                            f"data", limit=samples)
            labels = arrays.get("labels") if key == "eval" else None
            res = task_check(to_onnx(original), onnx.load(str(art.path / MODEL)), art.run, feeds, labels)
            if res is not None:
                res["data"] = key
            return res
    return None


#: a compiled library outside the fp32 tolerance still passes when, against the float64 result, it is at most
#: this many times as far off as onnxruntime itself (graphs that amplify float32 rounding: freshly pruned ones)
FP64_ARBITER_FACTOR = 2.0
FP64_ARBITER_RUNS = 3      # the worst element of a single input is noisy: average the max errors of a few


def _saturating_outputs(graph: gs.Graph) -> dict[str, tuple[str, int]]:
    """{output name: (op, axis)} for the outputs a Sigmoid or a Softmax produces (before opset 13 only a Softmax over
    the last axis, where the old flattening semantics are the same)."""
    found = {}
    names = {t.name for t in graph.outputs}
    for n in graph.nodes:
        out = n.outputs[0].name if n.outputs else None
        if out not in names:
            continue
        if n.op == "Sigmoid":
            found[out] = ("Sigmoid", 0)
        elif n.op == "Softmax":
            rank = len(n.outputs[0].shape or ())
            axis = int(n.attrs.get("axis", -1 if graph.opset >= 13 else 1))
            if graph.opset >= 13 or (rank and axis % rank == rank - 1):
                found[out] = ("Softmax", axis)
    return found


def logit_space(x: np.ndarray, op: str, axis: int, tiny: float = 1e-20) -> np.ndarray:
    """A Softmax's or Sigmoid's output taken back to its input: log-probabilities centred along the Softmax's axis
    (the logits up to the row constant the Softmax removes), or log(p / (1 - p)); probabilities clipped to
    [tiny, 1 - 1e-7] so that what float32 cannot resolve counts alike in every engine. Near a tie a Softmax turns
    a logit error into an output error a thousand times larger than elsewhere, so which engine happens to hit a
    near-tie decided the check (PP-OCRv4's 6625-way frames: onnxruntime's own error ranged over 23x between
    inputs); in logit space the same errors compare evenly."""
    p = np.clip(np.asarray(x, np.float64), tiny, 1.0 - 1e-7)
    if op == "Sigmoid":
        return np.log(p) - np.log1p(-p)
    lp = np.log(p)
    return lp - lp.mean(axis=axis, keepdims=True)


def _fp64_arbiter(art: Artifact, feeds: dict, ref: dict, got: dict, seed: int) -> dict:
    """Tell float32 rounding from a wrong result: compare both engines with the model run in float64, on the
    failing input and a few more (mean of the per-input max errors); outputs of a Softmax or a Sigmoid are
    compared in logit space (logit_space)."""
    from .check_inputs import input_ranges
    from .graph import from_onnx
    graph = from_onnx(onnx.load(str(art.path / MODEL)))
    ranges = input_ranges(graph)
    saturating = _saturating_outputs(graph)

    def view(name, x):
        return logit_space(x, *saturating[name]) if name in saturating else x

    e_ort, e_go = [], []
    for i in range(FP64_ARBITER_RUNS):
        if i:
            feeds = ort.random_inputs(_specs(art), seed + 1000 + i, ranges)
            ref, got = ort.run((art.path / MODEL).read_bytes(), feeds), art.run(feeds)
        exact = verify.fp64_outputs(graph, feeds)
        if exact is None:
            return {}
        e_ort.append(max((ort.max_error(view(k, exact[k]), view(k, r)) for k, r in ref.items()), default=0.0))
        e_go.append(max((ort.max_error(view(k, exact[k]), view(k, got[k])) for k in ref), default=0.0))
    m_ort, m_go = float(np.mean(e_ort)), float(np.mean(e_go))
    where = f"; {', '.join(sorted(set(op for op, _ in saturating.values())))} outputs in logit space" \
        if saturating else ""
    return {"ok": bool(m_go <= FP64_ARBITER_FACTOR * m_ort), "fp64_error_onnxruntime": m_ort,
            "fp64_error_graphopt": m_go,
            "note": f"outside the fp32 tolerance; against float64 (mean max error over {FP64_ARBITER_RUNS} inputs"
                    f"{where}) graphopt is off by {m_go:.3g} and onnxruntime by {m_ort:.3g} (accepted up to "
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
            log=None, data: dict | None = None, progress=None, input_values: dict | None = None) -> Prepared:
    """Load, run the user's pipeline, then the target's legalization: the graph the target will lower.
    compile and tune both start here, so tuning records match what compile builds."""
    log = log or (lambda msg: None)
    where = str(model) if isinstance(model, (str, Path)) else "model"
    graph = copy_graph(model) if isinstance(model, gs.Graph) else load(model, input_shapes=input_shapes,
                                                                       input_values=input_values)
    bad = nonfinite_weights(graph)
    if bad:
        raise BadInput(f"{where}: weight '{bad[0]}' holds NaN or Inf ({len(bad)} weight(s) in all); the model "
                       f"would compute garbage")
    for key, arrays in (data or {}).items():
        if isinstance(arrays, dict) and key in ("calib", "eval", "train"):
            check_finite(arrays, {"calib": "calibration data", "eval": "evaluation data"}.get(key, "training data"))
    tgt = get_target(target, **(target_options or {}))
    pm = _as_pipeline(pipeline)
    ctx = PassContext(target=target, hw=tgt.hw(), seed=seed, verify=verify_level, data=data, progress=progress,
                      target_options=target_options)
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
         target_options: dict | None = None, input_values: dict | None = None) -> dict:
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
    check_tuning_db(db, must_exist=False)
    prep = prepare(model, target, pipeline, input_shapes, target_options=target_options, input_values=input_values)
    Path(db).mkdir(parents=True, exist_ok=True)
    return prep.target.tune(prep.model_proto, str(db), trials, rpc=rpc, key=key, progress=progress)


def compile(model, target: str = "cpu", out: str | Path | None = None, pipeline=None, input_shapes: dict | None = None,
            tuning_db: str | None = None, target_options: dict | None = None, verify_level: str = "full",
            seed: int = 0, measure: bool = True, threads: int | None = None, log=None,
            data: dict | None = None, progress=None, check_inputs=None, input_values: dict | None = None) -> Artifact:
    """Run the pipeline on model (a Graph, a ModelProto or a path), lower it for target and write the artifact
    atomically into out (a temporary folder when None). Raises CheckFailed when the compiled library does not
    match onnxruntime on the artifact's own model.onnx. data: user data for passes, e.g. {"calib": {input: array}}.
    input_values: inputs made constants before anything else ({"sr": 16000}: see graphopt.load).
    check_inputs: inputs for that check ({input: array} or an .npz path, graphopt.samples layout; default: the
    evaluation or calibration data, else seeded inputs the model takes: see check_feeds).
    Targets that cannot run on this machine (runs_here() False) are built and published without the run check."""
    log = log or (lambda msg: None)
    where = str(model) if isinstance(model, (str, Path)) else "model"
    if out is not None:
        check_artifact_destination(Path(out), "-o")     # before any work; Staging checks again at publish
    if tuning_db:
        check_tuning_db(tuning_db)
    prep = prepare(model, target, pipeline, input_shapes, target_options, verify_level, seed, log, data, progress,
                   input_values)
    graph, original, tgt, pm, legal = prep.graph, prep.original, prep.target, prep.pm, prep.legal
    records, lres, model_proto = prep.records, prep.legal_records, prep.model_proto
    feeds, fed = check_feeds(graph, seed, check_inputs, data)      # before lowering: a bad file fails fast

    dest = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="graphopt-")) / "artifact"
    with Staging(dest) as stage:
        onnx.save_model(model_proto, str(stage.path / MODEL))
        log(f"lowering for {target} ({tgt.describe()})")
        facts = tgt.lower(model_proto, stage.path, tuning_db=tuning_db)
        files = [MODEL, tgt.library]
        manifest = {
            "format": FORMAT,
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
        check = dict(check_library(art, seed, feeds, compare_with_onnxruntime), inputs=fed) if runs_here else \
            {"ok": None, "skipped": f"target {target} cannot run on this machine"}
        quantized_here = not any(n.op == "QuantizeLinear" for n in original.nodes)   # so the fp32 model is known
        if runs_here and quantized_here and "onnxruntime_optimized" in next(iter(check.get("outputs", {}).values()),
                                                                            {}):
            task = _int8_task_check(art, original, data)
            if task is not None:
                check["task"] = task
                if not task["ok"]:
                    check.update(ok=False, problem=f"top-1 agreement with the fp32 model on the {task['data']} "
                                                   f"data: graphopt {task['agreement_with_fp32']['graphopt']:.3f}, "
                                                   f"onnxruntime-optimized "
                                                   f"{task['agreement_with_fp32']['onnxruntime_optimized']:.3f}")
        if check.get("problem"):
            raise CheckFailed(f"{where}: compiled library check failed: {check['problem']}")
        if check["ok"] is False:
            raise CheckFailed(f"{where}: compiled library differs from onnxruntime on output '{check['worst_output']}' "
                              f"(max abs error {check['max_abs_error']:.3g}"
                              + (f"; against float64 {check['fp64_error_graphopt']:.3g}, onnxruntime "
                                 f"{check['fp64_error_onnxruntime']:.3g}" if "fp64_error_graphopt" in check else "")
                              + _steps_text(check.get("outputs", {}).get(check["worst_output"]))
                              + ")" + (f"; {tgt.numeric_hint()}" if tgt.numeric_hint() else "")
                              + "; please report this model")
        report = {"source": where, "target": target, **facts, "check": check,
                  **_size_report(original, graph, stage.path / MODEL)}
        report.update(report_sections(pm.passes, records))
        if measure and runs_here and tgt.measures_here():
            report["latency"] = measure_latency(art, threads=threads, repeat=20, budget_s=2.0, seed=seed)
            if report["macs_after"] != report["macs_before"]:
                log("compiling the original (cleanup only) to measure the latency change")
                budgets = latency_budgets(records)
                report["latency"].update(_baseline_latency(original, target, target_options, tuning_db, threads,
                                                           seed, report["latency"]["graphopt_ms"],
                                                           art if budgets else None))
                if budgets:
                    report["latency"]["budget"] = [dict(b, achieved=report["latency"]["achieved_fraction"])
                                                   for b in budgets]
        write_json(stage.path / REPORT, report)
        stage.publish()
    return Artifact(dest)


def report_sections(passes: list, records: list[dict]) -> dict:
    """The report.json sections the pipeline's passes fill ({Pass.report_name: [one entry per run]}, e.g.
    "pruning"), each entry Pass.report_section of the run's record, led by the pass's text."""
    out = {}
    for p, rec in zip(passes, records, strict=True):
        entry = p.report_section(rec) if p.report_name else None
        if entry is not None:
            out.setdefault(p.report_name, []).append({"pass": rec["pass"], **entry})
    return out


def latency_budgets(records: list[dict]) -> list[dict]:
    """The latency budgets of a pipeline's records: [{"pass", "target", "predicted"}]."""
    out = []
    for rec in records:
        lat = rec["info"].get("latency")
        if isinstance(lat, dict) and "predicted" in lat and lat.get("target", 1.0) < 1.0:
            out.append({"pass": rec["pass"], "target": lat["target"], "predicted": lat["predicted"]})
    return out


def _baseline_latency(original: gs.Graph, target, target_options, tuning_db, threads, seed, now_ms,
                      art: Artifact | None = None) -> dict:
    """The latency change a structural pipeline bought: the original graph (cleanup only) compiled for the same
    target and timed the same way. With art (a latency budget to judge): also `achieved_fraction`, art's latency
    over the original's, both timed in the same interleaved rounds (medians; graphopt.timing.time_interleaved)."""
    with tempfile.TemporaryDirectory(prefix="graphopt-baseline-") as d:
        base = compile(original, target, Path(d) / "a", pipeline="cleanup", target_options=target_options,
                       tuning_db=tuning_db, seed=seed, measure=False, verify_level="structural")
        lat = measure_latency(base, threads=threads, repeat=20, budget_s=2.0, seed=seed)
        out = {"original_graphopt_ms": lat["graphopt_ms"], "original_onnxruntime_ms": lat["onnxruntime_ms"],
               "speedup_vs_original": round(lat["graphopt_ms"] / now_ms, 3) if now_ms else None}
        if art is not None:
            from .timing import ROUNDS, clock_name, time_interleaved, timer
            pruned_ms, base_ms = time_interleaved([timer(art, threads), timer(base, threads)], rounds=3 * ROUNDS,
                                                  threads=threads)
            out.update(achieved_fraction=round(pruned_ms / base_ms, 4), interleaved_ms=[round(pruned_ms, 4),
                                                                                          round(base_ms, 4)],
                       interleaved_clock=clock_name(threads))
    return out


def _size_report(original: gs.Graph, graph: gs.Graph, model_path: Path) -> dict:
    from .evaluate import graph_size
    before, after = graph_size(original, with_bytes=False), graph_size(graph, with_bytes=False)
    return {"macs_before": before["macs"], "macs_after": after["macs"], "params_before": before["params"],
            "params_after": after["params"], "param_bytes_before": before["param_bytes"],
            "param_bytes_after": after["param_bytes"], "model_bytes": model_path.stat().st_size,
            "ops": len(graph.nodes)}


def bench(source, threads: int | None = None, repeat: int = 50, input_shapes: dict | None = None,
          target: str = "cpu", profile: bool = False, input_values: dict | None = None) -> dict:
    """graphopt vs onnxruntime on the same model with the same thread count. source: artifact folder or model.
    profile: also per-kernel times of both engines over `repeat` runs (graphopt.profiling), under "profile"."""
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise BadInput(f"--repeat must be a whole number of runs, at least 1; got {repeat!r}")
    p = Path(source)
    if p.is_dir():
        art = Artifact(p)
        if not art.target().measures_here():
            raise BadInput(f"{p}: a {art.manifest['target']['name']} artifact cannot be timed on this machine; "
                           f"benchmark it on its device")
        res = _bench_artifact(art, threads, repeat, profile)
    else:
        with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as d:
            art = compile(p, target=target, out=Path(d) / "artifact", input_shapes=input_shapes, measure=False,
                          input_values=input_values)
            res = _bench_artifact(art, threads, repeat, profile)
    res["model"] = str(source)
    return res


def _bench_artifact(art: Artifact, threads: int | None, repeat: int, profile: bool) -> dict:
    prof = None
    if profile:
        from .profiling import profile_artifact
        prof = profile_artifact(art, threads, repeat, ort.random_inputs(_specs(art), 0, _input_ranges(art)))
    res = measure_latency(art, threads=threads, repeat=repeat)
    return res | {"profile": prof} if prof is not None else res


def run(artifact: str | Path, feeds: dict, threads: int | None = None) -> dict[str, np.ndarray]:
    return Artifact(artifact).run(feeds, threads=threads)
