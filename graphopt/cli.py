"""Command line: graphopt compile | run | bench | inspect | passes | tune.
Errors are one line on stderr with exit code 2 (bad input) or 1 (a check failed); --debug shows tracebacks."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import BadInput, GraphoptError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sub = self.prog.split()[1:]      # "graphopt compile" -> ["compile"]; the top-level parser has none
        self.exit(2, f"graphopt: error: {message} (see {' '.join(['graphopt', *sub[-1:]])} --help)\n")


def _add_shapes(p):
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="bind an input's dynamic dimensions (repeatable)")


def _shapes(args) -> dict:
    from .shapes import parse_shape_arg
    out = {}
    for text in args.input_shape:
        name, shape = parse_shape_arg(text)
        out[name] = shape
    return out


def _target_options(args) -> dict:
    from .pipeline_text import _value
    out = {}
    for text in getattr(args, "target_option", []):
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--target-option '{text}' is malformed; write KEY=VALUE (for example mcpu=haswell)")
        out[key.strip()] = _value(value)
    return out


def _interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def _log(msg: str) -> None:
    if _interactive():
        print(f"graphopt: {msg}", file=sys.stderr)


def _progress(enabled: bool = True):
    """Progress for calibration, training and tuning on stderr: a bar on a terminal, plain lines otherwise."""
    from .progress import Progress
    return Progress.for_stream(sys.stderr, enabled=enabled)


def _emit(args, data: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(text)


def _table(rows: list[tuple], header: tuple) -> str:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def _load_npz(path: str, what: str) -> dict:
    import numpy as np
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{p}: no such file ({what} must be an .npz file)")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise BadInput(f"{p}: not a readable .npz file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


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
    art = api.compile(args.model, target=args.target, out=out, pipeline=pm, input_shapes=_shapes(args),
                      tuning_db=args.tuning_db, threads=args.threads, measure=not args.no_bench, log=_log, data=data,
                      target_options=_target_options(args), progress=_progress())
    rep = art.report
    rows = [("artifact", str(art.path)), ("target", json.dumps(art.manifest["target"].get("llvm_mcpu", args.target))),
            ("pipeline", art.manifest["pipeline"]["text"] or "(none)"), ("ops", rep["ops"]),
            ("params", f"{rep['params_before']:,} -> {rep['params_after']:,}"),
            ("MACs", f"{rep['macs_before']:,} -> {rep['macs_after']:,}"),
            ("model.onnx bytes", f"{rep['model_bytes']:,}"), ("compile s", rep["compile_seconds"]),
            ("max |err| vs onnxruntime", f"{rep['check']['max_abs_error']:.3g} (ok)" if rep["check"]["ok"]
             else rep["check"].get("skipped", "not checked"))]
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
    text = _table(rows, ("report", "")) + "".join("\n\n" + _pruning_text(p) for p in rep.get("pruning", [])) \
        + "".join("\n\n" + _factorization_text(f) for f in rep.get("factorization", []))
    _emit(args, {"artifact": str(art.path), "report": rep, "manifest": art.manifest}, text)
    return 0


def _factorization_text(f: dict, max_rows: int = 12) -> str:
    """The terminal summary of one factorize-lowrank run: layers, ranks, reconstruction errors, drift."""
    rows = [(x["node"], x["method"], "x".join(map(str, x["ranks"])), f"{x['macs_after'] / max(1, x['macs_before']):.2f}",
             f"{x['rel_error']:.3g}") for x in f.get("layers", [])[:max_rows]]
    head = (f"factorize-lowrank ({f.get('selection')}): MACs x{f.get('macs_ratio')}, params x{f.get('params_ratio')}; "
            f"{f.get('factorized', 0)} layer(s) factorized, {len(f.get('skipped', []))} left alone")
    tail = [f"output drift on '{name}': max abs {d['max_abs']:.3g}, cosine {d['cosine']:.6f}"
            for name, d in (f.get("drift") or {}).items() if isinstance(d, dict) and "max_abs" in d]
    return "\n".join([head, _table(rows, ("layer", "method", "ranks", "MACs", "rel. error"))] + tail)


def _pruning_text(p: dict, max_rows: int = 12) -> str:
    """The terminal summary of one prune-channels run: changed layers, frozen layers and why, the oracle."""
    changed = [(k, b, a) for k, (b, a) in p.get("layers", {}).items() if a != b]
    rows = [(k, b, a, f"{a / b:.2f}") for k, b, a in changed[:max_rows]]
    if len(changed) > max_rows:
        rows.append((f"... {len(changed) - max_rows} more layers (report.json)", "", "", ""))
    lines = [f"prune-channels ({p.get('criterion')}): MACs x{p['macs']['ratio']}, params x{p['params']['ratio']}; "
             f"{len(changed)} of {len(p.get('layers', {}))} layers narrowed",
             _table(rows, ("layer", "channels", "kept", "ratio")) if rows else "(no layer narrowed)"]
    for f in p.get("frozen", [])[:5]:
        lines.append(f"frozen: {f['layer']}: {'; '.join(f['why'])}")
    if len(p.get("frozen", [])) > 5:
        lines.append(f"frozen: ... {len(p['frozen']) - 5} more (report.json)")
    if "oracle_max_error" in p:
        lines.append(f"oracle (zeroed original == pruned, onnxruntime): max error {p['oracle_max_error']:.3g}"
                     + (f"; {p['oracle_note']}" if p.get("oracle_note") else ""))
    return "\n".join(lines)


def cmd_run(args) -> int:
    import numpy as np
    from .artifact import Artifact
    art = Artifact(args.artifact)
    feeds = _load_npz(args.inputs, "--inputs")
    outs = art.run(feeds, threads=args.threads)
    if args.outputs:
        dest = Path(args.outputs)
        tmp = dest.with_name(f".{dest.name}.tmp.npz")
        np.savez(tmp, **outs)
        os.replace(tmp, dest)
    rows = [(k, "x".join(map(str, v.shape)), str(v.dtype), f"{float(np.mean(v)):.6g}" if v.size else "-")
            for k, v in outs.items()]
    _emit(args, {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outs.items()},
          _table(rows, ("output", "shape", "dtype", "mean")))
    return 0


def cmd_bench(args) -> int:
    from . import api
    res = api.bench(args.model, threads=args.threads, repeat=args.repeat, input_shapes=_shapes(args))
    rows = [("graphopt", res["graphopt_ms"], res["ratio_to_onnxruntime"]), ("onnxruntime", res["onnxruntime_ms"], 1.0)]
    _emit(args, res, f"{res['model']}  threads={res['threads'] or 'default'}  repeats={res['repeats']}\n"
          + _table(rows, ("engine", "median ms", "ratio")))
    return 0


def cmd_inspect(args) -> int:
    from .inspect_model import inspect_model
    info = inspect_model(args.model, _shapes(args))
    rows = [(layer["name"], layer["op"], layer["output_shape"], f"{layer['params']:,}", f"{layer['macs']:,}")
            for layer in info["layers"]]
    summary = (f"\n{info['nodes']} nodes, {info['params']:,} params, {info['macs']:,} MACs, opset {info['opset']}\n"
               f"ops: " + ", ".join(f"{k} {v}" for k, v in sorted(info["op_counts"].items())))
    inputs = "inputs: " + ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in info["inputs"])
    _emit(args, info, inputs + "\n" + _table(rows, ("node", "op", "output", "params", "MACs")) + summary)
    return 0


def cmd_passes(args) -> int:
    from .passmanager import REGISTRY, load_builtin_passes
    load_builtin_passes()
    data = {name: {"help": cls.help, "exact": cls.exact,
                   "options": {k: {"type": o.type.__name__, "default": o.default, "help": o.help}
                               for k, o in cls.options.items()}} for name, cls in sorted(REGISTRY.items())}
    lines = []
    for name, d in data.items():
        lines.append(f"{name}{' (exact)' if d['exact'] else ''}: {d['help']}")
        for k, o in d["options"].items():
            lines.append(f"    {k}: {o['type']} = {o['default']!r}  {o['help']}")
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_tune(args) -> int:
    from . import api
    res = api.tune(args.model, target=args.target, db=args.db, trials=args.trials, input_shapes=_shapes(args),
                   rpc=args.rpc, key=args.key, progress=_progress(), target_options=_target_options(args))
    where = (f" on '{res['rpc']['key']}' via {res['rpc']['tracker']} ({res['rpc']['measured']} measured there)"
             if res.get("rpc") else "")
    _emit(args, res, f"tuned {res['tasks']} task(s), {res['trials']} trial(s){where}; records in {res['db']}")
    return 0


def cmd_compress(args) -> int:
    import onnx
    from .compress import compress
    from .graph import to_onnx
    from .loading import load
    from .passmanager import PassManager
    pm = PassManager.parse(args.pipeline)
    original = load(args.model, input_shapes=_shapes(args))
    train = _load_npz(args.train, "--train")
    ev = _load_npz(args.eval, "--eval") if args.eval else None
    rank0 = True
    if args.distributed:
        from .distributed import setup
        rank0 = setup().rank == 0
    graph, info = compress(original, train, pm, eval_data=ev, epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, seed=args.seed, log=_log if not args.json and rank0 else None,
                           distributed=args.distributed, threads=args.threads, progress=_progress(rank0))
    if not rank0:                       # torchrun: rank 0 writes the output and reports
        return 0
    dest = Path(args.output)
    tmp = dest.with_name(f".{dest.name}.tmp")
    onnx.save_model(to_onnx(graph), str(tmp))
    os.replace(tmp, dest)
    final = info.get("final") or {}
    rows = [("output", str(dest)), ("MACs ratio", f"{info['macs_ratio']:.3f}"), ("params ratio", f"{info['params_ratio']:.3f}")]
    rows += [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in final.items() if v is not None]
    rows += [(f"step {h['step']} {h['phase']}", f"macs={h['macs']:,}" + (f" top1={h['top1']:.4f}" if h.get("top1") is not None else "")
              + (f" cka={h['cka_penultimate']:.3f}" if h.get("cka_penultimate") is not None else ""))
             for h in info["history"]]
    _emit(args, {"output": str(dest), **info}, _table(rows, ("compress", "")))
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
    c.add_argument("--pipeline", help="pipeline text, e.g. cleanup,fold-batchnorm")
    c.add_argument("--config", help="pipeline TOML with [[pass]] entries")
    _add_shapes(c)
    c.add_argument("--calib", help="calibration data (.npz)")
    c.add_argument("--eval", help="evaluation data (.npz, inputs + labels) for accuracy-aware passes")
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
    _add_shapes(b)
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_bench)

    i = sub.add_parser("inspect", help="ops, shapes, params and MACs per layer")
    i.add_argument("model")
    _add_shapes(i)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    ps = sub.add_parser("passes", help="list passes and their options")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(fn=cmd_passes)

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
    cp.add_argument("--train", required=True, help="training data .npz (arrays named after inputs, optional labels)")
    cp.add_argument("--eval", help="held-out data .npz (inputs and labels)")
    cp.add_argument("--pipeline", required=True)
    cp.add_argument("--epochs", type=int, default=None, help="over the whole schedule (default 60)")
    cp.add_argument("--batch-size", type=int, default=64, help="global batch (split over --distributed processes)")
    cp.add_argument("--lr", type=float, default=None, help="peak learning rate of each phase (default 1e-2)")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--threads", type=int, help="torch threads while training (small models: 1 is fastest)")
    cp.add_argument("--distributed", action="store_true",
                    help="several processes under torchrun (DDP; gloo on CPU, nccl on GPUs)")
    cp.add_argument("-o", "--output", required=True)
    _add_shapes(cp)
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(fn=cmd_compress)

    bd = sub.add_parser("build", help="deployment pipeline from a TOML file, with quality gates")
    bd.add_argument("pipeline", help="PIPELINE.toml")
    bd.add_argument("--json", action="store_true")
    bd.set_defaults(fn=cmd_build)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:       # name the subcommand whose --help lists the valid options
        sub = getattr(args, "command", None)
        print(f"graphopt: error: unrecognized arguments: {' '.join(extra)} "
              f"(see graphopt{' ' + sub if sub else ''} --help)", file=sys.stderr)
        return 2
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            print("graphopt: error: --threads must be at least 1", file=sys.stderr)
            return 2
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    try:
        return args.fn(args)
    except GraphoptError as e:
        if args.debug:
            raise
        print(f"graphopt: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: still one line, with the way to see more
        if args.debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"graphopt: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
