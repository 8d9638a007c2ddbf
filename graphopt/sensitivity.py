"""`graphopt sensitivity`: how much each layer group's accuracy suffers when it alone is pruned (at several levels) or
quantized, and, with a target, what that pruning saves in latency (the target's latency table, graphopt.latency).

For every channel group prune-channels can shrink (the channel-groups analysis; a group is the channels one or more
layers must lose together, named by the first node producing them), the group alone is pruned at each level (the
fraction of its prunable channels removed; the criterion ranks the channels) with
`prune-channels{ratio=LEVEL,only=[NODE],round_to=1}`; for every Conv / Gemm / MatMul, the graph is quantized with
only that node in int8 (`quantize{exclude_nodes=[every other one]}`, calibrated on the evaluation inputs). Each
variant is scored on the evaluation data: top-1 accuracy when it holds `labels`, else the agreement with the
original (graphopt.task_metrics: top-1 agreement, decoded-sequence agreement or map IoU, by the output's kind);
`drop` is the baseline's score minus the variant's (positive: worse).

The results (a JSON dict, see analyze()) feed prune-channels{allocation=sensitivity,sensitivity=FILE} and
quantize_excludes(). They are cached like the latency tables: $GRAPHOPT_CACHE_DIR/sensitivity/KEY.json (default
~/.cache/graphopt/), KEY the sha256 of the cleaned model, the data, the levels and the options; a file whose content
does not match its sha256 is not trusted (a warning, then measured again).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np

from . import verified_json
from .version import __version__
from .errors import BadInput, GraphoptError, printable

FORMAT = 1
LEVELS = (0.25, 0.5, 0.75)
SAMPLES = 512
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def parse_levels(text: str) -> tuple[float, ...]:
    """'0.25,0.5,0.75' -> (0.25, 0.5, 0.75); each a fraction in (0, 1). Raises BadInput."""
    try:
        levels = tuple(sorted({float(x) for x in str(text).split(",") if x.strip()}))
    except ValueError:
        levels = ()
    if not levels or not all(0.0 < v < 1.0 for v in levels):
        raise BadInput(f"--levels {printable(text)}: give fractions of a layer's channels to remove, each in (0, 1), "
                       f"separated by commas (for example 0.25,0.5,0.75)")
    return levels


def _split(data: dict, names: list[str], samples: int) -> tuple[dict, np.ndarray | None]:
    from .data_checks import check_finite, check_labels
    missing = [n for n in names if n not in data]
    if missing:
        raise BadInput(f"evaluation data lacks input(s) {', '.join(map(printable, missing))}; it has: "
                       f"{', '.join(printable(k) for k in sorted(data)) or 'nothing'}")
    inputs = {n: np.asarray(data[n])[:samples] for n in names}
    n = len(next(iter(inputs.values())))
    if any(len(a) != n for a in inputs.values()) or n == 0:
        raise BadInput("evaluation data: the input arrays are empty or have different lengths (axis 0)")
    check_finite(inputs, "evaluation data")
    labels = data.get("labels")
    if labels is not None:
        labels = check_labels(np.asarray(labels)[:samples], None, "evaluation data")
        if len(labels) != n:
            raise BadInput(f"evaluation data: {len(labels)} labels for {n} examples")
    return inputs, labels


def _data_digest(inputs: dict, labels) -> str:
    h = hashlib.sha256()
    for k in sorted(inputs):
        a = np.ascontiguousarray(inputs[k])
        h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def cache_path(key: str, root: Path | None = None) -> Path:
    from .latency import cache_dir
    return Path(root or cache_dir().parent) / "sensitivity" / f"{key[:40]}.json"


def _groups(graph, ctx) -> list[dict]:
    """The channel groups with at least two prunable channels: name, the node they are pruned through (the first
    weighted producer), channels and prunable channels."""
    g = ctx.analyses.get("channel-groups", graph)
    out = []
    for lay in g.layers:
        free = [k for k in lay.units if not g.units[k].frozen]
        if len(free) < 2:
            continue
        producers = [s for k in lay.units for s in g.units[k].sources]
        node = next((n for n in producers if any(x.name == n and x.op in WEIGHTED for x in graph.nodes)), None)
        if node is None:
            continue
        out.append({"name": lay.name, "node": node, "channels": len(lay.units), "prunable": len(free)})
    return out


def analyze(model, eval_data: dict, target: str | None = None, levels=LEVELS, quantize: bool = True,
            quantize_options: str | None = None, samples: int = SAMPLES, seed: int = 0, criterion: str = "l1",
            input_shapes: dict | None = None,
            input_values: dict | None = None,
            target_options: dict | None = None, progress=None, cache_root: Path | None = None) -> dict:
    """The sensitivity table of model (a path, ModelProto or Graph) on eval_data ({input: array [N, ...]}, optional
    'labels'). Returns {"format", "model", "metric", "baseline", "samples", "levels", "target", "groups": [{"name",
    "node", "channels", "prunable", "levels": [{"level", "kept", "macs", "latency", "value", "drop"}]}],
    "quantize": [{"node", "op", "value", "drop"} or {"node", "op", "error"}], "cached"}. quantize_options: the
    quantize pass's options for the per-layer int8 runs, as pipeline text takes them ("calibration=percentile,
    percentile=99.99"); levels (): no pruning runs."""
    from . import distill
    from .graph import copy as copy_graph, to_onnx
    from .loading import load
    from .passmanager import PassContext, PassManager
    import onnx_graphsurgeon as gs
    if not isinstance(eval_data, dict):
        raise BadInput("evaluation data: expected arrays named after the model's inputs (an .npz file)")
    graph = copy_graph(model) if isinstance(model, gs.Graph) else load(model, input_shapes=input_shapes,
                                                                       input_values=input_values)
    hw = None
    if target:
        from . import api
        hw = api.get_target(target, **(target_options or {})).hw()

    def context(data=None):
        return PassContext(target=target, hw=hw, seed=seed, verify="structural", data=data,
                           target_options=target_options)
    quant_given = {}
    if quantize_options:
        quant_given = dict(PassManager.parse(f"quantize{{{quantize_options}}}").passes[0].given)
        for key in ("exclude_nodes", "exclude", "qat", "max_drop"):
            if key in quant_given:
                raise BadInput(f"--quantize: '{key}' is chosen per layer by the sensitivity runs; leave it out")
    graph = PassManager.parse("cleanup").run(graph, context()).graph
    inputs, labels = _split(eval_data, [t.name for t in graph.inputs], samples)
    key_doc = {"format": FORMAT, "graphopt": __version__,
               "model": hashlib.sha256(to_onnx(graph).SerializeToString(deterministic=True)).hexdigest(),
               "data": _data_digest(inputs, labels), "levels": list(levels), "quantize": quantize,
               "quantize_options": quantize_options or "", "seed": seed,
               "criterion": criterion, "target": target, "target_options": target_options or {}}
    if target:
        from .latency import Cache, threads_used
        key_doc.update(machine=Cache(api.get_target(target, **(target_options or {})), cache_root).machine,
                       threads=threads_used())
    path = cache_path(verified_json.digest(key_doc), cache_root)
    if path.exists():
        body, problem = verified_json.read(path)
        if problem is None and isinstance(body, dict) and body.get("key") == key_doc:
            return dict(body["result"], cached=True)
        warnings.warn(f"graphopt: sensitivity results {path} are not trusted ({problem or 'another key'}); "
                      f"measuring again")

    base = distill.evaluate(graph, inputs, labels, teacher=graph)
    metric = "top1" if labels is not None else base["agreement_metric"] or "agreement"

    def score(g) -> float:
        res = distill.evaluate(g, inputs, labels, teacher=None if labels is not None else graph)
        return float(res["top1"] if labels is not None else res["agreement"])
    baseline = float(base["top1"] if labels is not None else base["agreement"])
    groups = _groups(graph, context())
    weighted = [n for n in graph.nodes
                if n.op in WEIGHTED and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant)]
    total = len(groups) * len(levels) + (len(weighted) if quantize else 0)
    with (progress.task("sensitivity", total) if progress is not None
          else contextlib.nullcontext(lambda *a, **k: None)) as update:
        done = 0
        for grp in groups:
            grp["levels"] = []
            for level in levels:
                step = {"name": "prune-channels", "criterion": criterion, "ratio": float(level), "only": [grp["node"]],
                        "round_to": 1, "max_layer_ratio": max(levels), "verify_oracle": False,
                        "predict_latency": bool(target)}
                res = PassManager.from_steps([step]).run(copy_graph(graph), context())
                rec = res.records[0]["info"]
                kept = rec["units"]["prunable"] - rec["units"]["removed"]
                entry = {"level": float(level), "kept": int(kept), "macs": rec["macs"]["ratio"]}
                if target:
                    entry["latency"] = rec["latency"]["predicted"]
                entry["value"] = score(res.graph)
                entry["drop"] = round(baseline - entry["value"], 6)
                grp["levels"].append(entry)
                done += 1
                update(done, f"{grp['node']} at {level:g}")
        quant = []
        if quantize:
            names = [n.name for n in weighted]
            with tempfile.TemporaryDirectory(prefix="graphopt-sensitivity-") as ranges:   # one calibration for all
                for n in weighted:
                    step = {"name": "quantize", **quant_given, "exclude_nodes": [m for m in names if m != n.name]}
                    try:
                        res = PassManager.from_steps([step]).run(copy_graph(graph), context(
                            {"calib": inputs, "calibration_cache": ranges}))
                        v = score(res.graph)
                        quant.append({"node": n.name, "op": n.op, "value": v, "drop": round(baseline - v, 6)})
                    except GraphoptError as e:
                        quant.append({"node": n.name, "op": n.op, "error": printable(e, 200)})
                    done += 1
                    update(done, f"int8 {n.name}")
    result = {"format": FORMAT, "model": str(model) if isinstance(model, (str, Path)) else "model",
              "metric": metric, "baseline": baseline, "samples": len(next(iter(inputs.values()))),
              "levels": list(levels), "target": target, "groups": groups, "quantize": quant}
    verified_json.write(path, {"key": key_doc, "result": result})
    return dict(result, cached=False)


def results_for(pass_name: str, path: str, ctx, why: str) -> dict:
    """The sensitivity results a pass uses: the JSON file `path` (`graphopt sensitivity --json`) when given, else
    ctx.data['sensitivity']. BadInput names the pass and says what to give; `why` is the option that needs them."""
    if path:
        import json
        try:
            return json.loads(Path(path).read_text())
        except OSError as e:
            raise BadInput(f"pass '{pass_name}': sensitivity={printable(path)}: cannot read it ({e.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadInput(f"pass '{pass_name}': sensitivity={printable(path)} is not the JSON `graphopt "
                           f"sensitivity` writes") from None
    data = (getattr(ctx, "data", None) or {}).get("sensitivity")
    if data is None:
        raise BadInput(f"pass '{pass_name}': {why} needs the results of `graphopt sensitivity`: give "
                       f"sensitivity=FILE.json (or ctx.data['sensitivity'])")
    return data


def quantize_excludes(results: dict, threshold: float) -> list[str]:
    """The nodes whose quantization alone costs more than `threshold` of the metric (e.g. 0.005 = half a point of
    top-1): what quantize{exclude=auto} leaves in fp32. Nodes the quantizer failed on are excluded too."""
    out = []
    for q in results.get("quantize", []):
        if "error" in q or (q.get("drop") is not None and q["drop"] > threshold):
            out.append(q["node"])
    return out


def table_rows(results: dict) -> list[tuple]:
    """(group node, channels, level, kept, MACs, [latency,] score, drop) rows, most sensitive groups first."""
    rows = []
    lat = bool(results.get("target"))
    for g in sorted(results["groups"], key=lambda g: -max((x["drop"] for x in g["levels"]), default=0.0)):
        for x in g["levels"]:
            rows.append((g["node"], g["channels"], f"{x['level']:g}", x["kept"], f"{x['macs']:.3f}",
                         *([f"{x['latency']:.3f}"] if lat else []), f"{x['value']:.4f}", f"{x['drop']:+.4f}"))
    return rows


def plot_png(results: dict) -> bytes:
    """Two panels: drop against pruning level per group (the ten most sensitive labelled), and the drop of
    quantizing each layer alone."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    ranked = sorted(results["groups"], key=lambda g: -max((x["drop"] for x in g["levels"]), default=0.0))
    for i, g in enumerate(ranked):
        xs = [0.0] + [x["level"] for x in g["levels"]]
        ys = [0.0] + [x["drop"] for x in g["levels"]]
        ax.plot(xs, ys, marker="o", lw=1.2, alpha=0.9 if i < 10 else 0.3,
                label=g["node"][-40:] if i < 10 else None)
    ax.set_xlabel("fraction of the group's channels pruned")
    ax.set_ylabel(f"{results['metric']} lost")
    ax.set_title("pruning one group at a time")
    if ranked:
        ax.legend(fontsize=6, loc="upper left")
    ax = axes[1]
    q = [x for x in results.get("quantize", []) if "drop" in x]
    if q:
        ax.barh(range(len(q)), [x["drop"] for x in q])
        ax.set_yticks(range(len(q)), [x["node"][-30:] for x in q], fontsize=6)
        ax.invert_yaxis()
    ax.set_xlabel(f"{results['metric']} lost")
    ax.set_title("int8 on one layer at a time")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def report_html(results: dict, png: bytes) -> str:
    lat = bool(results.get("target"))
    head = ["group (node)", "channels", "level", "kept", "MACs", *(["latency"] if lat else []), results["metric"],
            "drop"]
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in table_rows(results))
    quant = "".join(f"<tr><td>{html.escape(q['node'])}</td><td>{html.escape(q['op'])}</td><td>"
                    + (f"{q['value']:.4f}</td><td>{q['drop']:+.4f}" if "drop" in q
                       else f"failed</td><td>{html.escape(q['error'])}") + "</td></tr>"
                    for q in results.get("quantize", []))
    img = base64.b64encode(png).decode()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>graphopt sensitivity</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}}</style></head><body>
<h1>graphopt sensitivity: {html.escape(str(results['model']))}</h1>
<p>{html.escape(results['metric'])} of the original: {results['baseline']:.4f} on {results['samples']} samples;
levels {', '.join(f'{v:g}' for v in results['levels'])}{'; latency on ' + html.escape(results['target'])
                                                       if lat else ''}</p>
<img alt="sensitivity plot" src="data:image/png;base64,{img}">
<h2>Pruning one group at a time</h2>
<table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>{rows}</table>
<h2>int8 on one layer at a time</h2>
<table><tr><th>node</th><th>op</th><th>{html.escape(results['metric'])}</th><th>drop</th></tr>{quant}</table>
</body></html>
"""
