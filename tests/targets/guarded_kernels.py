"""Run one hand-written kernel with its buffers against inaccessible pages (tests/guarded_memory.py) and check the
result equals an ordinary run: `python guarded_kernels.py CASE` exits 0, or dies of SIGSEGV when the kernel touches
memory outside its buffers. test_guarded_reads.py runs each case in its own process, so a fault fails one test
instead of killing the suite.

The cases are the kernels whose padding reads a clamped index under a condition (a tap outside the input reads
zero): Winograd's input transform, the strided int8 depthwise conv (taps read in place), the VNNI int8 depthwise conv
(unclamped loads under the condition), the bf16 depthwise convs (tap by tap; in pairs: unclamped guarded loads),
the bf16 conv whose stage folds the kernel row's taps into pairs, the bf16 Winograd conv's input
transform; and the fp32 max pool, whose taps read clamped
indices unconditionally.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guarded_memory import run_guarded  # noqa: E402


def _winograd():
    from graphopt.targets.cpu import CpuTarget
    from graphopt.targets.cpu_winograd import pick_tile
    from graphopt.targets.cpu_winograd_kernel import WinogradSpec, pack_weight, winograd_conv2d
    lanes = CpuTarget().hw().fp32_lanes
    N, H, W, C, K = 1, 8, 12, 16, 32
    m_bn, nb = pick_tile(W // 2, K, lanes)
    spec = WinogradSpec(N, H, W, C, K, (1, 1, 1, 1), m_bn, nb, min(lanes, nb), (0.0, None), True, (None, None))
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((N, H, W, C)).astype(np.float32),
            pack_weight(rng.standard_normal((K, C, 3, 3)).astype(np.float32), nb),
            rng.standard_normal(K).astype(np.float32), rng.standard_normal((N, H, W, K)).astype(np.float32)]
    return winograd_conv2d(spec), CpuTarget().tvm_target(), args, (N, H, W, K), "float32"


def _int8_depthwise(C, H, K, stride, seed, mcpu, quads):
    """An s8 depthwise conv (zero point 3, padding K // 2) by the tap-by-tap kernel or dw_quads, fp32 out."""
    import tvm

    from graphopt.targets import int8 as ci
    from graphopt.targets.int8 import dw_quads
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (1, H, H, C)).astype(np.int8)
    w = rng.integers(-128, 128, (C, 1, K, K)).astype(np.int8)
    spec = ci.ConvSpec(1, H, H, C, C, K, K, (stride, stride), (K // 2,) * 4, (1, 1), "NHWC", C, "int8", 3,
                       ci.Epilogue(mode="f", out_dtype="float32"))
    Bi, M, Bf = ci.epilogue_constants(w, 1.0, np.ones(C, np.float32), 3 + 128, None, None, None, spec.OCp)
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    func, wp = ((dw_quads.dwconv2d_quads(spec, 2), dw_quads.pack_weight(w, spec)) if quads
                else (ci.dwconv2d_int8(spec, 2), ci.pack_dw_weight(w)))
    return func, target, [x, wp, Bi, M, Bf], (1, spec.OH, spec.OW, spec.OCp), "float32"


def _int8_depthwise_strided():
    return _int8_depthwise(32, 11, 3, 2, 1, "haswell", quads=False)


def _int8_depthwise_quads():
    return _int8_depthwise(32, 9, 5, 1, 4, "cascadelake", quads=True)   # 5x5 on 9 rows: reads past every edge


def _bf16_depthwise_pairs():
    import tvm

    from graphopt.targets.bf16 import DwSpec, bf16_bits, dw_pairs
    N, H, W, C, K = 1, 9, 10, 32, 5   # 5x5 on 9 rows: every block reads rows and columns past the input
    spec = DwSpec(N, H, W, C, C, K, K, (1, 1), (2, 2, 2, 2), (1, 1), in_bf16=True)
    rng = np.random.default_rng(5)
    x = bf16_bits(rng.standard_normal((N, H, W, C)).astype(np.float32))
    args = [x, dw_pairs.pack_weight(rng.standard_normal((C, 1, K, K)).astype(np.float32), spec),
            np.zeros(C, np.float32)]
    target = tvm.target.Target({"kind": "llvm", "mcpu": "cooperlake", "num-cores": 2})
    return dw_pairs.dwconv2d_pairs(spec, 2), target, args, (N, spec.OH, spec.OW, spec.Cp), "float32"


def _bf16_depthwise():
    import tvm

    from graphopt.targets import bf16
    N, H, W, C, K = 1, 9, 10, 24, 3
    spec = bf16.DwSpec(N, H, W, C, C, K, K, (1, 1), (1, 1, 1, 1), (1, 1), act=(-1.0, 6.0))
    rng = np.random.default_rng(2)
    w = np.zeros((K, K, spec.Cp), np.float32)
    w[..., :C] = rng.standard_normal((K, K, C))
    args = [rng.standard_normal((N, H, W, C)).astype(np.float32), w, np.zeros(spec.Cp, np.float32)]
    target = tvm.target.Target({"kind": "llvm", "mcpu": "cooperlake", "num-cores": 2})
    return bf16.dwconv2d_bf16(spec), target, args, (N, spec.OH, spec.OW, spec.Cp), "float32"


def _fp32_maxpool():
    from graphopt.targets.cpu import CpuTarget
    from graphopt.targets.cpu_pool import maxpool_nhwc
    N, H, W, C = 1, 9, 10, 16
    x = np.random.default_rng(3).standard_normal((N, H, W, C)).astype(np.float32)
    func = maxpool_nhwc(N, H, W, C, 5, 5, (3, 3), (2, 2), (1, 1, 1, 1), lanes=CpuTarget().hw().fp32_lanes)
    return func, CpuTarget().tvm_target(), [x], (N, 5, 5, C), "float32"


def _bf16_stem_folded():
    import tvm

    from graphopt.targets import bf16
    N, H, W, C, OC, K = 1, 12, 11, 3, 16, 7
    spec = bf16.ConvSpec(N, H, W, C, OC, K, K, (2, 2), (3,) * 4, (1, 1), "NHWC", C, act=(0.0, None))
    assert spec.fold_kw
    rng = np.random.default_rng(4)
    args = [rng.standard_normal((N, H, W, C)).astype(np.float32),
            bf16.conv_weight(spec, rng.standard_normal((OC, C, K, K)).astype(np.float32)),
            np.zeros(spec.OCp, np.float32)]
    target = tvm.target.Target({"kind": "llvm", "mcpu": "cooperlake", "num-cores": 2})
    return bf16.conv2d_bf16(spec), target, args, (N, spec.OH, spec.OW, spec.OCp), "float32"


def _bf16_winograd():
    """bf16 Winograd with bf16 bits in: its input transform reads clamped taps under the condition (odd size:
    a partial tile block at the right and bottom edges)."""
    import tvm

    from graphopt.targets import bf16
    from graphopt.targets.bf16 import winograd
    N, H, W, C, OC = 1, 9, 11, 16, 32
    spec = bf16.ConvSpec(N, H, W, C, OC, 3, 3, (1, 1), (1,) * 4, (1, 1), "NHWC", C, act=(0.0, None), in_bf16=True)
    rng = np.random.default_rng(5)
    args = [bf16.bf16_bits(rng.standard_normal((N, H, W, C)).astype(np.float32)),
            winograd.pack_weight(rng.standard_normal((OC, C, 3, 3)).astype(np.float32), spec),
            np.zeros(spec.OCp, np.float32)]
    target = tvm.target.Target({"kind": "llvm", "mcpu": "cooperlake", "num-cores": 2})
    return winograd.winograd_conv2d_bf16(spec), target, args, (N, spec.OH, spec.OW, spec.OCp), "float32"


#: case -> (builder, the /proc/cpuinfo flags its kernel's code needs)
CASES = {"winograd": (_winograd, ()), "int8_depthwise_strided": (_int8_depthwise_strided, ()),
         "int8_depthwise_quads": (_int8_depthwise_quads, ("avx512_vnni",)),
         "bf16_depthwise": (_bf16_depthwise, ("avx512_bf16",)),
         "bf16_depthwise_pairs": (_bf16_depthwise_pairs, ("avx512_bf16",)),
         "fp32_maxpool": (_fp32_maxpool, ()), "bf16_stem_folded": (_bf16_stem_folded, ("avx512_bf16",)),
         "bf16_winograd": (_bf16_winograd, ("avx512_bf16",))}


def main(case: str) -> int:
    import tvm
    func, target, args, out_shape, out_dtype = CASES[case][0]()
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    ref = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], ref)
    for side in ("before", "after"):
        got = run_guarded(lib["main"], args, out_shape, out_dtype, side)
        if not np.array_equal(got, ref.numpy()):
            print(f"{case}: guarded ({side}) result differs from the ordinary run")
            return 1
    print(f"{case}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
