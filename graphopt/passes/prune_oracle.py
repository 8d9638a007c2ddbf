"""prune-channels' oracle: why removal is exact by construction, and the check that it was.

Every use of a unit's channels is one of: a pass-through op whose output channel c depends only on input channel
c (activations, BN, per-channel parameters, layout ops, elementwise ops with the other operands in the same
unit), or a *sink* that contracts channels away (the input-channel axis of Conv / ConvTranspose / Gemm /
MatMul, both sides of an activation x activation MatMul contraction). Anything else froze the unit. So the only
way a unit influences what is kept is through its sinks, and

    pruned graph == original graph with the unit's channels multiplied by 0 at every sink

must hold exactly (up to float summation order). Zeroing the producer's weights would not be enough (a BN shift
or a bias after it makes the channel non-zero again), which is why the oracle zeroes the *incoming* side at the
consumers: `oracle_check(graph, plan)` inserts `Mul(x, mask)` in front of every sink input of the ORIGINAL graph
(mask 0 on the removed channels, 1 elsewhere), builds the pruned graph, and runs both in onnxruntime on seeded
inputs (or on ctx.data's calibration arrays); it returns the largest absolute difference. The pass runs it by
default (`verify_oracle=true`, `verify_removal`) and fails with CheckFailed when the graphs disagree beyond 1e-5
(relative to the output magnitude) and also in float64, where a correct removal agrees to ~1e-12. A wrong weight
slice, a wrong Reshape constant or a missed coupling all break that equality.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import ort, verify
from graphopt.errors import CheckFailed
from graphopt.graph import copy as copy_graph, np_dtype, to_onnx, toposort

from .prune_removal import Names, Plan, apply_removal, nodes_for

ORACLE_ATOL = 1e-5
ORACLE_FP64_RTOL = 1e-9


def apply_masks(graph: gs.Graph, plan: Plan) -> gs.Graph:
    """The oracle's 'zeroed original': Mul(x, mask) in front of every sink input that loses channels."""
    g = plan.groups
    nodes = nodes_for(graph, g)
    names = Names(graph)
    for s in g.sinks:
        k = plan.keep(s.slots)
        if k.all():
            continue
        node = nodes[s.node]
        x = node.inputs[s.input]
        mshape = [1] * s.rank
        mshape[s.axis] = len(k)
        mask = gs.Constant(names(f"{x.name}_oracle_mask"), k.astype(np_dtype(x)).reshape(mshape))
        y = gs.Variable(names(f"{x.name}_oracle_masked"), dtype=x.dtype)
        graph.nodes.append(gs.Node("Mul", names(f"{node.name}_oracle_mask"), inputs=[x, mask], outputs=[y]))
        node.inputs[s.input] = y
    toposort(graph)
    return graph


#: output ops that can hide a difference (a sigmoid at 0 or 1, a softmax's argmax): the oracle also compares the
#: tensor they read
SATURATING = {"Sigmoid", "Softmax", "LogSoftmax", "Tanh", "HardSigmoid", "Clip", "Relu", "ArgMax", "TopK"}


def with_pre_activations(a: gs.Graph, b: gs.Graph) -> tuple[gs.Graph, gs.Graph]:
    """Copies of two graphs with the same outputs in which every output made by a saturating op also exposes that
    op's input, when both graphs have it (by name, same shape). Pruned detectors and classifiers on random inputs
    often saturate (a DBNet map of exact zeros) and would make an output-only comparison vacuous."""
    a, b = copy_graph(a), copy_graph(b)
    ta, tb = a.tensors(), b.tensors()
    for out in list(a.outputs):
        prod = out.inputs[0] if out.inputs else None
        if prod is None or prod.op not in SATURATING or not prod.inputs:
            continue
        name = prod.inputs[0].name
        x, y = ta.get(name), tb.get(name)
        if isinstance(x, gs.Variable) and isinstance(y, gs.Variable) and x.shape == y.shape and \
                x.dtype is not None and x not in a.outputs:
            a.outputs.append(x)
            b.outputs.append(y)
    return a, b


def _oracle_outputs(graph, plan, pruned, feeds, seed):
    masked = apply_masks(copy_graph(graph), plan)
    if pruned is None:
        pruned = apply_removal(copy_graph(graph), plan)
    masked, pruned = with_pre_activations(masked, pruned)
    feeds = feeds if feeds is not None else verify.seeded_inputs(graph, seed)
    ref = ort.run(to_onnx(masked), feeds)
    got = ort.run(to_onnx(pruned), {k: v for k, v in feeds.items() if k in {t.name for t in pruned.inputs}})
    return ref, verify.outputs_by_position(masked, ref, pruned, got)


def oracle_check(graph: gs.Graph, plan: Plan, pruned: gs.Graph | None = None, feeds: dict | None = None,
                 seed: int = 0) -> float:
    """Largest |zeroed original - pruned| over the outputs (onnxruntime). `graph` is the graph the plan was made
    for (left unchanged); `pruned` the result of apply_removal (computed on a copy when not given)."""
    ref, got = _oracle_outputs(graph, plan, pruned, feeds, seed)
    return max((ort.max_error(r, got[name]) for name, r in ref.items()), default=0.0)


def oracle_holds(graph, plan, pruned=None, feeds=None, seed=0, atol=ORACLE_ATOL) -> tuple[bool, float]:
    """(outputs agree within atol scaled by the output magnitude and rtol=atol, max abs error)."""
    ref, got = _oracle_outputs(graph, plan, pruned, feeds, seed)
    ok, err, _ = verify.compare(ref, got, rtol=atol, atol=atol, scale_atol=True)
    return ok, err


def oracle_fp64(graph: gs.Graph, plan: Plan, pruned: gs.Graph, feeds: dict) -> tuple[float, float] | None:
    """The oracle in float64: (max |zeroed original - pruned|, max |output|). Deep or freshly pruned graphs can
    amplify float32 rounding past the fp32 tolerance (other channel counts change the accumulation order); in
    float64 a correct removal agrees to ~1e-12 while a wrong one keeps its error. None when the trainable view
    cannot run the graph."""
    masked, pruned = with_pre_activations(apply_masks(copy_graph(graph), plan), pruned)
    ref, got = verify.fp64_outputs(masked, feeds), verify.fp64_outputs(pruned, feeds)
    if ref is None or got is None:
        return None
    got = verify.outputs_by_position(masked, ref, pruned, got)
    err = max((float(np.abs(r - got[k]).max()) for k, r in ref.items() if r.size), default=0.0)
    return err, max((float(np.abs(r).max()) for r in ref.values() if r.size), default=0.0)


def fp64_verdict(original, plan, pruned, feeds, err, info):
    """fp32 disagreement: exact in float64 means float32 rounding (recorded); otherwise a real failure."""
    r = oracle_fp64(original, plan, pruned, feeds)
    if r is None or r[0] > ORACLE_FP64_RTOL * max(1.0, r[1]):
        more = "" if r is None else f"; in float64 they differ by {r[0]:.3g}"
        raise CheckFailed(f"pass 'prune-channels': the pruning oracle fails (zeroed original and pruned graph "
                          f"differ by {err:.3g}{more}); this is a bug in the channel analysis")
    info["oracle_fp64_max_error"] = max(info.get("oracle_fp64_max_error", 0.0), r[0])


def verify_removal(original: gs.Graph, plan: Plan, pruned: gs.Graph, runs: list[dict]) -> dict:
    """The oracle on each run's feeds: {"oracle_max_error"}, and where float32 disagreed but float64 agrees (float32
    rounding), "oracle_fp64_max_error" and "oracle_note"; CheckFailed where float64 disagrees too."""
    info = {}
    worst = 0.0
    for feeds in runs:
        ok, err = oracle_holds(original, plan, pruned, feeds)
        worst = max(worst, err)
        if not ok:
            fp64_verdict(original, plan, pruned, feeds, err, info)
    info["oracle_max_error"] = worst
    if "oracle_fp64_max_error" in info:
        info["oracle_note"] = (f"float32 outputs differ by up to {worst:.3g}: the pruned graph amplifies "
                               f"float32 rounding; in float64 (torch) zeroed and pruned graphs agree to "
                               f"{info['oracle_fp64_max_error']:.3g}")
    return info
