"""AMX for precision bf16: the tile micro kernel (tdpbf16ps) as LLVM IR functions imported into a kernel, and the
process's permission to use the tile registers.

The micro kernel multiplies a block of 32 rows (A: two 16-row tiles of KP bf16 pairs each, one row per output
pixel) by 32 output channels (B: two tiles of KP rows of 16 channel pairs, packing.py's layout) into four fp32
16x16 accumulator tiles; the caller (amx_kernels.py) runs ZERO, STEP over the reduction, then STORE puts the 32x32
fp32 block into a scratch buffer its TIR epilogue reads. The 16-channel forms (STEP1, STORE1) serve a last block of
16 channels. The non-`.internal` LLVM intrinsics take fixed tile numbers, so no tile register allocation is
involved: tmm0-3 accumulate (rows 0-15 / 16-31 x channels 0-15 / 16-31), tmm4-5 hold A, tmm6-7 hold B. CONFIG loads
the tile configuration (a constant per KP: palette 1, rows and bytes per row of every tile) at the start of each
parallel run of blocks (any other kernel on the thread may configure the tiles differently), RELEASE ends it.

Linux gives a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
without it the first tile instruction raises SIGILL. request_amx() asks for it; every process that runs a module
with these kernels must call it first (graphopt's loader does, tvm_lowering.TvmRunner; the kernel builder does too,
for processes that build and run in place).
"""
from __future__ import annotations

import ctypes
import functools

CONFIG, RELEASE, ZERO, STEP, STEP1, STORE, STORE1 = (
    "graphopt_amx_config", "graphopt_amx_release", "graphopt_amx_zero", "graphopt_amx_step", "graphopt_amx_step1",
    "graphopt_amx_store", "graphopt_amx_store1")
#: tile rows: pixels per A tile (two A tiles per block) and channels per B tile
ROWS = 16
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


@functools.cache
def request_amx() -> bool:
    """Ask Linux for this process's AMX tile state (once); True when granted. Idempotent and cheap."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def _config(kp: int) -> list[int]:
    """The 64-byte tile configuration: palette 1; colsb (u16 at 16 + 2t) and rows (u8 at 48 + t) of tile t."""
    cfg = [0] * 64
    cfg[0] = 1
    shapes = {0: (16, 64), 1: (16, 64), 2: (16, 64), 3: (16, 64), 4: (16, kp * 4), 5: (16, kp * 4), 6: (kp, 64),
              7: (kp, 64)}
    for t, (rows, colsb) in shapes.items():
        cfg[16 + 2 * t], cfg[17 + 2 * t], cfg[48 + t] = colsb & 0xFF, colsb >> 8, rows
    return cfg


def name(base: str, kp: int) -> str:
    """The extern name of base (ZERO, STEP, ...) for KP pairs per step (each KP has its own tile configuration)."""
    return f"{base}_k{kp}"


def llvm_ir(kp: int) -> str:
    """The micro kernel's LLVM IR for KP bf16 pairs per step (1..16): A tiles 16 x 4*KP bytes, B tiles KP x 64."""
    assert 1 <= kp <= 16, kp
    cfg = ", ".join(f"i8 {b}" for b in _config(kp))
    cf, rl, z, s, s1, st, st1 = (name(b, kp) for b in (CONFIG, RELEASE, ZERO, STEP, STEP1, STORE, STORE1))
    return f"""
@graphopt_amx_cfg_k{kp} = private unnamed_addr constant [64 x i8] [{cfg}], align 64
define internal void @{cf}() #0 {{
  call void @llvm.x86.ldtilecfg(ptr @graphopt_amx_cfg_k{kp})
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
  call void @llvm.x86.tdpbf16ps(i8 0, i8 4, i8 6)
  call void @llvm.x86.tdpbf16ps(i8 1, i8 4, i8 7)
  call void @llvm.x86.tdpbf16ps(i8 2, i8 5, i8 6)
  call void @llvm.x86.tdpbf16ps(i8 3, i8 5, i8 7)
  ret void
}}
define internal void @{s1}(ptr %a, i64 %lda, ptr %b0) #0 {{
  %off = mul i64 %lda, 16
  %a1 = getelementptr i8, ptr %a, i64 %off
  call void @llvm.x86.tileloadd64(i8 4, ptr %a, i64 %lda)
  call void @llvm.x86.tileloadd64(i8 5, ptr %a1, i64 %lda)
  call void @llvm.x86.tileloadd64(i8 6, ptr %b0, i64 64)
  call void @llvm.x86.tdpbf16ps(i8 0, i8 4, i8 6)
  call void @llvm.x86.tdpbf16ps(i8 2, i8 5, i8 6)
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
declare void @llvm.x86.tdpbf16ps(i8 immarg, i8 immarg, i8 immarg)
declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)
attributes #0 = {{ alwaysinline nounwind }}
"""
