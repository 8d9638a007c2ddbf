"""Integer lowering of QDQ graphs for the CPU targets: u8 x s8 -> s32 kernels with AVX-512 VNNI (x86, targets/cpu.py)
or NEON usdot (aarch64 with FEAT_I8MM, targets/arm_sve.py).

TVM imports QuantizeLinear / DequantizeLinear as relax.quantize / relax.dequantize and would compute every
quantized Conv / MatMul / Gemm in fp32 (dequantize -> fp32 op -> quantize). This module replaces those chains,
in the Relax module right after import (before LegalizeOps / FuseOps), with calls (call_tir) to graphopt's own
integer PrimFuncs (already scheduled, marked opaque so FuseOps leaves them alone):

    q(x) -> dequantize -> conv2d / matmul (weight: dequantize(int8 constant, per-channel scale, zero point 0))
         -> [+ bias] -> [relu | clip] -> quantize(sy, zy)                          mode "q": u8/s8 output
         -> [+ bias] -> [relu | clip]                       (no quantize after)    mode "f": fp32 output
         -> quantize(s1, z1) -> dequantize -> add(dequantize(residual)) -> [relu | clip] -> quantize(s2, z2)
                                                                                    mode "qadd": fused residual

Kernels (all exact in s32; only the final requantization rounds, like onnxruntime's QuantizeLinear):
* conv2d (groups 1) and dense: acc = sum of x_u8 * w_s8 with the activation read with its zero point; the
  zero-point correction zx * sum(w) and the int32 bias fold into one int32 per channel; the requantize epilogue
  q = clamp(nearbyint(float(acc + b') * (sx*sw/sy) + bias_f/sy) + zy) runs in the same loop nest. Convs are
  direct (no im2col) over a zero-point-padded NHWC copy of the input. Weights are packed at compile time into
  [OC/16, KH, KW, C/4, 16, 4]; the micro kernel is a register tile of TM output pixels x TN*16 channels whose
  innermost 16 x 4 block is tensorized with `graphopt_vnni_u8s8_16x4`: llvm.x86.avx512.vpdpbusd.512 with the
  operand types LLVM 22 wants (int32x16, int8x64, int8x64: the broadcast activation word reinterpreted as
  int8x64). vpdpbusd adds four u8*s8 products into s32 without saturation.
* depthwise conv2d (groups = channels): the KH*KW taps summed in int32, vectorized along the channels.
* max_pool2d on a quantized tensor (lower-int8 moves it onto the integers) and the global average pool's
  dequantize + mean run in NHWC too, so ResNet / MobileNet keep one layout from the first conv to the pooling.
Activations between these kernels stay NHWC with channels padded to a multiple of 16 (weights of the padded
channels are zero); permute_dims / strided_slice views back to the graph's NCHW shapes are emitted only where an
fp32 op reads the tensor, and dead views are removed.

Without VNNI (AVX2, AVX-512 without VNNI) the same loop nests are built without tensorization: the 16-lane
inner product is written in int32, which LLVM turns into vpmovzx/vpmovsx + vpmaddwd (16-bit operands, 32-bit
pair sums: exact); vpmaddubsw, whose int16 pair sums saturate, is never used.
aarch64 with FEAT_I8MM (the arm-sve target, Neoverse-V1): the same packing and schedules, the 16 x 4 block
tensorized with `graphopt_usdot_u8s8_16x4`: four NEON usdot (llvm.aarch64.neon.usdot.v4i32.v16i8, u8 x s8 -> s32
without saturation, exact) on the int32x4 quarters of the accumulator, the activation word broadcast; micro tiles
hold at most 6 accumulators (4 NEON registers each). Other targets (aarch64 without I8MM too) keep fp32.
s8 activations are converted to u8 on the fly (x + 128, zero point + 128) by the kernels' input stage.
Grouped (non-depthwise) convs, per-channel activation scales, non-zero weight zero points, MatMuls with batched
or computed weights and anything else that does not match stay on TVM's fp32 path (still correct).

Entry points:
    import_int8(model_proto, target, where) -> (IRModule, facts)   ONNX -> Relax with the int8 rewrite applied
    rewrite_int8(mod, target) -> (IRModule, facts)                  the Relax rewrite alone
    prepare_onnx(model_proto) -> model_proto                        folds weight-only INT4/blocked DQ weights
    build_library(model_proto, path, target, schedule) -> facts     import_int8 + build + export (tests, tools)
    int8_dot(target) -> "vnni" | "avx2" | "usdot" | None
    conv2d_int8 / dwconv2d_int8 / dense_int8 / maxpool_int8          the scheduled PrimFuncs
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("graphopt.cpu_int8")

VNNI_INTRIN = "graphopt_vnni_u8s8_16x4"
USDOT_INTRIN = "graphopt_usdot_u8s8_16x4"
#: dot modes computed by a tensorized 16x4 intrinsic (weights packed [.., 16, 4]) -> the intrinsic's name
TENSOR_INTRINS = {"vnni": VNNI_INTRIN, "usdot": USDOT_INTRIN}
#: PrimFunc attribute naming the integer kernel (tests, debugging)
KERNEL_ATTR = "graphopt.int8_kernel"
_VNNI_MCPUS = {"sapphirerapids", "cooperlake", "icelake-server", "icelake-client", "cascadelake", "tigerlake",
               "znver4", "znver5", "graniterapids", "emeraldrapids", "alderlake", "x86-64-v4"}
_AVX2_MCPUS = {"haswell", "broadwell", "skylake", "skylake-avx512", "znver1", "znver2", "znver3", "x86-64-v3"}
#: 16-lane s32 accumulators a micro tile may use. x86: one zmm each, 24 of the 32 (room for the weights and the
#: broadcast). aarch64: four 128-bit NEON registers each, 6 (24 registers) of the 32.
MAX_TILE_ACC = 24
MAX_TILE_ACC_BY_DOT = {"usdot": 6}

_registered = False


# ---------------------------------------------------------------------------------------------------------------
# the VNNI intrinsic
# ---------------------------------------------------------------------------------------------------------------

def register_intrinsics() -> None:
    """Register graphopt's 16x4 u8 x s8 -> s32 tensor intrinsics (once): VNNI for x86 and NEON usdot for aarch64.
    Both share one description, C[16] int32 += A[4] u8 . B[16, 4] s8, so the weight packing and the schedules are
    the same for both. Defined here rather than taken from tvm.s_tir.tensor_intrin.x86 / .arm_cpu: x86's
    dot_16x4_vnni passes int32x16 operands that LLVM 22 rejects, and the package import costs tens of seconds."""
    global _registered
    if _registered:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def vnni_impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
                  C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a, 16), dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16")

    # aarch64 (FEAT_I8MM): usdot Vd.4S, Vn.16B (unsigned), Vm.16B (signed) adds, in every s32 lane i, the four
    # products of bytes 4i..4i+3: exact, no saturation. The 16 channels are four int32x4 slices of C; the slice j
    # takes the 16 weight bytes B[4j:4j+4, 0:4] (contiguous) and the four activation bytes broadcast to all lanes
    # (LLVM 22 emits one dup per activation word and the vector form of usdot).
    @T.prim_func(s_tir=True)
    def usdot_impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
                   C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 4),
                              dtype="int8x16")
            for j in T.unroll(4):
                C[T.ramp(j * 4, 1, 4)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.usdot.v4i32.v16i8"),
                    C.vload([j * 4], dtype="int32x4"), a, B.vload([j * 4, 0], dtype="int8x16"),
                    dtype="int32x4")

    for name, impl in ((VNNI_INTRIN, vnni_impl), (USDOT_INTRIN, usdot_impl)):
        try:
            TensorIntrin.register(name, desc, impl)
        except Exception:  # noqa: BLE001 - already registered in this process (module reloaded)
            pass
    _registered = True


def _is_aarch64(target) -> bool:
    mtriple = str(target.attrs.get("mtriple", ""))
    return mtriple.startswith(("aarch64", "arm64"))


def _has_i8mm(target) -> bool:
    """FEAT_I8MM (usdot): TVM derives feature.has_matmul_i8 from the LLVM cpu and mattr (neoverse-v1 has it)."""
    mattr = {str(a) for a in target.attrs.get("mattr", [])}
    if "-i8mm" in mattr:
        return False
    if "+i8mm" in mattr:
        return True
    try:
        return bool(target.attrs.get("feature.has_matmul_i8", False))
    except Exception:  # noqa: BLE001
        return False


def int8_dot(target) -> str | None:
    """Which integer dot product the target's code may use: 'vnni' (AVX-512 VNNI), 'avx2' (x86 without VNNI:
    exact int32 fallback, vectorized by LLVM), 'usdot' (aarch64 with FEAT_I8MM: NEON usdot), or None (anything
    else, aarch64 without I8MM included: leave quantized graphs on the fp32 path)."""
    if target is None or str(target.kind.name) != "llvm":
        return None
    if _is_aarch64(target):
        return "usdot" if _has_i8mm(target) else None
    mtriple = str(target.attrs.get("mtriple", ""))
    if mtriple and not any(a in mtriple for a in ("x86_64", "i686", "amd64")):
        return None
    mcpu = str(target.attrs.get("mcpu", ""))
    mattr = {str(a) for a in target.attrs.get("mattr", [])}
    if "+avx512vnni" in mattr or (mcpu in _VNNI_MCPUS and "-avx512vnni" not in mattr):
        return "vnni"
    if "+avx2" in mattr or mcpu in _AVX2_MCPUS or mcpu in _VNNI_MCPUS:
        return "avx2"
    return None


def _num_cores(target) -> int:
    import os
    try:
        return max(1, int(target.attrs.get("num-cores")))
    except (TypeError, ValueError):
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------------
# kernel specifications
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Epilogue:
    """What follows the s32 accumulation. mode 'q': requantize to out_dtype; 'f': fp32 out; 'qadd': requantize
    (s1, z1), add the dequantized residual (sr, zr), requantize (s2, z2). Activation bounds are already in the
    quantized domain for 'q'/'qadd' (lo, hi) and in fp32 for 'f' (flo, fhi)."""
    mode: str = "q"
    out_dtype: str = "uint8"
    zy: int = 0
    lo: float = 0.0
    hi: float = 255.0
    flo: float | None = None
    fhi: float | None = None
    # residual (mode qadd)
    s1: float = 1.0
    z1: int = 0
    lo1: float = 0.0
    hi1: float = 255.0
    res_dtype: str = "uint8"
    sr: float = 1.0
    zr: int = 0
    inv_s2: float = 1.0
    act2_lo: float | None = None   # fp32 bounds of the activation after the add (relu: 0)
    act2_hi: float | None = None

    def key(self):
        return tuple(sorted(self.__dict__.items()))


@dataclass
class ConvSpec:
    N: int
    H: int
    W: int
    C: int                 # logical input channels
    OC: int                # logical output channels
    KH: int
    KW: int
    stride: tuple = (1, 1)
    pad: tuple = (0, 0, 0, 0)   # top, left, bottom, right
    dilation: tuple = (1, 1)
    in_layout: str = "NCHW"     # NCHW (logical) or NHWC (physical, channels Cphys)
    Cphys: int = 0              # channels of the NHWC input (>= C); 0: C
    in_dtype: str = "uint8"
    zx: int = 0
    epi: Epilogue = field(default_factory=Epilogue)

    @property
    def OH(self):
        return (self.H + self.pad[0] + self.pad[2] - self.dilation[0] * (self.KH - 1) - 1) // self.stride[0] + 1

    @property
    def OW(self):
        return (self.W + self.pad[1] + self.pad[3] - self.dilation[1] * (self.KW - 1) - 1) // self.stride[1] + 1

    @property
    def C4(self):
        """Channels the kernel reduces over (multiple of 4)."""
        c = self.Cphys if self.in_layout == "NHWC" and self.Cphys else self.C
        return -(-c // 4) * 4

    @property
    def OCp(self):
        return -(-self.OC // 16) * 16


@dataclass
class DenseSpec:
    M: int
    K: int                 # logical reduction length
    N: int                 # logical output features
    Kphys: int = 0         # columns of the input (>= K; padded activations from another int8 kernel)
    in_dtype: str = "uint8"
    zx: int = 0
    epi: Epilogue = field(default_factory=Epilogue)

    @property
    def K4(self):
        return -(-max(self.K, self.Kphys) // 4) * 4

    @property
    def Np(self):
        return -(-self.N // 16) * 16


# ---------------------------------------------------------------------------------------------------------------
# weight packing and epilogue constants (numpy, compile time)
# ---------------------------------------------------------------------------------------------------------------

def pack_conv_weight(w: np.ndarray, C4: int, dot: str = "vnni") -> np.ndarray:
    """int8 OIHW -> [OCp/16, KH, KW, C4/4, 16, 4] (vnni, usdot) or [.., 4, 16] (avx2), zero padded."""
    OC, C, KH, KW = w.shape
    OCp = -(-OC // 16) * 16
    wp = np.zeros((OCp, C4, KH, KW), np.int8)
    wp[:OC, :C] = w
    wp = wp.reshape(OCp // 16, 16, C4 // 4, 4, KH, KW)
    return np.ascontiguousarray(wp.transpose(0, 4, 5, 2, 1, 3) if dot in TENSOR_INTRINS
                                else wp.transpose(0, 4, 5, 2, 3, 1))


def pack_dense_weight(w: np.ndarray, K4: int, dot: str = "vnni") -> np.ndarray:
    """int8 [N, K] -> [Np/16, K4/4, 16, 4] (vnni, usdot) or [.., 4, 16] (avx2), zero padded."""
    N, K = w.shape
    Np = -(-N // 16) * 16
    wp = np.zeros((Np, K4), np.int8)
    wp[:N, :K] = w
    wp = wp.reshape(Np // 16, 16, K4 // 4, 4)
    return np.ascontiguousarray(wp.transpose(0, 2, 1, 3) if dot in TENSOR_INTRINS else wp.transpose(0, 2, 3, 1))


def epilogue_constants(w: np.ndarray, sx: float, sw: np.ndarray, zx_u: int, bias_i32: np.ndarray | None,
                       bias_f: np.ndarray | None, sy: float | None, padded: int):
    """(Bi int32, M f32, Bf f32) per (padded) output channel, for acc computed on u8 inputs with zero point zx_u:
    value = float(acc + Bi) * M + Bf; 'q' modes divide by the output scale sy (M = sx*sw/sy, Bf = bias_f/sy)."""
    OC = w.shape[0]
    colsum = w.reshape(OC, -1).astype(np.int64).sum(1)
    bi = -zx_u * colsum
    if bias_i32 is not None:
        bi = bi + bias_i32.astype(np.int64)
    if np.abs(bi).max(initial=0) >= 2 ** 31:
        raise ValueError("int32 bias overflow")
    s = (np.float32(sx) * np.asarray(sw, np.float32)).astype(np.float32) * np.ones(OC, np.float32)
    bf = np.zeros(OC, np.float32) if bias_f is None else np.asarray(bias_f, np.float32).reshape(OC)
    if sy is not None:
        s = (s.astype(np.float64) / sy).astype(np.float32)
        bf = (bf.astype(np.float64) / sy).astype(np.float32)
    Bi = np.zeros(padded, np.int32)
    M = np.zeros(padded, np.float32)
    Bf = np.zeros(padded, np.float32)
    Bi[:OC], M[:OC], Bf[:OC] = bi, s, bf
    return Bi, M, Bf


# ---------------------------------------------------------------------------------------------------------------
# TE compute + hand schedule
# ---------------------------------------------------------------------------------------------------------------

def _epilogue_expr(epi: Epilogue, acc, bi, m, bf, r=None):
    from tvm import te, tirx
    f32 = "float32"
    v = (acc + bi).astype(f32) * m + bf
    if epi.mode == "f":
        if epi.flo is not None:
            v = tirx.max(v, tirx.const(epi.flo, f32))
        if epi.fhi is not None:
            v = tirx.min(v, tirx.const(epi.fhi, f32))
        return v
    if epi.mode == "q":
        q = te.nearbyint(v) + tirx.const(float(epi.zy), f32)
        q = tirx.min(tirx.max(q, tirx.const(epi.lo, f32)), tirx.const(epi.hi, f32))
        return q.astype(epi.out_dtype)
    # qadd: requantize the conv result as the graph does, add the dequantized residual, requantize
    t = te.nearbyint(v) + tirx.const(float(epi.z1), f32)
    t = tirx.min(tirx.max(t, tirx.const(epi.lo1, f32)), tirx.const(epi.hi1, f32))
    a = (t - tirx.const(float(epi.z1), f32)) * tirx.const(epi.s1, f32) + \
        (r.astype(f32) - tirx.const(float(epi.zr), f32)) * tirx.const(epi.sr, f32)
    if epi.act2_lo is not None:
        a = tirx.max(a, tirx.const(epi.act2_lo, f32))
    if epi.act2_hi is not None:
        a = tirx.min(a, tirx.const(epi.act2_hi, f32))
    q = te.nearbyint(a * tirx.const(epi.inv_s2, f32)) + tirx.const(float(epi.zy), f32)
    q = tirx.min(tirx.max(q, tirx.const(epi.lo, f32)), tirx.const(epi.hi, f32))
    return q.astype(epi.out_dtype)


def _to_u8(x, in_dtype):
    """u8 view of an activation value: s8 is shifted by +128 (its zero point too)."""
    if in_dtype == "uint8":
        return x
    return (x.astype("int32") + 128).astype("uint8")


def _pick_tiles(width: int, oc_blocks: int, max_acc: int = MAX_TILE_ACC) -> tuple[int, int]:
    """(TM pixels, TN 16-channel blocks): TM divides width, TN divides oc_blocks, TM*TN accumulators fit."""
    best = (1, 1, 0)
    for tn in (4, 3, 2, 1):
        if oc_blocks % tn:
            continue
        for tm in range(min(width, 14), 0, -1):
            if width % tm or tm * tn > max_acc:
                continue
            score = tm * tn + (0.5 if tn >= 2 else 0)   # prefer more accumulators, then wider channel tiles
            if score > best[2]:
                best = (tm, tn, score)
            break
    return best[0], best[1]


def conv2d_int8(spec: ConvSpec, dot: str = "vnni", cores: int = 1, residual: bool = False):
    """Scheduled PrimFunc (X, Wp, Bi, M, Bf[, R], Y): X u8/s8 in spec.in_layout, Y NHWC with OCp channels."""
    from tvm import te, tirx
    s = spec
    OH, OW, C4, OCp = s.OH, s.OW, s.C4, s.OCp
    sh, sw = s.stride
    dh, dw = s.dilation
    pt, pl, pb, pr = s.pad
    zx_u = s.zx + (128 if s.in_dtype == "int8" else 0)
    xshape = (s.N, s.C, s.H, s.W) if s.in_layout == "NCHW" else (s.N, s.H, s.W, s.Cphys or s.C)
    X = te.placeholder(xshape, s.in_dtype, name="X")
    wshape = (OCp // 16, s.KH, s.KW, C4 // 4) + ((16, 4) if dot in TENSOR_INTRINS else (4, 16))
    Wp = te.placeholder(wshape, "int8", name="W")
    wl = (lambda ob, kh, kw, c4, oi, ci: Wp[ob, kh, kw, c4, oi, ci]) if dot in TENSOR_INTRINS else \
        (lambda ob, kh, kw, c4, oi, ci: Wp[ob, kh, kw, c4, ci, oi])
    Bi = te.placeholder((OCp,), "int32", name="Bi")
    Mq = te.placeholder((OCp,), "float32", name="M")
    Bf = te.placeholder((OCp,), "float32", name="Bf")
    Hp, Wpd = s.H + pt + pb, s.W + pl + pr
    cin = s.Cphys or s.C if s.in_layout == "NHWC" else s.C
    direct = (s.in_layout == "NHWC" and s.in_dtype == "uint8" and not any(s.pad) and cin == C4)
    if direct:
        P = X
    else:
        def pad_value(n, h, w, c):
            conds = []
            if pt:
                conds.append(h >= pt)
            if pb:
                conds.append(h < s.H + pt)
            if pl:
                conds.append(w >= pl)
            if pr:
                conds.append(w < s.W + pl)
            if C4 != cin:
                conds.append(c < cin)
            if s.in_layout == "NCHW":
                src = X[n, c, h - pt, w - pl]
            else:
                src = X[n, h - pt, w - pl, c]
            src = _to_u8(src, s.in_dtype)
            if not conds:
                return src
            cond = conds[0]
            for c2 in conds[1:]:
                cond = tirx.all(cond, c2)
            return tirx.if_then_else(cond, src, tirx.const(zx_u, "uint8"))
        P = te.compute((s.N, Hp, Wpd, C4), pad_value, name="pad")
    kh = te.reduce_axis((0, s.KH), "kh")
    kw = te.reduce_axis((0, s.KW), "kw")
    c4 = te.reduce_axis((0, C4 // 4), "c4")
    ci = te.reduce_axis((0, 4), "ci")
    acc = te.compute(
        (s.N, OH, OW, OCp // 16, 16),
        lambda n, oh, ow, ob, oi: te.sum(
            P[n, oh * sh + kh * dh, ow * sw + kw * dw, c4 * 4 + ci].astype("int32")
            * wl(ob, kh, kw, c4, oi, ci).astype("int32"), axis=[kh, kw, c4, ci]),
        name="acc")
    args = [X, Wp, Bi, Mq, Bf]
    if residual:
        R = te.placeholder((s.N, OH, OW, OCp), s.epi.res_dtype, name="R")
        args.append(R)
        Y = te.compute((s.N, OH, OW, OCp), lambda n, h, w, o: _epilogue_expr(
            s.epi, acc[n, h, w, o // 16, o % 16], Bi[o], Mq[o], Bf[o], R[n, h, w, o]), name="out")
    else:
        Y = te.compute((s.N, OH, OW, OCp), lambda n, h, w, o: _epilogue_expr(
            s.epi, acc[n, h, w, o // 16, o % 16], Bi[o], Mq[o], Bf[o]), name="out")
    func = te.create_prim_func(args + [Y])
    return _schedule_conv(func, spec, dot, cores, padded=not direct)


def _schedule_conv(func, spec: ConvSpec, dot: str, cores: int, padded: bool):
    from tvm.s_tir import Schedule
    if dot in TENSOR_INTRINS:
        register_intrinsics()
    sch = Schedule(func)
    acc = sch.get_sblock("acc")
    out = sch.get_sblock("out")
    OW, OCb = spec.OW, spec.OCp // 16
    TM, TN = _pick_tiles(OW, OCb, MAX_TILE_ACC_BY_DOT.get(dot, MAX_TILE_ACC))
    sch.set_scope(acc, 0, "local")
    n, h, w, o = sch.get_loops(out)
    wo, wi = sch.split(w, [None, TM])
    oo, oi = sch.split(o, [None, TN * 16])
    sch.reorder(oo, n, h, wo, wi, oi)
    sch.compute_at(acc, wo, preserve_unit_loops=True)
    par = sch.fuse(oo, n, h)
    sch.parallel(par)
    ln, lh, lw, lob, loi, lkh, lkw, lc4, lci = sch.get_loops(acc)[-9:]
    if dot in TENSOR_INTRINS:
        sch.reorder(lkh, lkw, lc4, ln, lh, lw, lob, loi, lci)
    else:
        sch.reorder(lkh, lkw, lc4, ln, lh, lw, lob, lci, loi)
        sch.vectorize(loi)
        sch.unroll(lci)
    sch.decompose_reduction(acc, lkh)
    init = sch.get_sblock("acc_init")
    if dot in TENSOR_INTRINS:
        sch.tensorize(loi, TENSOR_INTRINS[dot])
    sch.unroll(lw)
    sch.unroll(lob)
    il = sch.get_loops(init)
    sch.vectorize(il[-1])
    _, vi = sch.split(oi, [None, 16])
    sch.vectorize(vi)
    if padded:
        pad = sch.get_sblock("pad")
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*loops[:2]))
        if spec.in_layout == "NHWC":
            sch.vectorize(loops[-1])
    return sch.mod["main"].with_attr(KERNEL_ATTR, f"conv2d_{dot}")


def dense_int8(spec: DenseSpec, dot: str = "vnni", cores: int = 1):
    """Scheduled PrimFunc (A [M, Kin] u8/s8, Wp, Bi, M, Bf, Y [M, Np])."""
    from tvm import te, tirx
    s = spec
    K4, Np = s.K4, s.Np
    kin = max(s.K, s.Kphys)
    zx_u = s.zx + (128 if s.in_dtype == "int8" else 0)
    A = te.placeholder((s.M, kin), s.in_dtype, name="A")
    tensorized = dot in TENSOR_INTRINS
    Wp = te.placeholder((Np // 16, K4 // 4) + ((16, 4) if tensorized else (4, 16)), "int8", name="W")
    wl = (lambda nb, k4, ni, ki: Wp[nb, k4, ni, ki]) if tensorized else (lambda nb, k4, ni, ki: Wp[nb, k4, ki, ni])
    Bi = te.placeholder((Np,), "int32", name="Bi")
    Mq = te.placeholder((Np,), "float32", name="M")
    Bf = te.placeholder((Np,), "float32", name="Bf")
    direct = s.in_dtype == "uint8" and kin == K4
    if direct:
        P = A
    else:
        P = te.compute((s.M, K4), lambda m, k: tirx.if_then_else(
            k < kin, _to_u8(A[m, tirx.min(k, kin - 1)], s.in_dtype), tirx.const(zx_u, "uint8")), name="pad")
    k4 = te.reduce_axis((0, K4 // 4), "k4")
    ki = te.reduce_axis((0, 4), "ki")
    acc = te.compute((s.M, Np // 16, 16), lambda m, nb, ni: te.sum(
        P[m, k4 * 4 + ki].astype("int32") * wl(nb, k4, ni, ki).astype("int32"), axis=[k4, ki]), name="acc")
    Y = te.compute((s.M, Np), lambda m, n: _epilogue_expr(s.epi, acc[m, n // 16, n % 16], Bi[n], Mq[n], Bf[n]),
                   name="out")
    func = te.create_prim_func([A, Wp, Bi, Mq, Bf, Y])
    from tvm.s_tir import Schedule
    if dot in TENSOR_INTRINS:
        register_intrinsics()
    sch = Schedule(func)
    acc_b, out = sch.get_sblock("acc"), sch.get_sblock("out")
    TM, TN = _pick_tiles(s.M, Np // 16, MAX_TILE_ACC_BY_DOT.get(dot, MAX_TILE_ACC))
    sch.set_scope(acc_b, 0, "local")
    m, n = sch.get_loops(out)
    mo, mi = sch.split(m, [None, TM])
    no, ni_ = sch.split(n, [None, TN * 16])
    sch.reorder(no, mo, mi, ni_)
    sch.compute_at(acc_b, mo, preserve_unit_loops=True)
    sch.parallel(sch.fuse(no, mo))
    lm, lnb, lni, lk4, lki = sch.get_loops(acc_b)[-5:]
    if dot in TENSOR_INTRINS:
        sch.reorder(lk4, lm, lnb, lni, lki)
    else:
        sch.reorder(lk4, lm, lnb, lki, lni)
        sch.vectorize(lni)
        sch.unroll(lki)
    sch.decompose_reduction(acc_b, lk4)
    init = sch.get_sblock("acc_init")
    if dot in TENSOR_INTRINS:
        sch.tensorize(lni, TENSOR_INTRINS[dot])
    sch.unroll(lm)
    sch.unroll(lnb)
    sch.vectorize(sch.get_loops(init)[-1])
    _, vi = sch.split(ni_, [None, 16])
    sch.vectorize(vi)
    if not direct:
        pad = sch.get_sblock("pad")
        sch.vectorize(sch.get_loops(pad)[-1]) if K4 % 16 == 0 else None
    return sch.mod["main"].with_attr(KERNEL_ATTR, f"dense_{dot}")


def pack_dw_weight(w: np.ndarray) -> np.ndarray:
    """int8 depthwise [C, 1, KH, KW] -> [KH, KW, Cp] (channels last, zero padded to a multiple of 16)."""
    C, _, KH, KW = w.shape
    Cp = -(-C // 16) * 16
    wp = np.zeros((KH, KW, Cp), np.int8)
    wp[:, :, :C] = w[:, 0].transpose(1, 2, 0)
    return wp


def dwconv2d_int8(spec: ConvSpec, cores: int = 1):
    """Scheduled PrimFunc (X, Wdw [KH, KW, Cp], Bi, M, Bf, Y [N, OH, OW, Cp]): depthwise conv (one filter per
    channel) in NHWC: s32 sums of the KH*KW taps, vectorized along the channels (LLVM: widening int32
    multiplies and adds, exact), then the same requantize epilogue as the dense kernels. There is no reduction
    over channels, so VNNI's 4-wide dot products do not apply."""
    from tvm import te, tirx
    s = spec
    OH, OW, Cp = s.OH, s.OW, s.OCp
    sh, sw = s.stride
    dh, dw = s.dilation
    pt, pl, pb, pr = s.pad
    zx_u = s.zx + (128 if s.in_dtype == "int8" else 0)
    cin = (s.Cphys or s.C) if s.in_layout == "NHWC" else s.C
    xshape = (s.N, s.C, s.H, s.W) if s.in_layout == "NCHW" else (s.N, s.H, s.W, cin)
    X = te.placeholder(xshape, s.in_dtype, name="X")
    Wk = te.placeholder((s.KH, s.KW, Cp), "int8", name="W")
    Bi = te.placeholder((Cp,), "int32", name="Bi")
    Mq = te.placeholder((Cp,), "float32", name="M")
    Bf = te.placeholder((Cp,), "float32", name="Bf")
    Hp, Wpd = s.H + pt + pb, s.W + pl + pr

    def pad_value(n, h, w, c):
        cond = tirx.all(h >= pt, h < s.H + pt, w >= pl, w < s.W + pl, c < min(cin, Cp))
        hh, ww = tirx.min(tirx.max(h - pt, 0), s.H - 1), tirx.min(tirx.max(w - pl, 0), s.W - 1)
        cc = tirx.min(c, cin - 1)
        src = X[n, cc, hh, ww] if s.in_layout == "NCHW" else X[n, hh, ww, cc]
        return tirx.if_then_else(cond, _to_u8(src, s.in_dtype), tirx.const(zx_u, "uint8"))
    P = te.compute((s.N, Hp, Wpd, Cp), pad_value, name="pad")

    def body(n, h, w, c):
        acc = None
        for i in range(s.KH):
            for j in range(s.KW):
                t = P[n, h * sh + i * dh, w * sw + j * dw, c].astype("int32") * Wk[i, j, c].astype("int32")
                acc = t if acc is None else acc + t
        return _epilogue_expr(s.epi, acc, Bi[c], Mq[c], Bf[c])
    Y = te.compute((s.N, OH, OW, Cp), body, name="out")
    from tvm.s_tir import Schedule
    sch = Schedule(te.create_prim_func([X, Wk, Bi, Mq, Bf, Y]))
    for name in ("pad", "out"):
        b = sch.get_sblock(name)
        n, h, w, c = sch.get_loops(b)
        sch.parallel(sch.fuse(n, h))
        _, ci_ = sch.split(c, [None, 16])
        sch.vectorize(ci_)
    return sch.mod["main"].with_attr(KERNEL_ATTR, "dwconv2d")


def maxpool_int8(N: int, H: int, W: int, C: int, OH: int, OW: int, pool: tuple, stride: tuple, pad: tuple,
                 dilation: tuple, dtype: str, cores: int = 1):
    """Scheduled PrimFunc (X [N, H, W, C], Y [N, OH, OW, C]): max pooling of an integer NHWC tensor. The input is
    padded with the type's lowest value (never the maximum of a window that holds a real element, like fp32's
    -inf), then every output is the max of its KH*KW taps, vectorized along the channels."""
    from tvm import te, tirx
    KH, KW = pool
    sh, sw = stride
    dh, dw = dilation
    pt, pl = pad[0], pad[1]
    Hp = max(H + pt + (pad[2] if len(pad) > 2 else pt), (OH - 1) * sh + (KH - 1) * dh + 1)
    Wp = max(W + pl + (pad[3] if len(pad) > 3 else pl), (OW - 1) * sw + (KW - 1) * dw + 1)
    lowest = tirx.const(0 if dtype == "uint8" else -128, dtype)
    X = te.placeholder((N, H, W, C), dtype, name="X")
    P = te.compute((N, Hp, Wp, C), lambda n, h, w, c: tirx.if_then_else(
        tirx.all(h >= pt, h < H + pt, w >= pl, w < W + pl),
        X[n, tirx.min(tirx.max(h - pt, 0), H - 1), tirx.min(tirx.max(w - pl, 0), W - 1), c], lowest), name="pad")

    def window(n, oh, ow, c):
        v = None
        for i in range(KH):
            for j in range(KW):
                t = P[n, oh * sh + i * dh, ow * sw + j * dw, c]
                v = t if v is None else tirx.max(v, t)
        return v
    Y = te.compute((N, OH, OW, C), window, name="pool")
    from tvm.s_tir import Schedule
    sch = Schedule(te.create_prim_func([X, Y]))
    for name in ("pad", "pool"):
        b = sch.get_sblock(name)
        n, h, w, c = sch.get_loops(b)
        sch.parallel(sch.fuse(n, h))
        if C % 16 == 0:
            co, ci_ = sch.split(c, [None, 16])
            sch.vectorize(ci_)
    return sch.mod["main"].with_attr(KERNEL_ATTR, "maxpool_nhwc")


# ---------------------------------------------------------------------------------------------------------------
# numpy references (tests)
# ---------------------------------------------------------------------------------------------------------------

def reference_acc_conv(x_nchw: np.ndarray, w: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """s32 accumulators sum((x - zx) * w) as NHWC [N, OH, OW, OC] (int64 math)."""
    x = x_nchw.astype(np.int64) - spec.zx
    pt, pl, pb, pr = spec.pad
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    N, C, _, _ = x.shape
    OC, _, KH, KW = w.shape
    out = np.zeros((N, spec.OH, spec.OW, OC), np.int64)
    for kh in range(KH):
        for kw in range(KW):
            h0, w0 = kh * spec.dilation[0], kw * spec.dilation[1]
            patch = x[:, :, h0:h0 + spec.stride[0] * spec.OH:spec.stride[0], w0:w0 + spec.stride[1] * spec.OW:spec.stride[1]]
            out += np.einsum("nchw,oc->nhwo", patch, w[:, :, kh, kw].astype(np.int64))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Relax rewrite: dequantize -> conv2d / matmul -> ... -> quantize chains into call_tir of the int8 kernels
# ---------------------------------------------------------------------------------------------------------------

def _op_name(e) -> str | None:
    from tvm import relax
    if isinstance(e, relax.Call) and hasattr(e.op, "name"):
        return str(e.op.name)
    return None


def _const(e) -> np.ndarray | None:
    import tvm
    if isinstance(e, tvm.ir.expr.Constant):
        v = e.value
        return v.numpy() if hasattr(v, "numpy") else np.asarray(v)
    return None


def _shape(e) -> tuple | None:
    ty = getattr(e, "ty", None)
    shp = getattr(ty, "shape", None)
    if shp is None:
        return None
    try:
        return tuple(int(d) for d in shp)
    except (TypeError, ValueError):
        return None


def _dtype(e) -> str | None:
    ty = getattr(e, "ty", None)
    dt = getattr(ty, "dtype", None)
    return str(dt) if dt is not None else None


def _scalar(a: np.ndarray | None):
    if a is None or a.size != 1:
        return None
    return a.reshape(()).item()


class _Block:
    """Bindings of one dataflow block with use counts."""

    def __init__(self, block, outside_uses: set):
        from tvm import relax
        self.bindings = list(block.bindings)
        self.value = {}
        self.index = {}
        self.uses: dict = {}
        for i, b in enumerate(self.bindings):
            self.value[b.var] = b.value
            self.index[b.var] = i
        for i, b in enumerate(self.bindings):
            for v in _free_vars(b.value):
                self.uses.setdefault(v, []).append(i)
        self.outside = outside_uses
        self.relax = relax

    def bound(self, e):
        """The value bound to e when e is a var of this block, else e."""
        return self.value.get(e, e) if isinstance(e, self.relax.Var) else e

    def single_use(self, var) -> int | None:
        if var in self.outside:
            return None
        u = self.uses.get(var, [])
        return u[0] if len(u) == 1 else None


def _free_vars(expr) -> list:
    from tvm import relax
    out = []

    def visit(e):
        if isinstance(e, relax.Var):
            out.append(e)
    relax.analysis.post_order_visit(expr, visit)
    return out


@dataclass
class _Match:
    kind: str                   # conv | dense
    root: int                   # binding index of the chain's last binding (replaced by the kernel call)
    interior: list              # binding indices consumed by the chain (dropped)
    xq: object                  # quantized input var
    zx: int
    sx: float
    in_dtype: str
    w: np.ndarray               # int8 weight [OC, C, KH, KW] or [N, K]
    sw: np.ndarray              # per-channel weight scales [OC]
    bias_i32: np.ndarray | None
    bias_f: np.ndarray | None
    attrs: dict
    epi: Epilogue
    sy: float | None
    rq: object = None           # residual quantized var (qadd)
    out_var: object = None      # the var the chain defines (its NCHW / logical value)
    out_shape: tuple = ()


def _is_constant(blk: _Block, e, depth: int = 0) -> bool:
    """e is computed from constants only (FoldConstant would evaluate it at compile time)."""
    from tvm import relax
    if _const(e) is not None or isinstance(e, relax.ShapeExpr) or type(e).__name__ in ("PrimValue", "StringImm"):
        return True
    if isinstance(e, relax.Tuple):
        return all(_is_constant(blk, a, depth + 1) for a in e.fields)
    if depth > 16:
        return False
    v = blk.bound(e)
    if v is e:
        return False                      # a function parameter or a var from another block
    if isinstance(v, relax.Call):
        return all(_is_constant(blk, a, depth + 1) for a in v.args)
    if isinstance(v, relax.Tuple):
        return all(_is_constant(blk, a, depth + 1) for a in v.fields)
    return _const(v) is not None


def _match_dq_act(blk: _Block, e):
    """dequantize(xq, scalar scale, scalar zero point) with xq u8/s8 -> (xq, sx, zx, dtype) or None.
    A constant xq is left alone: FoldConstant evaluates such chains on a generic target (no VNNI)."""
    v = blk.bound(e)
    if _op_name(v) != "relax.dequantize":
        return None
    xq, s, z = v.args[0], _const(v.args[1]), _const(v.args[2])
    dt = _dtype(xq)
    if dt not in ("uint8", "int8") or _scalar(s) is None or _scalar(z) is None or _is_constant(blk, xq):
        return None
    return xq, float(_scalar(s)), int(_scalar(z)), dt


def _match_dq_weight(blk: _Block, e, out_axis: int):
    """dequantize(int8 constant, scale, zero point 0) with per-channel scales along out_axis (or one scale)
    -> (int8 values, scales broadcast to the out channels) or None."""
    v = blk.bound(e)
    if _op_name(v) != "relax.dequantize":
        return None
    q, s, z = _const(v.args[0]), _const(v.args[1]), _const(v.args[2])
    if q is None or s is None or q.dtype != np.int8 or (z is not None and np.any(z != 0)):
        return None
    n_out = q.shape[out_axis]
    if s.size == 1:
        s = np.full(n_out, float(s.reshape(())), np.float32)
    elif s.size == n_out and int(v.attrs.axis) % q.ndim == out_axis % q.ndim:
        s = s.reshape(n_out).astype(np.float32)
    else:
        return None
    return q, s


def _fold_fp32(blk: _Block, e, depth=0) -> np.ndarray | None:
    """Value of a constant fp32 expression built from constants, dequantize, reshape, astype."""
    v = blk.bound(e)
    c = _const(v)
    if c is not None:
        return c.astype(np.float64)
    if depth > 4:
        return None
    op = _op_name(v)
    if op == "relax.dequantize":
        q, s, z = _const(v.args[0]), _const(v.args[1]), _const(v.args[2])
        if q is None or s is None or z is None:
            return None
        axis = int(v.attrs.axis)
        shape = [1] * q.ndim
        if s.size > 1:
            shape[axis] = -1
        return (q.astype(np.float64) - z.astype(np.float64).reshape(shape if z.size > 1 else ())) * \
            s.astype(np.float64).reshape(shape if s.size > 1 else ())
    if op == "relax.reshape":
        x = _fold_fp32(blk, v.args[0], depth + 1)
        shp = _shape(v)
        return x.reshape(shp) if x is not None and shp is not None else None
    return None


def _bias_int(blk: _Block, e):
    """(int32 values, scale) when e is [reshape of] dequantize(int32 constant, scale, 0)."""
    v = blk.bound(e)
    if _op_name(v) == "relax.reshape":
        v = blk.bound(v.args[0])
    if _op_name(v) != "relax.dequantize":
        return None
    q, s, z = _const(v.args[0]), _const(v.args[1]), _const(v.args[2])
    if q is None or s is None or q.dtype != np.int32 or (z is not None and np.any(z != 0)):
        return None
    return q.reshape(-1), s.reshape(-1).astype(np.float64)


def _act_bounds(blk: _Block, v):
    """relu -> (0, None); clip/minimum/maximum with scalar constants -> bounds; else None."""
    op = _op_name(v)
    if op == "relax.nn.relu":
        return (0.0, None)
    if op == "relax.clip":
        lo, hi = v.args[1], v.args[2]
        try:
            return (float(lo.value), float(hi.value))
        except AttributeError:
            return None
    return None


def _quant_params(blk: _Block, v):
    """quantize(x, scalar scale, scalar zero point) -> (scale, zp, dtype) or None."""
    if _op_name(v) != "relax.quantize":
        return None
    s, z = _const(v.args[1]), _const(v.args[2])
    if _scalar(s) is None or _scalar(z) is None:
        return None
    return float(_scalar(s)), int(_scalar(z)), str(v.attrs.out_dtype)


def _qrange(dtype: str):
    return (0.0, 255.0) if dtype == "uint8" else (-128.0, 127.0)


def _follow_epilogue(blk: _Block, start_idx: int, n_out: int, channel_axis: int, sx: float, sw: np.ndarray,
                     residual: bool = True):
    """Walk bias -> activation -> quantize [-> residual add -> activation -> quantize] from the compute
    binding. Returns (root index, interior indices, bias_i32, bias_f, epilogue, sy, residual var) or None."""
    interior = [start_idx]
    cur = blk.bindings[start_idx].var
    bias_i32 = bias_f = None
    act = None
    while True:
        nxt = blk.single_use(cur)
        if nxt is None:
            break
        v = blk.bindings[nxt].value
        op = _op_name(v)
        if op == "relax.add" and bias_i32 is None and bias_f is None and act is None:
            other = v.args[1] if v.args[0].same_as(cur) else v.args[0] if v.args[1].same_as(cur) else None
            if other is None:
                break
            bi = _bias_int(blk, other)
            if bi is not None and bi[0].size == n_out:
                expect = sx * sw.astype(np.float64)
                if np.allclose(bi[1] * np.ones(n_out), expect, rtol=1e-6, atol=0):
                    bias_i32 = bi[0].astype(np.int64)
                else:
                    bias_f = bi[0].astype(np.float64) * bi[1]
            else:
                val = _fold_fp32(blk, other)
                if val is None:
                    break
                flat = val.reshape(-1)
                if flat.size == 1:
                    flat = np.full(n_out, flat[0])
                elif flat.size != n_out or (val.ndim > 1 and val.shape[channel_axis if val.ndim > 2 else -1] != n_out):
                    break
                bias_f = flat
            interior.append(nxt)
            cur = blk.bindings[nxt].var
            continue
        b = _act_bounds(blk, v)
        if b is not None and act is None:
            act = b
            interior.append(nxt)
            cur = blk.bindings[nxt].var
            continue
        qp = _quant_params(blk, v)
        if qp is not None:
            sy, zy, odt = qp
            lo, hi = _qrange(odt)
            if act is not None:
                if act[0] is not None:
                    lo = max(lo, float(np.clip(np.rint(act[0] / sy) + zy, *_qrange(odt))))
                if act[1] is not None:
                    hi = min(hi, float(np.clip(np.rint(act[1] / sy) + zy, *_qrange(odt))))
            epi = Epilogue(mode="q", out_dtype=odt, zy=zy, lo=lo, hi=hi)
            res = _follow_residual(blk, nxt, sy, zy, odt, epi) if residual else None
            if res is not None:
                root, extra, rq, epi2 = res
                return root, interior + [nxt] + extra, bias_i32, bias_f, epi2, sy, rq
            return nxt, interior, bias_i32, bias_f, epi, sy, None
        break
    # fp32 output (no quantize after the chain)
    root = interior[-1]
    interior = interior[:-1]
    epi = Epilogue(mode="f", out_dtype="float32",
                   flo=act[0] if act else None, fhi=act[1] if act else None)
    return root, interior, bias_i32, bias_f, epi, None, None


def _follow_residual(blk: _Block, q_idx: int, s1: float, z1: int, dt1: str, epi1: Epilogue):
    """quantize(s1, z1) -> dequantize(s1, z1) -> add(., dequantize(rq)) -> [act] -> quantize(s2, z2)."""
    qvar = blk.bindings[q_idx].var
    d_idx = blk.single_use(qvar)
    if d_idx is None:
        return None
    m = _match_dq_act(blk, blk.bindings[d_idx].var)
    if m is None or not m[0].same_as(qvar) or abs(m[1] - s1) > 1e-12 * max(1.0, s1) or m[2] != z1:
        return None
    dvar = blk.bindings[d_idx].var
    a_idx = blk.single_use(dvar)
    if a_idx is None:
        return None
    av = blk.bindings[a_idx].value
    if _op_name(av) != "relax.add":
        return None
    other = av.args[1] if av.args[0].same_as(dvar) else av.args[0]
    r = _match_dq_act(blk, other)
    if r is None or _shape(r[0]) != _shape(qvar):
        return None
    rq, sr, zr, rdt = r
    extra = [d_idx, a_idx]
    cur = blk.bindings[a_idx].var
    act = None
    while True:
        nxt = blk.single_use(cur)
        if nxt is None:
            return None
        v = blk.bindings[nxt].value
        b = _act_bounds(blk, v)
        if b is not None and act is None:
            act = b
            extra.append(nxt)
            cur = blk.bindings[nxt].var
            continue
        qp = _quant_params(blk, v)
        if qp is None:
            return None
        s2, z2, odt = qp
        lo, hi = _qrange(odt)
        epi = Epilogue(mode="qadd", out_dtype=odt, zy=z2, lo=lo, hi=hi, s1=s1, z1=z1, lo1=epi1.lo, hi1=epi1.hi,
                       res_dtype=rdt, sr=sr, zr=zr, inv_s2=float(np.float32(1.0) / np.float32(s2)),
                       act2_lo=act[0] if act else None, act2_hi=act[1] if act else None)
        return nxt, extra, rq, epi


def _match_conv(blk: _Block, idx: int, residual: bool = True):
    v = blk.bindings[idx].value
    a = v.attrs
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW":
        return None
    act = _match_dq_act(blk, v.args[0])
    wt = _match_dq_weight(blk, v.args[1], 0)
    xshape = _shape(v.args[0])
    if act is None or wt is None or xshape is None or len(xshape) != 4:
        return None
    xq, sx, zx, dt = act
    w, sw = wt
    OC = w.shape[0]
    groups = int(a.groups)
    depthwise = groups > 1 and groups == xshape[1] == OC and w.shape[1] == 1
    if groups != 1 and not depthwise:
        return None                       # grouped convs (other than depthwise) stay fp32
    chain = _follow_epilogue(blk, idx, OC, 1, sx, sw, residual and not depthwise)
    if chain is None:
        return None
    root, interior, bias_i32, bias_f, epi, sy, rq = chain
    attrs = {"stride": tuple(int(s) for s in a.strides), "pad": tuple(int(p) for p in a.padding),
             "dilation": tuple(int(d) for d in a.dilation), "xshape": xshape}
    out_var = blk.bindings[root].var
    return _Match("dwconv" if depthwise else "conv", root, interior, xq, zx, sx, dt, w, sw, bias_i32, bias_f,
                  attrs, epi, sy, rq, out_var, _shape(out_var))


def _match_dense(blk: _Block, idx: int):
    v = blk.bindings[idx].value
    act = _match_dq_act(blk, v.args[0])
    xshape = _shape(v.args[0])
    if act is None or xshape is None or len(xshape) < 2:
        return None
    wexpr = blk.bound(v.args[1])
    if _op_name(wexpr) == "relax.permute_dims":          # Gemm transB: permute_dims(dequantize(W[N, K]))
        axes = wexpr.attrs.axes
        if axes is not None and [int(x) for x in axes] != [1, 0]:
            return None
        wt = _match_dq_weight(blk, wexpr.args[0], 0)
        if wt is None:
            return None
        w, sw = wt
    else:                                                # MatMul: dequantize(W[K, N]) per column
        wt = _match_dq_weight(blk, v.args[1], 1)
        if wt is None:
            return None
        w, sw = np.ascontiguousarray(wt[0].T), wt[1]
    if w.ndim != 2 or w.shape[1] != xshape[-1]:
        return None
    xq, sx, zx, dt = act
    chain = _follow_epilogue(blk, idx, w.shape[0], -1, sx, sw)
    if chain is None:
        return None
    root, interior, bias_i32, bias_f, epi, sy, rq = chain
    if epi.mode == "qadd":
        return None       # residual adds on dense layers stay on the fp32 path
    out_var = blk.bindings[root].var
    return _Match("dense", root, interior, xq, zx, sx, dt, w, sw, bias_i32, bias_f, {"xshape": xshape}, epi, sy,
                  None, out_var, _shape(out_var))


@dataclass
class _Phys:
    """Physical (kernel-side) form of a quantized tensor: NHWC with padded channels, or [M, Kpadded]."""
    var: object
    layout: str        # NHWC | ROWS
    channels: int


class _Rewriter:
    def __init__(self, mod, target, dot: str):
        self.mod = mod
        self.target = target
        self.dot = dot
        self.cores = _num_cores(target)
        self.funcs: dict = {}          # kernel key -> GlobalVar
        self.new_funcs: list = []
        from tvm import relax
        self.bb = relax.BlockBuilder(mod)
        self.count = {"conv2d": 0, "dwconv2d": 0, "dense": 0, "residual_fused": 0, "maxpool_nhwc": 0, "mean_nhwc": 0,
                      "fp32_convs": 0, "fp32_matmuls": 0}
        self._n = 0

    def name(self, base):
        self._n += 1
        return f"{base}{self._n}"

    # -- PrimFunc registry --------------------------------------------------------------------------------
    def kernel(self, kind, spec, residual=False):
        key = (kind, repr(spec), residual, self.dot)
        if key in self.funcs:
            return self.funcs[key]
        if kind == "conv":
            f = conv2d_int8(spec, self.dot, self.cores, residual=residual)
        elif kind == "dwconv":
            f = dwconv2d_int8(spec, self.cores)
        else:
            f = dense_int8(spec, self.dot, self.cores)
        name = self.name(f"graphopt_int8_{kind}")
        f = f.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8) \
            .with_attr("tirx.noalias", True)
        gv = self.bb.add_func(f, name)
        self.funcs[key] = gv
        self.new_funcs.append((gv, f))
        return gv

    # -- the rewrite of one block -------------------------------------------------------------------------
    def rewrite_block(self, block, outside_uses):
        from tvm import relax
        blk = _Block(block, outside_uses)
        matches: dict[int, _Match] = {}
        claimed: set = set()
        for i, b in enumerate(blk.bindings):
            op = _op_name(b.value)
            if op not in ("relax.nn.conv2d", "relax.matmul") or i in claimed:
                continue
            try:
                m = _match_conv(blk, i) if op == "relax.nn.conv2d" else _match_dense(blk, i)
                if m is not None and m.kind == "conv" and any(j in claimed for j in m.interior + [m.root]):
                    m = _match_conv(blk, i, residual=False)   # the add was fused into the other branch
            except Exception as e:  # noqa: BLE001 - an unexpected form stays on the fp32 path
                log.debug("int8 match failed at %s: %s", b.var, e)
                m = None
            if m is None or any(j in claimed for j in m.interior + [m.root]):
                if _match_dq_act(blk, b.value.args[0]) is not None:
                    self.count["fp32_convs" if op == "relax.nn.conv2d" else "fp32_matmuls"] += 1
                continue
            matches[m.root] = m
            claimed.update(m.interior)
            claimed.add(m.root)
        if not matches:
            return block, False
        drop = set()
        for m in matches.values():
            drop.update(m.interior)
        self.phys: dict = {}
        out = []
        for i, b in enumerate(blk.bindings):
            if i in drop:
                continue
            if i in matches:
                out.extend(self.emit_match(matches[i]))
                continue
            op = _op_name(b.value)
            new = None
            if op == "relax.nn.max_pool2d":
                new = self.maxpool(b)
            elif op == "relax.mean":
                new = self.global_mean(b, blk)
            elif op in ("relax.maximum", "relax.minimum"):
                new = self.scalar_elementwise(b)
            if new is not None:
                out.extend(new)
                continue
            out.append(b)
        return relax.DataflowBlock(out), True

    def _dfvar(self, base, shape, dtype):
        from tvm import relax
        return relax.DataflowVar(self.name(base), relax.TensorType(list(shape), dtype))

    def _b(self, var, call):
        """VarBinding of var to the normalized call (struct info inferred and checked against var's)."""
        from tvm import relax
        call = self.bb.normalize(call)
        return relax.VarBinding(var, call)

    def _bind_view(self, orig_var, phys: _Phys, logical_shape):
        """orig_var = logical (NCHW / [M, N]) view of the physical tensor."""
        from tvm import relax
        bindings = []
        src = phys.var
        if phys.layout == "NHWC":
            n, h, w, c = _shape(src)
            t = self._dfvar("int8_nchw", (n, c, h, w), _dtype(src))
            bindings.append(self._b(t, relax.op.permute_dims(src, [0, 3, 1, 2])))
            src, ch_axis = t, 1
        else:
            ch_axis = 1
            if len(logical_shape) != 2:       # rows [M, Np] of an N-d matmul: slice, then the logical shape
                if phys.channels != logical_shape[-1]:
                    t = self._dfvar("int8_cols", (_shape(src)[0], logical_shape[-1]), _dtype(src))
                    bindings.append(self._b(t, relax.op.strided_slice(src, axes=[1], begin=[0],
                                                                        end=[int(logical_shape[-1])])))
                    src = t
                bindings.append(self._b(orig_var, relax.op.reshape(src, [int(d) for d in logical_shape])))
                return bindings
        if phys.channels != logical_shape[ch_axis]:
            sl = relax.op.strided_slice(src, axes=[ch_axis], begin=[0], end=[int(logical_shape[ch_axis])])
            bindings.append(self._b(orig_var, sl))
        elif bindings:
            last = bindings.pop()
            bindings.append(relax.VarBinding(orig_var, last.value))
        else:
            bindings.append(relax.VarBinding(orig_var, src))
        return bindings

    def emit_match(self, m: _Match):
        from tvm import relax
        bindings = []
        zx_u = m.zx + (128 if m.in_dtype == "int8" else 0)
        if m.kind == "dwconv":
            N, C, H, W = m.attrs["xshape"]
            _, _, KH, KW = m.w.shape
            p = self.phys.get(m.xq)
            nhwc = p is not None and p.layout == "NHWC"
            spec = ConvSpec(N, H, W, C, C, KH, KW, m.attrs["stride"], m.attrs["pad"], m.attrs["dilation"],
                            "NHWC" if nhwc else "NCHW", p.channels if nhwc else 0, m.in_dtype, m.zx, m.epi)
            x = p.var if nhwc else m.xq
            Bi, M, Bf = epilogue_constants(m.w, m.sx, m.sw, zx_u, m.bias_i32, m.bias_f,
                                           m.sy if m.epi.mode != "f" else None, spec.OCp)
            args = [x, relax.const(pack_dw_weight(m.w)), relax.const(Bi), relax.const(M), relax.const(Bf)]
            gv = self.kernel("dwconv", spec)
            odt = m.epi.out_dtype
            y = self._dfvar("int8_dwconv", (N, spec.OH, spec.OW, spec.OCp), odt)
            bindings.append(self._b(y, relax.call_tir(gv, args, relax.TensorType(
                [N, spec.OH, spec.OW, spec.OCp], odt))))
            phys = _Phys(y, "NHWC", spec.OCp)
            self.count["dwconv2d"] += 1
        elif m.kind == "conv":
            N, C, H, W = m.attrs["xshape"]
            OC, _, KH, KW = m.w.shape
            p = self.phys.get(m.xq)
            if p is not None and p.layout == "NHWC":
                spec = ConvSpec(N, H, W, C, OC, KH, KW, m.attrs["stride"], m.attrs["pad"], m.attrs["dilation"],
                                "NHWC", p.channels, m.in_dtype, m.zx, m.epi)
                x = p.var
            else:
                spec = ConvSpec(N, H, W, C, OC, KH, KW, m.attrs["stride"], m.attrs["pad"], m.attrs["dilation"],
                                "NCHW", 0, m.in_dtype, m.zx, m.epi)
                x = m.xq
            wp = pack_conv_weight(m.w, spec.C4, self.dot)
            Bi, M, Bf = epilogue_constants(m.w, m.sx, m.sw, zx_u, m.bias_i32, m.bias_f,
                                           m.sy if m.epi.mode != "f" else None, spec.OCp)
            args = [x, relax.const(wp), relax.const(Bi), relax.const(M), relax.const(Bf)]
            residual = m.epi.mode == "qadd"
            if residual:
                r, bl = self._to_nhwc_padded(m.rq, spec.OCp)
                bindings.extend(bl)
                args.append(r)
                self.count["residual_fused"] += 1
            gv = self.kernel("conv", spec, residual)
            odt = m.epi.out_dtype
            y = self._dfvar("int8_conv", (N, spec.OH, spec.OW, spec.OCp), odt)
            bindings.append(self._b(y, relax.call_tir(gv, args, relax.TensorType(
                [N, spec.OH, spec.OW, spec.OCp], odt))))
            phys = _Phys(y, "NHWC", spec.OCp)
            self.count["conv2d"] += 1
        else:
            xshape = m.attrs["xshape"]
            K, Mrows = xshape[-1], int(np.prod(xshape[:-1]))
            Nf = m.w.shape[0]
            p = self.phys.get(m.xq)
            if p is not None and p.layout == "ROWS":
                spec = DenseSpec(Mrows, K, Nf, p.channels, m.in_dtype, m.zx, m.epi)
                x = p.var
            else:
                spec = DenseSpec(Mrows, K, Nf, 0, m.in_dtype, m.zx, m.epi)
                x = m.xq
                if len(xshape) != 2:                 # [..., K] -> [M, K] rows
                    x = self._dfvar("int8_rows", (Mrows, K), m.in_dtype)
                    bindings.append(self._b(x, relax.op.reshape(m.xq, [Mrows, K])))
            wp = pack_dense_weight(m.w, spec.K4, self.dot)
            Bi, M, Bf = epilogue_constants(m.w, m.sx, m.sw, zx_u, m.bias_i32, m.bias_f,
                                           m.sy if m.epi.mode != "f" else None, spec.Np)
            gv = self.kernel("dense", spec)
            odt = m.epi.out_dtype
            y = self._dfvar("int8_dense", (Mrows, spec.Np), odt)
            bindings.append(self._b(y, relax.call_tir(gv, [x, relax.const(wp), relax.const(Bi),
                                                                     relax.const(M), relax.const(Bf)],
                                                               relax.TensorType([Mrows, spec.Np], odt))))
            phys = _Phys(y, "ROWS", spec.Np)
            self.count["dense"] += 1
        bindings.extend(self._bind_view(m.out_var, phys, m.out_shape))
        self.phys[m.out_var] = phys
        return bindings

    def _to_nhwc_padded(self, var, channels):
        """Residual operand in the output's physical layout (NHWC, `channels` channels)."""
        from tvm import relax
        p = self.phys.get(var)
        if p is not None and p.layout == "NHWC" and p.channels == channels:
            return p.var, []
        n, c, h, w = _shape(var)
        dt = _dtype(var)
        t = self._dfvar("int8_nhwc", (n, h, w, c), dt)
        bl = [self._b(t, relax.op.permute_dims(var, [0, 2, 3, 1]))]
        if channels != c:
            t2 = self._dfvar("int8_nhwc_pad", (n, h, w, channels), dt)
            bl.append(self._b(t2, relax.op.nn.pad(t, [0, 0, 0, 0, 0, 0, 0, channels - c])))
            t = t2
        return t, bl

    def global_mean(self, b, blk):
        """mean(dequantize(q), axis=[2, 3]) with q in NHWC: dequantize and average in NHWC (no transpose)."""
        from tvm import relax
        v = b.value
        axes = [int(a) for a in v.attrs.axis] if v.attrs.axis is not None else None
        dq = blk.bound(v.args[0])
        if axes not in ([2, 3], [-2, -1]) or _op_name(dq) != "relax.dequantize":
            return None
        p = self.phys.get(dq.args[0])
        if p is None or p.layout != "NHWC" or _scalar(_const(dq.args[1])) is None:
            return None
        n, h, w, c = _shape(p.var)
        keep = bool(v.attrs.keepdims)
        t = self._dfvar("int8_dq", (n, h, w, c), str(dq.attrs.out_dtype))
        m = self._dfvar("int8_mean", (n, 1, 1, c) if keep else (n, c), str(dq.attrs.out_dtype))
        bl = [self._b(t, relax.op.dequantize(p.var, dq.args[1], dq.args[2], axis=3, out_dtype=str(dq.attrs.out_dtype))),
              self._b(m, relax.op.mean(t, axis=[1, 2], keepdims=keep))]
        logical = _shape(b.var)
        if keep:
            bl += self._bind_view(b.var, _Phys(m, "NHWC", c), logical)
        else:
            bl += self._bind_view(b.var, _Phys(m, "ROWS", c), logical)
        self.count["mean_nhwc"] += 1
        return bl

    def scalar_elementwise(self, b):
        """maximum / minimum of a physical quantized tensor and a scalar constant (integer Relu from lower-int8):
        applied in the physical layout."""
        from tvm import relax
        v = b.value
        a0, a1 = v.args
        p = self.phys.get(a0)
        other = a1
        if p is None:
            p, other = self.phys.get(a1), a0
        if p is None or _scalar(_const(other)) is None:
            return None
        fn = relax.op.maximum if _op_name(v) == "relax.maximum" else relax.op.minimum
        y = self._dfvar("int8_ew", _shape(p.var), _dtype(p.var))
        phys = _Phys(y, p.layout, p.channels)
        self.phys[b.var] = phys
        return [self._b(y, fn(p.var, other))] + self._bind_view(b.var, phys, _shape(b.var))

    def maxpool(self, b):
        """max_pool2d on a quantized tensor whose physical form is NHWC: pool in NHWC."""
        from tvm import relax
        v = b.value
        p = self.phys.get(v.args[0])
        a = v.attrs
        if p is None or p.layout != "NHWC" or str(a.layout) != "NCHW" or _dtype(v.args[0]) not in ("uint8", "int8"):
            return None
        n, h, w, c = _shape(p.var)
        out_shape = _shape(b.var)
        dt = _dtype(p.var)
        key = ("pool", n, h, w, c, out_shape, tuple(int(x) for x in a.pool_size), tuple(int(x) for x in a.strides),
               tuple(int(x) for x in a.padding), tuple(int(x) for x in a.dilation), dt)
        gv = self.funcs.get(key)
        if gv is None:
            f = maxpool_int8(n, h, w, c, out_shape[2], out_shape[3], key[6], key[7], key[8], key[9], dt, self.cores)
            name = self.name("graphopt_int8_maxpool")
            f = f.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True) \
                .with_attr("op_pattern", 8).with_attr("tirx.noalias", True)
            gv = self.funcs[key] = self.bb.add_func(f, name)
            self.new_funcs.append((gv, f))
        oshape = (n, out_shape[2], out_shape[3], c)
        y = self._dfvar("int8_pool", oshape, dt)
        call = relax.call_tir(gv, [p.var], relax.TensorType(list(oshape), dt))
        phys = _Phys(y, "NHWC", c)
        self.phys[b.var] = phys
        self.count["maxpool_nhwc"] += 1
        return [self._b(y, call)] + self._bind_view(b.var, phys, out_shape)


def rewrite_int8(mod, target):
    """Replace the quantized conv2d / matmul chains of mod['main'] with graphopt's integer kernels.
    Returns (mod, facts); facts counts what was lowered (all zeros and mod unchanged when nothing matched,
    the target has no integer dot product, or the graph has no quantize ops)."""
    from tvm import relax
    dot = int8_dot(target)
    facts = {"int8_dot": dot, "int8_kernels": 0}
    if dot is None or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, facts
    gv_main = mod.get_global_var("main")
    func = mod[gv_main]
    text_ops = set()
    relax.analysis.post_order_visit(func, lambda e: text_ops.add(_op_name(e)))
    if "relax.quantize" not in text_ops:
        return mod, facts
    rw = _Rewriter(mod, target, dot)
    seq = func.body
    outside = set(_free_vars(seq.body))
    blocks, changed = [], False
    for bi, block in enumerate(seq.blocks):
        later = set(outside)
        for other in seq.blocks[bi + 1:]:
            for b in other.bindings:
                later.update(_free_vars(b.value))
        if isinstance(block, relax.DataflowBlock):
            # non-dataflow vars of the block are its outputs
            later.update(b.var for b in block.bindings if not isinstance(b.var, relax.DataflowVar))
            nb, ch = rw.rewrite_block(block, later)
            blocks.append(nb)
            changed |= ch
        else:
            blocks.append(block)
    if not changed:
        facts.update({k: v for k, v in rw.count.items()})
        return mod, facts
    new_func = relax.Function(func.params, relax.SeqExpr(blocks, seq.body), func.ret_ty, func.is_pure, func.attrs)
    mod = rw.bb.get()
    mod[gv_main] = new_func
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    facts.update(rw.count)
    facts["int8_kernels"] = len(rw.new_funcs)
    return mod, facts


# ---------------------------------------------------------------------------------------------------------------
# ONNX side and the hook for targets/cpu.py
# ---------------------------------------------------------------------------------------------------------------

def prepare_onnx(model):
    """Fold DequantizeLinear nodes TVM cannot import (INT4 / UINT4 inputs, blocked scales: weight-only int4
    from quantize{scheme=weight_int4}) into fp32 initializers. Returns a new ModelProto (the input is kept)."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    todo = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        t = inits[n.input[0]]
        block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or block:
            if all(i in inits for i in n.input[1:] if i):
                todo.append(n)
    if not todo:
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    names = {n.name for n in todo}
    for n in list(model.graph.node):
        if n.op_type != "DequantizeLinear" or n.name not in names:
            continue
        q = numpy_helper.to_array(inits[n.input[0]]).astype(np.float64)
        s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        z = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64) if len(n.input) > 2 and n.input[2] \
            else np.zeros_like(s)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % max(q.ndim, 1)
        block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
        if s.size == 1:
            val = (q - z.reshape(())) * s.reshape(())
        elif block:
            sl = tuple(slice(0, d) for d in q.shape)
            val = (q - np.repeat(z, block, axis=axis)[sl]) * np.repeat(s, block, axis=axis)[sl]
        else:
            shape = [1] * q.ndim
            shape[axis] = -1
            val = (q - z.reshape(shape)) * s.reshape(shape)
        model.graph.initializer.append(numpy_helper.from_array(val.astype(np.float32), n.output[0]))
        model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used or i.name in {o.name for o in model.graph.output}]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def import_int8(model, target, where: str = "model"):
    """What the cpu and arm-sve targets' lower() call instead of tvm_lowering.import_onnx: fold what TVM cannot import,
    import, and lower the quantized chains to graphopt's integer kernels. Returns (IRModule, facts); facts go
    into report.json (int8 kernel counts, the dot product used, fp32 leftovers)."""
    from . import tvm_lowering
    model = prepare_onnx(model)
    mod = tvm_lowering.import_onnx(model, where)
    return rewrite_int8(mod, target)


def host_target(cores: int | None = None):
    """The cpu target's TVM target for this machine (graphopt.targets.cpu picks the LLVM cpu from the flags)."""
    from .cpu import CpuTarget
    return CpuTarget(cores=cores).tvm_target()


def build_library(model, path, target=None, schedule=None, tuning_db: str | None = None) -> dict:
    """import_int8 + tvm_lowering.build + export into `path`: what the cpu target's lower() does with the int8
    hook (tests and tools/bench_int8.py use it directly). schedule: None (TVM's naive loops for the fp32 ops
    that remain) or a callable like cpu_schedules.schedule_module. Returns the facts."""
    import time
    from pathlib import Path
    from . import tvm_lowering
    t0 = time.perf_counter()
    target = target if target is not None else host_target()
    mod, facts = import_int8(model, target)
    ex = tvm_lowering.build(mod, target, schedule=schedule, tuning_db=tuning_db)
    tvm_lowering.export(ex, Path(path))
    facts["compile_seconds"] = round(time.perf_counter() - t0, 3)
    return facts
