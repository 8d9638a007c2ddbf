"""graphopt's 16x4 u8 x s8 -> s32 tensor intrinsics: AVX-512 VNNI (x86) and NEON usdot (aarch64, FEAT_I8MM)."""
from __future__ import annotations

VNNI_INTRIN = "graphopt_vnni_u8s8_16x4"
USDOT_INTRIN = "graphopt_usdot_u8s8_16x4"
#: dot modes computed by a tensorized 16x4 intrinsic (weights packed [.., 16, 4]) -> the intrinsic's name
TENSOR_INTRINS = {"vnni": VNNI_INTRIN, "usdot": USDOT_INTRIN}
#: PrimFunc attribute naming the integer kernel (tests, debugging)
KERNEL_ATTR = "graphopt.int8_kernel"

_registered = False


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
