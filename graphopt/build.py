"""`graphopt build PIPELINE.toml`: an unattended deployment pipeline with quality gates.

Stages (each cached by a content hash of everything it depends on, graphopt's code included): optimize (the
[[pass]] pipeline, through `compress` with distillation when [data].train is given and a pass is lossy), compile
(the target artifact) and evaluate (size, MACs, latency, accuracy, agreement, CKA, robustness). Gates then decide
the exit code."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx

from .version import __version__, code_fingerprint
from .artifact import Staging, check_artifact_destination, write_json
from .errors import BadInput, CheckFailed, printable, reraise_if_strict
from .graph import copy as copy_graph, input_specs, to_onnx
from .limits import check_threads
from .npz import load_npz
from .stage_cache import StageCache

# gate -> (direction, default used when the gate is turned on with `true`)
GATES = {
    "max_top1_drop": ("max", 0.02),
    "min_agreement": ("min", 0.95),
    "min_cka": ("min", 0.9),
    "min_speedup": ("min", 2.0),            # latency at most 50% of onnxruntime on the original
    "min_flops_reduction": ("min", 0.75),
    "min_size_reduction": ("min", 0.75),
    "max_latency_ms": ("max", None),
    "max_noise_drop": ("max", 0.04),
    "max_adversarial_drop": ("max", 0.03),
}
#: how messages name the artifact destination of a build
OUTPUT_OPTION = "[output] dir"
#: section -> {key: (type, lowest value, lowest excluded)}; a key whose spec is None is checked where it is read
SECTIONS = {
    "model": {"path": (str, None, False), "input_shapes": None, "module": (str, None, False),
              "checkpoint": (str, None, False)},
    "target": None,                          # name + target options
    "pass": None,
    "data": {"train": (str, None, False), "calib": (str, None, False), "eval": (str, None, False),
             "preprocess": (str, None, False)},
    "gates": dict.fromkeys(GATES),
    "output": {"dir": (str, None, False), "cache": (str, None, False)},
    "evaluate": {"cka_layers": (list, None, False), "noise_std": (float, 0.0, False), "fgsm_eps": (float, 0.0, False),
                 "threads": (int, 1, False), "repeat": (int, 1, False), "robustness": (bool, None, False)},
    "compress": {"epochs": (int, 1, False), "batch_size": (int, 1, False), "lr": (float, 0.0, True),
                 "seed": (int, 0, False), "micro_batch": (int, 1, False),
                 "schedule": None},            # [compress.schedule]: compress.Schedule fields
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list of strings"}


def _check_key(where: str, section: str, key: str, value, spec) -> None:
    """value of [section] key against its SECTIONS spec; [evaluate] threads also against the machine's cores."""
    kind, low, strict = spec
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise BadInput(f"{where}: [{section}] {key} must be {_TYPE_NAMES[kind]}, got {printable(repr(value))}")
    if low is not None and (value <= low if strict else value < low):
        raise BadInput(f"{where}: [{section}] {key} must be {'above' if strict else 'at least'} {low}, got {value}")
    if (section, key) == ("evaluate", "threads"):
        check_threads(value, f"{where}: [evaluate] threads")


class BuildConfig:
    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise BadInput(f"{self.path}: no such file")
        try:
            self.doc = tomllib.loads(self.path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise BadInput(f"{self.path}: invalid TOML ({e})") from None
        self.base = self.path.resolve().parent
        for section, value in self.doc.items():
            if section not in SECTIONS:
                raise BadInput(f"{self.path}: unknown section [{section}]; sections: {', '.join(SECTIONS)}")
            keys = SECTIONS[section]
            if keys is not None:
                if not isinstance(value, dict):
                    raise BadInput(f"{self.path}: [{section}] must be a table")
                bad = [k for k in value if k not in keys]
                if bad:
                    raise BadInput(f"{self.path}: [{section}] has no key '{bad[0]}'; keys: {', '.join(sorted(keys))}")
                for key, v in value.items():
                    if keys[key] is not None:
                        _check_key(str(self.path), section, key, v, keys[key])
        model = self.doc.get("model")
        if not isinstance(model, dict) or (isinstance(model.get("path"), str) == isinstance(model.get("module"), str)):
            raise BadInput(f"{self.path}: [model] needs path = \"model.onnx\", or module = \"FILE.py:FUNCTION\" "
                           f"(PyTorch code) with checkpoint = \"weights.pt\"")
        if "checkpoint" in model and not isinstance(model.get("module"), str):
            raise BadInput(f"{self.path}: [model].checkpoint goes with module = \"FILE.py:FUNCTION\"")
        self.torch_module = model.get("module")
        self.checkpoint = self.resolve(model["checkpoint"]) if "checkpoint" in model else None
        self.model_path = self.resolve(model["module"].rpartition(":")[0] if self.torch_module else model["path"])
        shapes = model.get("input_shapes", {})
        if not isinstance(shapes, dict) or not all(isinstance(v, list) and all(isinstance(d, int) for d in v)
                                                   for v in shapes.values()):
            raise BadInput(f"{self.path}: [model].input_shapes must map input names to lists of integers")
        self.input_shapes = {k: tuple(v) for k, v in shapes.items()}
        target = dict(self.doc.get("target", {"name": "cpu"}))
        if not isinstance(target.get("name", "cpu"), str):
            raise BadInput(f"{self.path}: [target].name must be a string")
        self.target = target.pop("name", "cpu")
        self.target_options = target
        steps = self.doc.get("pass", [])
        from .passmanager import PassManager
        self.pm = PassManager.from_steps(steps, str(self.path))
        data = dict(self.doc.get("data", {}))
        self.preprocess = data.pop("preprocess", None)      # "FILE.py:FUNCTION" for folders / .txt of lines
        self.data_paths = {k: self.resolve(v) for k, v in data.items()}
        self.gates = {}
        for name, value in self.doc.get("gates", {}).items():
            direction, default = GATES[name]
            if value is True:
                if default is None:
                    raise BadInput(f"{self.path}: gate {name} needs a number")
                value = default
            if value is False:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadInput(f"{self.path}: gate {name} must be a number or true")
            self.gates[name] = float(value)
        out = self.doc.get("output", {})
        self.out_dir = self.resolve(out.get("dir", "build"), must_exist=False)
        self.cache_dir = self.resolve(out.get("cache", ".graphopt-cache"), must_exist=False)
        self.eval_opts = {"noise_std": 0.1, "fgsm_eps": 0.05, "threads": 1, "repeat": 30, "cka_layers": [],
                          "robustness": True, **self.doc.get("evaluate", {})}
        self.compress_opts = dict(self.doc.get("compress", {}))
        if "schedule" in self.compress_opts:
            from .compress import Schedule
            schedule = self.compress_opts["schedule"]
            if not isinstance(schedule, dict):
                raise BadInput(f"{self.path}: [compress] schedule must be a table: [compress.schedule]")
            self.compress_opts["schedule"] = Schedule.from_options(schedule, f"{self.path}: [compress.schedule]")

    def resolve(self, p, must_exist: bool = True) -> Path:
        if not isinstance(p, str):
            raise BadInput(f"{self.path}: paths must be strings, got {p!r}")
        q = (self.base / p) if not os.path.isabs(p) else Path(p)
        if must_exist and not q.exists():
            raise BadInput(f"{self.path}: '{p}' (resolved to {q}) does not exist")
        return q


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _load_data(cfg: BuildConfig, input_names: list[str]) -> dict:
    """[data] train/calib/eval: .npz files, or folders / .txt files of lines through [data] preprocess."""
    if not cfg.preprocess:
        return {k: load_npz(p, f"[data] {k}") for k, p in cfg.data_paths.items()}
    from .folder_data import load_folder, load_hook
    hook = load_hook(cfg.preprocess, cfg.base, f"{cfg.path}: [data] preprocess")
    out = {}
    for k, p in cfg.data_paths.items():
        if not p.exists():
            raise BadInput(f"{cfg.path}: [data] {k} = {p} does not exist")
        out[k] = load_npz(p, f"[data] {k}") if p.suffix == ".npz" else load_folder(p, hook, input_names,
                                                                                  f"[data] {k}")
    return out


def _arrays_sha(arrays: dict) -> str:
    h = hashlib.sha256()
    for k, v in sorted(arrays.items()):
        a = np.ascontiguousarray(v)
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _file_sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _warn(message: str) -> None:
    print(f"graphopt: warning: {message}", file=sys.stderr)


# Readers of the cache entries: whatever they raise makes the entry count as unusable (discarded, built again).
def _read_optimized(d: Path):
    from .loading import load
    stages = json.loads((d / "stages.json").read_text())["stages"]
    if not isinstance(stages, list):
        raise TypeError("stages is not a list")
    return load(d / "model.onnx"), stages


def _read_compiled(d: Path) -> Path:
    from .artifact import Artifact
    Artifact(d / "artifact")              # a complete artifact, each file matching its manifest
    return d / "artifact"


def _read_metrics(d: Path) -> dict:
    metrics = json.loads((d / "metrics.json").read_text())
    if not isinstance(metrics, dict):
        raise TypeError("metrics is not an object")
    return metrics


def build(toml_path, log=None, progress=None, warn=_warn) -> dict:
    """Run the build; return the summary. Raises CheckFailed (exit 1) naming every failed gate, after writing the
    artifact and its reports (so the failure can be inspected). progress: a graphopt.progress.Progress for
    calibration and training; warn(line): a discarded cache entry (default: a line on stderr)."""
    from . import api
    from .loading import load

    log = log or (lambda m: None)
    cfg = BuildConfig(Path(toml_path))
    check_artifact_destination(cfg.out_dir, OUTPUT_OPTION)       # before any work
    cache = StageCache(cfg.cache_dir, warn)
    cached = []

    if cfg.torch_module:
        from .loading import load_torch_model
        original = load_torch_model(cfg.torch_module, cfg.base, str(cfg.checkpoint) if cfg.checkpoint else None,
                                    cfg.input_shapes, str(cfg.path))
    else:
        original = load(cfg.model_path, input_shapes=cfg.input_shapes)
    data = _load_data(cfg, [t.name for t in original.inputs])
    base_key = _sha(__version__, code_fingerprint(), _file_sha(cfg.model_path), cfg.torch_module,
                    _file_sha(cfg.checkpoint) if cfg.checkpoint else None, cfg.input_shapes,
                    {k: _arrays_sha(v) for k, v in sorted(data.items())})

    # --- optimize -------------------------------------------------------------------------------------------
    opt_key = _sha(base_key, cfg.pm.resolved(), cfg.target, cfg.target_options, cfg.compress_opts)
    hit = cache.get("optimize", opt_key, _read_optimized)
    if hit is None:
        log(f"optimize: {cfg.pm.resolved() or '(no passes)'}")

        def fill(d):
            graph, stages = _optimize(cfg, original, data, log, progress)
            onnx.save_model(to_onnx(graph), str(d / "model.onnx"))
            write_json(d / "stages.json", {"stages": stages})
        hit = cache.put("optimize", opt_key, fill, _read_optimized)
    else:
        cached.append("optimize")
    optimized, stages = hit

    # --- compile + evaluate into a staging folder, published atomically ----------------------------------------
    with Staging(cfg.out_dir, OUTPUT_OPTION) as stage:
        from .artifact import Artifact
        comp_key = _sha(opt_key, "compile", api._versions())
        chit = cache.get("compile", comp_key, _read_compiled)
        if chit is None:
            log(f"compile for {cfg.target}")
            chit = cache.put("compile", comp_key, lambda d: _compile_into(optimized, cfg, d / "artifact"),
                             _read_compiled)
        else:
            cached.append("compile")
        for f in chit.iterdir():
            shutil.copy2(f, stage.path / f.name)
        art = Artifact(stage.path)

        ev_key = _sha(comp_key, "evaluate", cfg.eval_opts)
        metrics = cache.get("evaluate", ev_key, _read_metrics)
        if metrics is None:
            log("evaluate")
            fresh = evaluate_build(cfg, original, optimized, art, data)
            metrics = cache.put("evaluate", ev_key, lambda d: write_json(d / "metrics.json", fresh), _read_metrics)
        else:
            cached.append("evaluate")

        failures = check_gates(cfg.gates, metrics)
        summary = {"toml": str(cfg.path), "artifact": str(cfg.out_dir), "target": cfg.target,
                   "pipeline": cfg.pm.resolved(), "metrics": metrics, "stages": stages,
                   "gates": {name: {"threshold": th, "passed": name not in {f["gate"] for f in failures}}
                             for name, th in cfg.gates.items()},
                   "failed_gates": failures, "cached_stages": cached}
        report = json.loads((stage.path / "report.json").read_text())
        report["build"] = summary
        write_json(stage.path / "report.json", report)
        from .report_html import render
        (stage.path / "report.html").write_text(render(summary))
        stage.publish()
    if failures:
        raise CheckFailed("quality gate(s) failed: " + "; ".join(f["message"] for f in failures))
    return summary


def _compile_into(graph, cfg: BuildConfig, dest: Path) -> None:
    from . import api
    api.compile(graph, target=cfg.target, out=dest, target_options=cfg.target_options,
                threads=cfg.eval_opts["threads"], measure=False)


def _optimize(cfg: BuildConfig, original, data: dict, log, progress=None):
    """Run the pipeline pass by pass, recording size and accuracy after each stage. With training data and a
    lossy pass, the whole pipeline goes through compress (distillation from the original)."""
    from .passmanager import PassContext, PassManager
    reference = _first_output(original, data)
    stages = [_stage_metrics("original", original, data, reference)]
    lossy = any(not p.exact for p in cfg.pm.passes)
    if "train" in data and lossy:
        from .compress import POST_TRAINING, compress
        trained = []
        graph, info = compress(original, data["train"], cfg.pm, eval_data=data.get("eval"), log=log,
                               progress=progress, after_training=trained.append, **cfg.compress_opts)
        names = [p.name for p in cfg.pm.passes if not p.exact and p.name not in POST_TRAINING]
        if trained and names:        # the trained fp32 graph, before quantize
            stages.append(_stage_metrics(" + ".join(names) + " + distilled", trained[0], data, reference))
        final = dict(_stage_metrics("compressed", graph, data, reference), info=info)
        q = info.get("quantization")
        if q is not None or any(p.name == "quantize" for p in cfg.pm.passes):
            final["label"] = "quantized (QAT)" if q and q.get("qat") else "quantized"
        stages.append(final)
        return graph, stages
    graph = copy_graph(original)
    passed = ("calib", "train", "eval")          # eval: quantize{max_drop}'s scores
    ctx = PassContext(target=cfg.target, seed=0, data={k: v for k, v in data.items() if k in passed},
                      progress=progress)
    for p in cfg.pm.passes:
        graph = PassManager([p]).run(graph, ctx).graph
        stages.append(_stage_metrics(p.text(), graph, data, reference))
    return graph, stages


def _first_output(graph, data):
    """The graph's first output on [data] eval (onnxruntime), or None without eval data."""
    from .evaluate import run_onnx
    ev = data.get("eval")
    if ev is None:
        return None
    return next(iter(run_onnx(to_onnx(graph), ev, [(n, s) for n, s, _ in input_specs(graph)]).values()))


def _stage_metrics(name, graph, data, reference=None) -> dict:
    """Size, onnxruntime latency (1 thread) and, on [data] eval, top-1 (with labels) and the task agreement with
    the original's outputs `reference` (graphopt.task_metrics)."""
    from .evaluate import graph_size, ort_latency_ms, top1
    from .task_metrics import agreement
    m = {"stage": name, **graph_size(graph)}
    m["ort_latency_ms"] = round(ort_latency_ms(to_onnx(graph), input_specs(graph), threads=1, repeat=10), 4)
    ev = data.get("eval")
    if ev is not None:
        out = _first_output(graph, data)
        if "labels" in ev:
            m["top1"] = top1(out, ev["labels"])
        if reference is not None:
            m["agreement"] = agreement(out, reference)["value"]
    return m


def evaluate_build(cfg: BuildConfig, original, optimized, art, data: dict) -> dict:
    from . import api
    from .evaluate import (channels_per_layer, fgsm, gaussian_noise, linear_cka,
                           penultimate_tensor, run_artifact, run_onnx, top1)
    from .task_metrics import agreement as task_agreement
    threads = int(cfg.eval_opts["threads"])
    specs = input_specs(original)
    from .evaluate import graph_size
    before = graph_size(original)
    m = {"macs_before": before["macs"], "macs_after": art.report["macs_after"],
         "params_before": before["params"], "params_after": art.report["params_after"]}
    orig_model = to_onnx(original)
    m["size_before"] = len(orig_model.SerializeToString())
    m["size_after"] = (art.path / "model.onnx").stat().st_size
    m["flops_reduction"] = 1 - m["macs_after"] / m["macs_before"] if m["macs_before"] else 0.0
    m["size_reduction"] = 1 - m["size_after"] / m["size_before"]
    # graphopt's library and onnxruntime on the original, timed with the same clock (timing.time_engines)
    lat = api.measure_latency(art, threads=threads, repeat=int(cfg.eval_opts["repeat"]), reference=orig_model)
    m["latency_ms"] = lat["graphopt_ms"]
    m["onnxruntime_original_ms"] = lat["onnxruntime_reference_ms"]
    m["latency_clock"] = lat["clock"]
    m["speedup"] = m["onnxruntime_original_ms"] / m["latency_ms"] if m["latency_ms"] else None
    m["threads"] = threads
    m["channels_before"] = channels_per_layer(original)
    m["channels_after"] = channels_per_layer(optimized)
    ev = data.get("eval")
    if ev is None:
        return m
    in_specs = [(n, s) for n, s, _ in specs]
    ref = run_onnx(orig_model, ev, in_specs)
    got = run_artifact(art, ev)
    ref_logits, got_logits = next(iter(ref.values())), next(iter(got.values()))
    task = task_agreement(got_logits, ref_logits)      # top-1, decoded sequences or map IoU, by output kind
    m["agreement"], m["agreement_metric"] = task["value"], task["metric"]
    layers = list(cfg.eval_opts["cka_layers"]) or [t for t in [penultimate_tensor(original)] if t]
    opt_model = to_onnx(optimized)
    cka = {}
    for name in layers:
        try:
            a = run_onnx(orig_model, ev, in_specs, [name])[name]
            b = run_onnx(opt_model, ev, in_specs, [name])[name]
        except Exception as e:
            reraise_if_strict(e)
            cka[name] = None
            continue
        cka[name] = linear_cka(a, b)
    m["cka"] = cka
    valid = [v for v in cka.values() if v is not None]
    m["cka_min"] = min(valid) if valid else None
    if "labels" in ev:
        labels = ev["labels"]
        m["top1_before"] = top1(ref_logits, labels)
        m["top1_after"] = top1(got_logits, labels)
        m["top1_drop"] = m["top1_before"] - m["top1_after"]
        if cfg.eval_opts.get("robustness", True):
            names = [n for n, _ in in_specs]
            noisy = gaussian_noise(ev, names, float(cfg.eval_opts["noise_std"]))
            m["noise_top1_before"] = top1(next(iter(run_onnx(orig_model, noisy, in_specs).values())), labels)
            m["noise_top1_after"] = top1(next(iter(run_onnx(opt_model, noisy, in_specs).values())), labels)
            m["noise_drop"] = m["noise_top1_before"] - m["noise_top1_after"]
            try:
                eps = float(cfg.eval_opts["fgsm_eps"])
                adv_o = fgsm(original, ev, labels, eps, names[0])
                adv_n = fgsm(optimized, ev, labels, eps, names[0])
                m["adversarial_top1_before"] = top1(next(iter(run_onnx(orig_model, adv_o, in_specs).values())), labels)
                m["adversarial_top1_after"] = top1(next(iter(run_onnx(opt_model, adv_n, in_specs).values())), labels)
                m["adversarial_drop"] = m["adversarial_top1_before"] - m["adversarial_top1_after"]
            except ImportError:
                m["adversarial_drop"] = None
    return m


def check_gates(gates: dict, metrics: dict) -> list[dict]:
    value_of = {"max_top1_drop": "top1_drop", "min_agreement": "agreement", "min_cka": "cka_min",
                "min_speedup": "speedup", "min_flops_reduction": "flops_reduction",
                "min_size_reduction": "size_reduction", "max_latency_ms": "latency_ms",
                "max_noise_drop": "noise_drop", "max_adversarial_drop": "adversarial_drop"}
    failures = []
    for gate, threshold in gates.items():
        direction = GATES[gate][0]
        value = metrics.get(value_of[gate])
        if value is None:
            failures.append({"gate": gate, "threshold": threshold, "value": None,
                             "message": f"{gate}: no value ({value_of[gate]} needs [data].eval with labels)"})
            continue
        ok = value <= threshold if direction == "max" else value >= threshold
        if not ok:
            rel = "above" if direction == "max" else "below"
            failures.append({"gate": gate, "threshold": threshold, "value": value,
                             "message": f"{gate}: {value_of[gate]} = {value:.4g} is {rel} {threshold:g}"})
    return failures
