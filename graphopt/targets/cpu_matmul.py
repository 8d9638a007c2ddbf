"""CPU schedule rule for matmul / dense / batch_matmul: C[b.., m, n] += A[b.., m, k] * B[b.., k, n].

Register tile of m_bn rows x n_bn columns (n vectorized, rows unrolled, A broadcast), reduction over k
outside the tile; the tile loop nest is (batch, n blocks, m blocks) fused and parallel so a B panel
(K x n_bn) stays in cache while the rows of A stream past it. A constant B is repacked at compile time into
panels [N / n_bn, K, n_bn] (layout-rewrite preprocess, evaluated by cpu_schedules.fold_prepack); a B stored as
[.., n, k]
(transposed) that is not constant is repacked once per call in a parallel stage. The epilogue (bias,
activation, residual, scaling) is inlined into one block computed after each tile, vectorized along n.
"""
from __future__ import annotations

from tvm import tirx

from .cpu_reduce import vectorize_row
from .cpu_sched_common import (MAX_STACK_BYTES, PREPROC, Ctx, block_work, extents, inline_epilogue, iter_kinds,
                               maybe_parallel, must_vectorize, param_index, read_index, root_blocks,
                               schedule_injective_block, try_vectorize)


def find_matmul(sch):
    for b in root_blocks(sch):
        kinds = iter_kinds(sch, b)
        if not (kinds.endswith("R") and kinds.count("R") == 1 and kinds[:-1] == "S" * (len(kinds) - 1)
                and len(kinds) >= 3):
            continue
        blk = sch.get(b)
        if len(blk.reads) != 2 or len(blk.writes) != 1 or str(blk.writes[0].source.dtype) != "float32":
            continue
        return b
    return None


def _analyse(sch, block):
    """Return (a_index, b_index, b_is_nt) or None."""
    blk = sch.get(block)
    ivs = [iv.var for iv in blk.iter_vars]
    m, n, k = ivs[-3], ivs[-2], ivs[-1]
    w = blk.writes[0]
    if not all(isinstance(r.min, tirx.Var) and r.min.same_as(v) for r, v in zip(w.region, ivs[:-1])):
        return None
    a_i = b_i = None
    for i, r in enumerate(blk.reads):
        mins = [rg.min for rg in r.region]
        if any(not (isinstance(x, tirx.Var) or isinstance(x, tirx.IntImm)) for x in mins):
            return None
        uses = lambda v: any(isinstance(x, tirx.Var) and x.same_as(v) for x in mins)  # noqa: E731
        if uses(m) and uses(k) and not uses(n):
            a_i = i
        elif uses(n) and uses(k) and not uses(m):
            b_i = i
    if a_i is None or b_i is None:
        return None
    bmins = [rg.min for rg in blk.reads[b_i].region]
    amins = [rg.min for rg in blk.reads[a_i].region]
    if not (isinstance(amins[-1], tirx.Var) and amins[-1].same_as(k)):
        return None  # A must be [.., m, k]
    if isinstance(bmins[-1], tirx.Var) and bmins[-1].same_as(n) and bmins[-2].same_as(k):
        nt = False
    elif isinstance(bmins[-1], tirx.Var) and bmins[-1].same_as(k) and bmins[-2].same_as(n):
        nt = True
    else:
        return None
    return a_i, b_i, nt


def _ceil_to(n: int, step: int) -> int:
    return -(-n // step) * step


#: a padded tile is taken only when its estimated time is this much below the best exact one's (padding costs
#: copies of the padded operands and predicated edge tiles)
PAD_GAIN = 1.1


def _tile_cycles(m_bn: int, v: int) -> float:
    """Cycles per reduction step of an m_bn x v-vector register tile: two FMA pipes, two loads per cycle (v B
    vectors, m_bn A broadcasts), and a 4-cycle FMA latency that fewer than 8 accumulators cannot hide."""
    return max(m_bn * v / 2, (m_bn + v) / 2, 4.0)


def _pick_tile(M: int, N: int, lanes: int):
    """Register tile (m_bn rows, n_bn columns) of least estimated time: (m_bn, n_bn, M_pad, N_pad). A tile
    that does not divide M or N pads them (zero rows / columns computed and dropped): an N of 6625 or 15 (a
    CTC vocabulary, a 15-wide attention head) otherwise leaves half-vector or scalar code. The accumulators
    and operands must fit the vector registers (32 with AVX-512, else 16) and the accumulator up to twice the
    stack limit: a workspace allocation per tile is cheap next to its K-long reduction, and LLVM keeps the
    accumulators in registers either way."""
    regs = 32 if lanes >= 16 else 16
    exact = padded = None
    for n_bn in (2 * lanes, lanes, lanes // 2, lanes // 4):
        if n_bn < 4:
            continue
        v = max(1, n_bn // lanes)
        max_rows = min(12, 2 * MAX_STACK_BYTES // 4 // n_bn, (regs - v - 1) // v)
        n_pad = _ceil_to(N, n_bn)
        for m_bn in range(max_rows, 0, -1):
            m_pad = _ceil_to(M, m_bn)
            cost = (m_pad // m_bn) * (n_pad // n_bn) * _tile_cycles(m_bn, v)
            cand = (cost, m_pad * n_pad, -m_bn * n_bn, m_bn, n_bn, m_pad, n_pad)
            if (m_pad, n_pad) == (M, N) and (exact is None or cand < exact):
                exact = cand
            if padded is None or cand < padded:
                padded = cand
    best = exact if exact is not None and exact[0] <= padded[0] * PAD_GAIN else padded
    return best[3:]


def schedule_matmul(sch, ctx: Ctx) -> bool:
    mm = find_matmul(sch)
    if mm is None:
        return False
    info = _analyse(sch, mm)
    if info is None:
        return False
    a_i, b_i, nt = info
    ext = extents(sch, mm)
    if ext is None:
        return False
    M, N, K = ext[-3], ext[-2], ext[-1]
    work = 1
    for e in ext:
        work *= e
    lanes = ctx.lanes
    m_bn, n_bn, m_pad, n_pad = _pick_tile(M, N, lanes)
    blk = sch.get(mm)
    func = sch.mod["main"]
    b_buf = blk.reads[b_i].source
    b_param = param_index(func, b_buf)
    b_const = b_param is not None and b_param in ctx.const_params and len(b_buf.shape) == 2

    _schedule_producers(sch, mm, ctx)
    root_epi = None
    if (m_pad, n_pad) != (M, N):
        epi, b_pad = _pad(sch, mm, ext, b_i, m_bn if m_pad != M else 1, n_bn if n_pad != N else 1, ctx)
        if n_pad != N and n_pad > n_bn:
            # the bound check on the padded columns would scalarize the epilogue of every tile: the tiles write
            # the padded result, and the epilogue runs over the real columns afterwards, its row tail split off
            root_epi, epi = epi, sch.cache_write(mm, 0, "global")
    else:
        b_pad = None
        epi = inline_epilogue(sch, mm, ctx)
        if epi is None:
            if param_index(func, blk.writes[0].source) is None:
                return False
            epi = sch.cache_write(mm, 0, "global")

    loops = sch.get_loops(mm)
    batch, m, n, k = loops[:-3], loops[-3], loops[-2], loops[-1]
    mo, mi = sch.split(m, [None, m_bn])
    no, ni = sch.split(n, [None, n_bn])
    if b_const and batch:
        # one B for every batch entry (a [1, 7, 7, K] activation times a [K, N] weight): the batch loops run inside
        # the panel loop, so each panel of B is read from memory once, not once per batch entry (ConvNeXt-T's 7x7
        # MLP matmuls, M = 7 rows x 7 batch entries, streamed their 9.4 MB weight 7 times: 4.5 ms, onnxruntime 2.1)
        sch.reorder(no, *batch, mo, k, mi, ni)
        par = sch.fuse(no, *batch, mo)
    else:
        sch.reorder(*batch, no, mo, k, mi, ni)
        par = sch.fuse(*batch, no, mo)
    maybe_parallel(sch, par, work, ctx)
    sch.unroll(mi)
    must_vectorize(sch, ni)
    sch.reverse_compute_at(epi, par)
    el = sch.get_loops(epi)
    if len(el) >= 2:
        try_vectorize(sch, el[-1])
    init = sch.decompose_reduction(mm, k)
    il = sch.get_loops(init)
    try_vectorize(sch, il[-1])
    if b_const:
        # the weight, in panels [N / n_bn, K, n_bn] (zero columns where N is padded), computed at compile time
        if b_pad is None:
            bc = sch.cache_read(mm, read_index(sch, mm, b_buf), "global")
        else:
            bc = b_pad
        sch.annotate(bc, PREPROC, True)
        ctx.preproc = True
        if nt:
            sch.transform_layout(bc, ("write", 0), lambda nn, kk: (nn // n_bn, kk, nn % n_bn))
        else:
            sch.transform_layout(bc, ("write", 0), lambda kk, nn: (nn // n_bn, kk, nn % n_bn))
    elif nt:
        # a transposed activation: repack into [.., K, N] once per call
        bc = b_pad if b_pad is not None else sch.cache_read(mm, read_index(sch, mm, b_buf), "global")
        nd = len(b_buf.shape)
        perm = list(range(nd - 2)) + [nd - 1, nd - 2]
        sch.transform_layout(bc, ("write", 0), lambda *ax: tuple(ax[p] for p in perm))
        if b_pad is None:
            schedule_injective_block(sch, bc, lanes, ctx.cores)
    if b_pad is not None and not b_const:
        schedule_injective_block(sch, b_pad, lanes, ctx.cores)
    if root_epi is not None:
        _schedule_rows(sch, root_epi, ctx)
    ctx.notes.append(f"matmul M={M} N={N} K={K} m_bn={m_bn} n_bn={n_bn} nt={nt} const_b={b_const}"
                     + (" batch inside panels" if b_const and batch else "")
                     + (f" padded to M={m_pad} N={n_pad}" if (m_pad, n_pad) != (M, N) else ""))
    return True


def _pad(sch, mm, ext, b_i: int, m_step: int, n_step: int, ctx: Ctx):
    """Pad the matmul's M / N up to multiples of the tile (pad_einsum: zero-filled copies of A and B, the
    result in a padded buffer copied out). The copy-out is computed with the epilogue inside each tile, so
    the padded result never leaves the tile. Returns (epilogue block, B's pad block or None)."""
    before = {sch.get(b).name_hint for b in root_blocks(sch)}
    sch.pad_einsum(mm, [1] * (len(ext) - 3) + [m_step, n_step, 1])
    mm_blk = sch.get(mm)
    new = [b for b in root_blocks(sch) if sch.get(b).name_hint not in before]
    result, b_src = mm_blk.writes[0].source, mm_blk.reads[b_i].source
    copy_out = [b for b in new if any(r.source.same_as(result) for r in sch.get(b).reads)]
    if len(copy_out) != 1:
        raise ValueError("pad_einsum made no single copy-out block")
    b_pad = None
    for b in new:
        if b.same_as(copy_out[0]):
            continue
        if sch.get(b).writes[0].source.same_as(b_src):
            b_pad = b             # scheduled by the caller (a compile-time repack, or a transpose)
        else:
            schedule_injective_block(sch, b, ctx.lanes, ctx.cores)
    epi = inline_epilogue(sch, copy_out[0], ctx)
    if epi is None:
        return copy_out[0], b_pad
    sch.compute_inline(copy_out[0])
    return epi, b_pad


def _schedule_rows(sch, block, ctx: Ctx) -> None:
    """An elementwise block at root over [.., rows, N]: rows parallel, each row vectorized (tail partitioned off)."""
    loops = sch.get_loops(block)
    if len(loops) < 2:
        return
    rows = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    maybe_parallel(sch, rows, block_work(sch, block), ctx)
    vectorize_row(sch, block, ctx.lanes)


def _schedule_producers(sch, main, ctx: Ctx) -> None:
    """Injective blocks before the matmul (fused reshapes/transposes) stay their own parallel stages:
    inlining them could turn the vectorized B loads into gathers. Blocks the matmul does not read (a slice
    only the epilogue adds: an unrolled RNN step) are inlined into the epilogue, which follows each tile."""
    name = sch.get(main).name_hint
    for b in root_blocks(sch):
        if sch.get(b).name_hint == name:
            break
        if "R" in iter_kinds(sch, b):
            raise ValueError("a reduction before the matmul")
        written = {w.source for w in sch.get(b).writes}
        if not any(r.source in written for r in sch.get(sch.get_sblock(name)).reads):
            sch.compute_inline(b)
            continue
        schedule_injective_block(sch, b, ctx.lanes, ctx.cores)
