"""bf16 lowering for the cpu target (`precision bf16`): fp32 Conv / MatMul / Gemm with constant weights run with bf16
inputs and fp32 accumulation on AVX512-BF16 (`vdpbf16ps`) or AMX tiles (`tdpbf16ps`), and so do MatMuls of two
activations (attention's QK^T and PV) on AVX512-BF16; everything else stays fp32.

Modules:
    intrinsic  the 16x2 vdpbf16ps tensor intrinsic (through a small imported LLVM IR function) and TIR rounding
    packing    fp32 weights -> bf16 pairs at compile time (nearest even)
    kernels    conv2d_bf16 / dense_bf16: scheduled PrimFuncs with fused bias, relu/clip and residual epilogues;
               batch_matmul_bf16: activation x activation, both rounded to bf16 per call, a scalar scale fused
    epilogue   the fp32 epilogue every bf16 kernel ends with (bias, bounds, HardSwish, residual), KERNEL_ATTR
    (../amx.py: the AMX tile micro kernel, tdpbf16ps or tdpbusd as imported LLVM IR, the GEMM over stage pixels
               and request_amx(); shared with int8/amx_kernels.py)
    amx_kernels  conv2d / dense on AMX tiles, taken by kernels.py where the target has AMX and the shape fits
    depthwise  dwconv2d_bf16: the NHWC depthwise conv in fp32 arithmetic, reading / storing bf16 bits or fp32
    dw_pairs   dwconv2d_pairs: the depthwise conv on vdpbf16ps (two input rows interleaved per column, bf16
               weights) where the input is bf16 bits with padded channels; fits(spec), pack_weight
    rewrite    rewrite_bf16(mod, target) -> (IRModule, facts): the Relax rewrite of fp32 conv2d / matmul chains;
               bf16_rewrite_pass(target): it as the module pass graphopt.Bf16Rewrite (tvm_lowering.build(passes=...),
               facts read back as .facts)
"""
from .depthwise import DwSpec, dwconv2d_bf16
from .kernels import (KERNEL_ATTR, BatchMatmulSpec, ConvSpec, DenseSpec, batch_matmul_bf16, conv2d_bf16, conv_weight,
                      dense_bf16)
from .packing import bf16_bits, pack_conv_weight, pack_dense_weight, padded_bias
from .rewrite import bf16_dot, bf16_rewrite_pass, rewrite_bf16

__all__ = ["KERNEL_ATTR", "BatchMatmulSpec", "ConvSpec", "DenseSpec", "DwSpec", "batch_matmul_bf16", "bf16_bits",
           "bf16_dot", "bf16_rewrite_pass", "conv2d_bf16", "conv_weight", "dense_bf16", "dwconv2d_bf16",
           "pack_conv_weight", "pack_dense_weight", "padded_bias", "rewrite_bf16"]
