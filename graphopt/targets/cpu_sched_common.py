"""Helpers shared by graphopt's CPU schedule rules (cpu_conv, cpu_matmul, cpu_reduce, cpu_schedules).

Everything here analyses TIR structurally (iteration kinds, buffer accesses, block graph); block names are
only hints, never the sole reason a rule applies."""
from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

#: annotation SplitLayoutRewritePreproc looks for: the block is moved out into a prepack function, which
#: cpu_schedules.fold_prepack then evaluates at compile time when its input is a constant
PREPROC = "meta_schedule.layout_rewrite_preproc"
#: below this many multiply-adds (or elements) a parallel loop costs more (thread-pool wake-up, a few us) than
#: it saves
PAR_MIN_WORK = 1 << 16
#: the largest register-tile accumulator (bytes) kept on the stack: TVM allocates constant-size buffers of
#: 1024 bytes or more from the workspace pool (a call per tile)
MAX_STACK_BYTES = 1020


@dataclass
class Ctx:
    """What a rule may know about the function and the machine."""
    lanes: int                                   # fp32 SIMD lanes (16 AVX-512, 8 AVX2, 4 SSE)
    cores: int
    const_params: set = field(default_factory=set)  # indices of params that are constants at every call site
    notes: list = field(default_factory=list)       # what the rule did (for debugging and tests)
    preproc: bool = False                           # a layout-rewrite preprocess block was added


Expr = tvm.ir.expr.Expr
TensorLoad = tvm.ir.expr.TensorLoad


def walk_expr(e, fn) -> None:
    """Call fn on every node of the TIR expression e (pre-order)."""
    fn(e)
    if isinstance(e, (tirx.Var, tirx.IntImm, tirx.FloatImm)):
        return
    for name in ("a", "b", "value", "condition", "true_value", "false_value"):
        sub = getattr(e, name, None)
        if isinstance(sub, Expr):
            walk_expr(sub, fn)
    for name in ("args", "indices"):
        subs = getattr(e, name, None)
        if subs is not None:
            for s in subs:
                if isinstance(s, Expr):
                    walk_expr(s, fn)


def uses_var(e, var) -> bool:
    """Whether the TIR expression e mentions var."""
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(e, []))


def maybe_parallel(sch: Schedule, loop, work: int, ctx: "Ctx") -> bool:
    """Parallelize loop when the function does enough work and there is more than one core."""
    ext = int_or_none(sch.get(loop).extent) or 0
    if ctx.cores > 1 and work >= PAR_MIN_WORK and ext > 1:
        sch.parallel(loop)
        return True
    return False


def block_work(sch: Schedule, block) -> int:
    """Iterations of block's loop nest (multiply-adds for a conv / matmul, elements for an elementwise op)."""
    n = 1
    for e in extents(sch, block) or [PAR_MIN_WORK]:
        n *= e
    return n


def int_or_none(e) -> int | None:
    if isinstance(e, int):
        return e
    if isinstance(e, tirx.IntImm):
        return int(e.value)
    return None


def extents(sch: Schedule, block) -> list[int] | None:
    out = []
    for iv in sch.get(block).iter_vars:
        v = int_or_none(iv.dom.extent)
        if v is None:
            return None
        out.append(v)
    return out


def iter_kinds(sch: Schedule, block) -> str:
    return "".join({tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}.get(iv.iter_type, "O")
                   for iv in sch.get(block).iter_vars)


def root_blocks(sch: Schedule):
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def has_block(sch: Schedule, name: str) -> bool:
    """Whether sch's root block has a child block called name."""
    return any(sch.get(b).name_hint == name for b in root_blocks(sch))


def param_index(func: tirx.PrimFunc, buf) -> int | None:
    """Position of buffer buf among func's parameters (None for an allocated buffer)."""
    for i, p in enumerate(func.params):
        if p.same_as(buf):
            return i
    return None


def read_index(sch: Schedule, block, buf) -> int:
    """Position of buf among block's reads (what cache_read wants)."""
    for i, r in enumerate(sch.get(block).reads):
        if r.source.same_as(buf):
            return i
    raise ValueError(f"block does not read {buf}")


_get_realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")


def block_realize(sch: Schedule, block):
    """The SBlockRealize of block (its iter bindings)."""
    return _get_realize(sch, block)


def consumers_chain(sch: Schedule, block) -> list:
    """Blocks after block at root level, in program order."""
    blocks = root_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    me = sch.get(block).name_hint
    i = names.index(me)
    return blocks[i + 1:]


def _is_point(region, ivs) -> bool:
    """region is the single element [iv0, iv1, ...] of the block iter vars ivs, in order."""
    return len(region) == len(ivs) and all(
        isinstance(r.min, tirx.Var) and r.min.same_as(iv.var) and int_or_none(r.extent) == 1
        for r, iv in zip(region, ivs))


def is_pointwise_over(sch: Schedule, block, shape, bufs) -> bool:
    """block computes one element per element of a tensor of `shape` (all-spatial iters of exactly those
    extents) and writes, and reads any buffer of bufs, at exactly that element."""
    blk = sch.get(block)
    ivs = list(blk.iter_vars)
    dims = [int_or_none(d) for d in shape]
    if None in dims or any(iv.iter_type != tirx.IterVar.DataPar for iv in ivs) or \
            [int_or_none(iv.dom.extent) for iv in ivs] != dims:
        return False
    if len(blk.writes) != 1 or not _is_point(blk.writes[0].region, ivs):
        return False
    return all(_is_point(r.region, ivs) for r in blk.reads if any(r.source.same_as(b) for b in bufs))


def inline_epilogue(sch: Schedule, main_block, ctx: Ctx):
    """Inline the pointwise blocks that follow main_block (bias, activation, residual add, ...) into the last
    of them, so that one epilogue block reads main_block's output element for element; callers compute it
    inside their tiles (reverse_compute_at). Returns that block, or None when main_block has no consumer.
    Blocks after it that are not pointwise over main_block's output (the next layer's Pad, a reshape) stay at
    root as their own stages: computed at a tile they would get only the elements the tile reaches, leaving
    the rest (a padding border) unwritten. When the first consumer is such a block, the epilogue is a copy
    (cache_write). Raises when the chain cannot be reduced (the caller then falls back)."""
    after = consumers_chain(sch, main_block)
    if not after:
        return None
    blk = sch.get(main_block)
    shape = blk.writes[0].source.shape
    bufs = [blk.writes[0].source]
    n = 0
    while n < len(after) and is_pointwise_over(sch, after[n], shape, bufs):
        bufs.append(sch.get(after[n]).writes[0].source)
        n += 1
    tail = [sch.get(b).name_hint for b in after[n:]]
    for b in after[:n - 1]:
        sch.compute_inline(b)
    epi = after[n - 1] if n else sch.cache_write(main_block, 0, "global")
    kept = []
    for i, name in enumerate(tail):
        if i < len(tail) - 1 and "R" not in iter_kinds(sch, sch.get_sblock(name)):
            try:
                sch.compute_inline(sch.get_sblock(name))   # one pass over the data for the whole tail
                continue
            except Exception:  # noqa: BLE001 - e.g. read by a reduction: it stays its own stage
                pass
        kept.append(name)
    for name in kept:
        b = sch.get_sblock(name)
        if "R" not in iter_kinds(sch, b):
            schedule_injective_block(sch, b, ctx.lanes, ctx.cores)
    return epi


def _product(values) -> int | None:
    n = 1
    for v in values:
        v = int_or_none(v)
        if v is None:
            return None
        n *= v
    return n


def check_full_coverage(sch: Schedule) -> None:
    """Raise unless the spatial blocks writing each output of the function run, together, at least once per
    output element: reverse_compute_at silently drops the instances a tile does not reach (a fused Pad's
    border), leaving part of the output unwritten (the caller falls back to the next rule). Only outputs are
    counted (producers moved by compute_at legitimately compute just what their consumers read); a reduction
    counts through its init block."""
    func = sch.mod["main"]
    written: dict[int, int | None] = {}
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        blk = sch.get(b)
        if any(iv.iter_type != tirx.IterVar.DataPar for iv in blk.iter_vars):
            continue
        points = _product(iv.dom.extent for iv in blk.iter_vars)
        runs = _product(sch.get(lp).extent for lp in sch.get_loops(b))
        for w in blk.writes:
            i = param_index(func, w.source)
            if i is not None:
                n = None if points is None or runs is None or written.get(i, 0) is None else min(points, runs)
                written[i] = None if n is None else written.get(i, 0) + n
    for i, n in written.items():
        size = _product(func.params[i].shape)
        if n is not None and size is not None and n < size:
            raise ValueError(f"output {func.params[i].name} gets {n} of its {size} elements written")


def schedule_injective_block(sch: Schedule, block, lanes: int, cores: int) -> None:
    """Parallelize the outer spatial loops and vectorize the innermost one (when it is long enough)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    exts = [int_or_none(sch.get(lp).extent) for lp in loops]
    if any(e is None for e in exts):
        return
    inner = loops[-1]
    vec = None
    if exts[-1] >= lanes and exts[-1] % lanes == 0:
        o, vec = sch.split(inner, [None, lanes])
        loops = loops[:-1] + [o]
        exts = exts[:-1] + [exts[-1] // lanes]
    elif 4 <= exts[-1] <= 4 * lanes:
        vec = inner
        loops, exts = loops[:-1], exts[:-1]
    # parallel over the outer loops until there is enough work per core
    n_par, par_ext = 0, 1
    for e in exts:
        if par_ext >= 4 * cores and n_par >= 1:
            break
        par_ext *= e
        n_par += 1
    total = 1
    for e in exts:
        total *= e
    if n_par and cores > 1 and total * (lanes if vec is not None else 1) >= PAR_MIN_WORK:
        fused = sch.fuse(*loops[:n_par]) if n_par > 1 else loops[0]
        if par_ext > 1:
            sch.parallel(fused)
    if vec is not None:
        try_vectorize(sch, vec)


def is_innermost_serial(sch: Schedule, loop) -> bool:
    """loop is serial and its body is exactly one block (vectorizing anything else is unsafe)."""
    lp = sch.get(loop)
    return lp.kind == tirx.ForKind.SERIAL and isinstance(lp.body, tvm.s_tir.SBlockRealize)


def must_vectorize(sch: Schedule, loop) -> None:
    """Vectorize loop or raise (the rule then fails and the next one is tried)."""
    if not is_innermost_serial(sch, loop):
        raise ValueError("refusing to vectorize a loop that is not innermost and serial")
    sch.vectorize(loop)


def try_vectorize(sch: Schedule, loop) -> bool:
    """Vectorize loop when that is safe; report whether it was done."""
    if not is_innermost_serial(sch, loop) or (int_or_none(sch.get(loop).extent) or 0) < 2:
        return False
    sch.vectorize(loop)
    return True


def vectorize_inner(sch: Schedule, block, lanes: int) -> None:
    """Vectorize the innermost loop of block: split by lanes when divisible, whole when short; otherwise
    leave it to LLVM's loop vectorizer (a predicated split would not vectorize)."""
    loops = sch.get_loops(block)
    if not loops or not is_innermost_serial(sch, loops[-1]):
        return
    inner = loops[-1]
    ext = int_or_none(sch.get(inner).extent)
    if ext is None or ext < 2:
        return
    if ext % lanes == 0 and ext > lanes:
        _, v = sch.split(inner, [None, lanes])
        try_vectorize(sch, v)
    elif ext <= 2 * lanes:
        try_vectorize(sch, inner)


# --------------------------------------------------------------------------- vectorizable erf
# LLVM lowers tirx.erf to a scalar libm call (erff), which blocks vectorization of GELU epilogues. This is the
# rational approximation Eigen (and TVM's topi.fast_erf) use; max abs error 4e-7 in fp32, well inside
# graphopt's 1e-4 tolerance (onnxruntime's own Erf kernel is also a polynomial approximation).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)
_fast_math_registered = False


def fast_erf_f32(x):
    f = lambda v: tirx.const(v, "float32")  # noqa: E731
    x = tirx.max(tirx.min(x, f(4.0)), f(-4.0))
    x2 = x * x
    p = f(_ERF_P[0])
    for a in _ERF_P[1:]:
        p = p * x2 + f(a)
    q = f(_ERF_Q[0])
    for b in _ERF_Q[1:]:
        q = q * x2 + f(b)
    return p * x / q


def _lower_erf(op):
    x = op.args[0]
    dt = str(x.ty.dtype) if hasattr(x.ty, "dtype") else str(x.ty)
    base, _, lanes = dt.partition("x")
    if base == "float32":
        return fast_erf_f32(x)
    if base in ("float16", "bfloat16"):
        f32 = "float32" + (f"x{lanes}" if lanes else "")
        return tirx.Cast(dt, fast_erf_f32(tirx.Cast(f32, x)))
    return tirx.call_pure_extern(dt, "erf", x)


# LLVM also scalarizes llvm.exp on vectors into libm expf calls (softmax, sigmoid / SiLU, ...). Cephes' expf:
# 2^n * p(r) with r = x - n ln2 (split in two constants), relative error ~1e-7; NaN and +-inf behave like expf,
# results below the smallest normal flush to 0, and (88.0, 88.72] saturates at e^88.
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def fast_exp_f32(x, lanes: str = ""):
    f = lambda v: tirx.const(v, "float32")  # noqa: E731
    xc = tirx.max(tirx.min(x, f(88.0)), f(-87.33654475))
    n = tirx.floor(xc * f(1.44269504088896341) + f(0.5))
    r = xc - n * f(0.693359375) - n * f(-2.12194440e-4)
    p = f(_EXP_P[0])
    for c in _EXP_P[1:]:
        p = p * r + f(c)
    y = p * (r * r) + r + f(1.0)
    i32 = "int32" + (f"x{lanes}" if lanes else "")
    f32 = "float32" + (f"x{lanes}" if lanes else "")
    two_n = tirx.reinterpret(f32, tirx.shift_left(tirx.Cast(i32, n) + tirx.const(127, "int32"),
                                                  tirx.const(23, "int32")))
    vec = (lambda v: tirx.Broadcast(f(v), int(lanes))) if lanes else f  # noqa: E731
    out = tirx.Select(x < f(-87.33654475), vec(0.0), y * two_n)
    out = tirx.Select(x > f(88.72283905), vec(float("inf")), out)
    return tirx.Select(tirx.isnan(x), x, out)


def _lower_exp(op):
    x = op.args[0]
    dt = str(x.ty.dtype) if hasattr(x.ty, "dtype") else str(x.ty)
    base, _, lanes = dt.partition("x")
    if base == "float32":
        return fast_exp_f32(x, lanes)
    return tirx.call_llvm_pure_intrin(dt, "llvm.exp", x)


# TVM legalizes tirx.sigmoid as 1 / (1 + exp(-x)), so every SiLU / sigmoid epilogue paid for fast_exp_f32's clamps,
# special-case selects, floor and int conversion. Sigmoid needs e^-x only for x in [-89, 18]: above 18 the result
# rounds to 1.0; at -89 n is 128, 2^n's bits are +inf's and the result is 0 (as onnxruntime's, so SiLU(-inf) is NaN
# there too); below -88 the true result is under 6.1e-39. NaN propagates through the arithmetic, so there are no
# special cases: n = round(-x log2 e) with the 1.5 * 2^23 shifter (its low bits are n, so 2^n needs no conversion),
# s = x + n ln2 (Cody-Waite, two constants), e^-x = 2^n p(-s) with p a degree-5 fit of e^r on [-ln2/2, ln2/2]
# (Lawson-weighted least squares for relative error: 1.0e-7). Max relative error of the sigmoid in float32: 2.6e-7
# against float64 for x above -87, absolute error under 6.1e-39 below (onnxruntime's own Sigmoid, MLAS's rational
# approximation, is off by up to 1.7e-7 absolute, i.e. wholly wrong relatively for x below -16). A conv 24 -> 144 at 56x56 with SiLU: 188 -> 142 us
# (with ReLU6 87; onnxruntime: conv 116 + its separate SiLU 62), EfficientNet-B0 6.36 -> 5.81 ms (1 thread, AMD EPYC).
_SIGMOID_EXP_P = (1.0000001192092896, -0.9999997019767761, 0.49998825788497925, -0.16667571663856506,
                  0.04192199558019638, -0.008300413377583027)      # e^-s = sum P[k] s^k
_SHIFTER = 12582912.0       # 1.5 * 2^23: float bits 0x4B400000 + n for an integer n, |n| < 2^22


def fast_sigmoid_f32(x, lanes: str = ""):
    """1 / (1 + e^-x) for float32 x (scalar, or vectors of `lanes` lanes) in vectorizable arithmetic."""
    f = lambda v: tirx.const(v, "float32")  # noqa: E731
    vec = (lambda v: tirx.Broadcast(f(v), int(lanes))) if lanes else f  # noqa: E731
    xc = tirx.Select(x > f(18.0), vec(18.0), x)            # comparisons false for NaN: NaN stays NaN
    xc = tirx.Select(xc < f(-89.0), vec(-89.0), xc)
    t = xc * f(-1.44269504088896341) + f(_SHIFTER)
    n = t - f(_SHIFTER)                                    # round(-x log2 e), in [-26, 128]
    s = xc + n * f(0.693359375) + n * f(-2.12194440e-4)
    p = f(_SIGMOID_EXP_P[-1])
    for c in _SIGMOID_EXP_P[-2::-1]:
        p = p * s + f(c)
    i32, f32 = ("int32", "float32") if not lanes else (f"int32x{lanes}", f"float32x{lanes}")
    two_n = tirx.reinterpret(f32, tirx.shift_left(tirx.reinterpret(i32, t) + tirx.const(127 - 0x4B400000, "int32"),
                                                  tirx.const(23, "int32")))
    return f(1.0) / (f(1.0) + p * two_n)


def _lower_sigmoid(op):
    x = op.args[0]
    dt = str(x.ty.dtype) if hasattr(x.ty, "dtype") else str(x.ty)
    base, _, lanes = dt.partition("x")
    if base == "float32" and (not lanes or lanes.isdigit()):
        return fast_sigmoid_f32(x, lanes)
    one = tirx.const(1.0, base)
    return one / (one + tirx.exp(-x))                      # TVM's own legalization


def register_fast_math() -> None:
    """Lower tirx.erf, tirx.exp and tirx.sigmoid (fp32) on llvm targets to the vectorizable approximations above
    (process-wide, idempotent)."""
    global _fast_math_registered
    if not _fast_math_registered:
        tirx.register_intrin_lowering("tirx.erf", target="llvm", f=_lower_erf, level=99)
        tirx.register_intrin_lowering("tirx.exp", target="llvm", f=_lower_exp, level=99)
        tirx.register_intrin_lowering("tirx.sigmoid", target="llvm", f=_lower_sigmoid, level=99)
        _fast_math_registered = True


#: the widest vectorized loop a rule may emit (elements) and the most iterations an unrolled loop may have,
#: and the most elements of straight-line code unrolled loops around a block may produce: LLVM's compile time
#: grows much faster than linearly with vector width and unrolled code (a 2033-lane row took minutes)
MAX_VECTOR_LANES = 64
MAX_UNROLL = 64
MAX_UNROLLED_LANES = 4096


def check_vectorized_loops(sch: Schedule) -> None:
    """Raise unless every vectorized loop's body is exactly one block (TVM's vectorizer silently miscompiles
    a vectorized loop around other loops or several blocks) and vector and unroll widths stay within the
    bounds above (the rule then fails and the next one gets the function)."""
    seen = set()
    todo = list(sch.get_child_blocks(sch.get_sblock("root")))
    while todo:
        b = todo.pop()
        straight = 1      # elements of straight-line code: product of the vector and unrolled loops around b
        for lp in sch.get_loops(b):
            loop = sch.get(lp)
            ext = int_or_none(loop.extent)
            if loop.kind in (tirx.ForKind.VECTORIZED, tirx.ForKind.UNROLLED) and ext is not None:
                vector = loop.kind == tirx.ForKind.VECTORIZED
                limit = MAX_VECTOR_LANES if vector else MAX_UNROLL
                if ext > limit:
                    raise ValueError(f"{'vectorized' if vector else 'unrolled'} loop {loop.loop_var.name} has {ext} "
                                     f"iterations (at most {limit})")
                straight *= ext
            key = loop.loop_var.name + str(id(loop))
            if loop.kind == tirx.ForKind.VECTORIZED and key not in seen:
                seen.add(key)
                if not isinstance(loop.body, tvm.s_tir.SBlockRealize):
                    raise ValueError(f"vectorized loop {loop.loop_var.name} does not hold exactly one block")
        if straight > MAX_UNROLLED_LANES:
            raise ValueError(f"block {sch.get(b).name_hint} is unrolled and vectorized into {straight} elements "
                             f"(at most {MAX_UNROLLED_LANES})")
        todo.extend(sch.get_child_blocks(b))
