#!/usr/bin/env python3
"""One-shot pruning of a real pretrained model without any training: how much of the original's behaviour a
prune-channels budget keeps, for each `reconstruct` mode (none / bias / lsq). The model and data are those of
tools/compress_real.py (rendered text lines for the PP-OCRv4 recognizer, rendered pages for the detector, file bytes
for magika); agreement with the unpruned model on held-out data in the task's terms (graphopt.task_metrics).

    .venv/bin/python tools/prune_oneshot.py --model ppocr-rec --flops 0.9 0.8 0.65 0.5
    .venv/bin/python tools/prune_oneshot.py --model ppocr-det --flops 0.9 0.8 0.65 0.5 --calib 64 --eval 40

Prints one JSON line per (budget, mode): MACs kept, agreement, seconds, and the pass's reconstruct report (sinks
compensated, output error before and after).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))


def main(argv=None) -> int:
    import compress_real as cr
    from graphopt import ort
    from graphopt.compress import _metrics
    from graphopt.graph import copy as copy_graph, to_onnx
    from graphopt.loading import load
    from graphopt.passmanager import PassContext, PassManager, make_pass
    from graphopt.task_metrics import agreement

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=sorted(cr.DEFAULTS))
    ap.add_argument("--flops", type=float, nargs="+", default=[0.9, 0.8, 0.65, 0.5], help="MACs budgets (kept)")
    ap.add_argument("--modes", nargs="+", default=["none", "bias", "lsq"], choices=("none", "bias", "lsq"))
    ap.add_argument("--calib", type=int, default=256, help="calibration examples (criterion and compensation)")
    ap.add_argument("--eval", type=int, default=100, help="held-out examples")
    ap.add_argument("--samples", type=int, default=4, help="prune-channels' samples option")
    ap.add_argument("--page-size", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    name, shape = cr.input_shape(a.model, a.page_size)
    calib, held = cr.make_data(a.model, a.calib, a.eval, a.page_size, a.seed)
    original = load(str(cr.model_file(a.model)), input_shapes={name: shape})

    def outputs(g):
        sess = ort.session(to_onnx(g), optimize=True)
        x = held[name]
        return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])

    reference = outputs(original)
    macs0 = _metrics(original)["macs"]
    ctx = PassContext(seed=a.seed, data={"calib": calib, "train": calib})
    for flops in a.flops:
        for mode in a.modes:
            t0 = time.perf_counter()
            p = make_pass("prune-channels", flops=flops, criterion="activation", min_widths=8, reconstruct=mode,
                          samples=a.samples)
            res = PassManager([p]).run(copy_graph(original), ctx)
            rec = res.records[-1]["info"].get("reconstruct", {})
            print(json.dumps({"model": a.model, "flops": flops, "mode": mode,
                              "macs": round(_metrics(res.graph)["macs"] / macs0, 3),
                              "agreement": agreement(outputs(res.graph), reference, cr.task(a.model)),
                              "seconds": round(time.perf_counter() - t0, 1),
                              **{k: rec.get(k) for k in ("sinks", "skipped_count", "output_error_before",
                                                         "output_error_after", "kept")}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
