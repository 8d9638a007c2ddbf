"""Per-model table for the test zoo: ops, compile time, max error against onnxruntime, latency ratio.

    .venv/bin/python tools/zoo_report.py [--threads 1] [--pipeline cleanup] [--models resnet vit ...]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import zoo  # noqa: E402

import graphopt  # noqa: E402
from graphopt.api import measure_latency  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pipeline", default="cleanup")
    p.add_argument("--models", nargs="*", default=list(zoo.ZOO))
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in a.models:
            path = Path(d) / f"{name}.onnx"
            zoo.export_onnx(name, path)
            ops_in = len(graphopt.load(path, fold_constants=False).nodes)
            t0 = time.perf_counter()
            art = graphopt.compile(path, out=Path(d) / name, pipeline=a.pipeline, measure=False)
            wall = time.perf_counter() - t0
            lat = measure_latency(art, threads=a.threads, repeat=50, budget_s=3.0)
            rep = art.report
            rows.append((name, ops_in, rep["ops"], f"{rep['compile_seconds']:.1f}", f"{wall:.1f}",
                         f"{rep['check']['max_abs_error']:.1e}", f"{lat['graphopt_ms']:.3f}", f"{lat['onnxruntime_ms']:.3f}",
                         f"{lat['ratio_to_onnxruntime']:.2f}"))
            print(" | ".join(map(str, rows[-1])), file=sys.stderr)
    print(f"threads={a.threads}, pipeline={a.pipeline}")
    print("| model | ops (exported) | ops (compiled) | TVM build s | total compile s | max abs err vs ORT "
          "| graphopt ms | onnxruntime ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
