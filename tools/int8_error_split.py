"""Where an int8 model loses its accuracy: clipping, weight rounding or activation rounding, and which layer.

Quantizes MODEL with graphopt's quantize pass (the QDQ graph compile lowers, before lowering) and scores variants of
that QDQ graph on the evaluation inputs, each against the reference's outputs in the terms of the task
(graphopt.task_metrics: top-1 agreement, decoded-sequence agreement for a CTC recognizer, IoU of thresholded maps):

* the QDQ graph as it is;
* no rounding anywhere: every activation QuantizeLinear -> DequantizeLinear pair replaced by a Clip to the pair's
  range (the clipping stays, fused Relu / Clip included, the rounding goes) and every Conv / MatMul / Gemm weight by
  the fp32 model's (BatchNormalization folded as quantize folds it): what calibration's clipping alone costs;
* weights int8 only (activations unrounded), activations int8 only (fp32 weights);
* with --each, one source of rounding at a time (one layer's weights, or one activation tensor), all others off.

    .venv/bin/python tools/int8_error_split.py STUDENT.onnx --calib train.npz --eval eval.npz \
        --reference ORIGINAL.onnx --quantize "calibration=percentile,percentile=99.99,calib_samples=64"

--reference defaults to MODEL itself (then the fp32 row is 100%). Runs on onnxruntime (CPU, all optimizations: graphopt.passes.quantize.first_outputs).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt import PassContext, PassManager  # noqa: E402
from graphopt.graph import to_onnx  # noqa: E402
from graphopt.passes.quantize import first_outputs as outputs, input_specs  # noqa: E402
from graphopt.samples import feeds_from_samples  # noqa: E402
from graphopt.task_metrics import agreement  # noqa: E402

WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _act_pairs(g: gs.Graph) -> list[tuple[gs.Node, gs.Node]]:
    """(QuantizeLinear, DequantizeLinear) of every activation pair of g, in g's node order (weights' DequantizeLinear
    read a constant and are left out)."""
    return [(dq.inputs[0].inputs[0], dq) for dq in g.nodes
            if dq.op == "DequantizeLinear" and not isinstance(dq.inputs[0], gs.Constant) and dq.inputs[0].inputs
            and dq.inputs[0].inputs[0].op == "QuantizeLinear"]


def activation_pairs(qdq: onnx.ModelProto) -> list[str]:
    """Names of the tensors that pass through an activation QuantizeLinear -> DequantizeLinear pair, in graph order."""
    g = gs.import_onnx(qdq)
    g.toposort()
    return list(dict.fromkeys(q.inputs[0].name for q, _ in _act_pairs(g)))


def variant(qdq: onnx.ModelProto, fp32_weights: dict, rounded_acts, rounded_weights) -> onnx.ModelProto:
    """The QDQ graph with rounding only on the activations in rounded_acts and the weights of the nodes in
    rounded_weights ("*": all); the other pairs become Clips to their range, the other weights the fp32 ones."""
    g = gs.import_onnx(qdq)
    for node in g.nodes:
        if node.op in WEIGHTED and node.name in fp32_weights and not ("*" in rounded_weights
                                                                       or node.name in rounded_weights):
            w = node.inputs[1]
            if w.inputs and w.inputs[0].op == "DequantizeLinear":
                node.inputs[1] = gs.Constant(node.name + "_fp32_weight", np.asarray(fp32_weights[node.name], np.float32))
    for q, dq in _act_pairs(g):
        x = q.inputs[0]
        if "*" in rounded_acts or x.name in rounded_acts:
            continue
        scale = float(np.asarray(q.inputs[1].values).reshape(-1)[0])
        zp = np.asarray(q.inputs[2].values) if len(q.inputs) > 2 else np.zeros((), np.uint8)
        z = int(zp.reshape(-1)[0])
        lo, hi = (0, 255) if zp.dtype == np.uint8 else (-128, 127)
        out = dq.outputs[0]
        dq.outputs.clear()
        g.nodes.append(gs.Node("Clip", inputs=[x, gs.Constant(out.name + "_lo", np.asarray((lo - z) * scale, np.float32)),
                                                gs.Constant(out.name + "_hi", np.asarray((hi - z) * scale, np.float32))],
                               outputs=[out]))
    g.cleanup().toposort()
    return gs.export_onnx(g)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="the fp32 model")
    ap.add_argument("--calib", required=True, help="calibration inputs (.npz)")
    ap.add_argument("--eval", required=True, help="evaluation inputs (.npz)")
    ap.add_argument("--reference", help="model whose outputs are the answers (default: MODEL)")
    ap.add_argument("--quantize", default="", help="quantize pass options, e.g. 'calibration=percentile,percentile=99.99'")
    ap.add_argument("--samples", type=int, default=200, help="evaluation samples used")
    ap.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...")
    ap.add_argument("--each", action="store_true", help="also one source of rounding at a time")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    shapes = {k: tuple(int(d) for d in v.split(",")) for k, v in (s.split("=", 1) for s in args.input_shape)}
    g = graphopt.load(args.model, input_shapes=shapes or None)
    feeds = feeds_from_samples(dict(np.load(args.eval)), input_specs(g), "--eval", args.samples)
    ref = outputs(args.reference or args.model, feeds)

    def score(model) -> float:
        return agreement(outputs(model, feeds), ref)["value"]

    quantize = "quantize{scheme=int8" + ("," + args.quantize if args.quantize else "") + "}"
    ctx = PassContext(data={"calib": dict(np.load(args.calib))}, verify="none")
    qdq = to_onnx(PassManager.parse("cleanup," + quantize).run(g, ctx).graph)
    folded = PassManager.parse("cleanup,fold-batchnorm").run(g, PassContext(verify="none")).graph
    weights = {n.name: n.inputs[1].values for n in folded.nodes
               if n.op in WEIGHTED and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant)}
    metric = agreement(ref, ref)["metric"]
    rows = [("fp32 model", score(to_onnx(g))), ("int8 QDQ graph", score(qdq)),
            ("no rounding (clipping only)", score(variant(qdq, weights, (), ()))),
            ("weights int8 only", score(variant(qdq, weights, (), ("*",)))),
            ("activations int8 only", score(variant(qdq, weights, ("*",), ())))]
    print(f"{metric} against {'the reference' if args.reference else 'the fp32 model'} on {len(feeds)} samples "
          f"({quantize})")
    for name, v in rows:
        print(f"  {name:<40} {v:.4f}", flush=True)
    each = []
    if args.each:
        acts = activation_pairs(qdq)
        for name in weights:
            each.append(("weight", name, score(variant(qdq, weights, (), (name,)))))
            print(f"  weights of {name:<40} alone {each[-1][2]:.4f}", flush=True)
        for name in acts:
            each.append(("activation", name, score(variant(qdq, weights, (name,), ()))))
            print(f"  activation {name:<40} alone {each[-1][2]:.4f}", flush=True)
        each.sort(key=lambda r: r[2])
        print("most costly alone:", ", ".join(f"{k} {n} {v:.4f}" for k, n, v in each[:10]))
    if args.json:
        Path(args.json).write_text(json.dumps({"metric": metric, "quantize": quantize, "samples": len(feeds),
                                               "rows": dict(rows), "each": each}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
