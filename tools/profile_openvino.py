"""Per ONNX node: graphopt's compiled kernel time beside OpenVINO's own profiler, on the artifact's model.onnx.

`python tools/profile_openvino.py ART [--threads 1] [--repeat 50] [--top 30]` (ART: a graphopt artifact folder).
graphopt's side is `graphopt bench --profile`'s (the Relax VM instrument, kernels mapped to ONNX nodes; minimum over
the runs); OpenVINO's is its PERF_COUNT profiling of the same file with the same thread count and its default
precision (median real time per executed node over the runs after a warm-up). OpenVINO names a fused node after
the ONNX node it grew from plus a suffix (`.../Conv/WithoutBiases`): the longest prefix that is an ONNX node name
is taken. Rows: the nodes both name, largest graphopt excess first, then graphopt's kernels and OpenVINO's nodes
that found no counterpart (vm builtins, OpenVINO's reorders and input conversions), each summed. Needs the
`bench` extra (openvino). graphopt bench --profile does the same against onnxruntime's profiler.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def openvino_nodes(model_path: Path, feeds: dict, threads: int, repeat: int, warmup: int = 5) -> dict:
    """{OpenVINO node name: (median real time us, layer type, exec type)} over `repeat` profiled runs."""
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(model_path)), "CPU",
                                  {"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": int(threads),
                                   "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    times = collections.defaultdict(list)
    kinds = {}
    for i in range(warmup + repeat):
        request.infer(feeds)
        if i < warmup:
            continue
        for p in request.profiling_info:
            if p.status.name == "EXECUTED":
                times[p.node_name].append(p.real_time.total_seconds() * 1e6)
                kinds[p.node_name] = (p.node_type, p.exec_type)
    return {n: (statistics.median(v), *kinds[n]) for n, v in times.items()}


def onnx_node_of(name: str, onnx_names: set) -> str | None:
    """The ONNX node an OpenVINO node name grew from: the name itself or its longest '/'-prefix that is one."""
    if name in onnx_names:
        return name
    cuts = [i for i, ch in enumerate(name) if ch == "/"]
    return next((name[:i] for i in reversed(cuts) if name[:i] in onnx_names), None)


def compare(art_path: str, threads: int, repeat: int) -> dict:
    """{"rows": [(node, graphopt us, OpenVINO us, kernel, OpenVINO exec type)], "graphopt_other_us",
    "openvino_other_us", "graphopt_run_ms"}: graphopt's kernels profiled as `graphopt bench --profile` does
    (graphopt.profiling: the VM instrument, kernels mapped to ONNX nodes), without its onnxruntime side."""
    import onnx

    from graphopt import api, ort
    from graphopt.artifact import Artifact
    from graphopt.profiling import ModelIndex, add_stats, map_kernels
    from graphopt.targets.vm_profile import profile_calls
    art = Artifact(Path(art_path))
    model_path = art.path / "model.onnx"
    model = onnx.load(str(model_path))
    feeds = ort.random_inputs(api._specs(art), 0, api._input_ranges(art))      # the inputs bench --profile uses
    prof = profile_calls(art.runner(threads), art.check_inputs(feeds), repeat)
    map_kernels(prof["calls"], ModelIndex(model))
    add_stats(prof["calls"])
    ours = collections.defaultdict(float)
    kernel = {}
    other_g = 0.0
    for it in prof["calls"]:
        if it.get("node"):
            ours[it["node"]] += it["min_us"]
            kernel[it["node"]] = it["kernel"]
        else:
            other_g += it["min_us"]
    names = {n.name for n in model.graph.node}
    theirs = collections.defaultdict(float)
    kind = {}
    other_o = 0.0
    for name, (us, _, exec_type) in openvino_nodes(model_path, feeds, threads, repeat).items():
        node = onnx_node_of(name, names)
        if node is None:
            other_o += us
        else:
            theirs[node] += us
            kind[node] = exec_type
    rows = [(n, ours.get(n), theirs.get(n), kernel.get(n, "-"), kind.get(n, "-")) for n in set(ours) | set(theirs)]
    for n, g, o, _, _ in rows:      # a node only one side names counts with that side's unmatched time
        if g is None:
            other_o += o
        elif o is None:
            other_g += g
    rows = sorted((r for r in rows if r[1] is not None and r[2] is not None), key=lambda r: r[2] - r[1])
    run_ms = statistics.median(prof["runs_us"]) / 1e3 if prof["runs_us"] else float("nan")
    return {"rows": rows, "graphopt_other_us": other_g, "openvino_other_us": other_o, "graphopt_run_ms": run_ms}


def main(argv=None) -> int:
    from graphopt.text_table import table
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--top", type=int, default=30, help="rows of nodes shown (largest graphopt excess first)")
    a = ap.parse_args(argv)
    c = compare(a.artifact, a.threads, a.repeat)
    rows = c["rows"]
    shown = [(n[-60:], f"{g:.1f}", f"{o:.1f}", f"{g / o:.2f}" if o else "-", k[:32], e)
             for n, g, o, k, e in rows[:a.top]]
    g_sum, o_sum = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{a.artifact}  threads={a.threads}  repeats={a.repeat}  graphopt {c['graphopt_run_ms']:.3f} ms a profiled run")
    print(table(shown, ("onnx node", "graphopt us", "openvino us", "ratio", "graphopt kernel", "openvino exec")))
    print(f"\nnodes both name: graphopt {g_sum:.0f} us, OpenVINO {o_sum:.0f} us ({len(rows)} nodes); unmatched: "
          f"graphopt {c['graphopt_other_us']:.0f} us (vm builtins, unmapped kernels), OpenVINO "
          f"{c['openvino_other_us']:.0f} us (reorders, input conversion, unnamed nodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
