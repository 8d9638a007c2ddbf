"""Matchers over one Relax dataflow block: dequantize -> conv2d / matmul -> [bias] -> [relu | clip] -> quantize
[-> residual add -> [activation] -> quantize] chains, as Match records the rewriter turns into kernel calls.

The forms are relax.dpl patterns (_patterns): a conv2d / matmul root with its dequantized activation and
dequantized int8 constant weight, the quantize of the epilogue, the int32 bias. What stays hand-written, because
dpl cannot say it:
- the epilogue is followed forward from the root through single-use vars, taking the longest prefix of
  bias -> activation -> quantize -> residual that matches (without a quantize, an fp32-output chain ending at the
  last step taken): match_expr matches a producer tree under one root and knows no use counts, and
  PatternContext.match_dfb, which has only_used_by, returns one match per block and would need one context per
  combination of optional steps;
- conditions on values: scalar scales and zero points, per-channel scales along the output axis, zero weight zero
  points, an int32 bias whose scale is sx * sw, an activation not computed from constants only (is_constant).
A MatMul of two quantized activations (attention's) is matched by hand too (match_batch_matmul: dequantize both
-> matmul -> quantize). The rewriter (rewrite.py) resolves overlapping chains and keeps the physical layout across
bindings."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from ..relax_bindings import (Block, act_bounds, batch_matmul_shapes, const_value, dtype_of, fold_fp32, is_constant,
                              op_name, scalar, shape_of)
from .specs import Epilogue


@dataclass
class Match:
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


@functools.cache
def _patterns() -> SimpleNamespace:
    """The dpl patterns of the chains' forms, made on first use (TVM is imported lazily). Each root pattern has
    sub-patterns of its own, so a match maps every one of them to the expression it matched."""
    from tvm.relax.dpl import is_const, is_op, wildcard

    def act():          # dequantize(xq u8 | s8, constant scale, constant zero point)
        return is_op("relax.dequantize")(wildcard().has_dtype("uint8") | wildcard().has_dtype("int8"),
                                         is_const(), is_const())

    def weight(dtype):  # dequantize(constant of dtype, constant scale, zero point: checked to be 0 by the caller)
        return is_op("relax.dequantize")(is_const().has_dtype(dtype), is_const(), wildcard())

    p = SimpleNamespace(act=act(), quantize=is_op("relax.quantize")(wildcard(), is_const(), is_const()),
                        bias=weight("int32"), bias_in_reshape=weight("int32"),
                        conv_act=act(), conv_w=weight("int8"), kn_act=act(), kn_w=weight("int8"),
                        nk_act=act(), nk_w=weight("int8"))
    p.bias_reshaped = is_op("relax.reshape")(p.bias_in_reshape, wildcard())
    p.conv = is_op("relax.nn.conv2d")(p.conv_act, p.conv_w).has_attr(
        {"data_layout": "NCHW", "kernel_layout": "OIHW", "out_layout": "NCHW"})
    p.dense_kn = is_op("relax.matmul")(p.kn_act, p.kn_w)                           # MatMul: W[K, N]
    p.nk_perm = is_op("relax.permute_dims")(p.nk_w)
    p.dense_nk = is_op("relax.matmul")(p.nk_act, p.nk_perm)                       # Gemm transB: W[N, K]
    return p


def _match(blk: Block, pattern, e):
    """{sub-pattern: matched expression} when pattern matches e (vars read through their bindings in blk)."""
    return pattern.extract_matched_expr(e, blk.var2val())


def _act_values(blk: Block, v):
    """(xq, sx, zx, dtype) of the activation dequantize v when its scale and zero point are scalars and xq is not
    computed from constants only (FoldConstant evaluates such chains on a generic target, no VNNI); else None."""
    xq, s, z = v.args[0], const_value(v.args[1]), const_value(v.args[2])
    if scalar(s) is None or scalar(z) is None or is_constant(blk, xq):
        return None
    return xq, float(scalar(s)), int(scalar(z)), dtype_of(xq)


def match_dq_act(blk: Block, e):
    """dequantize(xq, scalar scale, scalar zero point) with xq u8/s8 -> (xq, sx, zx, dtype) or None.
    A constant xq is left alone: FoldConstant evaluates such chains on a generic target (no VNNI)."""
    pat = _patterns()
    m = _match(blk, pat.act, e)
    return None if m is None else _act_values(blk, m[pat.act])


def _match_dq_weight(v, out_axis: int):
    """The matched weight dequantize v (int8 constant, scale, zero point) when its zero point is 0 and its scales
    are per channel along out_axis (or one scale) -> (int8 values, scales broadcast to the out channels) or None."""
    q, s, z = const_value(v.args[0]), const_value(v.args[1]), const_value(v.args[2])
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


def _bias_int(blk: Block, e):
    """(int32 values, scale) when e is [reshape of] dequantize(int32 constant, scale, 0)."""
    pat = _patterns()
    m = _match(blk, pat.bias, e)
    v = m[pat.bias] if m is not None else None
    if v is None:
        m = _match(blk, pat.bias_reshaped, e)
        v = m[pat.bias_in_reshape] if m is not None else None
    if v is None:
        return None
    q, s, z = const_value(v.args[0]), const_value(v.args[1]), const_value(v.args[2])
    if q is None or s is None or q.dtype != np.int32 or (z is not None and np.any(z != 0)):
        return None
    return q.reshape(-1), s.reshape(-1).astype(np.float64)


def _quant_params(blk: Block, v):
    """quantize(x, scalar scale, scalar zero point) -> (scale, zp, dtype) or None."""
    if not _patterns().quantize.match(v):       # v: a binding's value
        return None
    s, z = const_value(v.args[1]), const_value(v.args[2])
    if scalar(s) is None or scalar(z) is None:
        return None
    return float(scalar(s)), int(scalar(z)), str(v.attrs.out_dtype)


def _qrange(dtype: str):
    return (0.0, 255.0) if dtype == "uint8" else (-128.0, 127.0)


def _follow_epilogue(blk: Block, start_idx: int, n_out: int, channel_axis: int, sx: float, sw: np.ndarray,
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
        op = op_name(v)
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
                val = fold_fp32(blk, other)
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
        b = act_bounds(blk, v)
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


def _follow_residual(blk: Block, q_idx: int, s1: float, z1: int, dt1: str, epi1: Epilogue):
    """quantize(s1, z1) -> dequantize(s1, z1) -> add(., dequantize(rq)) -> [act] -> quantize(s2, z2)."""
    qvar = blk.bindings[q_idx].var
    d_idx = blk.single_use(qvar)
    if d_idx is None:
        return None
    m = match_dq_act(blk, blk.bindings[d_idx].var)
    if m is None or not m[0].same_as(qvar) or abs(m[1] - s1) > 1e-12 * max(1.0, s1) or m[2] != z1:
        return None
    dvar = blk.bindings[d_idx].var
    a_idx = blk.single_use(dvar)
    if a_idx is None:
        return None
    av = blk.bindings[a_idx].value
    if op_name(av) != "relax.add":
        return None
    other = av.args[1] if av.args[0].same_as(dvar) else av.args[0]
    r = match_dq_act(blk, other)
    if r is None or shape_of(r[0]) != shape_of(qvar):
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
        b = act_bounds(blk, v)
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
                       res_dtype=rdt, sr=sr, zr=zr, s2=s2,
                       act2_lo=act[0] if act else None, act2_hi=act[1] if act else None)
        return nxt, extra, rq, epi


def match_conv(blk: Block, idx: int, residual: bool = True):
    pat = _patterns()
    v = blk.bindings[idx].value
    a = v.attrs
    m = _match(blk, pat.conv, v)
    if m is None:
        return None
    act = _act_values(blk, m[pat.conv_act])
    wt = _match_dq_weight(m[pat.conv_w], 0)
    xshape = shape_of(v.args[0])
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
    return Match("dwconv" if depthwise else "conv", root, interior, xq, zx, sx, dt, w, sw, bias_i32, bias_f,
                  attrs, epi, sy, rq, out_var, shape_of(out_var))


def match_dense(blk: Block, idx: int):
    pat = _patterns()
    v = blk.bindings[idx].value
    m = _match(blk, pat.dense_nk, v)
    if m is not None:                                    # Gemm transB: permute_dims(dequantize(W[N, K]))
        act, perm, w_dq = m[pat.nk_act], m[pat.nk_perm], m[pat.nk_w]
    else:                                                # MatMul: dequantize(W[K, N]) per column
        m = _match(blk, pat.dense_kn, v)
        if m is None:
            return None
        act, perm, w_dq = m[pat.kn_act], None, m[pat.kn_w]
    act = _act_values(blk, act)
    xshape = shape_of(v.args[0])
    if act is None or xshape is None or len(xshape) < 2:
        return None
    if perm is not None:
        axes = perm.attrs.axes
        if axes is not None and [int(x) for x in axes] != [1, 0]:
            return None
        wt = _match_dq_weight(w_dq, 0)
    else:
        wt = _match_dq_weight(w_dq, 1)
        wt = None if wt is None else (np.ascontiguousarray(wt[0].T), wt[1])
    if wt is None:
        return None
    w, sw = wt
    if w.ndim != 2 or w.shape[1] != xshape[-1]:
        return None
    xq, sx, zx, dt = act
    # residual adds after a dense layer are not fused (the kernel has no residual input): the chain ends at its
    # quantize and the add runs after it (an LSTM cell's x W_ih + h W_hh: both Gemms integer, the add in fp32)
    chain = _follow_epilogue(blk, idx, w.shape[0], -1, sx, sw, residual=False)
    if chain is None:
        return None
    root, interior, bias_i32, bias_f, epi, sy, rq = chain
    out_var = blk.bindings[root].var
    return Match("dense", root, interior, xq, zx, sx, dt, w, sw, bias_i32, bias_f, {"xshape": xshape}, epi, sy,
                  None, out_var, shape_of(out_var))


def table_source(blk: Block, index):
    """q when index is the ONNX importer's form of Gather's index Cast(q, int32|int64) with negative indices
    wrapped: where(less(i, 0), add(i, extent), i) of i = astype(q) (or i itself), q u8/s8; else None."""
    e = blk.bound(index)
    if op_name(e) == "relax.where":
        cond, wrapped, i = e.args
        c, w = blk.bound(cond), blk.bound(wrapped)
        if op_name(c) != "relax.less" or not c.args[0].same_as(i) or scalar(const_value(c.args[1])) != 0 \
                or op_name(w) != "relax.add" or not w.args[0].same_as(i):
            return None
        e = blk.bound(i)
    if op_name(e) != "relax.astype" or str(e.attrs.dtype) not in ("int32", "int64"):
        return None
    q = e.args[0]
    return q if dtype_of(q) in ("uint8", "int8") else None


@dataclass
class BatchMatch:
    """quantize(matmul(dequantize(a), dequantize(b))) of two quantized activations (kernels.batch_matmul_int8)."""
    kind: str                   # batch_matmul
    root: int                   # the quantize's binding index
    interior: list              # the matmul's, and each dequantize's that only the matmul reads
    a: object
    b: object
    spec_args: tuple            # BatchMatmulSpec's fields
    out_var: object


def match_batch_matmul(blk: Block, idx: int) -> BatchMatch | None:
    """matmul(dequantize(A u8/s8), dequantize(B u8/s8)) [*batch, M, K] x [*batch, K, N] with scalar scales and zero
    points, the same batch dims, N a multiple of 16, whose only reader is a quantize to u8 / s8 (attention's QK^T
    and PV in onnxruntime's QDQ form)."""
    v = blk.bindings[idx].value
    a, b = match_dq_act(blk, v.args[0]), match_dq_act(blk, v.args[1])
    if a is None or b is None:
        return None
    (aq, sa, za, adt), (bq, sb, zb, bdt) = a, b
    xs, ys = shape_of(aq), shape_of(bq)
    if not batch_matmul_shapes(xs, ys):
        return None
    j = blk.single_use(blk.bindings[idx].var)
    qp = None if j is None else _quant_params(blk, blk.bindings[j].value)
    if qp is None or qp[2] not in ("uint8", "int8"):
        return None
    sy, zy, odt = qp
    mult = float(np.float32(np.float64(np.float32(sa) * np.float32(sb)) / sy))
    interior = [idx] + [blk.index[e] for e in (v.args[0], v.args[1])
                        if e in blk.index and blk.single_use(e) == idx]
    spec = (tuple(int(d) for d in xs[:-2]), int(xs[-2]), int(xs[-1]), int(ys[-1]), adt, za, bdt, zb, mult, zy, odt)
    return BatchMatch("batch_matmul", j, sorted(set(interior)), aq, bq, spec, blk.bindings[j].var)
