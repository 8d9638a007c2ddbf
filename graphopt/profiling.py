"""`graphopt bench --profile`: per-kernel time of the compiled library against onnxruntime's per-node profiler on
the artifact's own model.onnx, same inputs, same thread count.

graphopt's calls come from targets/vm_profile.py (the Relax VM's instrument hook); onnxruntime's from its JSON
trace (SessionOptions.enable_profiling). Both are tied back to the ONNX node they compute where that can be told:
a graphopt kernel by its anchor op (conv2d -> Conv, matmul -> MatMul/Gemm, ...), the element counts of its first
input and its output and, where it tells convs apart, of its (packed) weight, matched in graph order; an onnxruntime
node by its name or a node name it extends ("<node>/MatMulAddFusion"), or, for nodes its optimizer made (NCHWc,
named after their output tensor), by walking back from that tensor to the node of its op type. Both engines fuse
epilogues (bias, BatchNorm, activation, residual add, GELU) into these kernels, not always alike: compare a row's
times knowing that (graphopt's fc1 MatMul carries the GELU that onnxruntime runs as its own Gelu node).
Per-call medians and minima are kept: on a machine shared with other processes the minima are the figures to
compare."""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import tempfile
from pathlib import Path

import onnx

from . import ort
from .errors import BadInput

#: TVM op name in a fused kernel's name (or graphopt's int8 kernel kind) -> the ONNX op types it computes (first
#: match wins: longer names first)
ANCHORS = (("int8_dwconv", ("Conv",)), ("int8_conv", ("Conv",)), ("int8_dense", ("MatMul", "Gemm")),
           ("int8_maxpool", ("MaxPool",)), ("conv2d_transpose", ("ConvTranspose",)),
           ("conv1d_transpose", ("ConvTranspose",)),
           ("conv1d", ("Conv",)), ("conv2d", ("Conv",)), ("conv3d", ("Conv",)), ("matmul", ("MatMul", "Gemm")),
           ("dense", ("MatMul", "Gemm")), ("adaptive_avg_pool", ("GlobalAveragePool", "ReduceMean")),
           ("max_pool", ("MaxPool",)), ("avg_pool", ("AveragePool",)), ("layer_norm", ("LayerNormalization",)),
           ("softmax", ("Softmax",)), ("resize", ("Resize",)), ("mean", ("GlobalAveragePool", "ReduceMean")))

#: onnxruntime's fused / layout op types -> the ONNX op type of the node they replace
ORT_OP = {"FusedConv": "Conv", "FusedMatMul": "MatMul", "FusedGemm": "Gemm", "QLinearConv": "Conv",
          "MatMulIntegerToFloat": "MatMul", "DynamicQuantizeMatMul": "MatMul", "QLinearMatMul": "MatMul"}

_TVM_MULTIWORD = ("strided_slice", "expand_dims", "broadcast_to", "collapse_sum", "layout_transform")


def kernel_op(name: str) -> tuple[str, tuple[str, ...]]:
    """(group label, ONNX op types it may compute) of a VM call: an anchor op's ONNX type, else the kernel's first
    TVM op (e.g. 'add', 'transpose'), 'vm builtins' for the VM's own calls."""
    if name.startswith("vm.builtin.") or name.startswith("vm."):
        return "vm builtins", ()
    base = name[len("fused_"):] if name.startswith("fused_") else name
    for tvm_op, onnx_ops in ANCHORS:
        if tvm_op in base:
            return onnx_ops[0], onnx_ops
    for word in _TVM_MULTIWORD:
        if base.startswith(word):
            return word, ()
    return re.sub(r"\d+$", "", base.split("_")[0]) or base, ()


def _numel(shape) -> int | None:
    return math.prod(shape) if shape is not None and all(isinstance(d, int) and d > 0 for d in shape) else None


def _sizes(shape) -> set:
    """Element counts a kernel's tensor for this ONNX tensor may have: as is, or with its channels (axis 1) padded
    to a multiple of 16, as the integer and bf16 kernels keep them (24 -> 32, a classifier's 1000 -> 1008)."""
    n = _numel(shape)
    if n is None:
        return set()
    if len(shape) < 2:
        return {n}
    return {n, n // shape[1] * (-(-shape[1] // 16) * 16)}


class ModelIndex:
    """The nodes of model.onnx in graph order with their tensor shapes (static after graphopt.load)."""

    def __init__(self, model: onnx.ModelProto):
        from .analyses import flops
        from .graph import from_onnx
        self.macs = {n["name"]: n["macs"] for n in flops(from_onnx(model), None)["nodes"]}
        model = onnx.shape_inference.infer_shapes(model)
        g = model.graph
        self.shapes = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            dims = vi.type.tensor_type.shape.dim
            self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        for init in g.initializer:
            self.shapes[init.name] = list(init.dims)
        self.nodes = list(g.node)
        self.by_name = {n.name: n for n in self.nodes}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.inits = {i.name for i in g.initializer}

    def weight_numel(self, node) -> int | None:
        """Elements of a node's constant weight (second input): an initializer, or a DequantizeLinear of one (QDQ
        graphs), else None."""
        if len(node.input) < 2:
            return None
        w = node.input[1]
        dq = self.producer.get(w)
        if dq is not None and dq.op_type == "DequantizeLinear":
            w = dq.input[0]
        return _numel(self.shapes.get(w)) if w in self.inits else None

    def in_shape(self, node) -> list | None:
        return self.shapes.get(node.input[0]) if node.input else None

    def out_shape(self, node) -> list | None:
        return self.shapes.get(node.output[0]) if node.output else None

    def describe(self, node) -> str:
        shapes = [self.shapes.get(i) for i in node.input if i]
        ins = " ".join("x".join(map(str, s)) if s else "?" for s in shapes)
        out = self.out_shape(node)
        extra = "".join(f" {a.name}={onnx.helper.get_attribute_value(a)}" for a in node.attribute
                        if a.name in ("group", "strides", "kernel_shape") and onnx.helper.get_attribute_value(a)
                        not in (1, [1, 1]))
        return f"{ins} -> {'x'.join(map(str, out)) if out else '?'}{extra}"


def map_kernels(calls: list[dict], index: ModelIndex) -> None:
    """Set call["op"] (group label) and call["node"] (the ONNX node name, or None) on graphopt's VM calls: an
    anchor kernel takes the first unmatched node of its op types, in graph order, whose first input and output
    have the kernel's first and last tensors' element counts (layouts and packed weights differ, sizes do not;
    channels may be padded to 16: _sizes)."""
    used = set()
    for c in calls:
        c["op"], onnx_ops = kernel_op(c["kernel"])
        c["node"] = None
        if not onnx_ops or not c["shapes"]:
            continue
        first, last = _numel(c["shapes"][0]), _numel(c["shapes"][-1])
        sizes = {_numel(s) for s in c["shapes"]}
        fits = [n for n in index.nodes if n.op_type in onnx_ops and n.name not in used
                and first in _sizes(index.in_shape(n)) and last in _sizes(index.out_shape(n))]
        # a weight the kernel takes whole (packed, not padded) tells convs of equal input and output sizes apart
        best = [n for n in fits if index.weight_numel(n) in sizes]
        for n in (best or fits)[:1]:
            used.add(n.name)
            c["node"], c["op"] = n.name, n.op_type


def ort_node(event_name: str, op: str, index: ModelIndex) -> str | None:
    """The ONNX node an onnxruntime trace event computes: its own name, else the node of the same op type found by
    walking back (first non-weight input) from the tensor the event is named after."""
    name = event_name[:-len("_kernel_time")] if event_name.endswith("_kernel_time") else event_name
    if name in index.by_name:
        return name
    for cut in (i for i in range(len(name) - 1, 0, -1) if name[i] == "/"):   # "<node>/MatMulAddFusion"
        if name[:cut] in index.by_name:
            return name[:cut]
    want = ORT_OP.get(op, op)
    tensor = re.sub(r"_nchwc$", "", name)
    node = index.producer.get(tensor)
    for _ in range(8):
        if node is None:
            return None
        if node.op_type == want:
            return node.name
        data = [i for i in node.input if i and i not in index.inits]
        node = index.producer.get(data[0]) if data else None
    return None


def profile_onnxruntime(model_path: Path, feeds: dict, threads: int | None, repeat: int) -> dict:
    """onnxruntime (all optimizations, like the latency figure) with its profiler on: per-node durations of
    `repeat` runs after two warm-up runs. Returns {"nodes": [{"name", "op", "in_shapes", "out_shapes", "us"}] in
    execution order, "runs_us"}."""
    with tempfile.TemporaryDirectory(prefix="graphopt-ortprof-") as d:
        sess = ort.session(model_path.read_bytes(), optimize=True, threads=threads,
                           profile_prefix=os.path.join(d, "ort"))
        for _ in range(2 + repeat):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[2:]
    node_events = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                         key=lambda e: e["ts"])
    nodes: list[dict] = []
    for r, run in enumerate(runs):
        inside = [e for e in node_events if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]]
        if r == 0:
            for e in inside:
                a = e.get("args", {})
                nodes.append({"name": e["name"][:-len("_kernel_time")], "op": a.get("op_name", "?"),
                              "in_shapes": [next(iter(s.values())) for s in a.get("input_type_shape", [])],
                              "out_shapes": [next(iter(s.values())) for s in a.get("output_type_shape", [])],
                              "us": []})
        if len(inside) != len(nodes):
            continue        # onnxruntime ran another node sequence (never seen; skip rather than misalign)
        for node, e in zip(nodes, inside):
            node["us"].append(float(e["dur"]))
    return {"nodes": nodes, "runs_us": [float(r["dur"]) for r in runs]}


def add_stats(items: list[dict]) -> None:
    """median_us and min_us of each item's per-run durations. The median is the usual figure; the minimum is the
    one to compare on a shared machine, where other processes lengthen some runs of a kernel, never shorten them."""
    for it in items:
        it["median_us"] = statistics.median(it["us"]) if it["us"] else 0.0
        it["min_us"] = min(it["us"]) if it["us"] else 0.0


def by_op(items: list[dict]) -> list[dict]:
    """[{"op", "count", "ms", "min_ms", "share"}] grouped by item["op"] (sums of per-call medians and minima),
    largest total first."""
    groups: dict[str, list[dict]] = {}
    for it in items:
        groups.setdefault(it["op"], []).append(it)
    total = sum(it["median_us"] for it in items) or 1.0
    rows = [{"op": k, "count": len(v), "ms": sum(i["median_us"] for i in v) / 1e3,
             "min_ms": sum(i["min_us"] for i in v) / 1e3, "share": sum(i["median_us"] for i in v) / total}
            for k, v in groups.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def profile_artifact(art, threads: int | None, repeat: int, feeds: dict) -> dict:
    """Both engines profiled on the artifact's model.onnx; see the module docstring."""
    from .targets.vm_profile import profile_calls
    if art.manifest["target"]["name"] != "cpu":    # a GPU's kernels run asynchronously: host timing means nothing
        raise BadInput(f"{art.path}: --profile times the kernels of cpu-target libraries; this artifact is for "
                       f"{art.manifest['target']['name']}")
    runner = art.runner(threads)
    index = ModelIndex(onnx.load(str(art.path / "model.onnx")))
    tvm_prof = profile_calls(runner, art.check_inputs(feeds), repeat)
    map_kernels(tvm_prof["calls"], index)
    ort_prof = profile_onnxruntime(art.path / "model.onnx", feeds, threads, repeat)
    for n in ort_prof["nodes"]:
        n["node"] = ort_node(n["name"], n["op"], index)
    add_stats(tvm_prof["calls"])
    add_stats(ort_prof["nodes"])
    return {"graphopt": _summary(tvm_prof, tvm_prof["calls"]),
            "onnxruntime": _summary(ort_prof, ort_prof["nodes"]),
            "same_node": same_node(tvm_prof["calls"], ort_prof["nodes"], index)}


def _summary(prof: dict, items: list[dict]) -> dict:
    return {"total_ms": sum(i["median_us"] for i in items) / 1e3, "total_min_ms": sum(i["min_us"] for i in items) / 1e3,
            "run_ms": statistics.median(prof["runs_us"]) / 1e3 if prof["runs_us"] else None,
            "by_op": by_op(items), "items": items}


def same_node(calls: list[dict], nodes: list[dict], index: ModelIndex) -> list[dict]:
    """ONNX nodes both engines' profiles name: their kernel time side by side (medians and minima), largest
    graphopt excess in minima first."""
    ours: dict[str, list[dict]] = {}
    for c in calls:
        if c["node"]:
            ours.setdefault(c["node"], []).append(c)
    theirs: dict[str, list[dict]] = {}
    for n in nodes:
        if n["node"]:
            theirs.setdefault(n["node"], []).append(n)
    rows = []
    for name in ours.keys() & theirs.keys():
        row = {"node": name, "op": index.by_name[name].op_type, "shapes": index.describe(index.by_name[name]),
               "graphopt_kernel": ours[name][0]["kernel"], "onnxruntime_op": theirs[name][0]["op"]}
        for stat, suffix in (("median_us", "us"), ("min_us", "min_us")):
            g, o = sum(c[stat] for c in ours[name]), sum(n[stat] for n in theirs[name])
            row |= {f"graphopt_{suffix}": g, f"onnxruntime_{suffix}": o,
                    "ratio" if stat == "median_us" else "min_ratio": g / o if o > 0 else None}
        macs = index.macs.get(name, 0)
        row |= {"macs": macs, "graphopt_gflops": 2e-3 * macs / row["graphopt_min_us"] if macs else None,
                "onnxruntime_gflops": 2e-3 * macs / row["onnxruntime_min_us"] if macs else None}
        rows.append(row)
    return sorted(rows, key=lambda r: -(r["graphopt_min_us"] - r["onnxruntime_min_us"]))


def _short(text, limit: int = 60, keep_end: bool = True) -> str:
    from .errors import printable
    text = printable(str(text))
    if len(text) <= limit:
        return text
    return "..." + text[-(limit - 3):] if keep_end else text[:limit - 3] + "..."


def _shapes_text(shapes) -> str:
    return " ".join("x".join(map(str, s)) if s else "()" for s in shapes)


def _ratio(r) -> str:
    return f"{r:.2f}" if r else "-"


def profile_tables(prof: dict, top: int = 15) -> list[tuple[str, tuple, list[tuple]]]:
    """(title, header, rows) of the tables `graphopt bench --profile` prints: each engine's time by op type with the
    total, each engine's top kernels, and the ONNX nodes both profiles name, largest graphopt excess first. Times
    are per-call medians over the profiled runs, and minima ("min") for shared machines."""
    tables = []
    for engine, what in (("graphopt", "kernels"), ("onnxruntime", "nodes")):
        p = prof[engine]
        rows = [(_short(r["op"], 40), r["count"], f"{r['ms']:.3f}", f"{r['min_ms']:.3f}", f"{100 * r['share']:.1f}%")
                for r in p["by_op"]]
        rows.append(("total", sum(r["count"] for r in p["by_op"]), f"{p['total_ms']:.3f}", f"{p['total_min_ms']:.3f}",
                     f"run {p['run_ms']:.3f} ms" if p["run_ms"] is not None else ""))
        tables.append((f"{engine} {what} by op type (sums of per-call medians and minima; run = median of the "
                       f"profiled runs end to end)", ("op", "calls", "ms", "min ms", "share"), rows))
        items = sorted(p["items"], key=lambda i: -i["median_us"])[:top]
        total_us = 1e3 * p["total_ms"] or 1.0
        times = lambda i: (f"{i['median_us']:.1f}", f"{i['min_us']:.1f}",  # noqa: E731
                           f"{100 * i['median_us'] / total_us:.1f}%")
        if engine == "graphopt":
            rows = [(_short(i["kernel"]), _short(i["node"] or "-", 40), _shapes_text(i["shapes"]), *times(i))
                    for i in items]
            header = ("kernel", "onnx node", "tensor shapes", "us", "min us", "share")
        else:
            rows = [(_short(i["name"]), i["op"], _shapes_text(i["in_shapes"]) + " -> " + _shapes_text(i["out_shapes"]),
                     *times(i)) for i in items]
            header = ("node", "op", "shapes", "us", "min us", "share")
        tables.append((f"{engine} top {len(rows)} {what}", header, rows))
    rows = [(_short(r["node"], 50), r["op"], _short(r["shapes"], 80, keep_end=False), f"{r['graphopt_us']:.1f}",
             f"{r['onnxruntime_us']:.1f}", _ratio(r["ratio"]), f"{r['graphopt_min_us']:.1f}",
             f"{r['onnxruntime_min_us']:.1f}", _ratio(r["min_ratio"]),
             f"{r['graphopt_gflops']:.0f} / {r['onnxruntime_gflops']:.0f}" if r["macs"] else "-")
            for r in prof["same_node"][:top]]
    tables.append(("same ONNX node in both profiles (largest graphopt excess in minima first; GFLOP/s = 2 x MACs / "
                   "minimum)", ("onnx node", "op", "shapes", "graphopt us", "onnxruntime us", "ratio",
                                "min graphopt us", "min onnxruntime us", "min ratio", "GFLOP/s graphopt / ort"), rows))
    return tables
