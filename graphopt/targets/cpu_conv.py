"""CPU schedule rules for 2-D convolutions in NCHW (the PrimFuncs LegalizeOps + FuseTIR make of ONNX Conv:
optional padding block, the conv block, then elementwise epilogue blocks).

schedule_conv (regular, pointwise and grouped convolutions; weights constant or not):
  * the epilogue chain (bias, batch-norm arithmetic, activation, residual add, ...) is inlined into one block
    that is computed right after each register tile (reverse_compute_at), so outputs are written once;
  * a constant weight is repacked at compile time (layout-rewrite preprocess block) so that the weights one
    tile step needs are contiguous;
  * variant P, "pixels": unit stride along the width and a width that fills SIMD registers: a tile of m_bn
    output channels x n_bn output pixels of one row, pixels vectorized (unaligned input loads), weights
    broadcast, channels unrolled; the epilogue is vectorized along the pixels like the output;
  * variant C, "channels": otherwise (stride 2, 7x7 maps ...), when the output channels per group are a
    multiple of the SIMD width: a tile of ow_bn pixels x oc_bn channels, channels vectorized, input pixels
    broadcast; the accumulator is [pixel][channel], the epilogue is computed vectorized along the channels into
    a scratch tile and copied out to NCHW;
  * the reduction (input channels, kernel rows, kernel columns) runs outside the unrolled tile, whose
    accumulators stay in registers; (batch, channel blocks, output rows) are fused and run in parallel.

schedule_conv_spatial (depthwise convolutions, pooling windows, anything conv-like the first rule rejects):
  one output row segment vectorized along the width per step, reduction outside it, (batch, channel) in
  parallel, the padded input plane produced per parallel iteration (de-interleaved by phase for stride-2
  windows so the window reads stay contiguous).
"""
from __future__ import annotations

from tvm import tirx

from .cpu_sched_common import (MAX_STACK_BYTES, MAX_UNROLLED_LANES, PREPROC, Ctx, TensorLoad, extents,
                               inline_epilogue, int_or_none, iter_kinds, maybe_parallel, must_vectorize, param_index,
                               read_index, root_blocks, schedule_injective_block, try_vectorize, uses_var,
                               vectorize_inner, walk_expr)


def find_conv(sch):
    """The main conv block: 4 spatial + 3 reduce iters, out[n, f, y, x] += A[n, c', y', x'] * W[f, c, ry, rx]."""
    for b in root_blocks(sch):
        if iter_kinds(sch, b) != "SSSSRRR":
            continue
        blk = sch.get(b)
        if len(blk.reads) != 2 or len(blk.writes) != 1:
            continue
        if len(blk.writes[0].source.shape) != 4 or str(blk.writes[0].source.dtype) != "float32":
            continue
        return b
    return None


def _conv_info(sch, block):
    """Return (data_read_index, weight_read_index), or None unless the weight is read as W[f, c, ry, rx]."""
    blk = sch.get(block)
    _, f, _, _, c, ry, rx = [v.var for v in blk.iter_vars]
    w_idx = None
    for i, r in enumerate(blk.reads):
        mins = [rg.min for rg in r.region]
        if len(mins) == 4 and all(isinstance(m, tirx.Var) for m in mins) and \
                [m.same_as(v) for m, v in zip(mins, (f, c, ry, rx))] == [True] * 4:
            w_idx = i
    if w_idx is None:
        return None
    d_idx = 1 - w_idx
    return d_idx, w_idx


def _unit_stride_x(sch, conv, d_idx) -> bool:
    """The data's last index is x + (something without x): output pixels along x read consecutive inputs."""
    blk = sch.get(conv)
    x = blk.iter_vars[3].var
    last = blk.reads[d_idx].region[-1].min
    if isinstance(last, tirx.Var):
        return last.same_as(x)
    if isinstance(last, tirx.Add):
        for a, b in ((last.a, last.b), (last.b, last.a)):
            if isinstance(a, tirx.Var) and a.same_as(x) and not uses_var(b, x):
                return True
    return False


def pixel_tile(OW: int, OC: int, ocg: int | None, lanes: int, min_eff: float = 0.75):
    """(m_bn output channels, n_bn pixels) for the pixel-vectorized variant, or None when the width does not
    fill SIMD registers to at least min_eff (the channel-vectorized variant is then better)."""
    best = None
    for n_bn in range(min(OW, 2 * lanes), 3, -1):
        if OW % n_bn or (n_bn > lanes and n_bn % lanes):
            continue  # LLVM handles odd vector lengths above one register badly
        v = -(-n_bn // lanes)
        eff = n_bn / (v * lanes)
        if eff < min_eff:
            continue
        for m_bn in range(12, 0, -1):
            if OC % m_bn or (ocg is not None and ocg % m_bn) or m_bn * n_bn * 4 > MAX_STACK_BYTES or m_bn * v > 24:
                continue
            score = eff * (m_bn * v) / (m_bn + v)
            if best is None or score > best[0] + 1e-9:
                best = (score, m_bn, n_bn)
    return None if best is None else best[1:]


def schedule_conv(sch, ctx: Ctx) -> bool:
    conv = find_conv(sch)
    if conv is None:
        return False
    info = _conv_info(sch, conv)
    if info is None:
        return False
    d_idx, w_idx = info
    ext = extents(sch, conv)
    if ext is None:
        return False
    N, OC, OH, OW, IC, KH, KW = ext
    work = N * OC * OH * OW * IC * KH * KW
    blk = sch.get(conv)
    data_region = blk.reads[d_idx].region
    f_var = blk.iter_vars[1].var
    # the input channel index depends on f for grouped convolutions: f // ocg * icg + c
    grouped = uses_var(data_region[1].min, f_var)
    ocg = _group_out_channels(data_region[1].min, f_var) if grouped else None
    if grouped and ocg is None:
        return False
    lanes = ctx.lanes
    # variant P (pixels vectorized along the output width, weights broadcast, vectorized epilogue) for unit
    # stride and widths that fill vectors; variant C (output channels vectorized) otherwise
    unit = _unit_stride_x(sch, conv, d_idx)
    pixel = pixel_tile(OW, OC, ocg, lanes) if unit else None
    chan = None
    if pixel is None:
        # channels per group must cover whole vectors, else lanes would read different input channels
        chan = _channel_tile(OW, ocg if grouped else OC, lanes)
        if chan is None and unit:
            # channel counts without a vector-sized divisor (detection heads: 3 x 85 ...): partly filled
            # pixel vectors still beat one channel at a time
            pixel = pixel_tile(OW, OC, ocg, lanes, min_eff=0.3)
        if chan is None and pixel is None:
            return False
    w_buf = blk.reads[w_idx].source
    w_param = param_index(sch.mod["main"], w_buf)
    name = blk.name_hint

    # producers: the padding stays its own (parallel) stage unless it is a plain copy
    _schedule_producers(sch, conv, ctx)
    # epilogue chain -> one block
    out_buf_is_param = param_index(sch.mod["main"], blk.writes[0].source) is not None
    epi = inline_epilogue(sch, conv, ctx)
    if epi is None:
        if not out_buf_is_param:
            return False
        epi = sch.cache_write(conv, 0, "global")
        # cache_write puts the write-back block after conv: that is our epilogue
    conv = sch.get_sblock(name)
    n, f, y, x, c, ry, rx = sch.get_loops(conv)
    if pixel is not None:
        m_bn, n_bn = pixel
        fo, fi = sch.split(f, [None, m_bn])
        xo, xi = sch.split(x, [None, n_bn])
        sch.reorder(n, fo, y, xo, c, ry, rx, fi, xi)
        par = sch.fuse(n, fo, y)
        maybe_parallel(sch, par, work, ctx)
        sch.unroll(fi)
        must_vectorize(sch, xi)
        sch.reverse_compute_at(epi, xo)
        el = sch.get_loops(epi)
        try_vectorize(sch, el[-1])
        pack = m_bn
        tile = f"pixels m_bn={m_bn} n_bn={n_bn}"
    else:
        oc_bn, ow_bn = chan
        fo, fi = sch.split(f, [None, oc_bn])
        xo, xi = sch.split(x, [None, ow_bn])
        sch.reorder(n, fo, y, xo, c, ry, rx, xi, fi)
        par = sch.fuse(n, fo, y)
        maybe_parallel(sch, par, work, ctx)
        sch.unroll(xi)
        must_vectorize(sch, fi)
        # accumulator: (ow_bn, oc_bn) with the channel block innermost
        sch.transform_layout(conv, ("write", 0), lambda a, b, c_, d: (a, b // oc_bn, c_, d, b % oc_bn))
        sch.reverse_compute_at(epi, xo)
        _vectorize_channel_epilogue(sch, epi, xo, oc_bn)
        pack = oc_bn
        tile = f"channels oc_bn={oc_bn} ow_bn={ow_bn}"
    init = sch.decompose_reduction(conv, c)
    # constant weight: repack once at compile time so the tile's weights are contiguous
    if w_param is not None and w_param in ctx.const_params:
        wc = sch.cache_read(conv, read_index(sch, conv, w_buf), "global")
        sch.annotate(wc, PREPROC, True)
        ctx.preproc = True
        sch.transform_layout(wc, ("write", 0), lambda o, i, h, w: (o // pack, i, h, w, o % pack))
    il = sch.get_loops(init)
    try_vectorize(sch, il[-1])
    sch.unroll(il[-2])
    ctx.notes.append(f"conv {N}x{IC}->{OC} {OH}x{OW} k{KH}x{KW} {tile} grouped={grouped}")
    return True


def _vectorize_channel_epilogue(sch, epi, xo, oc_bn: int) -> None:
    """The channel-vectorized tile holds its accumulators as [pixel][channel] while the output is NCHW. An
    epilogue with real arithmetic (batch-norm, activation, residual) is computed vectorized along the channels
    into a [pixel][channel] scratch tile, then copied out along the pixels (the copy is the only scalar part)."""
    blk = sch.get(epi)
    if isinstance(blk.body, tirx.BufferStore) and isinstance(blk.body.value, TensorLoad):
        return  # a plain copy: nothing to vectorize
    if len(blk.writes) != 1 or len(blk.writes[0].region) != 4:
        return
    copy = sch.cache_write(epi, 0, "global")
    sch.reverse_compute_at(copy, xo)
    sch.transform_layout(epi, ("write", 0), lambda a, b, c_, d: (a, b // oc_bn, c_, d, b % oc_bn))
    loops = sch.get_loops(epi)
    inner = [lp for lp in loops if (int_or_none(sch.get(lp).extent) or 1) > 1][-2:]
    if len(inner) == 2 and int_or_none(sch.get(inner[0]).extent) == oc_bn:
        sch.reorder(inner[1], inner[0])
        try_vectorize(sch, inner[0])


def _group_out_channels(expr, f_var):
    """From f // ocg * icg + c return ocg."""
    found = []

    def visit(e):
        if isinstance(e, tirx.FloorDiv) and isinstance(e.a, tirx.Var) and e.a.same_as(f_var):
            v = int_or_none(e.b)
            if v:
                found.append(v)
    walk_expr(expr, visit)
    return found[0] if len(found) == 1 else None


def _channel_tile(OW: int, oc: int, lanes: int):
    """(oc_bn, ow_bn) for the channel-vectorized variant: oc_bn a multiple of the SIMD width dividing oc
    (the channels per group), ow_bn a divisor of the width; maximises FMAs per load with the accumulator on the
    stack. A width without a usable divisor gets a partial last tile (predicated, still correct)."""
    best = None
    for oc_bn in (2 * lanes, lanes, lanes // 2):
        if oc_bn < 4 or oc % oc_bn:
            continue
        v = max(1, oc_bn // lanes)
        max_ow = max(1, MAX_STACK_BYTES // 4 // oc_bn)
        for ow_bn in range(min(OW, max_ow), 0, -1):
            if OW % ow_bn:
                continue
            score = (ow_bn * v) / (ow_bn + v) * (oc_bn / (v * lanes))
            if best is None or score > best[0] + 1e-9:
                best = (score, oc_bn, ow_bn)
    if best is None:
        return None
    _, oc_bn, ow_bn = best
    max_ow = max(1, MAX_STACK_BYTES // 4 // oc_bn)
    if ow_bn < 4 and OW > max_ow:  # e.g. a prime width: a full tile plus a predicated remainder
        ow_bn = max_ow
    return oc_bn, ow_bn


def _schedule_producers(sch, conv, ctx: Ctx) -> None:
    for b in root_blocks(sch):
        if b.same_as(conv) or sch.get(b).name_hint == sch.get(conv).name_hint:
            break
        if "R" in iter_kinds(sch, b):
            continue
        blk = sch.get(b)
        body = blk.body
        plain = isinstance(body, tirx.BufferStore) and isinstance(body.value, TensorLoad)
        if plain:
            try:
                sch.compute_inline(b)
                continue
            except Exception:  # noqa: BLE001
                pass
        schedule_injective_block(sch, b, ctx.lanes, ctx.cores)


def find_window(sch):
    """A reduction block S..S R..R whose innermost spatial iter x and some reduce iter both index the last
    dimension of one input (x * stride + r): depthwise / narrow-group convolutions, pooling windows."""
    for b in reversed(root_blocks(sch)):
        kinds = iter_kinds(sch, b)
        a = len(kinds) - len(kinds.lstrip("S"))
        if a < 3 or kinds[a:] != "R" * (len(kinds) - a) or len(kinds) == a:
            continue
        blk = sch.get(b)
        if len(blk.writes) != 1 or str(blk.writes[0].source.dtype) not in ("float32", "float16"):
            continue
        ivs = [iv.var for iv in blk.iter_vars]
        x, rs = ivs[a - 1], ivs[a:]
        for r in blk.reads:
            last = r.region[-1].min
            if uses_var(last, x) and any(uses_var(last, rv) for rv in rs):
                return b, a
    return None


def _pick_width(ow: int, lanes: int) -> int:
    """Vector length along the width: the whole row when it fits one register, else a multiple of the
    register width, else the largest divisor that fits one register (odd lengths above one register
    legalize badly in LLVM), else (a prime width) one register with a partial last block: never the whole
    row, which LLVM needs minutes to compile for rows of thousands."""
    if ow <= lanes:
        return ow
    for c in (2 * lanes, lanes):
        if ow % c == 0:
            return c
    for c in range(lanes, 1, -1):
        if ow % c == 0:
            return c
    return lanes


def _x_stride(expr, x) -> int | None:
    """s for an index of the form x * s + r (r free of x)."""
    if isinstance(expr, tirx.Var):
        return 1 if expr.same_as(x) else None
    if isinstance(expr, tirx.Mul):
        if isinstance(expr.a, tirx.Var) and expr.a.same_as(x):
            return int_or_none(expr.b)
        return None
    if isinstance(expr, (tirx.Add, tirx.Sub)):
        sa = _x_stride(expr.a, x) if uses_var(expr.a, x) else None
        if uses_var(expr.b, x):
            return None
        return sa
    return None


def _split_padding(sch, block, lanes: int, stride: int) -> None:
    """A padding block computed per parallel iteration (its first loop is the parallel one): fill the plane
    with the pad value and copy the interior without a per-element condition (vectorized)."""
    loops = sch.get_loops(block)
    fill = None
    if len(loops) > 1:
        try:
            fill = sch.decompose_padding(block, loops[1])
        except Exception:  # noqa: BLE001 - not a recognised padding pattern: keep the conditional copy
            fill = None
    if fill is not None:
        vectorize_inner(sch, fill, lanes)
    vectorize_inner(sch, block, lanes)


def _deinterleave_plane(sch, pad_block, s: int) -> bool:
    """At root, before compute_at: store the padded plane as [.., h, w % s, w // s] (so a stride-s window reads
    consecutive addresses) and iterate the padding block in that storage order."""
    buf = sch.get(pad_block).writes[0].source
    nd = len(buf.shape)
    wp = int_or_none(buf.shape[-1])
    if wp is None or wp % s or len(sch.get(pad_block).iter_vars) != nd:
        return False
    imap = tirx.IndexMap.from_func(lambda *ax: tuple(ax[:nd - 1]) + (ax[nd - 1] % s, ax[nd - 1] // s), ndim=nd)
    sch.transform_layout(pad_block, ("write", 0), imap)
    sch.transform_block_layout(pad_block, imap)
    return True


def schedule_conv_spatial(sch, ctx: Ctx) -> bool:
    """Window reductions vectorized along the output width: loops (outer spatial, fused and parallel), rows,
    width blocks, reduction, width vector; the padded input plane is computed per parallel iteration."""
    found = find_window(sch)
    if found is None:
        return False
    main, a = found
    ext = extents(sch, main)
    if ext is None:
        return False
    OW = ext[a - 1]
    work = 1
    for e in ext:
        work *= e
    blk = sch.get(main)
    name = blk.name_hint
    out_is_param = param_index(sch.mod["main"], blk.writes[0].source) is not None
    epi = inline_epilogue(sch, main, ctx)
    if epi is None:
        if not out_is_param:
            return False
        epi = sch.cache_write(main, 0, "global")
    main = sch.get_sblock(name)
    ivs = [iv.var for iv in sch.get(main).iter_vars]
    stride = 1
    for r in sch.get(main).reads:
        last = r.region[-1].min
        if uses_var(last, ivs[a - 1]):
            stride = _x_stride(last, ivs[a - 1]) or 1
    xb = _pick_width(OW, ctx.lanes)
    loops = sch.get_loops(main)
    outer, h, x, red = loops[:a - 2], loops[a - 2], loops[a - 1], loops[a:]
    xo, xi = sch.split(x, [None, xb])
    sch.reorder(*outer, h, xo, *red, xi)
    par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    maybe_parallel(sch, par, work, ctx)
    must_vectorize(sch, xi)
    red_ext = 1
    for r in red:
        red_ext *= int_or_none(sch.get(r).extent) or 1 << 20
    if red_ext <= 49:  # small windows (3x3, 5x5, 7x7): unrolled, so the weights stay in registers across rows
        for r in red:
            sch.unroll(r)
    sch.reverse_compute_at(epi, xo)
    el = sch.get_loops(epi)
    try_vectorize(sch, el[-1])
    # producers (padding): one plane per parallel iteration, or inlined when a plain copy
    for b in root_blocks(sch):
        bn = sch.get(b).name_hint
        if bn == name or "R" in iter_kinds(sch, b):
            continue
        if sch.get(b).annotations.get(PREPROC) is not None:
            continue
        consumers = sch.get_consumers(b)
        if not any(sch.get(c).name_hint.startswith(name) for c in consumers):
            continue
        body = sch.get(b).body
        if isinstance(body, tirx.BufferStore) and isinstance(body.value, TensorLoad):
            try:
                sch.compute_inline(b)
                continue
            except Exception:  # noqa: BLE001
                pass
        deint = False
        if stride > 1:
            try:
                deint = _deinterleave_plane(sch, b, stride)
            except Exception:  # noqa: BLE001 - keep the natural layout
                deint = False
        try:
            sch.compute_at(b, par)
            if deint:
                pl = sch.get_loops(b)
                if len(pl) >= 3:  # (.., phase, column) -> (.., column, phase unrolled): s contiguous streams
                    sch.reorder(pl[-1], pl[-2])
                    sch.unroll(sch.get_loops(b)[-1])
            else:
                _split_padding(sch, b, ctx.lanes, stride)
        except Exception:  # noqa: BLE001
            schedule_injective_block(sch, b, ctx.lanes, ctx.cores)
    init = sch.decompose_reduction(main, red[0])
    try_vectorize(sch, sch.get_loops(init)[-1])
    ctx.notes.append(f"window {name} width block {xb}")
    return True


# --------------------------------------------------------------------------- channels-last (NHWC) convolutions


def find_conv_nhwc(sch):
    """The main block of a channels-last conv: out[n, y, x, f] += A[n, y', x', c'] * W[f, ry, rx, rc] (iters n, y, x,
    f spatial; ry, rx, rc reduce; weights OHWI). Returns (block, data read index, weight read index) or None."""
    for b in root_blocks(sch):
        if iter_kinds(sch, b) != "SSSSRRR":
            continue
        blk = sch.get(b)
        if len(blk.reads) != 2 or len(blk.writes) != 1 or len(blk.writes[0].region) != 4 or \
                str(blk.writes[0].source.dtype) != "float32":
            continue
        _, _, _, f, ry, rx, rc = [v.var for v in blk.iter_vars]
        for i, r in enumerate(blk.reads):
            mins = [rg.min for rg in r.region]
            if len(mins) == 4 and all(isinstance(m, tirx.Var) and m.same_as(v) for m, v in zip(mins, (f, ry, rx, rc))) \
                    and len(blk.reads[1 - i].region) == 4:
                return b, 1 - i, i
    return None


def _nhwc_channel_kind(expr, f, rc, rc_ext: int):
    """How a channels-last conv reads its input channel (the data index `expr`): ("dense", None) when it does not
    depend on the output channel f (input pixels are broadcast across a vector of output channels), ("group", ocg)
    for f // ocg * icg + rc, ("depthwise", None) for f (+ rc of extent 1) (a vector of output channels reads a
    vector of input channels); None otherwise."""
    if not uses_var(expr, f):
        return "dense", None
    if rc_ext == 1:
        if isinstance(expr, tirx.Var) and expr.same_as(f):
            return "depthwise", None
        if isinstance(expr, tirx.Add):
            for a, b in ((expr.a, expr.b), (expr.b, expr.a)):
                if isinstance(a, tirx.Var) and a.same_as(f) and (int_or_none(b) == 0 or
                                                                 (isinstance(b, tirx.Var) and b.same_as(rc))):
                    return "depthwise", None
    ocg = _group_out_channels(expr, f)
    return ("group", ocg) if ocg else None


#: the fewest accumulator vectors of a depthwise tile preferred for unrolling its whole window (5x5, 240 channels at
#: 12x80: 6 accumulators fully unrolled 0.75 ms, 15 with the window rows looped 0.96)
MIN_UNROLLED_DEPTHWISE_ACC = 6

#: the most accumulator vectors a depthwise tile is given: beside them its unrolled window keeps a weight vector per
#: tap (3x3 depthwise conv of 72 channels at 56x56, half-width vectors of 8 channels, 1 thread, AMD EPYC: 28-pixel
#: tiles 69 us, 14-pixel tiles 41 us; 24 channels 22 us, 32 channels in whole vectors 11 us)
MAX_DEPTHWISE_ACC = 16


def _nhwc_tile(width: int, oc: int, lanes: int, kind: str, ocg: int | None, window: int = 9):
    """(oc_bn output channels, ow_bn pixels) of a channels-last register tile: oc_bn a multiple of the SIMD width
    (half a register when no multiple divides oc), ow_bn a divisor of the width; the accumulators (ow_bn x oc_bn) fit
    MAX_STACK_BYTES, so they stay a stack array LLVM keeps in registers. Scored by vector FMAs per load, where a
    weight vector (re-read from L2 for every tile) counts three times an input broadcast (from L1); depthwise
    tiles load a vector per FMA whatever the shape, so they only want enough accumulators to hide FMA latency, and
    at most MAX_DEPTHWISE_ACC; ahead of all, a tile of at least MIN_UNROLLED_DEPTHWISE_ACC accumulators small
    enough that its whole window (`window` = KH * KW taps) unrolls within MAX_UNROLLED_LANES: four 5x5 depthwise
    convs of 240 channels at 12x80, 1 thread, Intel Xeon: 48 channels x 5 pixels (rows of the window looped)
    0.96 ms, 16 x 8 or 16 x 10 (all 25 taps unrolled) 0.64-0.69."""
    limit = MAX_STACK_BYTES // 4
    cands = [m * lanes for m in (1, 2, 3, 4) if oc % (m * lanes) == 0]
    if not cands:
        cands = [c for c in (lanes // 2, lanes // 4) if c >= 4 and oc % c == 0][:1]
    if kind == "group":
        cands = [c for c in cands if ocg % c == 0]
    best = None
    for oc_bn in cands:
        v = -(-oc_bn // lanes)
        for ow_bn in range(min(width, limit // oc_bn), 0, -1):
            if width % ow_bn:
                continue
            acc = ow_bn * v
            if acc + v + 1 > 32:
                continue  # accumulators + weight vectors + a broadcast: the AVX-512 register file
            if kind == "depthwise":
                score = min(acc, 12) - max(0, acc - MAX_DEPTHWISE_ACC) + 0.01 * oc_bn
                if window * ow_bn * oc_bn <= MAX_UNROLLED_LANES and acc >= MIN_UNROLLED_DEPTHWISE_ACC:
                    score += 12     # the whole window unrolls: ahead of every tile whose window rows loop
            else:
                score = acc / (ow_bn + 3 * v) * min(1.0, acc / 8)
            if best is None or score > best[0] + 1e-9:
                best = (score, oc_bn, ow_bn)
    return None if best is None else best[1:]


#: fp32 weights up to this size are read again from L2 for every output row (weights_first)
L2_WEIGHT_BYTES = 1 << 20


def weights_first(act_elems: int, weight_elems: int) -> bool:
    """Whether a channels-last conv runs its channel blocks outside its output rows (each block's weights read
    once, from L2 for the rows after the first) rather than rows outside channel blocks (every row reads all the
    weights): when the weights outgrow L2 and the activations. ResNet-18's 7x7x512 3x3 convs, 9.4 MB of fp32
    weights read once per output row, took 4.1 ms on 1 thread (onnxruntime 1.9)."""
    return 4 * weight_elems > L2_WEIGHT_BYTES and weight_elems > act_elems


def schedule_conv_nhwc(sch, ctx: Ctx) -> bool:
    """Channels-last convolution (regular, pointwise, grouped, depthwise): register tiles of ow_bn output pixels of
    one row x oc_bn output channels (vectorized), the reduction (kernel rows, kernel columns, input channels) outside
    the unrolled tile, weights repacked at compile time to [OC / oc_bn][KH][KW][IC][oc_bn] so one reduction step
    reads oc_bn contiguous weights; input pixels are broadcast (dense / grouped) or loaded as vectors (depthwise).
    The epilogue (bias, batch-norm arithmetic, activation, residual) is computed vectorized along the channels
    right after each tile. (batch, rows, channel blocks) run in parallel."""
    found = find_conv_nhwc(sch)
    if found is None:
        return False
    conv, d_idx, w_idx = found
    ext = extents(sch, conv)
    if ext is None:
        return False
    N, OH, OW, OC, KH, KW, IC = ext
    blk = sch.get(conv)
    f_var, rc_var = blk.iter_vars[3].var, blk.iter_vars[6].var
    kind = _nhwc_channel_kind(blk.reads[d_idx].region[3].min, f_var, rc_var, IC)
    if kind is None:
        return False
    kind, ocg = kind
    tile = _nhwc_tile(OW, OC, ctx.lanes, kind, ocg, KH * KW)
    if tile is None:
        return False
    oc_bn, ow_bn = tile
    work = N * OH * OW * OC * KH * KW * IC
    w_buf = blk.reads[w_idx].source
    w_param = param_index(sch.mod["main"], w_buf)
    name = blk.name_hint
    _inline_producers(sch, conv, ctx)
    out_is_param = param_index(sch.mod["main"], blk.writes[0].source) is not None
    epi = inline_epilogue(sch, conv, ctx)
    if epi is None:
        if not out_is_param:
            return False
        epi = sch.cache_write(conv, 0, "global")
    conv = sch.get_sblock(name)
    n, y, x, f, ry, rx, rc = sch.get_loops(conv)
    vec = min(oc_bn, ctx.lanes)      # vectors of exactly one register (LLVM scalarizes 48-lane vectors)
    fo, fm, fi = sch.split(f, [None, oc_bn // vec, vec])
    xo, xi = sch.split(x, [None, ow_bn])
    order = "weights" if kind == "dense" and weights_first(OH * OW * IC, OC * KH * KW * IC) else "rows"
    if order == "weights":
        sch.reorder(n, fo, y, xo, ry, rx, rc, xi, fm, fi)
        par = sch.fuse(n, fo, y)
    else:
        sch.reorder(n, y, fo, xo, ry, rx, rc, xi, fm, fi)
        par = sch.fuse(n, y, fo)
    maybe_parallel(sch, par, work, ctx)
    if kind == "depthwise" or KH * KW <= 49 and IC == 1:
        # the window unrolled around the tile, within MAX_UNROLLED_LANES (a 5x5 window over 5 x 48 lanes is not)
        tile_lanes = ow_bn * oc_bn
        if KW * tile_lanes <= MAX_UNROLLED_LANES:
            sch.unroll(rx)
            if KH * KW * tile_lanes <= MAX_UNROLLED_LANES:
                sch.unroll(ry)
    sch.unroll(xi)
    sch.unroll(fm)
    must_vectorize(sch, fi)
    sch.reverse_compute_at(epi, xo)
    el = sch.get_loops(epi)
    _, ev = sch.split(el[-1], [None, vec])
    try_vectorize(sch, ev)
    init = sch.decompose_reduction(conv, ry)
    if w_param is not None and w_param in ctx.const_params:
        wc = sch.cache_read(conv, read_index(sch, conv, w_buf), "global")
        sch.annotate(wc, PREPROC, True)
        ctx.preproc = True
        sch.transform_layout(wc, ("write", 0), lambda o, h, w, i: (o // oc_bn, h, w, i, o % oc_bn))
    il = sch.get_loops(init)
    try_vectorize(sch, il[-1])
    sch.unroll(il[-2])
    sch.unroll(il[-3])
    ctx.notes.append(f"conv nhwc {N}x{IC}->{OC} {OH}x{OW} k{KH}x{KW} {kind} oc_bn={oc_bn} ow_bn={ow_bn} "
                     f"outer={order}")
    return True


def _inline_producers(sch, conv, ctx: Ctx) -> None:
    """Inline the blocks before the conv (its padding) into the conv's input reads: the border test costs less than
    a padded copy of the input (measured on depthwise and 3x3 convs alike); a block that cannot be inlined stays
    its own parallel stage."""
    name = sch.get(conv).name_hint
    for b in root_blocks(sch):
        if sch.get(b).name_hint == name:
            break
        if "R" in iter_kinds(sch, b):
            continue
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001 - e.g. read by another block too
            schedule_injective_block(sch, b, ctx.lanes, ctx.cores)
