"""AMX tiles for graphopt's kernels (bf16/amx_kernels.py: tdpbf16ps; int8/amx_kernels.py: tdpbusd): the tile micro
kernel as LLVM IR functions imported into a kernel, the GEMM over a grid of stage pixels both kernels are, and the
process's permission to use the tile registers.

Both instructions have the same tile geometry, in 4-byte units (a bf16 pair, or four u8 / s8 bytes): an A tile is
16 rows of KP units (one row per output pixel), a B tile KP rows of 16 channels x one unit (the weights' VNNI-style
packing: [OCp/16, KH, KW, units, 16, unit]), a C tile 16 x 16 32-bit accumulators (fp32 / s32). The micro kernel
multiplies a block of 32 rows (two A tiles) by 32 output channels (two B tiles) into four accumulator tiles; the
caller runs ZERO, STEP over the reduction, then STORE puts the 32x32 block into a scratch buffer its TIR epilogue
reads. The 16-channel forms (STEP1, STORE1) serve a last block of 16 channels. The non-`.internal` LLVM intrinsics
take fixed tile numbers, so no tile register allocation is involved: tmm0-3 accumulate (rows 0-15 / 16-31 x
channels 0-15 / 16-31), tmm4-5 hold A, tmm6-7 hold B. CONFIG loads the tile configuration (a constant per KP:
palette 1, rows and bytes per row of every tile) at the start of each parallel run of blocks (any other kernel on
the thread may configure the tiles differently), RELEASE ends it. Each instruction (DOTS) has its own function
names, so bf16 and int8 kernels can share a module.

The GEMM (Grid, build): N images of `phases` x Hq x Wq stage pixels, grid row m = oh*Wq + ow; a conv's taps are
pixel offsets into the stage, so one A tile (16 consecutive grid rows) serves every tap with no im2col; rows with
ow >= OW are computed and dropped. Blocks are 32 grid rows x 32 channels; the last row block starts at rows - 32
(it overlaps the one before: the same rows are written twice with the same values).

Linux gives a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
without it the first tile instruction raises SIGILL. request_amx() asks for it; every process that runs a module
with these kernels must call it first (graphopt's loader does, tvm_lowering.VMRunner; the kernel builder does too,
for processes that build and run in place).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

CONFIG, RELEASE, ZERO, STEP, STEP1, STORE, STORE1 = (
    "graphopt_amx_config", "graphopt_amx_release", "graphopt_amx_zero", "graphopt_amx_step", "graphopt_amx_step1",
    "graphopt_amx_store", "graphopt_amx_store1")
#: tile rows: pixels per A tile (two A tiles per block) and channels per B tile
ROWS = 16
#: block rows (two A tiles) and channels (two B tiles)
BM, BN = 2 * ROWS, 32
#: weights up to this size are read from L2 again for every row block (rows_first); the AMX CPUs graphopt meets
#: (Sapphire / Granite Rapids) have 2 MB of L2 per core
L2_WEIGHT_BYTES = 3 << 19
#: parallel runs of consecutive blocks (enough for any thread count graphopt meets to share the work evenly)
CHUNKS = 64
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


@dataclass(frozen=True)
class Dot:
    """One AMX dot product: its LLVM intrinsic, the stage's element type, elements per 4-byte unit, the
    accumulator type and the suffix of its function names."""
    instr: str
    stage_dtype: str
    per_unit: int
    acc_dtype: str
    suffix: str


DOTS = {"bf16": Dot("tdpbf16ps", "uint16", 2, "float32", ""),      # bf16 pairs -> fp32
        "int8": Dot("tdpbusd", "uint8", 4, "int32", "_u8s8")}       # u8 x s8 quads -> s32 (exact)


@functools.cache
def request_amx() -> bool:
    """Ask Linux for this process's AMX tile state (once); True when granted. Idempotent and cheap."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def step_units(units: int) -> int:
    """KP: 4-byte units per tile step."""
    return min(16, units)


def padded_units(units: int) -> int:
    """The reduction's units padded to a multiple of KP (zero weights)."""
    kp = step_units(units)
    return -(-units // kp) * kp


def _config(kp: int) -> list[int]:
    """The 64-byte tile configuration: palette 1; colsb (u16 at 16 + 2t) and rows (u8 at 48 + t) of tile t."""
    cfg = [0] * 64
    cfg[0] = 1
    shapes = {0: (16, 64), 1: (16, 64), 2: (16, 64), 3: (16, 64), 4: (16, kp * 4), 5: (16, kp * 4), 6: (kp, 64),
              7: (kp, 64)}
    for t, (rows, colsb) in shapes.items():
        cfg[16 + 2 * t], cfg[17 + 2 * t], cfg[48 + t] = colsb & 0xFF, colsb >> 8, rows
    return cfg


def name(base: str, kp: int, dot: str = "bf16") -> str:
    """The extern name of base (ZERO, STEP, ...) for KP units per step (each KP has its own tile configuration)."""
    return f"{base}{DOTS[dot].suffix}_k{kp}"


def llvm_ir(kp: int, dot: str = "bf16") -> str:
    """The micro kernel's LLVM IR for KP units per step (1..16): A tiles 16 x 4*KP bytes, B tiles KP x 64."""
    assert 1 <= kp <= 16, kp
    d = DOTS[dot]
    cfg = ", ".join(f"i8 {b}" for b in _config(kp))
    cf, rl, z, s, s1, st, st1 = (name(b, kp, dot) for b in (CONFIG, RELEASE, ZERO, STEP, STEP1, STORE, STORE1))
    g = f"graphopt_amx_cfg{d.suffix}_k{kp}"
    return f"""
@{g} = private unnamed_addr constant [64 x i8] [{cfg}], align 64
define internal void @{cf}() #0 {{
  call void @llvm.x86.ldtilecfg(ptr @{g})
  ret void
}}
define internal void @{rl}() #0 {{
  call void @llvm.x86.tilerelease()
  ret void
}}
define internal void @{z}() #0 {{
  call void @llvm.x86.tilezero(i8 0)
  call void @llvm.x86.tilezero(i8 1)
  call void @llvm.x86.tilezero(i8 2)
  call void @llvm.x86.tilezero(i8 3)
  ret void
}}
define internal void @{s}(ptr %a, i64 %lda, ptr %b0, ptr %b1) #0 {{
  %off = mul i64 %lda, 16
  %a1 = getelementptr i8, ptr %a, i64 %off
  call void @llvm.x86.tileloadd64(i8 4, ptr %a, i64 %lda)
  call void @llvm.x86.tileloadd64(i8 5, ptr %a1, i64 %lda)
  call void @llvm.x86.tileloadd64(i8 6, ptr %b0, i64 64)
  call void @llvm.x86.tileloadd64(i8 7, ptr %b1, i64 64)
  call void @llvm.x86.{d.instr}(i8 0, i8 4, i8 6)
  call void @llvm.x86.{d.instr}(i8 1, i8 4, i8 7)
  call void @llvm.x86.{d.instr}(i8 2, i8 5, i8 6)
  call void @llvm.x86.{d.instr}(i8 3, i8 5, i8 7)
  ret void
}}
define internal void @{s1}(ptr %a, i64 %lda, ptr %b0) #0 {{
  %off = mul i64 %lda, 16
  %a1 = getelementptr i8, ptr %a, i64 %off
  call void @llvm.x86.tileloadd64(i8 4, ptr %a, i64 %lda)
  call void @llvm.x86.tileloadd64(i8 5, ptr %a1, i64 %lda)
  call void @llvm.x86.tileloadd64(i8 6, ptr %b0, i64 64)
  call void @llvm.x86.{d.instr}(i8 0, i8 4, i8 6)
  call void @llvm.x86.{d.instr}(i8 2, i8 5, i8 6)
  ret void
}}
define internal void @{st}(ptr %c, i64 %ldc) #0 {{
  %off = mul i64 %ldc, 16
  %c1 = getelementptr i8, ptr %c, i64 64
  %c2 = getelementptr i8, ptr %c, i64 %off
  %c3 = getelementptr i8, ptr %c2, i64 64
  call void @llvm.x86.tilestored64(i8 0, ptr %c, i64 %ldc)
  call void @llvm.x86.tilestored64(i8 1, ptr %c1, i64 %ldc)
  call void @llvm.x86.tilestored64(i8 2, ptr %c2, i64 %ldc)
  call void @llvm.x86.tilestored64(i8 3, ptr %c3, i64 %ldc)
  ret void
}}
define internal void @{st1}(ptr %c, i64 %ldc) #0 {{
  %off = mul i64 %ldc, 16
  %c2 = getelementptr i8, ptr %c, i64 %off
  call void @llvm.x86.tilestored64(i8 0, ptr %c, i64 %ldc)
  call void @llvm.x86.tilestored64(i8 2, ptr %c2, i64 %ldc)
  ret void
}}
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tilerelease()
declare void @llvm.x86.tilezero(i8 immarg)
declare void @llvm.x86.tileloadd64(i8 immarg, ptr, i64)
declare void @llvm.x86.{d.instr}(i8 immarg, i8 immarg, i8 immarg)
declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)
attributes #0 = {{ alwaysinline nounwind }}
"""


# -- the GEMM ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvLayout:
    """How an AMX conv lays out its stage: `phases` row phases x column phases of Hq x Wq pixels each (a stride-s
    conv reads pixel (s*i + a, s*j + b) of the padded input into pixel (i, j) of phase (a, b), so every tap reads
    one phase with a shift: stride 1 within it), `units` 4-byte units per stage pixel; `fold`: the KW taps of a row
    are the stage's channels (kw-major), for convs of few channels (a stem's 3): one tap per kernel row, KW times
    the units per step."""
    fold: bool
    ah: int                     # row phases
    aw: int                     # column phases
    Hq: int
    Wq: int
    units: int                  # units per stage pixel: C channels, or KW*C padded to 16 (a stage vectorized 16
                                # lanes wide: the bf16 stem's 21 channels in 11 pairs, 2 lanes, ran 1.5x slower)
    rows: int                   # Mg: grid rows up to the last output pixel, (OH - 1)*Wq + OW


def conv_layout(s, per_unit: int, fold_units: int) -> ConvLayout:
    """The stage of conv spec s (C, KH, KW, stride, dilation, OH, OW) for units of per_unit channels; a KxK conv
    with fewer than fold_units units of input channels folds its KW taps into the channels."""
    sh, sw = s.stride
    dh, dw = s.dilation
    fold = s.KW > 1 and -(-s.C // per_unit) < fold_units
    ah = min(sh, (s.KH - 1) * dh + 1)
    aw = 1 if fold else min(sw, (s.KW - 1) * dw + 1)
    shift_h, shift_w = (s.KH - 1) * dh // sh, 0 if fold else (s.KW - 1) * dw // sw
    Wq = s.OW + shift_w
    units = -(-s.C * s.KW // 16) * (16 // per_unit) if fold else -(-s.C // per_unit)
    return ConvLayout(fold, ah, aw, s.OH + shift_h, Wq, units, (s.OH - 1) * Wq + s.OW)


def strip_layout(s, per_unit: int) -> ConvLayout:
    """A strip: the stage of a KxK conv of few channels (a stem's 3) is the padded input itself, C channels exactly,
    its rows split into sh row phases, one stage pixel per sw padded columns (sw*C elements), Wq of them a row; a
    tile row reads the KW*C elements of a kernel row's taps (KW folded into the channels, kw-major, like `fold`)
    straight from its pixel on, lda sw*C elements; the elements after them meet zero weights. The stage is no
    bigger than the input (a fold writes KW*C channels per output pixel, and its stage dominated the stem: int8 822
    us on 1 thread against 289 as a strip, bf16 482 against 260-310). Take Grid.conv's width = sw*C."""
    sh, sw = s.stride
    Wq = s.OW - 1 + -(-s.KW // sw)
    return ConvLayout(True, min(sh, s.KH), 1, s.OH + (s.KH - 1) // sh, Wq, -(-s.KW * s.C // per_unit),
                      (s.OH - 1) * Wq + s.OW)


class Grid:
    """The GEMM: N images of `phases` x Hq x Wq stage pixels (`units` 4-byte units each, padded to whole steps),
    grid row m = oh*Wq + ow for the OW-wide outputs, `rows` of them; OCp channels; KH x KW taps, tap(kh, kw) ->
    their pixel offset; `dot` a DOTS key; `width`: stage elements per pixel where a pixel is not one row of the
    A tile (a strip layout: a tile row reads KP units from the start of its pixel on, across the next pixels)."""

    def __init__(self, dot, N, phases, Hq, Wq, OW, rows, units, OCp, KH, KW, tap, width=None):
        self.dot, self.d = dot, DOTS[dot]
        self.N, self.phases, self.Hq, self.Wq, self.OW, self.rows = N, phases, Hq, Wq, OW, rows
        self.units, self.OCp, self.KH, self.KW, self.tap = units, OCp, KH, KW, tap
        self.pixels = phases * Hq * Wq                       # per image
        # stage elements per pixel; fewer than a step's (a strip: a tile row reads on into the next pixels)
        self.width = width or units * self.d.per_unit
        self.row_blocks = -(-rows // BM)
        self.col_blocks = -(-OCp // BN)                      # the last one is 16 channels when OCp % 32 == 16
        self.kp = step_units(units)

    @classmethod
    def conv(cls, dot, s, lay: ConvLayout, width=None):
        """The grid of conv spec s (stride, dilation, KH, KW, N, OW, OCp) with stage layout lay."""
        sh, _ = s.stride
        dh, dw = s.dilation

        def tap(kh, kw):
            """The pixel offset of tap (kh, kw) in the stage: its phase, then its shift within the phase."""
            if lay.fold:
                return (kh * dh % sh) * lay.Hq * lay.Wq + kh * dh // sh * lay.Wq
            phase = (kh * dh % sh) * lay.aw + kw * dw % s.stride[1]
            return phase * lay.Hq * lay.Wq + kh * dh // sh * lay.Wq + kw * dw // s.stride[1]
        return cls(dot, s.N, lay.ah * lay.aw, lay.Hq, lay.Wq, s.OW, lay.rows, padded_units(lay.units), s.OCp, s.KH,
                   1 if lay.fold else s.KW, tap, width)

    def conv_source(self, s, lay: ConvLayout, read, outside):
        """source(n, ph, i, j, c) of a conv's stage: read(n, hh, ww, cc) (the input element at indices clamped into
        the input, cc < s.C; converted to the stage type) inside the input, `outside` (padding value, stage type)
        elsewhere. Where every stage channel is an input channel (no fold, width <= C) the channels are neither
        tested nor clamped: the stage's vectors stay contiguous loads (a clamped channel index is a gather: the
        stage of a 56x56x64 bf16 conv took a third of its time, 2 threads slower than 1)."""
        from tvm import tirx
        sh, sw = s.stride
        dw = s.dilation[1]
        pt, pl = s.pad[0], s.pad[1]
        exact = not lay.fold and self.width <= s.C

        def source(n, ph, i, j, c):
            a, b = ph // lay.aw, ph % lay.aw
            kw, c = (c // s.C, c % s.C) if lay.fold else (0, c)
            h, w = i * sh + a - pt, j * sw + b + kw * dw - pl
            pixel = [h >= 0, h < s.H, w >= 0, w < s.W]
            inside = tirx.all(*pixel) if exact else tirx.all(*pixel, c < s.C, kw < s.KW)
            hh, ww = tirx.min(tirx.max(h, 0), s.H - 1), tirx.min(tirx.max(w, 0), s.W - 1)
            return tirx.if_then_else(inside, read(n, hh, ww, c if exact else tirx.min(c, s.C - 1)), outside)
        return source


def _lanes(n: int) -> int:
    return next(v for v in (32, 16, 8, 4, 2, 1) if n % v == 0)


def build(g: Grid, args, X, source, Wp, finish, attrs: dict, import_llvm: str | None = None):
    """The PrimFunc main(*args): the input stage (source(n, phase, i, j, c) -> a stage element; None: X is the
    stage), then the blocks; finish(D, r, ob, n, oh, ow, cols) is the epilogue of block row r (output pixel (oh,
    ow)) over `cols` channels from channel ob*32, D the [32, 32] accumulator block. import_llvm: more LLVM IR the
    epilogue calls."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    request_amx()
    with IRBuilder() as ib:
        with T.prim_func(s_tir=True):
            T.func_name("main")
            T.func_attr({"tir.noalias": True, **attrs})
            for buf in args:
                T.arg(buf.name, buf)
            # relax.transform.SplitLayoutRewritePreproc wants a root block with a block in it in every kernel
            with T.sblock("root"):
                P = X
                if source is not None:
                    # + a pixel's units: a strip's last tile rows read past its last pixel (into zero weights)
                    P = T.sblock_alloc_buffer([g.N * g.pixels * g.width + g.units * g.d.per_unit], g.d.stage_dtype)
                with T.sblock("amx"):
                    if source is not None:
                        _stage(g, P, source)
                        # the pixel's worth after the stage, which a strip's last tile rows read (against zero
                        # weights): zeros, not whatever the workspace held. NaN or Inf bits there made NaN outputs
                        # (bf16: Inf x 0), which a ReLU turned into zeros: a 12-channel 3x3 bf16 conv was wrong at its
                        # last pixels on some runs
                        with T.serial(0, g.units * g.d.per_unit) as z:
                            T.buffer_store(P, tirx.const(0, g.d.stage_dtype), [g.N * g.pixels * g.width + z])
                    _blocks(g, P, Wp, finish, import_llvm)
    return ib.get()


def _stage(g: Grid, P, source):
    """P[(((n*phases + ph)*Hq + i)*Wq + j)*width + c] = source(n, ph, i, j, c): rows in parallel (image, row, phase:
    a thread stages the rows its blocks read, _blocks' row order), channels vectorized."""
    from tvm.script.ir_builder import tirx as T
    width, ph = g.width, g.phases
    lanes = _lanes(width)
    with T.parallel(0, g.N * g.Hq * ph) as t:
        n, i, a = t // (g.Hq * ph), t // ph % g.Hq, t % ph
        with T.serial(0, g.Wq) as j:
            with T.serial(0, width // lanes) as cb:
                with T.vectorized(0, lanes) as c:
                    T.buffer_store(P, source(n, a, i, j, cb * lanes + c),
                                   [(((n * ph + a) * g.Hq + i) * g.Wq + j) * width + cb * lanes + c])


def rows_first(g: Grid) -> bool:
    """Whether _blocks runs the blocks row block by row block (all channel blocks of a row block on one thread)
    rather than channel block by channel block: unless the weights are too big to re-read from L2 for every row
    block and outweigh the stage. Threads then split the pixels, each reading the stage rows it wrote (and the
    input rows the layer before wrote on it): tile loads of lines another core wrote are slow (bf16 3x3, 2 threads,
    split by channels -> by rows: 56x56x64 123 -> 77 us (60 with a stage nobody wrote), 28x28x128 108 -> 87,
    14x14x256 87 -> 79 us), while a split by channels halves each thread's weights where they stream from L3
    (7x7x512: 4.7 MB of them, 83 KB of stage: 109 us by channels, 151 by rows)."""
    weights = g.OCp * g.KH * g.KW * g.units
    return 4 * weights <= L2_WEIGHT_BYTES or weights <= g.N * g.pixels * -(-g.width // g.d.per_unit)


def _blocks(g: Grid, P, Wp, finish, import_llvm):
    """The (channel block, image, row block) blocks (rows_first: image, row block, channel block) in CHUNKS parallel
    runs of consecutive blocks, each run configuring the tiles once (ldtilecfg per block: the bf16 stem's blocks of
    7 steps ran 1.25x slower) and releasing them at its end; per block: zero the tiles, the taps' steps, store,
    epilogue."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T
    nb, tail = g.OCp // BN, g.OCp % BN                  # full 32-channel blocks; 16 more channels or none
    rb = g.row_blocks
    blocks = g.col_blocks * g.N * rb
    chunks = min(blocks, CHUNKS)
    ann = {"pragma_import_llvm": import_llvm} if import_llvm else {}
    cb, by_rows = g.col_blocks, rows_first(g)
    with T.parallel(0, chunks, annotations=ann) as k:
        D = T.alloc_buffer([BM, BN], g.d.acc_dtype, scope="local")
        T.evaluate(T.call_extern("void", name(CONFIG, g.kp, g.dot)))
        with T.serial(k * blocks // chunks, (k + 1) * blocks // chunks) as t:
            if by_rows:
                n, mb, ob = t // (rb * cb), t // cb % rb, t % cb
            else:
                ob, n, mb = t // (g.N * rb), t // rb % g.N, t % rb
            start = tirx.min(mb * BM, g.rows - BM)
            T.evaluate(T.call_extern("void", name(ZERO, g.kp, g.dot)))
            if not tail:
                _block(g, P, Wp, D, ob, n, start, BN, finish)
            elif not nb:
                _block(g, P, Wp, D, ob, n, start, BN // 2, finish)
            else:
                with T.If(ob < nb):
                    with T.Then():
                        _block(g, P, Wp, D, ob, n, start, BN, finish)
                    with T.Else():
                        _block(g, P, Wp, D, ob, n, start, BN // 2, finish)
        T.evaluate(T.call_extern("void", name(RELEASE, g.kp, g.dot)))


def _block(g: Grid, P, Wp, D, ob, n, start, cols: int, finish):
    """One block of `cols` channels (32: four tiles, 16: two): the steps over the taps and units, then the
    epilogue of the grid rows that are output pixels."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T
    kp, width, e = g.kp, g.width, g.d.per_unit
    row = 16 * e                                        # elements of one packed weight row (64 bytes)
    wstep = g.KH * g.KW * g.units * row                 # elements from one 16-channel block of Wp to the next
    esize = 4 // e                                      # bytes per stage element
    i64 = (lambda v: tirx.const(v, "int64"))
    with T.serial(0, g.KH, annotations={"pragma_import_llvm": llvm_ir(kp, g.dot)}) as kh:
        with T.serial(0, g.KW) as kw:
            with T.serial(0, g.units // kp) as c:
                a = P.access_ptr("r", offset=((n * g.pixels + start + g.tap(kh, kw)) * width + c * e * kp))
                w0 = ((2 * ob * g.KH + kh) * g.KW + kw) * g.units * row + c * kp * row
                if cols == BN:
                    T.evaluate(T.call_extern("void", name(STEP, kp, g.dot), a, i64(esize * width),
                                             Wp.access_ptr("r", offset=w0), Wp.access_ptr("r", offset=w0 + wstep)))
                else:
                    T.evaluate(T.call_extern("void", name(STEP1, kp, g.dot), a, i64(esize * width),
                                             Wp.access_ptr("r", offset=w0)))
    T.evaluate(T.call_extern("void", name(STORE if cols == BN else STORE1, kp, g.dot), D.access_ptr("w"),
                             i64(4 * BN)))
    with T.serial(0, BM) as r:
        m = start + r
        oh, ow = m // g.Wq, m % g.Wq
        with T.If(ow < g.OW):
            with T.Then():
                finish(D, r, ob, n, oh, ow, cols)
