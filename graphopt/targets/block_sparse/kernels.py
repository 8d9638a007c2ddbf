"""The BSR kernels as PrimFuncs: TE with a data-dependent reduce axis (scheduled for CUDA, or the same loop nest on
llvm) and hand-written TIR for llvm; each kernel's data layout and the packing of BSR data into it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .packing import BSR

KERNEL_ATTR = "graphopt.kernel"


@dataclass(frozen=True)
class KernelSpec:
    kind: str            # "linear" | "conv1x1"
    m: int               # linear: rows of X; conv1x1: batch
    k: int               # input features
    n: int               # output features
    p: int               # conv1x1: pixels (H*W); linear: 1
    block: tuple
    nnzb: int
    dtype: str = "float32"

    @property
    def x_shape(self):
        return (self.m, self.k) if self.kind == "linear" else (self.m, self.k, self.p)

    @property
    def y_shape(self):
        return (self.m, self.n) if self.kind == "linear" else (self.m, self.n, self.p)

    def flops(self) -> int:
        return 2 * self.nnzb * self.block[0] * self.block[1] * self.m * self.p


def _finish(func, name: str, impl: str):
    return (func.with_attr("global_symbol", name).with_attr("op_pattern", 8)
            .with_attr("tirx.is_scheduled", True).with_attr("tirx.noalias", True).with_attr(KERNEL_ATTR, impl))


def te_compute(spec: KernelSpec):
    """The BSR kernel as a TE compute with a data-dependent reduce axis, made a PrimFunc (unscheduled)."""
    from tvm import te
    r, c = spec.block
    dt = spec.dtype
    X = te.placeholder(spec.x_shape, dt, "X")
    data = te.placeholder((spec.nnzb, r, c), dt, "data")
    indices = te.placeholder((spec.nnzb,), "int32", "indices")
    indptr = te.placeholder((spec.n // r + 1,), "int32", "indptr")

    def row_sum(n, load_x):
        nb = n // r
        start = indptr[nb]
        # one flattened axis over (stored block of this row, column inside the block), block-major
        t = te.reduce_axis((0, (indptr[nb + 1] - start) * c), "t")
        e = start + t // c
        cc = t % c
        return te.sum(data[e, n % r, cc] * load_x(indices[e] * c + cc), axis=t)

    if spec.kind == "linear":
        Y = te.compute(spec.y_shape, lambda m, n: row_sum(n, lambda k: X[m, k]), name="Y")
    else:
        Y = te.compute(spec.y_shape, lambda b, n, p: row_sum(n, lambda k: X[b, k, p]), name="Y")
    return te.create_prim_func([X, data, indices, indptr, Y])


CUDA_THREADS = 128


def schedule_te(func, device: bool, threads: int = CUDA_THREADS):
    """One thread per output (outputs of a block row on neighbouring threads), the sum kept in a register, the
    output initialised before the data-dependent loop (so empty block rows give 0). device=False keeps the same
    loop nest with the block loop parallel instead of bound to blockIdx/threadIdx (runs on llvm)."""
    from tvm.s_tir import Schedule
    sch = Schedule(func)
    outer = sch.get_sblock("Y_l1")
    inner = sch.get_sblock("Y")
    t = sch.get_loops(inner)[-1]
    acc = sch.cache_write(outer, 0, "local")
    fused = sch.fuse(*sch.get_loops(outer))
    bx, tx = sch.split(fused, [None, threads])
    if device:
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    else:
        sch.parallel(bx)
    sch.reverse_compute_at(acc, tx)
    sch.decompose_reduction(inner, t)
    return sch.mod["main"]


def te_kernel(spec: KernelSpec, name: str, device: bool):
    return _finish(schedule_te(te_compute(spec), device), name, "bsr-te-cuda" if device else "bsr-te-llvm")


def _cpu_linear_rows(spec: KernelSpec):
    """Vectorized over the r rows of a block (c unrolled): data is packed [nnzb, c, r]."""
    from tvm.script import tirx as T
    M, K, N = spec.m, spec.k, spec.n
    r, c = spec.block
    nnzb, dt = spec.nnzb, spec.dtype
    nbr = N // r
    MT = min(M, 8 if r <= 16 else 4 if r <= 32 else 2)
    MO = (M + MT - 1) // MT

    @T.prim_func(private=True, s_tir=True)
    def f(X: T.Buffer((M, K), dt), data: T.Buffer((nnzb, c, r), dt), indices: T.Buffer((nnzb,), "int32"),
          indptr: T.Buffer((nbr + 1,), "int32"), Y: T.Buffer((M, N), dt)):
        for nb in T.parallel(nbr):
            with T.sblock("bsr_row"):
                T.reads(X[0:M, 0:K], data[0:nnzb, 0:c, 0:r], indices[0:nnzb], indptr[0:nbr + 1])
                T.writes(Y[0:M, nb * r:nb * r + r])
                acc = T.alloc_buffer((MT, r), dt, scope="local")
                for mo in range(MO):
                    # the last tile overlaps the previous one instead of running past M: same values written twice
                    for mi in T.unroll(MT):
                        for jr in T.vectorized(r):
                            acc[mi, jr] = T.cast(0, dt)
                    for e in range(indptr[nb], indptr[nb + 1]):
                        for cc in T.unroll(c):
                            for mi in T.unroll(MT):
                                for jr in T.vectorized(r):
                                    acc[mi, jr] = acc[mi, jr] + data[e, cc, jr] * X[T.min(mo * MT, M - MT) + mi,
                                                                                     indices[e] * c + cc]
                    for mi in T.unroll(MT):
                        for jr in T.vectorized(r):
                            Y[T.min(mo * MT, M - MT) + mi, nb * r + jr] = acc[mi, jr]
    return f


def _cpu_linear_cols(spec: KernelSpec):
    """r == 1: vectorized over the c columns of a block, summed across lanes at the end: data [nnzb, c]."""
    from tvm.script import tirx as T
    M, K, N = spec.m, spec.k, spec.n
    _, c = spec.block
    nnzb, dt = spec.nnzb, spec.dtype
    MT = min(M, 8)
    MO = (M + MT - 1) // MT

    @T.prim_func(private=True, s_tir=True)
    def f(X: T.Buffer((M, K), dt), data: T.Buffer((nnzb, c), dt), indices: T.Buffer((nnzb,), "int32"),
          indptr: T.Buffer((N + 1,), "int32"), Y: T.Buffer((M, N), dt)):
        for n in T.parallel(N):
            with T.sblock("bsr_row"):
                T.reads(X[0:M, 0:K], data[0:nnzb, 0:c], indices[0:nnzb], indptr[0:N + 1])
                T.writes(Y[0:M, n])
                acc = T.alloc_buffer((MT, c), dt, scope="local")
                s = T.alloc_buffer((1,), dt, scope="local")
                for mo in range(MO):
                    for mi in T.unroll(MT):
                        for cc in T.vectorized(c):
                            acc[mi, cc] = T.cast(0, dt)
                    for e in range(indptr[n], indptr[n + 1]):
                        for mi in T.unroll(MT):
                            for cc in T.vectorized(c):
                                acc[mi, cc] = acc[mi, cc] + data[e, cc] * X[T.min(mo * MT, M - MT) + mi,
                                                                            indices[e] * c + cc]
                    for mi in range(MT):
                        s[0] = T.cast(0, dt)
                        for cc in range(c):
                            s[0] = s[0] + acc[mi, cc]
                        Y[T.min(mo * MT, M - MT) + mi, n] = s[0]
    return f


def _cpu_conv1x1(spec: KernelSpec):
    """Vectorized over pixels (a tile of PT), all r rows of the block in registers: data [nnzb, r, c]."""
    from tvm.script import tirx as T
    B, K, N, P = spec.m, spec.k, spec.n, spec.p
    r, c = spec.block
    nnzb, dt = spec.nnzb, spec.dtype
    nbr = N // r
    PT = min(P, 16)
    PO = (P + PT - 1) // PT

    @T.prim_func(private=True, s_tir=True)
    def f(X: T.Buffer((B, K, P), dt), data: T.Buffer((nnzb, r, c), dt), indices: T.Buffer((nnzb,), "int32"),
          indptr: T.Buffer((nbr + 1,), "int32"), Y: T.Buffer((B, N, P), dt)):
        for bn in T.parallel(B * nbr):
            with T.sblock("bsr_row"):
                T.reads(X[bn // nbr, 0:K, 0:P], data[0:nnzb, 0:r, 0:c], indices[0:nnzb], indptr[0:nbr + 1])
                T.writes(Y[bn // nbr, bn % nbr * r:bn % nbr * r + r, 0:P])
                acc = T.alloc_buffer((r, PT), dt, scope="local")
                for po in range(PO):
                    for jr in T.unroll(r):
                        for pl in T.vectorized(PT):
                            acc[jr, pl] = T.cast(0, dt)
                    for e in range(indptr[bn % nbr], indptr[bn % nbr + 1]):
                        for cc in range(c):
                            for jr in T.unroll(r):
                                for pl in T.vectorized(PT):
                                    acc[jr, pl] = acc[jr, pl] + data[e, jr, cc] * X[bn // nbr, indices[e] * c + cc,
                                                                                    T.min(po * PT, P - PT) + pl]
                    for jr in T.unroll(r):
                        for pl in T.vectorized(PT):
                            Y[bn // nbr, bn % nbr * r + jr, T.min(po * PT, P - PT) + pl] = acc[jr, pl]
    return f


def _cpu_linear_t(spec: KernelSpec):
    """Blocks with one or two rows, M >= 16: vectorized over M instead, on transposed activations. Takes
    Xt [K, M] and writes Yt [N, M] (the rewrite transposes around it); data [nnzb, r, c]."""
    from tvm.script import tirx as T
    M, K, N = spec.m, spec.k, spec.n
    r, c = spec.block
    nnzb, dt = spec.nnzb, spec.dtype
    nbr = N // r
    MT = min(M, 128, 16 * max(1, 16 // r))
    MO = (M + MT - 1) // MT

    @T.prim_func(private=True, s_tir=True)
    def f(Xt: T.Buffer((K, M), dt), data: T.Buffer((nnzb, r, c), dt), indices: T.Buffer((nnzb,), "int32"),
          indptr: T.Buffer((nbr + 1,), "int32"), Yt: T.Buffer((N, M), dt)):
        for nb in T.parallel(nbr):
            with T.sblock("bsr_row"):
                T.reads(Xt[0:K, 0:M], data[0:nnzb, 0:r, 0:c], indices[0:nnzb], indptr[0:nbr + 1])
                T.writes(Yt[nb * r:nb * r + r, 0:M])
                acc = T.alloc_buffer((r, MT), dt, scope="local")
                for mo in range(MO):
                    for jr in T.unroll(r):
                        for mi in T.vectorized(MT):
                            acc[jr, mi] = T.cast(0, dt)
                    for e in range(indptr[nb], indptr[nb + 1]):
                        for cc in T.unroll(c):
                            for jr in T.unroll(r):
                                for mi in T.vectorized(MT):
                                    acc[jr, mi] = acc[jr, mi] + data[e, jr, cc] * Xt[indices[e] * c + cc,
                                                                                     T.min(mo * MT, M - MT) + mi]
                    for jr in T.unroll(r):
                        for mi in T.vectorized(MT):
                            Yt[nb * r + jr, T.min(mo * MT, M - MT) + mi] = acc[jr, mi]
    return f


def cpu_layout(spec: KernelSpec) -> str:
    """How cpu_kernel wants its operands: "rc" (data as BSR packs it, [nnzb, r, c]), "cr" ([nnzb, c, r]), "c"
    ([nnzb, c]), or "t" (data "rc", but X and Y transposed: Xt [K, M] in, Yt [N, M] out)."""
    if spec.kind == "conv1x1":
        return "rc"
    r, c = spec.block
    if r <= 2 and spec.m >= 16:
        return "t"
    return "c" if r == 1 and c >= 4 else "cr"


def cpu_kernel(spec: KernelSpec, name: str):
    layout = cpu_layout(spec)
    f = {"rc": _cpu_conv1x1, "c": _cpu_linear_cols, "cr": _cpu_linear_rows, "t": _cpu_linear_t}[layout](spec)
    return _finish(f, name, "bsr-cpu")


def pack_data(bsr: BSR, layout: str) -> np.ndarray:
    """data as a kernel with this layout (see cpu_layout) wants it."""
    if layout == "cr":
        return np.ascontiguousarray(bsr.data.transpose(0, 2, 1))
    if layout == "c":
        return np.ascontiguousarray(bsr.data[:, 0, :])
    return bsr.data


def make_kernel(spec: KernelSpec, name: str, impl: str):
    """impl: "cuda" (TE, bound to threads), "te" (TE, same loop nest on llvm) or "cpu" (hand-written TIR, llvm).
    Returns (PrimFunc, layout); layout "t" means the kernel takes X transposed and writes Y transposed."""
    if impl == "cuda":
        return te_kernel(spec, name, device=True), "rc"
    if impl == "te":
        return te_kernel(spec, name, device=False), "rc"
    if impl == "cpu":
        return cpu_kernel(spec, name), cpu_layout(spec)
    raise ValueError(f"unknown block-sparse kernel implementation '{impl}'")
