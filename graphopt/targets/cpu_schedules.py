"""Default CPU schedules applied to the fused PrimFuncs before building (no tuning needed).

schedule_module(mod, target) is tvm_lowering.build's schedule hook: it runs after FuseTIR, and after
MetaScheduleApplyDatabase when a tuning database is given (functions MetaSchedule scheduled carry
"tirx.is_scheduled" and are left alone). Every other PrimFunc is given to graphopt's rules in order, each on a
fresh Schedule of the untouched function:

    conv2d_nhwc  cpu_conv.schedule_conv_nhwc   channels-last convolutions (cpu_layout.to_nhwc), depthwise included
    conv2d     cpu_conv.schedule_conv          regular / pointwise / grouped convolutions (NCHW)
    depthwise  cpu_conv.schedule_conv_spatial  depthwise convolutions, pooling windows, other window reductions
    matmul     cpu_matmul.schedule_matmul      dense / matmul / batch_matmul (+ epilogues)
    reduction  cpu_reduce.schedule_reduction   row reductions: softmax, layer-norm, mean / global pooling, sums
    generic    cpu_reduce.schedule_generic     anything else: parallel outer loops, vectorized inner loop

Rules recognise functions by analysing the TIR (iteration kinds, access patterns), never by name. A rule that
does not recognise the function returns False; one that a schedule primitive rejects raises; either way the
next rule gets a fresh schedule, and a function no rule takes stays as it was (correct, just slow). Schedule
primitives preserve semantics (only the floating-point summation order changes); the one TVM hazard found -
vectorizing a loop that holds more than one block is silently miscompiled - is excluded by
check_vectorized_loops on every result. A second hazard - compute_at / reverse_compute_at drop the instances
a tile does not reach (a fused Pad's border stayed unwritten) - is avoided by inline_epilogue (only pointwise
epilogues go into tiles) and caught by check_full_coverage on every result.

Scheduled functions get "tirx.is_scheduled", "graphopt.schedule_rule" and op_pattern 8 (opaque, so the
FuseOps that tvm.compile runs again cannot re-fuse them). Constant weights a rule wants in another layout are
repacked through layout-rewrite preprocess blocks: SplitLayoutRewritePreproc moves them into separate
functions and fold_prepack evaluates those at compile time (one LLVM build for all of them).

On llvm targets tirx.exp, tirx.erf and tirx.sigmoid (fp32) are lowered to vectorizable polynomial approximations
(cpu_sched_common.register_fast_math), instead of LLVM's scalar libm calls (sigmoid: without exp's special cases).
"""
from __future__ import annotations

import logging

import tvm
from tvm import relax, tirx
from tvm.s_tir import Schedule

from graphopt.errors import reraise_if_strict

from . import x86_isa
from .target_attrs import num_cores
from .cpu_sched_common import Ctx, check_full_coverage, check_vectorized_loops, register_fast_math
from .relax_layout import rewrite_calls
from .cpu_vector_math import vectorizable_math

log = logging.getLogger("graphopt.cpu_schedules")

#: PrimFunc attribute MetaScheduleApplyDatabase (and we) set on scheduled functions
SCHEDULED_ATTR = "tirx.is_scheduled"
#: attribute recording which graphopt rule scheduled a function (for tests and debugging)
RULE_ATTR = "graphopt.schedule_rule"


def fp32_lanes(target) -> int:
    """SIMD width in fp32 lanes from the target's mcpu / mattr (AVX-512: 16, AVX2: 8, else 4)."""
    if target is None:
        return 4
    return x86_isa.vector_bits(x86_isa.features(str(target.attrs.get("mcpu", "")), target.attrs.get("mattr", []))) // 32


def constant_params(mod) -> dict[str, set[int]]:
    """For each PrimFunc name: the parameter indices that receive a relax.Constant at every call site."""
    calls: dict[str, list] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir):
            gv, args = e.args[0], e.args[1]
            fields = list(args.fields) if isinstance(args, relax.Tuple) else [args]
            calls.setdefault(gv.name_hint, []).append([isinstance(a, tvm.ir.expr.Constant) for a in fields])

    for _, f in mod.functions.items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    out = {}
    for name, sites in calls.items():
        common = set(range(len(sites[0])))
        for s in sites:
            common &= {i for i, c in enumerate(s) if c}
        out[name] = common
    return out


def _rules():
    from . import cpu_conv, cpu_matmul, cpu_reduce
    return [("conv2d_nhwc", cpu_conv.schedule_conv_nhwc), ("conv2d", cpu_conv.schedule_conv),
            ("depthwise", cpu_conv.schedule_conv_spatial),
            ("matmul", cpu_matmul.schedule_matmul), ("reduction", cpu_reduce.schedule_reduction),
            ("generic", cpu_reduce.schedule_generic)]


def default_schedule(func_or_mod, target, const_params=frozenset()):
    """Apply the first rule that takes func_or_mod (a PrimFunc or an IRModule whose "main" is one).
    Returns (Schedule or None, rule name or None, notes). The Schedule is traced, so its trace can be stored
    as a MetaSchedule tuning record."""
    if isinstance(func_or_mod, tvm.IRModule):
        mod = func_or_mod
    else:
        func = func_or_mod
        if func.attrs is None or "global_symbol" not in func.attrs:
            func = func.with_attr("global_symbol", "main")
        mod = tvm.IRModule({"main": func})
    lanes, cores = fp32_lanes(target), num_cores(target)
    for name, rule in _rules():
        sch = Schedule(mod)
        ctx = Ctx(lanes=lanes, cores=cores, const_params=set(const_params))
        try:
            if not rule(sch, ctx):
                continue
            check_vectorized_loops(sch)
            check_full_coverage(sch)
        except Exception as e:  # noqa: BLE001 - a rule that fails leaves the function to the next rule
            reraise_if_strict(e)
            msg = str(e).strip().splitlines()
            log.debug("rule %s failed: %s", name, msg[-1] if msg else type(e).__name__)
            continue
        return sch, name, ctx.notes
    return None, None, []


def schedule_func(func: tirx.PrimFunc, target, const_params=frozenset()) -> tuple[tirx.PrimFunc, str | None, list]:
    """Schedule one PrimFunc with the first rule that applies; returns (func, rule name or None, notes)."""
    sch, rule, notes = default_schedule(func, target, const_params)
    if sch is None:
        return func, None, []
    return sch.mod["main"], rule, notes


def schedule_module(mod, target):
    """Return mod with graphopt's default schedules applied to each fused PrimFunc it knows how to schedule."""
    register_fast_math()
    consts = constant_params(mod)
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and SCHEDULED_ATTR in func.attrs and int(func.attrs[SCHEDULED_ATTR]):
            # MetaSchedule's record: keep it, but never let a later FuseOps re-fuse it
            updates[gv] = func.with_attr("op_pattern", 8)
            continue
        if relax.analysis.has_reshape_pattern(func):
            continue    # left as it is, tvm.compile's RewriteDataflowReshape makes it a view (no copy, no kernel)
        new, rule, _ = schedule_func(func, target, consts.get(gv.name_hint, set()))
        if rule is None:
            continue
        new = new.with_attr(SCHEDULED_ATTR, True).with_attr(RULE_ATTR, rule).with_attr("op_pattern", 8)
        # keep the original attributes (global symbol etc.)
        if func.attrs is not None and "global_symbol" in func.attrs:
            new = new.with_attr("global_symbol", func.attrs["global_symbol"])
        elif new.attrs is not None and "global_symbol" in new.attrs:
            new = new.without_attr("global_symbol")
        updates[gv] = new
    mod = mod.clone()  # the caller's module stays as it was
    for gv, f in list(mod.functions.items()):
        if isinstance(f, tirx.PrimFunc):
            mod[gv] = vectorizable_math(updates.get(gv, f))   # erf / rsqrt would scalarize vector loops
    # weight repacking blocks (ours, or from MetaSchedule records) -> separate functions, evaluated now
    try:
        mod = relax.transform.SplitLayoutRewritePreproc()(mod)
    except Exception as e:  # noqa: BLE001 - the repacking then simply stays inside the kernels (correct, slower)
        log.warning("SplitLayoutRewritePreproc failed (%s); weights are repacked at run time",
                    str(e).strip().splitlines()[-1:] or type(e).__name__)
    else:
        mod = fold_prepack(mod, target)
    return mod


def fold_prepack(mod, target):
    """Evaluate every weight-prepack call whose inputs are constants (what FoldConstant would do, but with
    one LLVM build for all of them instead of one per call) and replace it by its result."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    sites = []  # (callee name, [constant args])

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir) and e.args[0].name_hint.endswith("_weight_prepack"):
            args = e.args[1]
            fields = list(args.fields) if isinstance(args, relax.Tuple) else [args]
            if all(isinstance(a, tvm.ir.expr.Constant) for a in fields):
                sites.append((e.args[0].name_hint, fields))

    for _, f in mod.functions.items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    if not sites:
        return mod
    names = sorted({n for n, _ in sites})
    funcs = {n: mod[n].with_attr("global_symbol", n) for n in names}
    lib = tvm.compile(tvm.IRModule(funcs), target=target)
    results = []
    for name, fields in sites:
        func = funcs[name]
        outs = []
        for p in func.params[len(fields):]:
            outs.append(tvm.runtime.empty([int(d) for d in p.shape], str(p.dtype)))
        lib[name](*[c.value for c in fields], *outs)
        results.append((name, fields, [o.numpy() for o in outs]))

    def replace(_bb, new):
        if new.op.same_as(call_tir):
            args = new.args[1]
            fields = list(args.fields) if isinstance(args, relax.Tuple) else [args]
            for name, consts, outs in results:
                if name == new.args[0].name_hint and len(consts) == len(fields) and \
                        all(a.same_as(c) for a, c in zip(fields, consts)):
                    return relax.const(outs[0]) if len(outs) == 1 else relax.Tuple([relax.const(o) for o in outs])
        return new

    mod = rewrite_calls(mod, replace)
    return relax.transform.DeadCodeElimination()(mod)
