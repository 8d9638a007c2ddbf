"""Block-sparse (BSR) weights: detection, packing, graphopt's own kernels, and the Relax rewrite that uses them.

Relax has no sparse operator and topi's sparse kernels are gone, so graphopt carries its own. A constant weight of a
Gemm / MatMul / 1x1 Conv whose zero entries form whole blocks (at least `min_sparsity` of the blocks are zero) is
packed into BSR (`data` [nnz_blocks, r, c], `indices` [nnz_blocks], `indptr` [N/r + 1]) and the dense call is
replaced by `call_tir` to one of these kernels:

    linear   Y[M, N]    = X[M, K]    . W[N, K]^T      (MatMul / Gemm; leading dims of X are flattened)
    conv1x1  Y[B, N, P] = W[N, K]    . X[B, K, P]     (1x1 Conv, stride 1, no padding, groups 1; P = H * W)

Block shapes are written `r x c` over the weight seen as [out features, in features] (PyTorch's Linear / Conv
layout): `16x1` is 16 output features by one input feature; for an ONNX MatMul weight [K, N] the block applies to
its transpose.

Two implementations of each kernel:
  * TE (`te_kernel`): a compute with a data-dependent reduce axis over the BSR row, made a PrimFunc with
    te.create_prim_func. Scheduled by hand for CUDA (one thread per output, accumulator in a register, outputs
    of one block row on neighbouring threads so they share their loop and read `data` coalesced). The same
    schedule with `parallel` in place of the thread bindings runs on llvm, which is how these exact kernels are
    checked without a GPU.
  * hand-written TIR for llvm (`cpu_kernel`): vectorized over the block's rows (or its columns when r == 1, or
    the pixels of a 1x1 conv), a tile of M rows kept in registers, parallel over block rows.

Every kernel is a PrimFunc with its own global symbol, `op_pattern = 8` (opaque: FuseOps leaves it alone) and
`tirx.is_scheduled` (dlight and graphopt's CPU rules leave it alone).

Where the sparsify pass recorded a block shape (graphopt.metadata.sparse_blocks), it is used; else the shape is
detected (the cheapest of BLOCK_CANDIDATES with at least `min_sparsity` zero blocks).

Modules (each one job; the names below are the package's API):
    packing        block shapes (parse_block, block_mask, block_sparsity, fits, choose_block), to_bsr, and
                   weight_table(model): the model's candidate weights by content (numpy and onnx only)
    kernels        KernelSpec; te_compute / te_kernel (TE, CUDA or llvm), the hand-written llvm TIR kernels,
                   pack_data (BSR data in a kernel's layout), make_kernel
    relax_rewrite  decide (dense or sparse, which block), rewrite(mod, impl, weights, min_sparsity): the Relax
                   rewrite; build_llvm(model): import, rewrite and build on llvm
"""
from .kernels import KERNEL_ATTR, KernelSpec, make_kernel, pack_data, te_compute, te_kernel
from .packing import (DEFAULT_MIN_SPARSITY, block_mask, block_sparsity, choose_block, fits, parse_block, to_bsr,
                      weight_table)
from .relax_rewrite import build_llvm, decide, rewrite

__all__ = ["DEFAULT_MIN_SPARSITY", "KERNEL_ATTR", "KernelSpec", "block_mask", "block_sparsity", "build_llvm",
           "choose_block", "decide", "fits", "make_kernel", "pack_data", "parse_block", "rewrite", "te_compute",
           "te_kernel", "to_bsr", "weight_table"]
