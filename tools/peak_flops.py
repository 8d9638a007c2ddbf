"""This machine's fp32, bf16 and int8 peak FLOP/s (int8: OP/s) on N threads, measured with register-only multiply-add loops.

A small C library (compiled once per process with the system C compiler, $CC or gcc) holds loops of independent
accumulator chains: `vfmadd231ps zmm` (fp32, AVX-512), `vdpbf16ps zmm` (bf16 pairs into fp32, AVX512-BF16),
`tdpbf16ps` on four AMX accumulator tiles (bf16, where the CPU has AMX: the process first asks Linux for the tile
state), `vpdpbusd zmm` (u8 x s8 quads into s32, AVX-512 VNNI), `tdpbusd` on four AMX tiles (int8, AMX-INT8) and
`vfmadd231ps ymm` (fp32, AVX2 + FMA, used where there is no AVX-512). Only the loops whose CPU flags
/proc/cpuinfo lists are run. N Python threads call the loop at once (ctypes releases the GIL); the rate, from each
thread's own CPU time (load from other processes does not lower it), is the best of a few runs of about `seconds`
each. Flops: an FMA is 2 per fp32 lane; vdpbf16ps is 4 per fp32 lane (2 products, 2 adds); tdpbf16ps is
2 x 16 x 16 x 32 (a 16x16 fp32 tile += 16x32 bf16 x 32x16 bf16); int8 ops likewise count a multiply-add as 2:
vpdpbusd 8 per s32 lane (4 products, 4 adds), tdpbusd 2 x 16 x 16 x 64.
"""
from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

CHAINS = 24  # independent accumulators per loop: covers latency x ports of every core we run on (32 zmm registers)

# one loop per instruction; a and b are hidden from the optimizer so the products cannot be folded
_SOURCE = r"""
#include <immintrin.h>
#define R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define R24(X) R12(X) X(12) X(13) X(14) X(15) X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23)
#define SUM(i) s += c##i[0];

__attribute__((target("avx512f"))) float fma_zmm(long n) {
#define INIT(i) __m512 c##i = _mm512_set1_ps(i);
  R24(INIT)
  __m512 a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(0.5f);
  __asm__ volatile("" : "+v"(a), "+v"(b));
  for (long k = 0; k < n; k++) {
#define STEP(i) c##i = _mm512_fmadd_ps(a, b, c##i);
    R24(STEP)
#undef STEP
  }
  float s = 0; R24(SUM) return s;
#undef INIT
}

__attribute__((target("avx512f,avx512bf16"))) float dpbf16_zmm(long n) {
#define INIT(i) __m512 c##i = _mm512_set1_ps(i);
  R24(INIT)
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x3f003f00);
  __asm__ volatile("" : "+v"(a), "+v"(b));
  for (long k = 0; k < n; k++) {
#define STEP(i) c##i = _mm512_dpbf16_ps(c##i, a, b);
    R24(STEP)
#undef STEP
  }
  float s = 0; R24(SUM) return s;
#undef INIT
}

__attribute__((target("avx512f,avx512vnni"))) float dpbusd_zmm(long n) {
#define INIT(i) __m512i c##i = _mm512_set1_epi32(i);
  R24(INIT)
  __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
  __asm__ volatile("" : "+v"(a), "+v"(b));
  for (long k = 0; k < n; k++) {
#define STEP(i) c##i = _mm512_dpbusd_epi32(c##i, a, b);
    R24(STEP)
#undef STEP
  }
  int s = 0;
#define ISUM(i) s += _mm512_reduce_add_epi32(c##i);
  R24(ISUM)
#undef ISUM
  return (float)s;
#undef INIT
}

/* four AMX accumulator tiles (0-3) += products of tiles 4-7: palette 1, 16 rows of 64 bytes, zero operands (the
   timing does not depend on values) */
#define AMX_LOOP(NAME, FEATURE, ELEM, OUT, DOT) \
__attribute__((target("amx-tile," FEATURE))) float NAME(long n) { \
  unsigned char cfg[64] = {1}; \
  for (int t = 0; t < 8; t++) { cfg[16 + 2 * t] = 64; cfg[48 + t] = 16; } \
  static const ELEM ab[16 * 64 / sizeof(ELEM)]; \
  OUT out[16 * 16]; \
  _tile_loadconfig(cfg); \
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); \
  _tile_loadd(4, ab, 64); _tile_loadd(5, ab, 64); _tile_loadd(6, ab, 64); _tile_loadd(7, ab, 64); \
  for (long k = 0; k < n; k++) { DOT(0, 4, 6); DOT(1, 4, 7); DOT(2, 5, 6); DOT(3, 5, 7); } \
  _tile_stored(0, out, 64); \
  _tile_release(); \
  return (float)out[0]; \
}
AMX_LOOP(dpbusd_amx, "amx-int8", unsigned char, int, _tile_dpbusd)
AMX_LOOP(dpbf16_amx, "amx-bf16", unsigned short, float, _tile_dpbf16ps)

#include <sys/syscall.h>
#include <unistd.h>
int amx_request(void) { return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */); }

__attribute__((target("avx2,fma"))) float fma_ymm(long n) {
#define INIT(i) __m256 c##i = _mm256_set1_ps(i);
  R12(INIT)
  __m256 a = _mm256_set1_ps(1.0f), b = _mm256_set1_ps(0.5f);
  __asm__ volatile("" : "+x"(a), "+x"(b));
  for (long k = 0; k < n; k++) {
#define STEP(i) c##i = _mm256_fmadd_ps(a, b, c##i);
    R12(STEP) R12(STEP)
#undef STEP
  }
  float s = 0; R12(SUM) return s;
#undef INIT
}
"""

# name -> (C function, flops per loop iteration, CPU flags it needs)
LOOPS = {
    "fp32 avx512": ("fma_zmm", CHAINS * 16 * 2, ("avx512f",)),
    "bf16 avx512": ("dpbf16_zmm", CHAINS * 16 * 4, ("avx512f", "avx512_bf16")),
    "bf16 amx": ("dpbf16_amx", 4 * 2 * 16 * 16 * 32, ("amx_tile", "amx_bf16")),
    "fp32 avx2": ("fma_ymm", CHAINS * 8 * 2, ("avx2", "fma")),
    "int8 vnni": ("dpbusd_zmm", CHAINS * 16 * 4 * 2, ("avx512f", "avx512_vnni")),
    "int8 amx": ("dpbusd_amx", 4 * 2 * 16 * 16 * 64, ("amx_tile", "amx_int8")),
}


def cpu_flags() -> set[str]:
    """The CPU flags /proc/cpuinfo lists (empty when it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith("flags")), set())
    except OSError:
        return set()


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    with tempfile.TemporaryDirectory(prefix="peak-flops-") as d:
        src, lib = Path(d) / "peak.c", Path(d) / "peak.so"
        src.write_text(_SOURCE)
        subprocess.run([os.environ.get("CC") or "gcc", "-O2", "-shared", "-fPIC", str(src), "-o", str(lib)],
                       check=True, capture_output=True)
        dll = ctypes.CDLL(str(lib))  # stays mapped after the file is removed
    for fn, _, _ in LOOPS.values():
        getattr(dll, fn).argtypes, getattr(dll, fn).restype = [ctypes.c_long], ctypes.c_float
    if "amx_tile" in cpu_flags() and dll.amx_request() != 0:
        raise RuntimeError("peak_flops: Linux refused this process the AMX tile state (arch_prctl)")
    return dll


def _run(fn, iters: int, threads: int) -> list[float]:
    """CPU seconds of each of `threads` threads running fn(iters) at once."""
    start, cpu = threading.Barrier(threads), [0.0] * threads

    def work(i):
        start.wait()
        t0 = time.thread_time()
        fn(iters)
        cpu[i] = time.thread_time() - t0

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return cpu


def loop_gflops(name: str, threads: int, seconds: float = 0.15, reps: int = 3) -> float:
    """Best-of-reps GFLOP/s of loop `name` (a key of LOOPS) on `threads` threads, each run about `seconds`: the
    sum of each thread's flops / its own CPU time, so that other processes taking turns on the cores do not lower
    it; more threads than usable CPUs count as that many CPUs."""
    fn_name, flops_per_iter, _ = LOOPS[name]
    fn = getattr(_library(), fn_name)
    iters = 10_000
    while (t := _run(fn, iters, 1)[0]) < 0.02:  # calibrate on one thread
        iters *= 4
    iters = max(1, int(iters * seconds / t))
    share = min(threads, len(os.sched_getaffinity(0))) / threads
    return max(share * sum(iters * flops_per_iter / c for c in _run(fn, iters, threads)) for _ in range(reps)) / 1e9


def peak_gflops(threads: int, seconds: float = 0.15, reps: int = 3) -> dict:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s or None (neither AMX nor avx512_bf16), "bf16_isa": "amx" or "avx512" (or
    None), "int8": GOP/s or None (neither AMX-INT8 nor AVX-512 VNNI), "int8_isa": "amx" or "vnni" (or None), "isa":
    "avx512" or "avx2"} on `threads` threads: bf16 and int8 are the AMX tiles' peaks where the CPU has AMX (what
    graphopt's and OpenVINO's bf16 and int8 convs run on there), else vdpbf16ps' and vpdpbusd's. RuntimeError when
    the CPU has neither AVX-512 nor AVX2 + FMA."""
    flags = cpu_flags()
    have = [n for n, (_, _, need) in LOOPS.items() if set(need) <= flags]
    fp32 = next((n for n in have if n.startswith("fp32")), None)
    if fp32 is None:
        raise RuntimeError("peak_flops: the CPU lists neither avx512f nor avx2 + fma in /proc/cpuinfo")
    bf16 = next((n for n in ("bf16 amx", "bf16 avx512") if n in have), None)
    int8 = next((n for n in ("int8 amx", "int8 vnni") if n in have), None)
    return {"fp32": loop_gflops(fp32, threads, seconds, reps),
            "bf16": loop_gflops(bf16, threads, seconds, reps) if bf16 else None,
            "bf16_isa": bf16 and bf16.split()[1],
            "int8": loop_gflops(int8, threads, seconds, reps) if int8 else None,
            "int8_isa": int8 and int8.split()[1], "isa": fp32.split()[1]}


if __name__ == "__main__":
    import sys
    for n in [int(a) for a in sys.argv[1:]] or [1]:
        print(f"{n} thread(s): {peak_gflops(n)}")
