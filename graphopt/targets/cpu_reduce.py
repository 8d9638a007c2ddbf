"""CPU schedule rules for row reductions (softmax, layer-norm, mean / global pooling, sums) and the generic
fallback for every other PrimFunc.

Row reductions: every block shares P leading spatial axes (the rows); the output block's row loops are fused
and parallel, every other block is computed inside that loop (so a row stays in L1 between the passes),
elementwise passes are vectorized along the row, and each reduction over a long enough row is rfactor-ed
into a vector of SIMD-width partial results (vectorized) followed by a short horizontal reduction (rows the
SIMD width does not divide: as many partial results as a divisor of the row up to four widths).

Generic: inline injective intermediates, then parallelize the outer loops and vectorize the innermost loop
of each remaining block (only spatial loops are vectorized, reductions are only parallelized).
"""
from __future__ import annotations

from tvm import tirx

from .cpu_sched_common import (Ctx, block_realize, block_work, int_or_none, is_innermost_serial, iter_kinds,
                               maybe_parallel, root_blocks, schedule_injective_block, try_vectorize, uses_var,
                               vectorize_inner)


def _leading_s(kinds: str) -> int:
    return len(kinds) - len(kinds.lstrip("S"))


def schedule_reduction(sch, ctx: Ctx) -> bool:
    blocks = root_blocks(sch)
    if not blocks:
        return False
    kinds = [iter_kinds(sch, b) for b in blocks]
    if not any("R" in k for k in kinds):
        return False
    for k in kinds:
        if "O" in k or not k or k[0] != "S":
            return False
        if "R" in k and k[_leading_s(k):] != "R" * (len(k) - _leading_s(k)):
            return False  # reduce iters must be trailing
    P = min(_leading_s(k) if "R" in k else len(k) for k in kinds)
    if P < 1 or not _rows_consistent(sch, blocks, P) or any(_is_column(sch, b) for b in blocks):
        return False
    names = [sch.get(b).name_hint for b in blocks]
    lanes = ctx.lanes
    work = sum(block_work(sch, b) for b in blocks)
    # 1. rfactor long reductions into SIMD-wide partial results (at root, before compute_at)
    rf_names = []
    for name, k in zip(names, kinds):
        if "R" not in k:
            continue
        b = sch.get_sblock(name)
        loops = sch.get_loops(b)
        red = loops[_leading_s(k):]
        r = sch.fuse(*red) if len(red) > 1 else red[0]
        ext = int_or_none(sch.get(r).extent)
        width = _rfactor_width(ext, lanes)
        if width is None:
            continue
        try:
            _, ri = sch.split(r, [None, width])
            rf = sch.rfactor(ri, len(sch.get(b).writes[0].region))
            rf_names.append(sch.get(rf).name_hint)
        except Exception:  # noqa: BLE001 - e.g. a reducer rfactor does not know: keep the scalar reduction
            continue
    # 2. parallel rows on the output block, everything else computed inside
    out = sch.get_sblock(names[-1])
    loops = sch.get_loops(out)
    rows = sch.fuse(*loops[:P]) if P > 1 else loops[0]
    maybe_parallel(sch, rows, work, ctx)
    for b in reversed(root_blocks(sch)[:-1]):
        sch.compute_at(b, rows, preserve_unit_loops=True)
    if len(sch.get_loops(out)) > 1 and "R" not in iter_kinds(sch, out):
        vectorize_row(sch, out, lanes)  # (rows is the out block's first loop: never that one)
    # 3. vectorize inside the row loop
    for b in sch.get_child_blocks(rows):
        name = sch.get(b).name_hint
        k = iter_kinds(sch, b)
        if name in rf_names:
            # rf block: (ko reduce, ki spatial): put ki innermost and vectorize it
            bl = sch.get_loops(b)
            inner = [lp for lp in bl[1:] if (int_or_none(sch.get(lp).extent) or 2) > 1]  # under the rows loop
            ki = [lp for lp in inner if _is_spatial_loop(sch, b, lp)]
            ko = [lp for lp in inner if not _is_spatial_loop(sch, b, lp)]
            if len(ki) == 1 and ko:
                sch.reorder(*ko, ki[0])
                try_vectorize(sch, ki[0])  # before decompose_reduction (see _column_reduction)
                init = sch.decompose_reduction(b, ko[0])
                try_vectorize(sch, sch.get_loops(init)[-1])
        elif "R" not in k:
            vectorize_row(sch, b, lanes)
    ctx.notes.append(f"rows P={P} rfactor={len(rf_names)}")
    return True


def vectorize_row(sch, b, lanes: int) -> None:
    """vectorize_inner, except that a long row the SIMD width does not divide (a 6625-way softmax, a 120-wide layer
    norm) is partitioned into a vectorized multiple of the width and a scalar tail: TVM scalarizes a vector loop
    with a bound check whole, and a row-long vector is beyond check_vectorized_loops' bounds."""
    loops = sch.get_loops(b)
    ext = int_or_none(sch.get(loops[-1]).extent) if loops else None
    if ext is None or ext <= 2 * lanes or ext % lanes == 0 or not is_innermost_serial(sch, loops[-1]):
        vectorize_inner(sch, b, lanes)
        return
    body, _ = sch.loop_partition(loops[-1], [ext // lanes * lanes, None])
    _, v = sch.split(body, [None, lanes])
    try_vectorize(sch, v)


def _rfactor_width(ext: int | None, lanes: int) -> int | None:
    """Partial results per row for a reduction of ext elements: the SIMD width when it divides ext, else the largest
    divisor of ext up to four SIMD widths (a 6625- or 18710-way softmax summed in one float32 accumulator is 10x
    further from the exact result than onnxruntime; TVM 0.27's rfactor of a split that does not divide ext drops
    the bound check and reads past the row, so only divisors)."""
    if ext is None or ext < 2 * lanes:
        return None
    if ext % lanes == 0:
        return lanes
    return next((w for w in range(4 * lanes, 3, -1) if ext % w == 0), None)


def _column_reduction(sch, b, n: int, ctx: Ctx) -> bool:
    """A reduction whose innermost spatial axis is the inputs' contiguous axis while the reduced axes are not
    (a sum / max over a middle axis): move the reduction loops outside that axis and vectorize it."""
    blk = sch.get(b)
    k = iter_kinds(sch, b)
    if n < 2 or k[n:] != "R" * (len(k) - n) or len(k) == n:
        return False
    ivs = [iv.var for iv in blk.iter_vars]
    x, rs = ivs[n - 1], ivs[n:]
    contiguous = False
    for r in blk.reads:
        last = r.region[-1].min
        if any(uses_var(last, rv) for rv in rs):
            return False
        if isinstance(last, tirx.Var) and last.same_as(x):
            contiguous = True
    if not contiguous:
        return False
    loops = sch.get_loops(b)
    if len(loops) != len(ivs):
        return False
    outer, xl, red = loops[:n - 1], loops[n - 1], loops[n:]
    sch.reorder(*outer, *red, xl)
    par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    maybe_parallel(sch, par, block_work(sch, b), ctx)
    vectorize_inner(sch, b, ctx.lanes)  # (before decompose_reduction: the update alone is no reduction block)
    init = sch.decompose_reduction(b, red[0])
    vectorize_inner(sch, init, ctx.lanes)
    ctx.notes.append(f"column reduction {blk.name_hint}")
    return True


def _is_column(sch, b) -> bool:
    """A reduction reading some input along its contiguous axis with a spatial variable (the reduced axis is
    strided): schedule_generic's column rule handles those better."""
    blk = sch.get(b)
    k = iter_kinds(sch, b)
    n = _leading_s(k)
    if "R" not in k or n < 1:
        return False
    x = blk.iter_vars[n - 1].var
    rs = [iv.var for iv in blk.iter_vars[n:]]
    for r in blk.reads:
        idx = [rg.min for rg in r.region]
        if isinstance(idx[-1], tirx.Var) and idx[-1].same_as(x) and \
                any(uses_var(i, rv) for i in idx[:-1] for rv in rs):
            return True
    return False


def _rows_consistent(sch, blocks, P: int) -> bool:
    """Every block writes, and reads the function's intermediates, at its own first P iteration variables
    (the rows). Otherwise (e.g. softmax over a middle axis) computing everything per row would recompute the
    reductions for every row."""
    root = sch.get(sch.get_sblock("root"))
    inter = list(root.alloc_buffers)
    for b in blocks:
        blk = sch.get(b)
        rows = [iv.var for iv in blk.iter_vars][:P]
        regions = list(blk.writes) + [r for r in blk.reads if any(r.source.same_as(t) for t in inter)]
        for r in regions:
            idx = [rg.min for rg in r.region]
            if len(idx) < P or not all(isinstance(i, tirx.Var) and i.same_as(v) for i, v in zip(idx[:P], rows)):
                return False
    return True


def _is_spatial_loop(sch, block, loop) -> bool:
    """Whether loop binds only spatial iters of block (it is the rfactor-ed lane loop)."""
    blk = sch.get(block)
    lv = sch.get(loop).loop_var
    br = block_realize(sch, block)
    if br is None:
        return False
    for iv, val in zip(blk.iter_vars, br.iter_values):
        if uses_var(val, lv) and iv.iter_type != tirx.IterVar.DataPar:
            return False
    return True


#: a function with more blocks is left to TVM: each compute_inline rewrites the whole function, so inlining
#: n blocks costs n^2 (an unrolled 300-step RNN's output Concat of 300 reshapes took 10 s)
MAX_GENERIC_BLOCKS = 64


def _order_for_transposed_read(sch, b) -> None:
    """A copy that reads its largest input along another axis than it writes (a transpose, NHWC -> NCHW): put the
    loop of that input's contiguous axis just outside the innermost (vectorized, output-contiguous) loop, so the
    cache lines one vector of gathered loads touches are reused by the next iterations instead of being evicted
    by a whole plane first (ConvNeXt's 56x56x96 transpose back: 3x faster)."""
    blk = sch.get(b)
    ivs = [iv.var for iv in blk.iter_vars]
    loops = sch.get_loops(b)
    if len(loops) != len(ivs) or len(ivs) < 3:
        return
    binds = block_realize(sch, b).iter_values
    if not all(isinstance(v, tirx.Var) and v.same_as(sch.get(lp).loop_var) for v, lp in zip(binds, loops)):
        return
    best, size = None, 0
    for r in blk.reads:
        last = r.region[-1].min
        n = 1
        for d in r.source.shape:
            n *= int_or_none(d) or 0
        if isinstance(last, tirx.Var) and int_or_none(r.region[-1].extent) == 1 and not last.same_as(ivs[-1]) \
                and n > size:
            hits = [i for i, v in enumerate(ivs) if v.same_as(last)]
            if hits:
                best, size = hits[0], n
    if best is None or best == len(ivs) - 2:
        return
    order = [lp for i, lp in enumerate(loops[:-1]) if i != best] + [loops[best], loops[-1]]
    sch.reorder(*order)


def schedule_generic(sch, ctx: Ctx) -> bool:
    blocks = root_blocks(sch)
    if not blocks or len(blocks) > MAX_GENERIC_BLOCKS:
        return False
    # inline injective intermediates (keep the output blocks)
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(sch.get_sblock("root"))}
    for b in blocks:
        name = sch.get(b).name_hint
        if name in outputs or "R" in iter_kinds(sch, b):
            continue
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001
            pass
    did = False
    for b in root_blocks(sch):
        k = iter_kinds(sch, b)
        if "O" in k:
            continue
        if "R" not in k:
            _order_for_transposed_read(sch, b)
            schedule_injective_block(sch, b, ctx.lanes, ctx.cores)
            did = True
            continue
        n = _leading_s(k)
        loops = sch.get_loops(b)
        if _column_reduction(sch, b, n, ctx):
            did = True
            continue
        # other reductions: parallelize the leading spatial loops
        if n and len(loops) >= n:
            par = sch.fuse(*loops[:n]) if n > 1 else loops[0]
            if maybe_parallel(sch, par, block_work(sch, b), ctx):
                did = True
    ctx.notes.append("generic")
    return did
