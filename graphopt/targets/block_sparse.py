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
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt import metadata

#: auto-detected block shapes (r over output features, c over input features); 1x1 and 2x2 are only used when
#: recorded: unstructured sparsity rarely beats a dense kernel
BLOCK_CANDIDATES = ((32, 1), (16, 1), (8, 1), (1, 16), (1, 8), (4, 4), (8, 4), (4, 8), (4, 1), (1, 4))
#: per stored block, the cost of fetching its column index and looping, in multiply-adds
BLOCK_OVERHEAD = 4
DEFAULT_MIN_SPARSITY = 0.5
KERNEL_ATTR = "graphopt.kernel"


# ----------------------------------------------------------------------------------------------------------------
# analysis and packing (numpy only)

def parse_block(b) -> tuple[int, int]:
    if isinstance(b, str):
        r, _, c = b.lower().partition("x")
        b = (r, c)
    r, c = (int(v) for v in b)
    if r < 1 or c < 1:
        raise ValueError(f"bad block shape {b}")
    return r, c


def block_mask(w: np.ndarray, block) -> np.ndarray:
    """[N/r, K/c] bool: which r x c blocks of w [N, K] hold a nonzero."""
    r, c = block
    n, k = w.shape
    return np.any(w.reshape(n // r, r, k // c, c) != 0, axis=(1, 3))


def block_sparsity(w: np.ndarray, block) -> float:
    m = block_mask(w, block)
    return 1.0 - float(m.sum()) / m.size


def fits(shape, block) -> bool:
    return shape[0] % block[0] == 0 and shape[1] % block[1] == 0


def choose_block(w: np.ndarray, min_sparsity: float = DEFAULT_MIN_SPARSITY, candidates=BLOCK_CANDIDATES):
    """The block shape with the least estimated work among those with at least min_sparsity zero blocks, or None.
    Work: stored blocks x (r*c + BLOCK_OVERHEAD); ties go to the larger block."""
    best = None
    for blk in candidates:
        if not fits(w.shape, blk):
            continue
        mask = block_mask(w, blk)
        nnz = int(mask.sum())
        if 1.0 - nnz / mask.size < min_sparsity:
            continue
        cost = (nnz * (blk[0] * blk[1] + BLOCK_OVERHEAD), -blk[0] * blk[1])
        if best is None or cost < best[0]:
            best = (cost, blk)
    return None if best is None else best[1]


@dataclass
class BSR:
    """w [N, K] in block-sparse rows: data [nnzb, r, c], indices [nnzb] (block column), indptr [N/r + 1]."""
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple
    block: tuple

    @property
    def nnzb(self) -> int:
        return int(self.indices.shape[0])

    def todense(self) -> np.ndarray:
        r, c = self.block
        n, k = self.shape
        out = np.zeros((n // r, k // c, r, c), self.data.dtype)
        rows = np.repeat(np.arange(n // r), np.diff(self.indptr))
        out[rows, self.indices] = self.data
        return out.transpose(0, 2, 1, 3).reshape(n, k)


def to_bsr(w: np.ndarray, block) -> BSR:
    r, c = block
    n, k = w.shape
    if not fits(w.shape, block):
        raise ValueError(f"block {r}x{c} does not tile a {n}x{k} weight")
    blocks = w.reshape(n // r, r, k // c, c).transpose(0, 2, 1, 3)
    nz = np.any(blocks != 0, axis=(2, 3))
    rows, cols = np.nonzero(nz)
    data = np.ascontiguousarray(blocks[rows, cols])
    if data.shape[0] == 0:     # an all-zero weight: one unused zero block keeps the buffers non-empty
        return BSR(np.zeros((1, r, c), w.dtype), np.zeros(1, np.int32), np.zeros(n // r + 1, np.int32), (n, k),
                   (r, c))
    indptr = np.concatenate([[0], np.cumsum(nz.sum(axis=1))])
    return BSR(data, cols.astype(np.int32), indptr.astype(np.int32), (n, k), (r, c))


def weight_key(w: np.ndarray) -> str:
    h = hashlib.sha1()
    h.update(str((w.shape, w.dtype.str)).encode())
    h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def _weight_oi(node: onnx.NodeProto, inits: dict) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(initializer name, the array as stored, the weight as [out, in]) for a node that could go sparse."""
    if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
        w = inits[node.input[1]]
        return (node.input[1], w, w.T) if w.ndim == 2 else None
    if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits:
        w = inits[node.input[1]]
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (node.input[1], w, w if trans_b else w.T) if w.ndim == 2 else None
    if node.op_type == "Conv" and len(node.input) >= 2 and node.input[1] in inits:
        w = inits[node.input[1]]
        if w.ndim == 4 and w.shape[2:] == (1, 1):
            return node.input[1], w, w[:, :, 0, 0]
    return None


def weight_table(model: onnx.ModelProto) -> dict[str, dict]:
    """weight_key of every Gemm / MatMul / 1x1-Conv constant weight -> {"node", "op", "block" (recorded or None)}.
    The Relax rewrite matches constants by content, since the importer keeps neither node nor tensor names."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rec = metadata.sparse_blocks(model)
    table = {}
    for node in model.graph.node:
        got = _weight_oi(node, inits)
        if got is None:
            continue
        _, stored, _ = got
        table.setdefault(weight_key(stored), {"node": node.name, "op": node.op_type, "block": rec.get(node.name)})
    return table


# ----------------------------------------------------------------------------------------------------------------
# kernels

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


# ----------------------------------------------------------------------------------------------------------------
# Relax rewrite

class _Skip(Exception):
    pass


@dataclass
class Decision:
    op: str                  # "matmul" | "conv1x1"
    node: str | None         # ONNX node name when known
    weight_shape: tuple      # [out, in]
    block: tuple | None
    block_sparsity: float
    source: str              # "recorded" | "detected"
    sparse: bool
    kernel: str | None = None
    reason: str = ""

    def as_dict(self) -> dict:
        d = {"op": self.op, "node": self.node, "weight": list(self.weight_shape),
             "block": None if self.block is None else f"{self.block[0]}x{self.block[1]}",
             "block_sparsity": round(self.block_sparsity, 4), "source": self.source, "sparse": self.sparse}
        if self.kernel:
            d["kernel"] = self.kernel
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclass
class RewriteResult:
    mod: object
    decisions: list = field(default_factory=list)

    @property
    def kernels(self) -> list[str]:
        return [d.kernel for d in self.decisions if d.sparse]

    def facts(self) -> dict:
        return {"sparse_layers": sum(d.sparse for d in self.decisions),
                "block_sparse": [d.as_dict() for d in self.decisions]}


def decide(w_oi: np.ndarray, op: str, info: dict | None, min_sparsity: float,
           candidates=BLOCK_CANDIDATES) -> Decision:
    node = info["node"] if info else None
    recorded = info.get("block") if info else None
    if recorded is not None:
        if not fits(w_oi.shape, recorded):
            return Decision(op, node, w_oi.shape, recorded, 0.0, "recorded", False,
                            reason=f"recorded block {recorded[0]}x{recorded[1]} does not tile the weight")
        sp = block_sparsity(w_oi, recorded)
        ok = sp >= min_sparsity
        return Decision(op, node, w_oi.shape, recorded, sp, "recorded", ok,
                        reason="" if ok else f"block sparsity {sp:.2f} below {min_sparsity}")
    blk = choose_block(w_oi, min_sparsity, candidates)
    if blk is None:
        return Decision(op, node, w_oi.shape, None, 0.0, "detected", False,
                        reason=f"no candidate block shape has {min_sparsity:.0%} zero blocks")
    return Decision(op, node, w_oi.shape, blk, block_sparsity(w_oi, blk), "detected", True)


def rewrite(mod, impl: str, weights: dict | None = None, min_sparsity: float = DEFAULT_MIN_SPARSITY,
            candidates=BLOCK_CANDIDATES, prefix: str = "graphopt_bsr") -> RewriteResult:
    """Replace every matmul / 1x1 conv2d with a constant block-sparse float32 weight by call_tir to a BSR kernel.
    impl: see make_kernel. weights: weight_table(model) (node names and recorded block shapes)."""
    import tvm
    from tvm import relax

    weights = weights or {}
    matmul_op = tvm.ir.Op.get("relax.matmul")
    conv_op = tvm.ir.Op.get("relax.nn.conv2d")
    permute_op = tvm.ir.Op.get("relax.permute_dims")
    Const = tvm.ir.expr.Constant

    def array(expr):
        """The tensor of a relax constant, or None."""
        if isinstance(expr, Const) and hasattr(getattr(expr, "value", None), "numpy"):
            return expr.value.numpy()
        return None
    decisions: list[Decision] = []

    def resolve(expr, lookup):
        if isinstance(expr, relax.Var):
            bound = lookup(expr)
            if bound is not None:
                return bound
        return expr

    def const_of(expr, lookup):
        """(stored array, [out, in] view) for a constant weight or permute_dims(constant, [1, 0])."""
        expr = resolve(expr, lookup)
        w = array(expr)
        if w is not None:
            return (w, w.T) if w.ndim == 2 else (None, None)
        if isinstance(expr, relax.Call) and expr.op.same_as(permute_op):
            axes = expr.attrs.axes
            w = array(resolve(expr.args[0], lookup))
            if w is not None and w.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
                return w, w
        return None, None

    def static_shape(expr):
        sinfo = getattr(expr, "ty", None)
        if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
            return None
        try:
            return tuple(int(d) for d in sinfo.shape.values)
        except (TypeError, AttributeError):
            return None

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.m = m
            self.count = 0

        def transform(self):
            for gv, func in self.m.functions.items():
                if isinstance(func, relax.Function):
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

        def visit_call_(self, call):
            call = super().visit_call_(call)
            try:
                new = None
                if call.op.same_as(matmul_op):
                    new = self._matmul(call)
                elif call.op.same_as(conv_op):
                    new = self._conv(call)
                if new is not None:
                    return new
            except _Skip:
                pass
            return call

        def _new(self, op, w_stored, w_oi):
            if w_oi.dtype != np.float32:
                raise _Skip
            info = weights.get(weight_key(w_stored))
            d = decide(w_oi, op, info, min_sparsity, candidates)
            decisions.append(d)
            if not d.sparse:
                raise _Skip
            return d

        def _emit(self, d, spec, bsr, x):
            name = f"{prefix}_{spec.kind}_{self.count}"
            self.count += 1
            func, layout = make_kernel(spec, name, impl)
            gv = self.builder_.add_func(func, name)
            d.kernel = name
            consts = [relax.const(pack_data(bsr, layout)), relax.const(bsr.indices), relax.const(bsr.indptr)]
            if layout != "t":
                return relax.call_tir(gv, [x] + consts, relax.TensorType(spec.y_shape, spec.dtype))
            xt = self.builder_.emit(relax.op.permute_dims(x, [1, 0]))
            yt = self.builder_.emit(relax.call_tir(gv, [xt] + consts, relax.TensorType(spec.y_shape[::-1], spec.dtype)))
            return relax.op.permute_dims(yt, [1, 0])

        def _matmul(self, call):
            x, w = call.args
            xs = static_shape(x)
            if xs is None or len(xs) < 2 or call.attrs.out_dtype not in (None, "", "float32") or \
                    x.ty.dtype != "float32":
                return None
            stored, w_oi = const_of(w, self.lookup_binding)
            if stored is None or w_oi.shape[1] != xs[-1]:
                return None
            d = self._new("matmul", stored, w_oi)
            bsr = to_bsr(np.ascontiguousarray(w_oi), d.block)
            m = int(np.prod(xs[:-1]))
            spec = KernelSpec("linear", m, xs[-1], w_oi.shape[0], 1, d.block, bsr.nnzb)
            x2 = x if len(xs) == 2 else self.builder_.emit(relax.op.reshape(x, (m, xs[-1])))
            y = self._emit(d, spec, bsr, x2)
            if len(xs) == 2:
                return y
            y = self.builder_.emit(y)
            return relax.op.reshape(y, (*xs[:-1], w_oi.shape[0]))

        def _conv(self, call):
            x, w = call.args
            a = call.attrs
            xs = static_shape(x)
            if xs is None or len(xs) != 4 or x.ty.dtype != "float32":
                return None
            wa = array(resolve(w, self.lookup_binding))
            if wa is None:
                return None
            if wa.ndim != 4 or wa.shape[2:] != (1, 1) or int(a.groups) != 1 or \
                    [int(v) for v in a.strides] != [1, 1] or any(int(v) for v in a.padding) or \
                    [int(v) for v in a.dilation] != [1, 1] or a.data_layout != "NCHW" or \
                    a.kernel_layout != "OIHW" or a.out_layout not in ("NCHW", "") or \
                    a.out_dtype not in (None, "", "float32"):
                return None
            w_oi = wa[:, :, 0, 0]
            d = self._new("conv1x1", wa, w_oi)
            bsr = to_bsr(np.ascontiguousarray(w_oi), d.block)
            b, k, h, wd = xs
            spec = KernelSpec("conv1x1", b, k, w_oi.shape[0], h * wd, d.block, bsr.nnzb)
            x3 = self.builder_.emit(relax.op.reshape(x, (b, k, h * wd)))
            y = self.builder_.emit(self._emit(d, spec, bsr, x3))
            return relax.op.reshape(y, (b, w_oi.shape[0], h, wd))

    new_mod = _Rewriter(mod).transform()
    new_mod = relax.transform.DeadCodeElimination()(new_mod)
    return RewriteResult(new_mod, decisions)


# ----------------------------------------------------------------------------------------------------------------
# the llvm path (the same kernels without a GPU; also the block-sparse path a CPU build can take)

def build_llvm(model: onnx.ModelProto, impl: str = "cpu", min_sparsity: float = DEFAULT_MIN_SPARSITY, target=None,
               candidates=BLOCK_CANDIDATES):
    """Import model, replace its block-sparse weights with llvm kernels (impl "cpu": hand-written TIR, "te": the
    CUDA kernels' compute and loop nest), schedule the rest with graphopt's CPU rules and build.
    Returns (executable, RewriteResult)."""
    from . import tvm_lowering
    from .cpu import CpuTarget
    from .cpu_schedules import schedule_module

    if impl not in ("cpu", "te"):
        raise ValueError(f"llvm block-sparse kernels are 'cpu' or 'te', not '{impl}'")
    tgt = target if target is not None else CpuTarget().tvm_target()
    mod = tvm_lowering.import_onnx(model)
    res = rewrite(mod, impl, weight_table(model), min_sparsity, candidates)
    return tvm_lowering.build(res.mod, tgt, schedule=schedule_module), res
