"""quantize: int8 post-training quantization (QDQ), and weight-only int8 / int4 for MatMul and Gemm.

`scheme=int8` (static PTQ) calibrates activation ranges on user data with onnxruntime.quantization's calibrators
and writes a standard-domain QDQ graph (QuantizeLinear / DequantizeLinear around every quantized op), so the
result runs in onnxruntime as is and the cpu target lowers the Conv / MatMul / Gemm chains to integer SIMD code
(targets/int8/: u8 x s8 -> s32 with AVX-512 VNNI, fused requantize):

* weights: symmetric int8, per output channel (`per_channel=false`: per tensor); biases int32 (scale sx*sw);
* activations: per tensor, `activations=u8` (asymmetric, the fast path of the VNNI kernels) or `s8` (symmetric);
* calibration data: ctx.data["calib"], a dict of arrays named after the graph inputs (`graphopt compile --calib
  DATA.npz` fills it): for an input of shape S, [N, *S] (N samples on an added leading axis: the layout for inputs
  whose first axis is not a batch, such as a recurrent state [layers*dirs, 1, H] or a fixed [4, 576] chunk) or,
  when S starts with a batch of 1, batch-first [N, *S[1:]] (graphopt.samples); at most `calib_samples` samples;
  `calibration=minmax|percentile|entropy` picks onnxruntime's calibrator; ctx.data["calibration_cache"] (a folder):
  the ranges are kept there and reused by every run on the same fp32 graph, batches and settings (graphopt
  sensitivity's per-layer runs calibrate once);
* opset: graphs below opset 13 are converted to 13 first (per-channel DequantizeLinear needs its `axis`);
* when onnxruntime's quantizer emits an invalid graph, the node it names (its fp32 node) is left in fp32 and the
  graph quantized once more; the pass info lists it under "auto_excluded" (compile prints it);
* `ops=all` (default) quantizes every op onnxruntime's quantizer knows: the elementwise chains between convs become
  int8 tables (lower-int8) and residual adds fuse into the integer kernels; `ops=compute` only the tensors Conv /
  ConvTranspose / MatMul / Gemm read and write (onnxruntime's quantizer still quantizes their outputs), the ops
  between them in fp32 (or as lower-int8 tables without the rounding inside the chain): fewer roundings, for a model
  whose elementwise and normalization ops are many (a transformer's decomposed LayerNorm, hardswish): PP-OCRv4's
  recognizer decodes 98.7% of 1000 rendered lines right against 67.0% with every op (minmax; fp32 98.8%); int8
  CNNs run 10-20% slower (their Relu / residual Add no longer fuse into the kernels' requantization);
* `exclude_nodes=[...]` (node names) and `exclude_ops=[...]` (op types) stay fp32; `exclude=auto` also leaves in
  fp32 the layers whose quantization alone cost more than `exclude_threshold` in `graphopt sensitivity`'s results
  (`sensitivity=FILE.json` or ctx.data["sensitivity"]; the pass info lists them under "sensitivity_excluded");
* `max_drop=P` (accuracy-aware): on ctx.data["eval"], the quantized graph's score may be at most P points
  (percent) below the fp32 graph's: top-1 accuracy when the data has "labels", else (unlabeled data, the usual case
  for a real model) the agreement with the fp32 graph's own outputs in the terms of the task (graphopt.task_metrics:
  top-1 agreement, decoded-sequence agreement for a CTC recognizer, IoU of thresholded probability maps; the fp32
  graph scores 100); otherwise the most sensitive Conv / MatMul / Gemm layers (ranked by the output error when each
  alone is left in fp32) go back to fp32, one at a time, each with the ops after it up to the next Conv / MatMul /
  Gemm (fallback_units), until the budget holds (or nothing is left to exclude: then the pass fails). With `ops`
  left at its default, ops=compute is scored first: when it holds the budget it is taken with every layer int8
  (info "ops": "compute"), else the fallback starts from whichever of the two scored higher;
* BatchNormalization right after a Conv / Gemm / MatMul (and a per-channel constant Add or Mul after a Conv: a
  bias, a BatchNormalization written as its arithmetic) is folded first (as fold-batchnorm does), so the folded
  weights are quantized once instead of a Conv whose output is renormalized in fp32; a ConvTranspose whose kernel equals its stride becomes a 1x1 Conv and a DepthToSpace
  (deconv-as-depth-to-space: exact), so the int8 lowering's integer convs take it (unless excluded by name or
  exclude_ops=[ConvTranspose]);
* `qat=true` (quantization-aware training) is carried out by `graphopt compress` (and `graphopt build` with training
  data): this pass quantizes, graphopt/qat.py makes the weights trainable through fake quantization, compress
  distills from the fp32 model and exports the same QDQ structure. Run alone, the pass refuses qat=true.

`scheme=weight_int8` / `weight_int4` quantize only the constant weights of MatMul and Gemm (no calibration):
the weight becomes an INT8 (per output channel) or INT4 (blocks of `block_size` along the reduction axis, opset
21) initializer read through a DequantizeLinear; activations stay fp32. This shrinks model.onnx; onnxruntime runs
it as is. (The cpu target folds the dequantized weights back to fp32 constants before TVM import, so the compiled
library is as fast and as large as fp32.)

Ordering: quantize is the last lossy step of a pipeline: run structural passes (prune-channels, factorize-lowrank,
sparsify, insert-adapters ...) and folding before it. Structural passes do not understand QDQ graphs (they would
see DequantizeLinear outputs instead of weights), so a pipeline that places one after quantize is refused (the
PassManager calls check_pipeline when it builds and when it runs a pipeline) and quantizing an already quantized
graph is refused.

The pass is lossy: the PassManager reports its drift against the fp32 graph on seeded inputs; `min_cosine`
(default 0: off) turns the cosine similarity of every output into a budget.

Re-exported from graphopt.quant_check (api.compile's self-check of int8 artifacts): check_criterion,
within_quant_steps, compare_quantized.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import tempfile

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import metadata
from graphopt.errors import BadInput, CheckFailed, printable
from graphopt.progress import Progress
from graphopt.samples import feeds_from_samples
from graphopt.shapes import infer
from graphopt.graph import MAX_IR_VERSION, constant_value, from_onnx, to_onnx, toposort
from graphopt.passmanager import Option, Pass, PassResult, register
from graphopt.passes.deconv_as_depth_to_space import rewrite_deconvs
from graphopt.quant_check import (COMPUTE_OPS, STEP_FRACTION, check_criterion,  # noqa: F401  (re-exported)
                                  compare_quantized, within_quant_steps)

#: the ops quantize{ops=compute} quantizes (their inputs, weights and outputs: onnxruntime's quantizer writes the
#: outputs' QDQ pairs too); the elementwise and normalization ops between them stay fp32, where each quantized one
#: adds a rounding (PP-OCRv4's recognizer, minmax PTQ on 1000 rendered lines: 67.0% decoded right with every op
#: quantized, 98.7% with these only, fp32 98.8%)
QUANTIZED_COMPUTE = COMPUTE_OPS + ("ConvTranspose",)

#: passes that may follow quantize (they understand or leave alone QDQ graphs)
SAFE_AFTER = {"quantize", "lower-int8", "cleanup", "eliminate-dead-code", "remove-identity", "infer-shapes",
              "fold-constants"}

# ---------------------------------------------------------------------------------------------------------------
# data helpers
# ---------------------------------------------------------------------------------------------------------------

def input_specs(graph: gs.Graph) -> list[tuple[str, tuple, np.dtype]]:
    out = []
    for t in graph.inputs:
        dt = t.dtype if t.dtype is not None else np.float32
        if isinstance(dt, int):
            dt = onnx.helper.tensor_dtype_to_np_dtype(dt)
        out.append((t.name, tuple(t.shape or ()), np.dtype(dt)))
    return out


def _calibration_key(fp32: onnx.ModelProto, feeds: list, args: dict, op_types: list) -> str:
    """What onnxruntime's tensor ranges depend on: the fp32 graph, the calibration batches and the calibrator's
    settings (not the nodes left out of quantization: the ranges cover every tensor of the op types)."""
    h = hashlib.sha256(fp32.SerializeToString(deterministic=True))
    for feed in feeds:
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            h.update(f"{name}{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    h.update(repr(sorted((k, str(v)) for k, v in args.items())).encode())
    h.update(repr(sorted(op_types)).encode())
    return h.hexdigest()[:32]


def _reader(feeds, update=None):
    """onnxruntime's calibration data reader over our batches; update(n) after each batch handed out."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)
            self._n = 0

        def get_next(self):
            item = next(self._it, None)
            if item is not None and update is not None:
                self._n += 1
                update(self._n)
            return item

        def __len__(self):
            return len(feeds)

        def set_range(self, start_index, end_index):
            self._it = iter(feeds[start_index:end_index])

    return Reader()


def first_outputs(model, feeds: list[dict]) -> np.ndarray:
    """First output of model (ModelProto, bytes or path) over every feed, concatenated on axis 0 (onnxruntime, all
    optimizations)."""
    from graphopt import ort
    sess = ort.session(model, optimize=True)
    name = sess.get_outputs()[0].name
    return np.concatenate([sess.run([name], f)[0] for f in feeds])


def fallback_units(model: onnx.ModelProto, compute: list[str]) -> dict[str, list[str]]:
    """max_drop's unit of fallback: per Conv / MatMul / Gemm node, the node and the ops that follow it up to the next
    compute ops (activations, residual adds, pooling, reshapes ...). Leaving only the compute node in fp32 keeps the
    QuantizeLinear -> DequantizeLinear pairs of the elementwise ops after it, each rounding on its own: on a pruned
    PP-OCRv4 recognizer (hardswish as Add / Clip / Mul / Div) every Conv and MatMul in fp32 with those left int8 kept
    2% of the fp32 graph's decodings, where the whole graph in int8 kept 85%."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_name = {n.name: n for n in model.graph.node}
    units = {}
    for name in compute:
        unit, todo, seen = [name], list(by_name[name].output), set()
        while todo:
            for node in consumers.get(todo.pop(), []):
                if node.op_type in COMPUTE_OPS or node.name in seen or not node.name:
                    continue
                seen.add(node.name)
                unit.append(node.name)
                todo.extend(node.output)
        units[name] = unit
    return units


def _scorer(ref: np.ndarray, labels: np.ndarray | None, n: int):
    """(score(outputs) in points, metric name, the fp32 graph's own score) for max_drop: top-1 accuracy against
    labels, else the agreement with the fp32 graph's outputs `ref` in the terms of the task (graphopt.task_metrics:
    top-1 agreement for a classifier, decoded-sequence agreement for a CTC recognizer, IoU of thresholded maps), 100
    for ref itself."""
    if labels is not None:
        labels = labels[:n]

        def top1(out):
            return float(np.mean(np.argmax(out.reshape(len(out), -1), 1) == labels)) * 100.0
        return top1, "top1", top1(ref)
    from ..task_metrics import agreement, task_kind
    kind = task_kind(ref.shape, ref)
    if kind is None:
        raise BadInput(f"pass 'quantize': max_drop without labels needs a first output graphopt can score against "
                       f"the fp32 graph's (a classifier [N, C], a CTC recognizer [N, T, C] or a probability map "
                       f"[N, 1, H, W]); this one has shape {list(ref.shape[1:])}: add 'labels' to the evaluation data")

    def agree(out):
        return agreement(out, ref, kind)["value"] * 100.0
    itself = agreement(ref, ref, kind)
    return agree, itself["metric"], itself["value"] * 100.0


# ---------------------------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------------------------

@register
class Quantize(Pass):
    name = "quantize"
    help = ("Post-training quantization: int8 QDQ (calibrated on --calib data: per input of shape S, [N, *S] or "
            "batch-first [N, *S[1:]]; per-channel weights) or weight-only int8/int4 for MatMul/Gemm")
    lossy = True
    report_name = "quantization"
    options = {
        "scheme": Option(str, "int8", "int8 (static, weights + activations), weight_int8 or weight_int4 "
                                      "(MatMul/Gemm weights only)", choices=("int8", "weight_int8", "weight_int4")),
        "calibration": Option(str, "minmax", "activation range calibrator", choices=("minmax", "percentile",
                                                                                     "entropy")),
        "activations": Option(str, "u8", "activation type: u8 (asymmetric) or s8 (symmetric)", choices=("u8", "s8")),
        "per_channel": Option(bool, True, "per-output-channel weight scales (else one per tensor)"),
        "exclude_nodes": Option(list, [], "node names left in fp32"),
        "exclude_ops": Option(list, [], "op types left in fp32"),
        "ops": Option(str, "all", "which ops are quantized: all (every op onnxruntime's quantizer knows: elementwise "
                                  "chains become int8 tables, residual adds fuse into the kernels) or compute (only "
                                  "the tensors Conv / ConvTranspose / MatMul / Gemm read and write; the ops between "
                                  "them stay fp32: more accurate, int8 CNNs 10-20% slower)",
                      choices=("all", "compute")),
        "exclude": Option(str, "", "auto: also leave in fp32 every layer whose quantization alone costs more than "
                                   "exclude_threshold of the metric in `graphopt sensitivity`'s results",
                          choices=("", "auto")),
        "sensitivity": Option(str, "", "exclude=auto: the JSON `graphopt sensitivity` wrote (empty: "
                                       "ctx.data['sensitivity'])"),
        "exclude_threshold": Option(float, 0.005, "exclude=auto: the drop (fraction of the metric: 0.005 = half a "
                                                  "point of top-1) above which a layer stays fp32", minimum=0.0),
        "max_drop": Option(float, -1.0, "accuracy-aware mode: allowed drop in points on ctx.data['eval'] (top-1 "
                                        "with labels, else agreement with the fp32 graph; negative: off); the "
                                        "most sensitive layers go back to fp32"),
        "calib_samples": Option(int, 512, "at most this many calibration samples", minimum=1),
        "percentile": Option(float, 99.999, "percentile for calibration=percentile", minimum=50.0, maximum=100.0),
        "block_size": Option(int, 32, "weight_int4: block length along the reduction axis", minimum=16),
        "min_cosine": Option(float, 0.0, "drift budget: every output's cosine similarity to fp32 on seeded "
                                         "inputs must be at least this (0: no budget)", minimum=0.0, maximum=1.0),
        "qat": Option(bool, False, "quantization-aware training (scheme=int8): inside compress / build with "
                                   "training data, the PTQ graph's weights are trained through fake quantization "
                                   "with distillation from the fp32 model (graphopt/qat.py)"),
        "qat_scales": Option(str, "kept", "qat=true: the activation scales stay those of the calibration (kept) or "
                                          "train with the weights (learned: LSQ-style steps)",
                             choices=("kept", "learned")),
    }

    def validate(self):
        if "qat_scales" in self.changed() and not self.opts["qat"]:
            raise BadInput("pass 'quantize': option qat_scales applies with qat=true only")
        bs = self.opts["block_size"]
        if bs & (bs - 1):
            raise BadInput(f"pass 'quantize': block_size={bs} must be a power of two (16, 32, 64, ...)")
        if self.opts["scheme"] != "int8":
            for k in ("calibration", "activations", "ops", "max_drop", "calib_samples", "percentile", "qat",
                      "qat_scales", "exclude", "sensitivity", "exclude_threshold"):
                if k in self.changed():
                    raise BadInput(f"pass 'quantize': option {k} applies to scheme=int8 only, not "
                                   f"scheme={self.opts['scheme']}")

    # -- ordering -------------------------------------------------------------------------------------------
    @classmethod
    def check_pipeline(cls, passes) -> None:
        """Raise BadInput when a pass that does not understand QDQ graphs follows quantize in `passes`
        (a list of Pass objects or names). PassManager.check_order calls it."""
        names = [p if isinstance(p, str) else p.name for p in passes]
        if cls.name not in names:
            return
        first = names.index(cls.name)
        for later in names[first + 1:]:
            if later not in SAFE_AFTER:
                raise BadInput(f"pipeline: '{later}' runs after 'quantize'; structural and lossy passes must come "
                               f"before quantize (they do not understand QDQ graphs): move quantize to the end")

    def check_drift(self, drift: dict) -> str | None:
        floor = self.opts["min_cosine"]
        if floor <= 0:
            return None
        for name, d in drift.items():
            if d.get("cosine", 1.0) < floor:
                return f"output '{name}' has cosine {d['cosine']:.4f} < min_cosine={floor}"
        return None

    # -- report ---------------------------------------------------------------------------------------------
    def report_section(self, record: dict) -> dict | None:
        """What quantize did on its own, when it did: nodes left in fp32 because onnxruntime's quantizer emitted an
        invalid graph there, an opset upgrade."""
        said = {k: record["info"][k] for k in ("auto_excluded", "opset") if record["info"].get(k)}
        return said or None

    @classmethod
    def report_text(cls, entry: dict) -> str:
        lines = [f"quantize: left '{printable(a['node'])}' in fp32: onnxruntime's quantizer emitted an invalid graph "
                 f"there ({a['problem']})" for a in entry.get("auto_excluded") or []]
        if isinstance(entry.get("opset"), dict):
            lines.append(f"quantize: converted the model from opset {entry['opset']['before']} to "
                         f"{entry['opset']['after']} first")
        return "\n".join(lines)

    # -- run ------------------------------------------------------------------------------------------------
    def run(self, graph: gs.Graph, ctx) -> PassResult:
        if self.opts["qat"]:
            raise BadInput("pass 'quantize{qat=true}' trains the model: it runs inside `graphopt compress` (or "
                           "`graphopt build` with [data] train); elsewhere use post-training quantize")
        if any(n.op in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                        "MatMulInteger", "DynamicQuantizeLinear") for n in graph.nodes):
            raise BadInput("pass 'quantize': the graph is already quantized (it has QuantizeLinear/"
                           "DequantizeLinear nodes); quantize the fp32 model instead")
        names = {n.name for n in graph.nodes}
        unknown = [n for n in self.opts["exclude_nodes"] if n not in names]
        if unknown:
            raise BadInput(f"pass 'quantize': exclude_nodes names no node '{unknown[0]}'")
        if self.opts["scheme"] == "int8":
            return self._static(graph, ctx)
        return self._weight_only(graph, ctx)

    # -- static int8 ----------------------------------------------------------------------------------------
    def _ort_args(self):
        from onnxruntime.quantization import CalibrationMethod, QuantType
        methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                   "entropy": CalibrationMethod.Entropy}
        s8 = self.opts["activations"] == "s8"
        extra = {"ActivationSymmetric": s8, "WeightSymmetric": True,
                 "CalibPercentile": self.opts["percentile"], "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
        return dict(activation_type=QuantType.QInt8 if s8 else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=methods[self.opts["calibration"]], per_channel=self.opts["per_channel"],
                    extra_options=extra)

    def _static(self, graph: gs.Graph, ctx) -> PassResult:
        from onnxruntime.quantization import QuantFormat, quantize_static
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        calib = ctx.data.get("calib")
        if calib is None:
            raise BadInput("pass 'quantize{scheme=int8}' needs calibration data: pass --calib DATA.npz (arrays "
                           "named after the graph inputs: [N, *input shape], or [N, ...] batch-first) or "
                           "data={'calib': {...}}")
        graph, folded = _fold_batchnorm(graph, ctx)
        opset = graph.opset
        graph = _upgrade_opset(graph, 13, "per-channel DequantizeLinear needs its axis attribute")
        specs = input_specs(graph)
        feeds = feeds_from_samples(calib, specs, "calibration data", self.opts["calib_samples"])
        excluded_ops = set(self.opts["exclude_ops"])
        known = set(QLinearOpsRegistry) | set(QDQRegistry)
        ops_of = {"all": sorted(known - excluded_ops), "compute": sorted(known & set(QUANTIZED_COMPUTE) - excluded_ops)}
        op_types = ops_of[self.opts["ops"]]
        base_excluded = list(self.opts["exclude_nodes"])
        sensitive = self._sensitive_nodes(graph, ctx, base_excluded)
        base_excluded += sensitive
        # upsampling ConvTransposes (kernel = stride) as 1x1 Convs + DepthToSpace: the int8 lowering has integer
        # convs, no integer transposed conv (PP-OCRv4's detector int8: 6.6 -> 5.6 ms, 1 thread)
        deconvs = 0 if "ConvTranspose" in excluded_ops else rewrite_deconvs(graph, skip=set(base_excluded))
        fp32 = to_onnx(graph)
        args = self._ort_args()

        with tempfile.TemporaryDirectory(prefix="graphopt-quant-") as tmp:
            src = os.path.join(tmp, "fp32.onnx")
            onnx.save_model(fp32, src)
            shared = ctx.data.get("calibration_cache")

            def quantizer(op_types: list[str]):
                """quantize(excluded nodes) -> the QDQ model of these op types (calibrated once per op set)."""
                key = _calibration_key(fp32, feeds, args, op_types)
                cache = os.path.join(str(shared) if shared else tmp, f"calibration-{key}.json")
                return lambda excluded: quantize_with(op_types, cache, excluded)

            def quantize_with(op_types: list[str], cache: str, excluded: list[str]) -> onnx.ModelProto:
                dst = os.path.join(tmp, "q.onnx")
                have_cache = os.path.exists(cache)
                kw = dict(quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                          nodes_to_exclude=list(excluded), **args)
                progress = ctx.progress if ctx.progress is not None and not have_cache else Progress("off")
                with _quiet(), progress.task(f"calibration ({self.opts['calibration']})", len(feeds)) as update:
                    try:      # calibrate once; later calls (accuracy-aware mode) reuse the ranges
                        try:
                            quantize_static(src, dst, None if have_cache else _reader(feeds, update),
                                            calibration_cache_path=cache, **kw)
                        except TypeError as e:            # onnxruntime < 1.22: no calibration cache
                            if "calibration_cache_path" not in str(e):
                                raise
                            quantize_static(src, dst, _reader(feeds, update), **kw)
                    except Exception as e:  # noqa: BLE001 - onnxruntime's quantizer reports many kinds of errors
                        raise BadInput(f"pass 'quantize': onnxruntime's quantizer failed: {quantizer_error(e)}; if "
                                       f"one node or op type causes it, leave it in fp32 with "
                                       f"quantize{{exclude_nodes=[NAME]}} or exclude_ops=[OP]") from e
                m = onnx.load(dst)
                _tidy(m)
                return m

            quantize = quantizer(op_types)
            model, auto_excluded = quantize_checked(quantize, base_excluded, {n.name for n in fp32.graph.node})
            base_excluded += [a["node"] for a in auto_excluded]
            info = {"scheme": "int8", "ops": self.opts["ops"], "calibration": self.opts["calibration"],
                    "calib_samples": len(feeds),
                    "activations": self.opts["activations"], "per_channel": self.opts["per_channel"],
                    "batchnorm_folded": folded, "deconvs_as_conv": deconvs, "auto_excluded": auto_excluded}
            if self.opts["exclude"] == "auto":
                info["sensitivity_excluded"] = sensitive
            if opset != graph.opset:
                info["opset"] = {"before": opset, "after": graph.opset}
            fallback: list[str] = []
            if self.opts["max_drop"] >= 0:
                # ops left at its default: before any layer goes back to fp32, ops=compute is tried (every Conv /
                # MatMul int8, the ops between them fp32)
                compute = quantizer(ops_of["compute"]) if "ops" not in self.given else None
                model, fallback, acc = self._accuracy_aware(fp32, model, quantize, compute, base_excluded, specs,
                                                            ctx)
                info.update(acc)
        quantized = sorted({n.name for n in model.graph.node if n.op_type in COMPUTE_OPS
                            and any(_is_dq_output(model, i) for i in n.input[1:2])})
        compute = {n.name for n in fp32.graph.node if n.op_type in COMPUTE_OPS}
        info.update({"quantized": quantized, "quantized_count": len(quantized),
                     "fp32_nodes": sorted(compute - set(quantized)), "fallback": fallback})
        # the quantizer writes no shapes for the tensors it adds (every DequantizeLinear output): annotated here, so
        # the passes after quantize (the targets' legalization: conv1d-as-2d takes static shapes only) see them
        out = infer(from_onnx(model))
        metadata.set_quantization(out, metadata.Quantization("int8", self.opts["activations"]))
        return PassResult(out, True, info)

    def _sensitive_nodes(self, graph: gs.Graph, ctx, already: list[str]) -> list[str]:
        """exclude=auto: the graph's nodes whose quantization alone costs more than exclude_threshold in the
        sensitivity results (nodes the results name that this graph no longer has are skipped)."""
        if self.opts["exclude"] != "auto":
            return []
        from ..sensitivity import quantize_excludes, results_for
        results = results_for(self.name, self.opts["sensitivity"], ctx, "exclude=auto")
        if not isinstance(results, dict) or not isinstance(results.get("quantize"), list):
            raise BadInput(f"pass 'quantize': exclude=auto needs `graphopt sensitivity` results with the per-layer "
                           f"quantization drops (run it without --no-quantize)")
        present = {n.name for n in graph.nodes}
        return [n for n in quantize_excludes(results, self.opts["exclude_threshold"])
                if n in present and n not in already]

    def _accuracy_aware(self, fp32, model, quantize, quantize_compute, base_excluded, specs, ctx):
        ev = ctx.data.get("eval")
        if ev is None:
            raise BadInput("pass 'quantize': max_drop needs evaluation data: data={'eval': {<inputs>...}} (with "
                           "'labels': top-1 accuracy; without: agreement with the fp32 graph's outputs)")
        labelled = "labels" in ev
        feeds = feeds_from_samples({k: v for k, v in ev.items() if k != "labels"}, specs, "evaluation data")
        ref = first_outputs(fp32, feeds)
        score, metric, fp_score = _scorer(ref, np.asarray(ev["labels"]).reshape(-1) if labelled else None,
                                len(feeds) * len(next(iter(feeds[0].values()))))
        ref2 = ref.reshape(len(ref), -1)

        def score_of(m):
            out = first_outputs(m, feeds)
            return score(out), out.reshape(len(ref), -1)

        q_score, _ = score_of(model)
        info = {"metric": metric, "fp32_score": round(fp_score, 3), "int8_score_all_layers": round(q_score, 3),
                "max_drop": self.opts["max_drop"]}
        budget = self.opts["max_drop"]
        if fp_score - q_score <= budget:
            info["int8_score"] = round(q_score, 3)
            return model, [], info
        if quantize_compute is not None:
            c_model = quantize_compute(base_excluded)
            c_score = score_of(c_model)[0] if invalid_node(c_model) is None else -np.inf
            info["int8_score_compute_ops"] = round(c_score, 3) if np.isfinite(c_score) else None
            if fp_score - c_score <= budget:
                info.update(int8_score=round(c_score, 3), ops="compute")
                return c_model, [], info
            if c_score > q_score:       # the per-layer fallback starts from the closer of the two
                model, quantize, q_score = c_model, quantize_compute, c_score
                info["ops"] = "compute"
        # sensitivity: output error with each candidate layer alone left in fp32
        candidates = [n.name for n in model.graph.node if n.op_type in COMPUTE_OPS and n.name not in base_excluded
                      and any(_is_dq_output(model, i) for i in n.input[1:2])]
        units = fallback_units(fp32, candidates)
        mean_square = float(np.mean(ref2 ** 2)) or 1.0
        sens = []
        progress = ctx.progress if ctx.progress is not None else Progress("off")
        with progress.task("max_drop: each layer alone in fp32", len(candidates)) as update:
            for i, name in enumerate(candidates):
                _, out = score_of(quantize(base_excluded + units[name]))
                sens.append((float(np.mean((out - ref2) ** 2)) / mean_square, name))
                update(i + 1)
        sens.sort()
        info["sensitivity"] = [{"node": n, "rel_mse_when_fp32": round(e, 6)} for e, n in sens]
        fallback: list[str] = []
        excluded = list(base_excluded)
        for _, name in sens:
            fallback.append(name)
            excluded += [n for n in units[name] if n not in excluded]
            q = quantize(excluded)
            q_score, _ = score_of(q)
            if fp_score - q_score <= budget:
                info["int8_score"] = round(q_score, 3)
                info["fallback_nodes"] = len(excluded) - len(base_excluded)
                info["fallback_excluded"] = [n for n in excluded if n not in base_excluded]   # exclude_nodes' form
                return q, fallback, info
        raise CheckFailed(f"pass 'quantize': {metric} drops {fp_score - q_score:.2f} points even with every "
                          f"Conv/MatMul/Gemm in fp32 (budget max_drop={budget}); the drop comes from other "
                          f"quantized ops: exclude them with exclude_ops=[...]")

    # -- weight-only ----------------------------------------------------------------------------------------
    def _weight_only(self, graph: gs.Graph, ctx) -> PassResult:
        bits = 8 if self.opts["scheme"] == "weight_int8" else 4
        excluded_ops = set(self.opts["exclude_ops"])
        excluded = set(self.opts["exclude_nodes"])
        done, skipped = [], []
        shared = {}      # (weight, reduction axis) -> its DequantizeLinear output: a shared weight stays one
        done_for = {}    # weight -> its record in done
        for node in list(graph.nodes):
            if node.op not in ("MatMul", "Gemm") or node.name in excluded or node.op in excluded_ops:
                continue
            w = node.inputs[1] if len(node.inputs) > 1 else None
            W = constant_value(w) if w is not None else None
            if W is None or W.ndim != 2 or W.dtype != np.float32 or constant_value(node.inputs[0]) is not None:
                skipped.append({"node": node.name, "reason": "weight is not a constant fp32 matrix"})
                continue
            if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
                skipped.append({"node": node.name, "reason": "transA"})
                continue
            # reduction axis of the stored weight: MatMul B[K, N] -> 0; Gemm B[K, N] -> 0, transB B[N, K] -> 1
            k_axis = 1 if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else 0
            if bits == 4 and W.shape[k_axis] % 2:
                skipped.append({"node": node.name, "reason": "odd reduction length"})
                continue
            if (id(w), k_axis) in shared:                # e.g. an unrolled RNN's recurrent matrix, read every step
                node.inputs[1] = shared[(id(w), k_axis)]
                done.append(dict(done_for[id(w)], node=node.name))
                continue
            q, scale, dq_attrs = _quantize_weight(W, bits, k_axis, self.opts["block_size"])
            base = f"{node.name}/weight_int{bits}"
            out = gs.Variable(f"{base}/dequantized", dtype=np.float32, shape=list(W.shape))
            if bits == 8:
                inputs = [gs.Constant(f"{base}/q", q), gs.Constant(f"{base}/scale", scale),
                          gs.Constant(f"{base}/zero_point", np.zeros(scale.shape, np.int8))]
            else:
                inputs = [_int4_constant(f"{base}/q", q), gs.Constant(f"{base}/scale", scale)]
            graph.nodes.append(gs.Node("DequantizeLinear", f"{base}/DequantizeLinear", inputs=inputs,
                                       outputs=[out], attrs=dq_attrs))
            node.inputs[1] = shared[(id(w), k_axis)] = out
            deq = _dequantize_blocks(q, scale, k_axis, self.opts["block_size"]) if bits == 4 else \
                q.astype(np.float64) * scale.reshape((1, -1) if k_axis == 0 else (-1, 1))
            done.append({"node": node.name, "shape": list(W.shape),
                         "max_abs_error": float(np.max(np.abs(deq - W))) if W.size else 0.0})
            done_for[id(w)] = done[-1]
        if not done:
            return PassResult(graph, False, {"scheme": self.opts["scheme"], "quantized_count": 0, "skipped": skipped})
        toposort(graph.cleanup(remove_unused_graph_inputs=False))
        if bits == 4:
            graph = _upgrade_opset(graph, 21, "DequantizeLinear with INT4 and blocks")
        else:
            graph = _upgrade_opset(graph, 13, "per-channel DequantizeLinear needs its axis attribute")
        metadata.set_quantization(graph, metadata.Quantization(self.opts["scheme"]))
        return PassResult(graph, True, {"scheme": self.opts["scheme"], "quantized": [d["node"] for d in done],
                                        "quantized_count": len(done), "layers": done, "skipped": skipped})


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def _fold_batchnorm(graph: gs.Graph, ctx) -> tuple[gs.Graph, int]:
    """fold-batchnorm (BatchNormalization, per-channel Adds and Muls folded into the conv before them); the BNs
    folded."""
    from graphopt.passes.fold_batchnorm import FoldBatchNorm
    res = FoldBatchNorm().run(graph, ctx)
    return res.graph, int(res.info.get("folded", 0))


def quantizer_error(e: BaseException) -> str:
    """onnxruntime's quantizer error as one line: the whole message (its first lines hold the cause, the last one
    often only advice), the exception type and the quantizer function that raised it."""
    text = " ".join(str(e).split()) or "(no message)"
    where, tb = None, e.__traceback__
    while tb is not None:
        if "onnxruntime" in tb.tb_frame.f_code.co_filename:
            where = tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    return printable(f"{type(e).__name__}: {text}" + (f" (in {where})" if where else ""), 400)


def invalid_node(model: onnx.ModelProto) -> tuple[str | None, str] | None:
    """None when onnx.checker (full check) accepts model; else (the node it names or None, the first line of its
    message)."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001 - the checker raises several types
        text = str(e)
        m = re.search(r"Name: (.*?) OpType:", text) or re.search(r"node name: ([^)]*)\)", text)
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
        return (m.group(1) if m else None), printable(first)
    return None


def _fp32_nodes_of(model: onnx.ModelProto, name: str, fp32_names: set[str]) -> list[str]:
    """The fp32 node(s) a node of the quantized model belongs to: itself, else the nodes its QuantizeLinear /
    DequantizeLinear chain feeds (or, for a chain feeding nothing of the original, the one that feeds it)."""
    if name in fp32_names:
        return [name]
    consumers: dict[str, list] = {}
    producer = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for o in n.output:
            producer[o] = n
    node = next((n for n in model.graph.node if n.name == name), None)
    if node is None:
        return []
    found, stack, seen = set(), [node], set()
    while stack:
        n = stack.pop()
        for o in n.output:
            for c in consumers.get(o, []):
                if c.name in fp32_names:
                    found.add(c.name)
                elif c.op_type in ("QuantizeLinear", "DequantizeLinear") and c.name not in seen:
                    seen.add(c.name)
                    stack.append(c)
    if not found:
        for i in node.input:
            p = producer.get(i)
            while p is not None and p.op_type in ("QuantizeLinear", "DequantizeLinear") and p.name not in fp32_names:
                p = producer.get(p.input[0])
            if p is not None and p.name in fp32_names:
                found.add(p.name)
    return sorted(found)


def quantize_checked(quantize, excluded: list[str], fp32_names: set[str]) -> tuple[onnx.ModelProto, list[dict]]:
    """quantize(excluded) -> QDQ model, checked with onnx.checker. When onnxruntime's quantizer emits an invalid
    graph, the fp32 node(s) behind the node the checker names are left in fp32 and the graph is quantized once more.
    Returns (model, [{"node", "problem"}] for the nodes so excluded); BadInput naming the node when that fails."""
    model = quantize(excluded)
    bad = invalid_node(model)
    if bad is None:
        return model, []
    name, why = bad
    culprits = [c for c in (_fp32_nodes_of(model, name, fp32_names) if name else []) if c not in excluded]
    if culprits:
        retry = quantize(excluded + culprits)
        if invalid_node(retry) is None:
            return retry, [{"node": c, "problem": why} for c in culprits]
    tried = f"; leaving {', '.join(map(printable, culprits))} in fp32 did not help" if culprits else ""
    raise BadInput(f"pass 'quantize': onnxruntime's quantizer produced an invalid graph at node "
                   f"'{printable(name or '?')}' ({why}){tried}: leave the node in fp32 with "
                   f"quantize{{exclude_nodes=[NAME]}} or its op type with exclude_ops=[OP]")


def _is_dq_output(model: onnx.ModelProto, name: str) -> bool:
    for n in model.graph.node:
        if name in n.output:
            return n.op_type == "DequantizeLinear"
    return False


def _tidy(model: onnx.ModelProto) -> None:
    """What onnxruntime's quantizer leaves that graphopt's checks dislike: a newer IR version, value_info of
    removed tensors, its pre-processing metadata."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    del model.graph.value_info[:]
    keep = [p for p in model.metadata_props if not p.key.startswith("onnx.quant")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    bad = [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    if bad:
        raise BadInput(f"pass 'quantize': onnxruntime produced non-standard op {bad[0].domain}.{bad[0].op_type}")


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer logs pre-processing advice on the root logger and its histogram calibrators
    print progress: keep both out of graphopt's output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _quantize_weight(W: np.ndarray, bits: int, k_axis: int, block: int):
    """Symmetric quantization of W[K, N] (k_axis 0) or W[N, K] (k_axis 1). int8: one scale per output channel;
    int4: one per block of `block` along K and output channel. Returns (q int8 values, scale, DQ attributes)."""
    qmax = 127 if bits == 8 else 7
    Wd = W.astype(np.float64)
    if bits == 8:
        amax = np.max(np.abs(Wd), axis=k_axis)
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        s = scale.reshape((1, -1) if k_axis == 0 else (-1, 1)).astype(np.float64)
        q = np.clip(np.rint(Wd / s), -qmax, qmax).astype(np.int8)
        return q, scale, {"axis": 1 - k_axis}
    K = W.shape[k_axis]
    nb = -(-K // block)
    pad = nb * block - K
    Wp = np.pad(Wd, ((0, pad), (0, 0)) if k_axis == 0 else ((0, 0), (0, pad)))
    if k_axis == 0:
        blocks = Wp.reshape(nb, block, W.shape[1])
        amax = np.max(np.abs(blocks), axis=1)                       # [nb, N]
    else:
        blocks = Wp.reshape(W.shape[0], nb, block)
        amax = np.max(np.abs(blocks), axis=2)                       # [N, nb]
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    full = np.repeat(scale.astype(np.float64), block, axis=k_axis)
    full = full[:W.shape[0], :W.shape[1]]
    q = np.clip(np.rint(Wd / full), -8, 7).astype(np.int8)
    return q, scale, {"axis": k_axis, "block_size": block}


def _int4_constant(name: str, values: np.ndarray) -> gs.Constant:
    """An INT4 initializer (packed two per byte by onnx.helper) as a graphsurgeon constant."""
    tensor = onnx.helper.make_tensor(name, onnx.TensorProto.INT4, list(values.shape),
                                     values.astype(np.int8).ravel().tolist())
    return gs.Constant(name, gs.ir.tensor.LazyValues(tensor))


def _dequantize_blocks(q: np.ndarray, scale: np.ndarray, k_axis: int, block: int) -> np.ndarray:
    full = np.repeat(scale.astype(np.float64), block, axis=k_axis)[:q.shape[0], :q.shape[1]]
    return q.astype(np.float64) * full


def _upgrade_opset(graph: gs.Graph, opset: int, why: str) -> gs.Graph:
    if (graph.opset or 0) >= opset:
        return graph
    model = to_onnx(graph)
    from onnx import version_converter
    try:
        up = version_converter.convert_version(model, opset)
    except Exception as e:  # noqa: BLE001
        raise BadInput(f"pass 'quantize': cannot convert the model from opset {graph.opset} to {opset} ({why}): "
                       f"{printable(' '.join(str(e).split()))}") from e
    up.ir_version = min(max(up.ir_version, 10), MAX_IR_VERSION)
    return from_onnx(up)


# ---------------------------------------------------------------------------------------------------------------
# the self-check criterion for compiled int8 artifacts
# ---------------------------------------------------------------------------------------------------------------

