"""Integer lowering of QDQ graphs for the CPU targets: u8 x s8 -> s32 kernels with AVX-512 VNNI (x86, targets/cpu.py)
or NEON usdot (aarch64 with FEAT_I8MM, targets/arm_sve.py).

TVM imports QuantizeLinear / DequantizeLinear as relax.quantize / relax.dequantize and would compute every
quantized Conv / MatMul / Gemm in fp32 (dequantize -> fp32 op -> quantize). This package's module pass
`graphopt.Int8Rewrite` (int8_rewrite_pass), the first pass of tvm_lowering.build's pipeline (before
DecomposeOpsForInference / LegalizeOps / FuseOps), replaces those chains with calls (call_tir) to graphopt's own
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
* depthwise conv2d (groups = channels): the KH*KW taps summed in int32, vectorized along the channels, a row of
  output pixels per 16-channel block; strided ones read their input in place instead of a padded copy.
* epilogues round with llvm.nearbyint called directly (tirx.nearbyint is not vectorizable in TVM 0.27 and made
  them scalar).
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

Modules (each one job; the names below are the package's API):
    target_facts  int8_dot(target) -> "vnni" | "avx2" | "usdot" | None; int8_amx(target): AMX tiles for conv /
                  dense (x86 with AMX and VNNI); num_cores(target)
    intrinsics    register_intrinsics(): the VNNI and usdot 16x4 tensor intrinsics
    specs         ConvSpec, DenseSpec, Epilogue: what one kernel computes
    packing       pack_conv_weight / pack_dense_weight / pack_dw_weight, epilogue_constants (numpy, compile time)
    kernels       conv2d_int8 / dense_int8 / dwconv2d_int8 / maxpool_int8: the scheduled PrimFuncs; conv_weight /
                  dense_weight: the packing of the kernel conv2d_int8 / dense_int8 build for a spec
    dw_quads      the depthwise conv on VNNI (vpdpbusd over four input rows interleaved per column): fits(spec,
                  dot), pack_weight, dwconv2d_quads; the rewrite takes it over dwconv2d_int8 wherever it fits
    amx_kernels   conv2d / dense on AMX tiles (tdpbusd, ../amx.py), taken by kernels.py where the spec's target has
                  AMX and the shape fits; bit-exact with the VNNI kernels
    relax_match   the quantized-chain matchers over one dataflow block: the forms as relax.dpl patterns, the walk
                  along the epilogue and the checks on constants hand-written (generic Relax reading:
                  ../relax_bindings.py)
    rewrite       rewrite_int8(mod, target) -> (IRModule, facts): the Relax rewrite; int8_rewrite_pass(target): it
                  as the module pass graphopt.Int8Rewrite for tvm_lowering.build(passes=...), facts read back as
                  .facts after the build
    onnx_entry    import_qdq(model): prepare_onnx + import (what the targets build from); import_int8(model, target)
                  -> (IRModule, facts) and build_library (tests, tools; the host's target:
                  graphopt.targets.cpu.CpuTarget().tvm_target())
"""
from .intrinsics import KERNEL_ATTR, register_intrinsics
from .kernels import conv2d_int8, dense_int8, dwconv2d_int8, maxpool_int8
from .onnx_entry import build_library, import_int8, import_qdq, prepare_onnx
from .packing import epilogue_constants, pack_conv_weight, pack_dense_weight, pack_dw_weight
from .rewrite import int8_rewrite_pass, rewrite_int8
from .specs import ConvSpec, DenseSpec, Epilogue
from .target_facts import int8_amx, int8_dot, num_cores

__all__ = ["KERNEL_ATTR", "ConvSpec", "DenseSpec", "Epilogue", "build_library", "conv2d_int8", "dense_int8",
           "dwconv2d_int8", "epilogue_constants", "import_int8", "import_qdq", "int8_amx", "int8_dot",
           "int8_rewrite_pass", "maxpool_int8", "num_cores", "pack_conv_weight", "pack_dense_weight", "pack_dw_weight", "prepare_onnx",
           "register_intrinsics", "rewrite_int8"]
