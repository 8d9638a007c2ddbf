"""Reading one Relax dataflow block: bindings with use counts, constants, shapes and dtypes of expressions, and
whether an expression is computed from constants only. Shared by the int8 and bf16 rewrites."""
from __future__ import annotations

import numpy as np


def op_name(e) -> str | None:
    from tvm import relax
    if isinstance(e, relax.Call) and hasattr(e.op, "name"):
        return str(e.op.name)
    return None


def const_value(e) -> np.ndarray | None:
    import tvm
    if isinstance(e, tvm.ir.expr.Constant):
        v = e.value
        return v.numpy() if hasattr(v, "numpy") else np.asarray(v)
    return None


def shape_of(e) -> tuple | None:
    ty = getattr(e, "ty", None)
    shp = getattr(ty, "shape", None)
    if shp is None:
        return None
    try:
        return tuple(int(d) for d in shp)
    except (TypeError, ValueError):
        return None


def batch_matmul_shapes(xs, ys) -> bool:
    """Whether [*batch, M, K] x [*batch, K, N] is a batch matmul the bf16 / int8 activation kernels take: the same
    batch dims (no broadcast), at least one, and N a multiple of 16."""
    return xs is not None and ys is not None and len(xs) >= 3 and len(xs) == len(ys) \
        and tuple(xs[:-2]) == tuple(ys[:-2]) and xs[-1] == ys[-2] and ys[-1] % 16 == 0


def dtype_of(e) -> str | None:
    ty = getattr(e, "ty", None)
    dt = getattr(ty, "dtype", None)
    return str(dt) if dt is not None else None


def scalar(a: np.ndarray | None):
    if a is None or a.size != 1:
        return None
    return a.reshape(()).item()


class Block:
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
            for v in free_vars(b.value):
                self.uses.setdefault(v, []).append(i)
        self.outside = outside_uses
        self.relax = relax
        self._var2val = None

    def var2val(self):
        """The block's var -> bound value as a TVM Map, made once: a relax.dpl pattern matched with it reads a var
        operand through its binding in this block (as bound() does)."""
        if self._var2val is None:
            from tvm.runtime import convert
            self._var2val = convert(self.value)
        return self._var2val

    def bound(self, e):
        """The value bound to e when e is a var of this block, else e."""
        return self.value.get(e, e) if isinstance(e, self.relax.Var) else e

    def single_use(self, var) -> int | None:
        if var in self.outside:
            return None
        u = self.uses.get(var, [])
        return u[0] if len(u) == 1 else None


def free_vars(expr) -> list:
    from tvm import relax
    out = []

    def visit(e):
        if isinstance(e, relax.Var):
            out.append(e)
    relax.analysis.post_order_visit(expr, visit)
    return out


def is_constant(blk: Block, e, depth: int = 0) -> bool:
    """e is computed from constants only (FoldConstant would evaluate it at compile time)."""
    from tvm import relax
    if const_value(e) is not None or isinstance(e, relax.ShapeExpr) or type(e).__name__ in ("PrimValue", "StringImm"):
        return True
    if isinstance(e, relax.Tuple):
        return all(is_constant(blk, a, depth + 1) for a in e.fields)
    if depth > 16:
        return False
    v = blk.bound(e)
    if v is e:
        return False                      # a function parameter or a var from another block
    if isinstance(v, relax.Call):
        return all(is_constant(blk, a, depth + 1) for a in v.args)
    if isinstance(v, relax.Tuple):
        return all(is_constant(blk, a, depth + 1) for a in v.fields)
    return const_value(v) is not None


def act_bounds(blk: Block, v):
    """relu -> (0, None); clip/minimum/maximum with scalar constants -> bounds; else None."""
    op = op_name(v)
    if op == "relax.nn.relu":
        return (0.0, None)
    if op == "relax.clip":
        lo, hi = v.args[1], v.args[2]
        try:
            return (float(lo.value), float(hi.value))
        except AttributeError:
            return None
    return None


def fold_fp32(blk: Block, e, depth=0) -> np.ndarray | None:
    """Value of a constant fp32 expression built from constants, dequantize, reshape, and where(isnan(c), a, b)
    (how the ONNX importer writes Clip's bounds)."""
    v = blk.bound(e)
    c = const_value(v)
    if c is not None:
        return c.astype(np.float64)
    if depth > 4:
        return None
    op = op_name(v)
    if op == "relax.dequantize":
        q, s, z = const_value(v.args[0]), const_value(v.args[1]), const_value(v.args[2])
        if q is None or s is None or z is None:
            return None
        axis = int(v.attrs.axis)
        shape = [1] * q.ndim
        if s.size > 1:
            shape[axis] = -1
        return (q.astype(np.float64) - z.astype(np.float64).reshape(shape if z.size > 1 else ())) * \
            s.astype(np.float64).reshape(shape if s.size > 1 else ())
    if op == "relax.reshape":
        x = fold_fp32(blk, v.args[0], depth + 1)
        shp = shape_of(v)
        return x.reshape(shp) if x is not None and shp is not None else None
    if op == "relax.isnan":
        x = fold_fp32(blk, v.args[0], depth + 1)
        return None if x is None else np.isnan(x).astype(np.float64)
    if op == "relax.where":
        parts = [fold_fp32(blk, a, depth + 1) for a in v.args]
        return None if any(p is None for p in parts) else np.where(*parts).astype(np.float64)
    return None
