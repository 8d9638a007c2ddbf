"""graphopt's 16x2 bf16 x bf16 -> fp32 tensor intrinsic: AVX512-BF16 `vdpbf16ps` (llvm.x86.avx512bf16.dpbf16ps.512),
and the fp32 -> bf16 stores: 16 lanes by `vcvtneps2bf16` (CVT_INTRIN, through graphopt_cvtneps2bf16 the same way),
32 lanes (two fp32 vectors) by one `vcvtne2ps2bf16` (CVT2_INTRIN).

C[16] fp32 += A[2] . B[16, 2], A and B bf16 held as uint16 bits: every fp32 lane i adds the two products of the
activation pair and weights (i, 0), (i, 1). TVM 0.27 cannot pass LLVM `bfloat` vectors to an intrinsic (its BF16
legalization turns every bf16 value into fp32 and bf16 storage into uint16, and its LLVM code generation has no
bf16 type), so the kernel calls `graphopt_dpbf16ps` on int32x16 operands: a three-line LLVM IR function, imported
into the kernel's module through the `pragma_import_llvm` loop annotation, that bitcasts them to <32 x bfloat>
and calls the intrinsic. It is `alwaysinline`: the compiled kernel holds the bare vdpbf16ps instructions.
"""
from __future__ import annotations

INTRIN = "graphopt_avx512bf16_16x2"
EXTERN = "graphopt_dpbf16ps"
#: 16 fp32 -> 16 bf16 bits with vcvtneps2bf16 (to_bf16_bits' rounding, but denormals flush to zero)
CVT_INTRIN = "graphopt_avx512bf16_cvt16"
CVT_EXTERN = "graphopt_cvtneps2bf16"
#: 32 fp32 -> 32 bf16 bits with one vcvtne2ps2bf16 (the same rounding): half the conversions of CVT_INTRIN (a 1x1
#: conv of 16 -> 96 channels at 112x112 storing bf16 ran 125 us with CVT_INTRIN, 104 storing fp32; 1 thread, EPYC)
CVT2_INTRIN = "graphopt_avx512bf16_cvt32"
CVT2_EXTERN = "graphopt_cvtne2ps2bf16"
LLVM_IR = f"""
define internal <16 x float> @{EXTERN}(<16 x float> %c, <16 x i32> %a, <16 x i32> %b) #0 {{
  %a2 = bitcast <16 x i32> %a to <32 x bfloat>
  %b2 = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %c, <32 x bfloat> %a2, <32 x bfloat> %b2)
  ret <16 x float> %r
}}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define internal <16 x i16> @{CVT_EXTERN}(<16 x float> %x) #0 {{
  %r = call <16 x bfloat> @llvm.x86.avx512bf16.cvtneps2bf16.512(<16 x float> %x)
  %b = bitcast <16 x bfloat> %r to <16 x i16>
  ret <16 x i16> %b
}}
declare <16 x bfloat> @llvm.x86.avx512bf16.cvtneps2bf16.512(<16 x float>)
define internal <32 x i16> @{CVT2_EXTERN}(<16 x float> %hi, <16 x float> %lo) #0 {{
  %r = call <32 x bfloat> @llvm.x86.avx512bf16.cvtne2ps2bf16.512(<16 x float> %hi, <16 x float> %lo)
  %b = bitcast <32 x bfloat> %r to <32 x i16>
  ret <32 x i16> %b
}}
declare <32 x bfloat> @llvm.x86.avx512bf16.cvtne2ps2bf16.512(<16 x float>, <16 x float>)
attributes #0 = {{ alwaysinline nounwind memory(none) }}
"""

_registered = False


def bf16_value(bits):
    """TIR: the fp32 value of bf16 bits held in a uint16 expression."""
    from tvm import tirx
    return tirx.reinterpret("float32", bits.astype("uint32") << tirx.const(16, "uint32"))


def to_bf16_bits(x):
    """TIR: the bf16 bits (uint16) of an fp32 expression, rounded to nearest even like vcvtneps2bf16 (NaN aside)."""
    from tvm import tirx
    u = tirx.reinterpret("uint32", x)
    rounded = u + tirx.const(0x7FFF, "uint32") + ((u >> tirx.const(16, "uint32")) & tirx.const(1, "uint32"))
    return (rounded >> tirx.const(16, "uint32")).astype("uint16")


def register_intrinsic() -> None:
    """Register INTRIN, CVT_INTRIN and CVT2_INTRIN (once)."""
    global _registered
    if _registered:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((2,), "uint16", offset_factor=1), B: T.Buffer((16, 2), "uint16", offset_factor=1),
             C: T.Buffer((16,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.reinterpret("float32", T.shift_left(T.Cast("uint32", A[vk]), T.uint32(16))) \
                            * T.reinterpret("float32", T.shift_left(T.Cast("uint32", B[vi, vk]), T.uint32(16)))

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), "uint16", offset_factor=1), B: T.Buffer((16, 2), "uint16", offset_factor=1),
             C: T.Buffer((16,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            a = T.reinterpret("int32", A.vload([0], "uint16x2"))
            C[T.ramp(T.int32(0), 1, 16)] = T.call_extern(
                "float32x16", EXTERN, C.vload([0], dtype="float32x16"), T.broadcast(a, 16),
                T.reinterpret("int32x16", B.vload([0, 0], dtype="uint16x32")))

    def cvt_desc_of(lanes):
        """fp32 -> bf16 bits of `lanes` values, rounded as to_bf16_bits."""
        @T.prim_func(s_tir=True)
        def cvt_desc_n(F: T.Buffer((lanes,), "float32", offset_factor=1, scope="local"),
                       Y: T.Buffer((lanes,), "uint16", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(F[0:lanes])
                T.writes(Y[0:lanes])
                for i in T.serial(0, lanes):
                    with T.sblock("cvt"):
                        vi = T.axis.remap("S", [i])
                        Y[vi] = T.Cast("uint16", T.shift_right(
                            T.reinterpret("uint32", F[vi]) + T.uint32(32767)
                            + T.bitwise_and(T.shift_right(T.reinterpret("uint32", F[vi]), T.uint32(16)), T.uint32(1)),
                            T.uint32(16)))
        return cvt_desc_n

    @T.prim_func(s_tir=True)
    def cvt2_impl(F: T.Buffer((32,), "float32", offset_factor=1, scope="local"),
                  Y: T.Buffer((32,), "uint16", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(F[0:32])
            T.writes(Y[0:32])
            Y[T.ramp(T.int32(0), 1, 32)] = T.call_extern("uint16x32", CVT2_EXTERN, F.vload([16], dtype="float32x16"),
                                                         F.vload([0], dtype="float32x16"))

    @T.prim_func(s_tir=True)
    def cvt_impl(F: T.Buffer((16,), "float32", offset_factor=1, scope="local"),
                 Y: T.Buffer((16,), "uint16", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(F[0:16])
            T.writes(Y[0:16])
            Y[T.ramp(T.int32(0), 1, 16)] = T.call_extern("uint16x16", CVT_EXTERN, F.vload([0], dtype="float32x16"))

    for name, d, i in ((INTRIN, desc, impl), (CVT_INTRIN, cvt_desc_of(16), cvt_impl),
                          (CVT2_INTRIN, cvt_desc_of(32), cvt2_impl)):
        try:
            TensorIntrin.register(name, d, i)
        except Exception:  # noqa: BLE001 - already registered in this process (module reloaded)
            pass
    _registered = True


def import_llvm(sch, loop) -> None:
    """Annotate `loop` so that LLVM code generation links EXTERN into the kernel's module."""
    sch.annotate(loop, "pragma_import_llvm", LLVM_IR)
