"""The Relax rewrite: every matmul / 1x1 conv2d whose constant float32 weight is block-sparse enough becomes call_tir
to a BSR kernel; build_llvm runs it on llvm (the same kernels without a GPU)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .kernels import KernelSpec, make_kernel, pack_data
from .packing import (BLOCK_CANDIDATES, DEFAULT_MIN_SPARSITY, block_sparsity, choose_block, fits, to_bsr, weight_key,
                      weight_table)


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


def build_llvm(model: onnx.ModelProto, impl: str = "cpu", min_sparsity: float = DEFAULT_MIN_SPARSITY, target=None,
               candidates=BLOCK_CANDIDATES):
    """Import model, replace its block-sparse weights with llvm kernels (impl "cpu": hand-written TIR, "te": the
    CUDA kernels' compute and loop nest), schedule the rest with graphopt's CPU rules and build.
    Returns (executable, RewriteResult)."""
    from .. import tvm_lowering
    from ..cpu import CpuTarget
    from ..cpu_schedules import schedule_module

    if impl not in ("cpu", "te"):
        raise ValueError(f"llvm block-sparse kernels are 'cpu' or 'te', not '{impl}'")
    tgt = target if target is not None else CpuTarget().tvm_target()
    mod = tvm_lowering.import_onnx(model)
    res = rewrite(mod, impl, weight_table(model), min_sparsity, candidates)
    return tvm_lowering.build(res.mod, tgt, schedule=schedule_module), res
