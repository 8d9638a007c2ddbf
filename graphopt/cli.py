"""Command line: graphopt compile | run | bench | inspect | passes | profile | sensitivity | tune | compress | build.
Errors are one line on stderr with exit code 2 (bad input) or 1 (a check failed); --debug shows tracebacks."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import BadInput, GraphoptError, printable
from .limits import check_threads
from .text_table import table as _table


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sub = self.prog.split()[1:]      # "graphopt compile" -> ["compile"]; the top-level parser has none
        self.exit(2, f"graphopt: error: {printable(message, None)} (see {' '.join(['graphopt', *sub[-1:]])} --help)\n")


def _add_shapes(p):
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="bind an input's dynamic dimensions (repeatable)")
    p.add_argument("--input-value", action="append", default=[], metavar="NAME=V[,V...]",
                   help="make an input a constant, e.g. a VAD's sample rate sr=16000: control flow and shapes that "
                        "depend on it fold away (repeatable)")


def _shapes(args) -> dict:
    from .shapes import parse_shape_arg
    out = {}
    for text in args.input_shape:
        name, shape = parse_shape_arg(text)
        out[name] = shape
    return out


def _values(args) -> dict:
    from .shapes import parse_value_arg
    return dict(parse_value_arg(text) for text in getattr(args, "input_value", []))


def key_values(texts, flag: str, example: str, parse=lambda v: v) -> dict:
    """{key: parse(value)} of repeated `flag KEY=VALUE` arguments."""
    out = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"{flag} '{printable(text)}' is malformed; write KEY=VALUE (for example {example})")
        out[key.strip()] = parse(value)
    return out


def _target_options(args) -> dict:
    from .pipeline_text import _value
    return key_values(getattr(args, "target_option", []), "--target-option", "mcpu=haswell", _value)


def _interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def _log(msg: str) -> None:
    if _interactive():
        print(f"graphopt: {printable(msg, None)}", file=sys.stderr)


def _note(msg: str) -> None:
    """A line the user must see even in CI logs (a decision graphopt took for them)."""
    print(f"graphopt: note: {printable(msg, None)}", file=sys.stderr)


def _progress(enabled: bool = True):
    """Progress for calibration, training and tuning on stderr: a bar on a terminal, plain lines otherwise."""
    from .progress import Progress
    return Progress.for_stream(sys.stderr, enabled=enabled)


def _emit(args, data: dict, text: str) -> None:
    if getattr(args, "json", False):
        from .artifact import json_text
        print(json_text(data, default=str))
    else:
        print(text)


def _load_npz(path: str, what: str) -> dict:
    from .npz import load_npz
    return load_npz(path, what)


def _load_data(path: str, what: str, preprocess: str | None, input_names: list[str]) -> dict:
    """An .npz file, or with --preprocess a folder of files / a .txt of lines through the user's hook."""
    if not preprocess:
        return _load_npz(path, what)
    from .folder_data import load_folder, load_hook
    if not Path(path).exists():
        raise BadInput(f"{path}: no such file or folder ({what})")
    return load_folder(path, load_hook(preprocess), input_names, what)


def cmd_compile(args) -> int:
    from . import api
    if args.pipeline and args.config:
        raise BadInput("give either --pipeline or --config, not both")
    if args.config and not Path(args.config).is_file():
        raise BadInput(f"{args.config}: no such file")
    out = args.output or f"{Path(args.model).stem}.{args.target}"
    from .passmanager import PassManager
    pm = PassManager.from_toml(Path(args.config)) if args.config else PassManager.parse(args.pipeline or "")
    data = {}
    if args.calib:
        data["calib"] = _load_npz(args.calib, "--calib")
    if args.eval:
        data["eval"] = _load_npz(args.eval, "--eval")
    if args.tuning_db and not Path(args.tuning_db).is_dir():
        raise BadInput(f"{args.tuning_db}: no such tuning database folder (create one with `graphopt tune`)")
    check_inputs = _load_npz(args.check_inputs, "--check-inputs") if args.check_inputs else None
    art = api.compile(args.model, target=args.target, out=out, pipeline=pm, input_shapes=_shapes(args),
                      input_values=_values(args),
                      tuning_db=args.tuning_db, threads=args.threads, measure=not args.no_bench, log=_log, data=data,
                      target_options=_compile_target_options(args), progress=_progress(),
                      check_inputs=check_inputs)
    rep = art.report
    rows = [("artifact", str(art.path)), ("target", json.dumps(art.manifest["target"].get("llvm_mcpu", args.target))),
            ("pipeline", art.manifest["pipeline"]["text"] or "(none)"), ("ops", rep["ops"]),
            ("params", f"{rep['params_before']:,} -> {rep['params_after']:,}"),
            ("weight bytes", f"{rep['param_bytes_before']:,} -> {rep['param_bytes_after']:,}"),
            ("MACs", f"{rep['macs_before']:,} -> {rep['macs_after']:,}"),
            ("model.onnx bytes", f"{rep['model_bytes']:,}"), ("compile s", rep["compile_seconds"]),
            ("max |err| vs onnxruntime", f"{_g(rep['check']['max_abs_error'])} (ok)" if rep["check"]["ok"]
             else rep["check"].get("skipped", "not checked"))]
    rows += _check_rows(rep["check"])
    if "fp64_error_graphopt" in rep["check"]:
        rows.append(("error vs float64", f"graphopt {rep['check']['fp64_error_graphopt']:.3g}, onnxruntime "
                                         f"{rep['check']['fp64_error_onnxruntime']:.3g} (fp32 rounding)"))
    if "latency" in rep:
        lat = rep["latency"]
        rows += [("latency ms (graphopt)", lat["graphopt_ms"]), ("latency ms (onnxruntime)", lat["onnxruntime_ms"]),
                 ("ratio to onnxruntime", lat["ratio_to_onnxruntime"])]
        if "original_graphopt_ms" in lat:
            rows.append(("latency ms before the passes", f"{lat['original_graphopt_ms']} "
                                                         f"(speedup {lat['speedup_vs_original']}x)"))
        for b in lat.get("budget", []):
            rows.append(("latency budget", f"target {b['target']:g} of the original's, predicted {b['predicted']:.3f}, "
                                           f"achieved {b['achieved']:.3f} (interleaved medians)"))
    text = _table(rows, ("report", "")) + "".join("\n\n" + t for t in _report_texts(rep))
    _emit(args, {"artifact": str(art.path), "report": rep, "manifest": art.manifest}, text)
    return 0


def _report_texts(report: dict) -> list[str]:
    """The terminal summaries of the report sections that passes filled (Pass.report_text), in report order."""
    from .passmanager import REGISTRY, load_passes
    load_passes()
    by_section = {cls.report_name: cls for cls in REGISTRY.values() if cls.report_name}
    return [by_section[name].report_text(entry) for name, entries in report.items() if name in by_section
            for entry in entries]


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _compile_target_options(args) -> dict:
    """--target-option pairs plus --precision (the target option `precision`; the target checks the value)."""
    opts = _target_options(args)
    if args.precision is not None:
        if "precision" in opts and opts["precision"] != args.precision:
            raise BadInput(f"--precision {printable(args.precision)} and --target-option "
                           f"precision={printable(str(opts['precision']))} disagree; give one of them")
        opts["precision"] = args.precision
    return opts


def _check_rows(check: dict) -> list[tuple]:
    """Terminal rows for the self-check: its inputs, NaNs both engines agree on, and for quantized graphs both
    engines' distance from the reference and the task-level agreement."""
    rows = [("checked on", check["inputs"])] if check.get("inputs") else []
    if check.get("note"):
        rows.append(("note", check["note"]))
    if "max_relative_error" in check:
        rows.append(("bf16 error vs " + check["reference"],
                     f"{check['max_relative_error']:.3g} of the largest output (bound {check['bound']:.3g})"))
    out = (check.get("outputs") or {}).get(check.get("worst_output")) or {}
    if "onnxruntime_optimized" in out:
        rows.append(("within one quant step", f"graphopt {out['graphopt']['within_one_step']:.2%}, onnxruntime-"
                                              f"optimized {out['onnxruntime_optimized']['within_one_step']:.2%}"))
    task = check.get("task")
    if task:
        a = task["agreement_with_fp32"]
        rows.append((f"top-1 = fp32 ({task['samples']} samples)", f"graphopt {a['graphopt']:.2%}, onnxruntime-"
                                                                  f"optimized {a['onnxruntime_optimized']:.2%}"))
    return rows


def cmd_run(args) -> int:
    import numpy as np
    from .artifact import Artifact
    from .outputs import check_output_file, write_file
    if args.outputs:
        check_output_file(Path(args.outputs), "--outputs")
    art = Artifact(args.artifact)
    feeds = _load_npz(args.inputs, "--inputs")
    outs = art.run(feeds, threads=args.threads)
    if args.outputs:
        def save(path):
            with open(path, "wb") as f:         # a file object: np.savez would append .npz to a name
                np.savez(f, **outs)
        write_file(Path(args.outputs), save, "--outputs")
    rows = [(k, "x".join(map(str, v.shape)), str(v.dtype), f"{float(np.mean(v)):.6g}" if v.size else "-")
            for k, v in outs.items()]
    _emit(args, {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outs.items()},
          _table(rows, ("output", "shape", "dtype", "mean")))
    return 0


def cmd_bench(args) -> int:
    from . import api
    res = api.bench(args.model, threads=args.threads, repeat=args.repeat, input_shapes=_shapes(args),
                    input_values=_values(args),
                    profile=args.profile)
    rows = [("graphopt", res["graphopt_ms"], res["ratio_to_onnxruntime"]), ("onnxruntime", res["onnxruntime_ms"], 1.0)]
    text = (f"{res['model']}  threads={res['threads'] or 'default'}  repeats={res['repeats']}\n"
            + _table(rows, ("engine", "median ms", "ratio")))
    if "profile" in res:
        from .profiling import profile_tables
        text += "".join(f"\n\n{title}\n{_table(rows, header)}"
                        for title, header, rows in profile_tables(res["profile"]))
    _emit(args, res, text)
    return 0


def cmd_inspect(args) -> int:
    from .inspect_model import inspect_model
    info = inspect_model(args.model, _shapes(args), _values(args))
    rows = [(layer["name"], layer["op"], layer["output_shape"], f"{layer['params']:,}", _macs_text(layer["macs"]))
            for layer in info["layers"]]
    macs = f"{info['macs']:,} MACs" if isinstance(info["macs"], int) else f"MACs = {info['macs']}"
    if info.get("macs_unknown_nodes"):
        macs += f" (+ {info['macs_unknown_nodes']} node(s) whose shapes stay unknown)"
    summary = (f"\n{info['nodes']} nodes, {info['params']:,} params, {macs}, opset {info['opset']}\n"
               f"ops: " + ", ".join(f"{k} {v}" for k, v in sorted(info["op_counts"].items())))
    inputs = "inputs: " + ", ".join(f"{i['name']} {i['dtype']}[{', '.join(map(str, i['shape']))}]"
                                    for i in info["inputs"])
    if "symbols" in info:
        inputs += "\nsymbols: " + ", ".join(
            f"{s['name']} = " + ", ".join(f"{w['input']}[{w['axis']}]" for w in s["inputs"])
            + (f" ('{printable(s['dim_param'])}')" if s["dim_param"] else "")
            + (f", fixed at {s['fixed']}" if s["fixed"] else "")
            for s in info["symbols"])
        summary += f"\nshapes: {info['shapes_note']}"
    _emit(args, info, inputs + "\n" + _table(rows, ("node", "op", "output", "params", "MACs")) + summary)
    return 0


def _macs_text(macs) -> str:
    return f"{macs:,}" if isinstance(macs, int) else str(macs)


def cmd_passes(args) -> int:
    """The passes and their options; with --target, the values "the target's" defaults take there."""
    from .passmanager import REGISTRY, load_passes
    load_passes()
    hw = None
    if args.target:
        from . import api
        hw = api.get_target(args.target, **_target_options(args)).hw()
    data = {}
    for name, cls in sorted(REGISTRY.items()):
        on = cls.target_defaults(hw) if hw is not None else {}
        data[name] = {"help": cls.help, "exact": not cls.lossy,
                      "options": {k: {"type": o.type.__name__, "default": o.default, "help": o.help,
                                      **({"on_target": on[k]} if k in on else {})}
                                  for k, o in cls.options.items()}}
    lines = [f"target {args.target}: {hw.summary()}"] if hw is not None else []
    for name, d in data.items():
        lines.append(f"{name}{' (exact)' if d['exact'] else ''}: {d['help']}")
        for k, o in d["options"].items():
            on = f" (on {args.target}: {o['on_target']!r})" if "on_target" in o else ""
            lines.append(f"    {k}: {o['type']} = {o['default']!r}{on}  {o['help']}")
    if hw is not None:
        data = {"target": {"name": args.target, **hw.describe()}, "passes": data}
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_profile(args) -> int:
    """The per-layer latency table a latency budget uses: ms at each measured channel count (* = not faster than a
    larger count, so never chosen)."""
    from .latency import profile_model
    if not Path(args.model).is_file():
        raise BadInput(f"{args.model}: no such model file")
    res = profile_model(args.model, args.target, _shapes(args), _target_options(args), progress=_progress(),
                        input_values=_values(args))
    rows = [(r["layer"], r["op"], r["axis"], r["channels"],
             " ".join(f"{k}:{ms:.3g}" + ("" if fast else "*") for k, ms, fast in r["ms"])) for r in res["layers"]]
    text = (f"latency table for {args.target} ({res['threads']} thread(s), channel step {res['step']}): "
            f"{res['table']}\n" + _table(rows, ("layer", "op", "axis", "channels", "ms at count (* not faster than "
                                                                                 "a larger count)"))
            + f"\nwhole model: {res['model_ms']:.3f} ms"
            + "".join(f"\n{s['layer']} ({s['op']}): {s['why']}" for s in res["skipped"]))
    _emit(args, res, text)
    return 0


def cmd_sensitivity(args) -> int:
    """Prune (and separately quantize) one layer group at a time; table, JSON, plot and report.html."""
    from .outputs import check_output_file, write_file
    from .sensitivity import SAMPLES, analyze, parse_levels, plot_png, report_html, table_rows
    if not Path(args.model).is_file():
        raise BadInput(f"{args.model}: no such model file")
    levels = () if args.no_prune else parse_levels(args.levels)
    if args.no_prune and args.no_quantize:
        raise BadInput("--no-prune with --no-quantize leaves nothing to measure: drop one of them")
    if args.samples is not None and args.samples < 1:
        raise BadInput(f"--samples must be at least 1, not {args.samples}")
    out = Path(args.out or Path(args.model).with_suffix(".sensitivity.json"))
    png, page = out.with_suffix(".png"), out.with_suffix(".html")
    for dest, suffix in ((out, ".json"), (png, ".png"), (page, ".html")):
        check_output_file(dest, "--out", suffix)
    data = _load_npz(args.eval, "--eval")
    res = analyze(args.model, data, target=args.target, levels=levels, quantize=not args.no_quantize,
                  quantize_options=args.quantize,
                  samples=args.samples or SAMPLES, seed=args.seed, input_shapes=_shapes(args),
                  input_values=_values(args),
                  target_options=_target_options(args), progress=_progress())
    from .artifact import json_text
    image = plot_png(res)
    write_file(out, lambda tmp: Path(tmp).write_text(json_text(res)), "--out", ".json")
    write_file(png, lambda tmp: Path(tmp).write_bytes(image), "--out", ".png")
    write_file(page, lambda tmp: Path(tmp).write_text(report_html(res, image)), "--out", ".html")
    head = ("group (node)", "channels", "level", "kept", "MACs", *(["latency"] if args.target else []),
            res["metric"], "drop")
    text = (f"{res['metric']} of the original: {res['baseline']:.4f} on {res['samples']} samples"
            + (" (cached)" if res["cached"] else "") + "\n" + _table(table_rows(res), head))
    if res["quantize"]:
        text += "\n\n" + _table([(q["node"], q["op"], f"{q['value']:.4f}" if "value" in q else "failed",
                                    f"{q['drop']:+.4f}" if "drop" in q else q["error"][:80])
                                   for q in res["quantize"]], ("int8 node", "op", res["metric"], "drop"))
    text += f"\n\nwrote {out}, {png} and {page}"
    _emit(args, {**res, "json": str(out), "png": str(png), "html": str(page)}, text)
    return 0


def cmd_tune(args) -> int:
    from . import api
    res = api.tune(args.model, target=args.target, db=args.db, trials=args.trials, input_shapes=_shapes(args),
                   input_values=_values(args),
                   rpc=args.rpc, key=args.key, progress=_progress(), target_options=_target_options(args))
    where = (f" on '{res['rpc']['key']}' via {res['rpc']['tracker']} ({res['rpc']['measured']} measured there)"
             if res.get("rpc") else "")
    _emit(args, res, f"tuned {res['tasks']} task(s), {res['trials']} trial(s){where}; records in {res['db']}")
    return 0


#: the only existing files `compress -o` replaces (a model it wrote before); a folder or any other file is refused
COMPRESS_REPLACES = ".onnx"


def cmd_compress(args) -> int:
    """graphopt compress; with --distributed, one process of a torchrun launch (rank 0 writes and reports)."""
    import onnx
    from .compress import Schedule, compress
    from .graph import to_onnx
    from .loading import load
    from .limits import parse_bytes
    from .outputs import check_output_file, write_file
    from .passmanager import PassManager
    if args.backend and not args.distributed:
        raise BadInput("--backend goes with --distributed")
    dest = Path(args.output)
    if not args.distributed or os.environ.get("RANK", "0") == "0":     # the process that will write it
        check_output_file(dest, "-o", COMPRESS_REPLACES)
    max_memory = parse_bytes(args.max_memory, "--max-memory") if args.max_memory else None
    if not args.checkpoint_every > 0:
        raise BadInput(f"--checkpoint-every must be a positive number of minutes, not {args.checkpoint_every:g}")
    dist = None
    if args.distributed:
        from .distributed import setup
        dist = setup(args.backend)
    try:
        rank0 = dist is None or dist.rank == 0
        pm = PassManager.parse(args.pipeline)
        original = load(args.model, input_shapes=_shapes(args), input_values=_values(args))
        names = [t.name for t in original.inputs]
        train = _load_data(args.train, "--train", args.preprocess, names)
        ev = _load_data(args.eval, "--eval", args.preprocess, names) if args.eval else None
        schedule = Schedule.from_options(key_values(args.schedule, "--schedule", "light_fraction=0.2"), "--schedule")
        graph, info = compress(original, train, pm, eval_data=ev, epochs=args.epochs, batch_size=args.batch_size,
                               lr=args.lr, seed=args.seed, log=_log if not args.json and rank0 else None,
                               distributed=args.distributed, threads=args.threads, progress=_progress(rank0),
                               micro_batch=args.micro_batch, resume=args.resume,
                               checkpoint_dir=args.checkpoint_dir or f"{dest}.ckpt",
                               checkpoint_every_s=60.0 * args.checkpoint_every, notice=_note,
                               max_memory=max_memory, schedule=schedule)
        if rank0:
            write_file(dest, lambda tmp: onnx.save_model(to_onnx(graph), str(tmp)), "-o", COMPRESS_REPLACES)
            final = info.get("final") or {}
            rows = [("output", str(dest))]
            if dist is not None:
                rows.append(("processes", f"{dist.world_size} ({dist.backend})"))
            rows += [("MACs ratio", f"{info['macs_ratio']:.3f}"), ("params ratio", f"{info['params_ratio']:.3f}")]
            rows += [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in final.items() if v is not None]
            rows += [(f"step {h['step']} {h['phase']}", f"macs={h['macs']:,}"
                      + (f" top1={h['top1']:.4f}" if h.get("top1") is not None else "")
                      + (f" cka={h['cka_penultimate']:.3f}" if h.get("cka_penultimate") is not None else ""))
                     for h in info["history"]]
            _emit(args, {"output": str(dest), **info}, _table(rows, ("compress", "")))
        if dist is not None:
            from .distributed import barrier
            barrier(dist)
    finally:
        if dist is not None:
            from .distributed import teardown
            teardown(dist)
    return 0


def cmd_build(args) -> int:
    from .build import build
    from .errors import CheckFailed
    try:
        summary = build(args.pipeline, log=_log, progress=_progress())
    except CheckFailed as e:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": str(e)}))
        raise
    m = summary["metrics"]
    rows = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in m.items()
            if not isinstance(v, dict) and v is not None]
    rows += [(f"gate {n}", "passed" if g["passed"] else "FAILED") for n, g in summary["gates"].items()]
    _emit(args, summary, f"artifact {summary['artifact']} (report.html beside it); cached: "
          f"{', '.join(summary['cached_stages']) or 'none'}\n" + _table(rows, ("metric", "value")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphopt", description="Model-graph compiler: ONNX/PyTorch in, verified passes, TVM out.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compile", help="run a pipeline and compile for a target")
    c.add_argument("model")
    c.add_argument("--target", default="cpu")
    c.add_argument("-o", "--output")
    c.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="target option, e.g. mcpu=haswell (cpu), vector_bits=512 (arm-sve) (repeatable)")
    c.add_argument("--precision", help="cpu: fp32 (default) or bf16 (conv / matmul with bf16 inputs and fp32 "
                                       "accumulation, AVX512-BF16; checked against float64 with a bf16 bound)")
    c.add_argument("--pipeline", help="pipeline text, e.g. cleanup,fold-batchnorm")
    c.add_argument("--config", help="pipeline TOML with [[pass]] entries")
    _add_shapes(c)
    c.add_argument("--calib", help="calibration data (.npz: arrays named after the inputs; for an input of shape S, "
                                   "[N, *S] with N samples on an added axis, or batch-first [N, *S[1:]] when S "
                                   "starts with 1)")
    c.add_argument("--eval", help="evaluation data (.npz: the inputs, and labels when there are some) for "
                                   "accuracy-aware passes (quantize{max_drop=P}: top-1 with labels, else agreement "
                                   "with the fp32 graph)")
    c.add_argument("--check-inputs", metavar="FILE.npz",
                   help="inputs for the self-check against onnxruntime (arrays named after the inputs; for an input "
                        "of shape S, [N, *S] or batch-first [N, *S[1:]]; default: the first --eval or --calib "
                        "sample, else seeded inputs within the ranges the model takes)")
    c.add_argument("--tuning-db", help="MetaSchedule database folder from `graphopt tune`")
    c.add_argument("--threads", type=int, help="threads for the latency measurement")
    c.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("run", help="run a compiled artifact on inputs from an .npz file")
    r.add_argument("artifact")
    r.add_argument("--inputs", required=True)
    r.add_argument("--outputs")
    r.add_argument("--threads", type=int)
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_run)

    b = sub.add_parser("bench", help="graphopt vs onnxruntime latency, same model, same threads")
    b.add_argument("model", help="artifact folder or ONNX file")
    b.add_argument("--threads", type=int)
    b.add_argument("--repeat", type=int, default=50)
    b.add_argument("--profile", action="store_true",
                   help="also time every kernel of both engines (per op type, top kernels, same ONNX node side by side)")
    _add_shapes(b)
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_bench)

    i = sub.add_parser("inspect", help="ops, shapes, params and MACs per layer (without --input-shape, dynamic "
                                       "dimensions are symbols and shapes and MACs formulas in them)")
    i.add_argument("model")
    _add_shapes(i)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    ps = sub.add_parser("passes", help="list passes and their options")
    ps.add_argument("--target", help="also show the defaults each pass takes on this target (cpu, cuda, arm-sve)")
    ps.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                    help="target option, e.g. mcpu=haswell (cpu), vector_bits=512 (arm-sve) (repeatable)")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(fn=cmd_passes)

    pf = sub.add_parser("profile", help="per-layer latency table on the compiled target at a few channel counts "
                                        "(what prune-channels{latency=...} uses; cached)")
    pf.add_argument("model")
    pf.add_argument("--target", default="cpu")
    pf.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                    help="target option, e.g. mcpu=haswell (repeatable)")
    pf.add_argument("--threads", type=int, help="threads the kernels run with (default: all cores)")
    _add_shapes(pf)
    pf.add_argument("--json", action="store_true")
    pf.set_defaults(fn=cmd_profile)

    sn = sub.add_parser("sensitivity", help="accuracy lost when one layer group at a time is pruned (at several "
                                            "levels) or quantized; feeds prune-channels{allocation=sensitivity} and "
                                            "quantize{exclude=auto}")
    sn.add_argument("model")
    sn.add_argument("--eval", required=True, help="evaluation data (.npz: arrays named after the inputs, batch "
                                                   "first; with 'labels' the score is top-1 accuracy, else the "
                                                   "agreement with the original)")
    sn.add_argument("--target", help="also predict each variant's latency on this target (its latency table)")
    sn.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                    help="target option, e.g. mcpu=haswell (repeatable)")
    sn.add_argument("--levels", default="0.25,0.5,0.75", help="fractions of a group's channels pruned (default "
                                                              "0.25,0.5,0.75)")
    sn.add_argument("--no-quantize", action="store_true", help="skip the per-layer int8 runs")
    sn.add_argument("--no-prune", action="store_true", help="skip the pruning runs (only the per-layer int8 runs)")
    sn.add_argument("--quantize", metavar="OPTIONS", help="quantize options of the per-layer int8 runs, as the "
                                                           "pass takes them (e.g. 'calibration=percentile,"
                                                           "percentile=99.99'): the calibration the int8 model "
                                                           "will use")
    sn.add_argument("--samples", type=int, help="evaluation samples used (default 512)")
    sn.add_argument("--seed", type=int, default=0)
    sn.add_argument("--threads", type=int, help="threads for the latency table")
    sn.add_argument("--out", metavar="FILE.json", help="results (default MODEL.sensitivity.json beside the model); "
                                                     "FILE.png (the plot) and FILE.html (report) beside it")
    _add_shapes(sn)
    sn.add_argument("--json", action="store_true")
    sn.set_defaults(fn=cmd_sensitivity)

    t = sub.add_parser("tune", help="tune with MetaSchedule into a persistent database")
    t.add_argument("model")
    t.add_argument("--target", default="cpu")
    t.add_argument("--db", required=True)
    t.add_argument("--trials", type=int, default=64)
    t.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="target option, e.g. mcpu=haswell cores=4: with --rpc, those of the device (repeatable)")
    _add_shapes(t)
    t.add_argument("--rpc", metavar="HOST:PORT", help="TVM RPC tracker to measure candidates on a device through")
    t.add_argument("--key", help="device key the device's RPC server registered at the tracker")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_tune)

    cp = sub.add_parser("compress", help="lossy passes with distillation from the original model")
    cp.add_argument("model")
    cp.add_argument("--train", required=True,
                    help="training data: .npz (arrays named after the inputs; labels optional: the teacher supplies "
                         "the targets), or a folder / .txt of lines with --preprocess")
    cp.add_argument("--eval", help="held-out data, as --train; without labels the report gives agreement with the "
                                   "teacher (top-1, decoded sequences or map IoU, by the output's kind)")
    cp.add_argument("--preprocess", metavar="FILE.py:FUNCTION",
                    help="turns each file of a --train/--eval folder (or each line of a .txt) into the model's "
                         "input arrays (see graphopt/folder_data.py)")
    cp.add_argument("--pipeline", required=True)
    cp.add_argument("--epochs", type=int, default=None, help="over the whole schedule (default 60)")
    cp.add_argument("--batch-size", type=int, default=64, help="global batch (split over --distributed processes)")
    cp.add_argument("--lr", type=float, default=None, help="peak learning rate of each phase (default 1e-2)")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--micro-batch", type=int, default=32,
                    help="examples per forward/backward pass, gradients accumulated to --batch-size (default 32; "
                         "runs with the same value agree bit for bit on 1 or N processes)")
    cp.add_argument("--checkpoint-dir", help="checkpoints of this run (default: OUT.ckpt beside -o; removed when "
                                             "the run completes)")
    cp.add_argument("--checkpoint-every", type=float, default=5.0, metavar="MINUTES",
                    help="save the training state this often within a phase (default 5; every phase end is saved)")
    cp.add_argument("--resume", action="store_true",
                    help="continue the interrupted run saved in the checkpoint folder (same result as uninterrupted)")
    cp.add_argument("--threads", type=int, help="torch threads while training (small models: 1 is fastest)")
    cp.add_argument("--schedule", action="append", default=[], metavar="KEY=VALUE",
                    help="a compress.Schedule setting, e.g. light_fraction=0.2 fine_fraction=0.2 (repeatable; "
                         "see the README's compress section)")
    cp.add_argument("--max-memory", metavar="SIZE",
                    help="memory training may use, e.g. 4G (default: what is available); a smaller micro-batch "
                         "is used when the estimate does not fit")
    cp.add_argument("--backend", choices=("gloo", "nccl"),
                    help="with --distributed: the torch.distributed backend (default nccl on GPUs, else gloo)")
    cp.add_argument("--distributed", action="store_true",
                    help="several processes under torchrun (gloo on CPU, nccl on GPUs); results equal one process's")
    cp.add_argument("-o", "--output", required=True,
                    help="the compressed model; an existing .onnx file is replaced, a folder or other file refused")
    _add_shapes(cp)
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(fn=cmd_compress)

    bd = sub.add_parser("build", help="deployment pipeline from a TOML file, with quality gates")
    bd.add_argument("pipeline", help="PIPELINE.toml")
    bd.add_argument("--json", action="store_true")
    bd.set_defaults(fn=cmd_build)
    for sp in sub.choices.values():     # --debug after the subcommand too (`graphopt compile ... --debug`)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:       # name the subcommand whose --help lists the valid options
        sub = getattr(args, "command", None)
        print(f"graphopt: error: unrecognized arguments: {printable(' '.join(extra), None)} "
              f"(see graphopt{' ' + sub if sub else ''} --help)", file=sys.stderr)
        return 2
    from .quiet import quiet_libraries
    try:
        with quiet_libraries(args.debug):
            if getattr(args, "threads", None) is not None:
                os.environ["TVM_NUM_THREADS"] = str(check_threads(args.threads))
            return args.fn(args)
    except GraphoptError as e:      # every message is printed on one line, whatever user text it holds
        if args.debug:
            raise
        print(f"graphopt: error: {printable(e, None)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: still one line, with the way to see more
        if args.debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"graphopt: internal error: {type(e).__name__}: {printable(first, None)} (rerun with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1


def distributed_main(argv=None) -> int:
    """`python -m graphopt.distributed compress ...`: `graphopt compress --distributed ...` in each process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "compress":
        print("usage: torchrun [torchrun options] -m graphopt.distributed compress MODEL --train TRAIN.npz "
              "--pipeline TEXT -o OUT.onnx [graphopt compress options] [--backend gloo|nccl]", file=sys.stderr)
        return 2
    return main(["compress", *argv[1:], "--distributed"])


if __name__ == "__main__":
    sys.exit(main())
