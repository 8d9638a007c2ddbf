"""The Relax rewrite: matched quantized chains become call_tir of graphopt's integer kernels, activations kept
NHWC (channels padded to 16) between kernels, with NCHW views only where an fp32 op reads them."""
from __future__ import annotations

import logging
import numpy as np


from ..relax_bindings import Block, const_value, dtype_of, op_name, scalar, shape_of
from ..relax_layout import LayoutRewriter, Phys, rewrite_main, rewrite_pass
from . import amx_kernels, dw_quads
from .kernels import (batch_matmul_int8, conv2d_int8, conv_weight, dense_int8, dense_weight, dwconv2d_int8,
                      maxpool_int8)
from .packing import epilogue_constants, pack_dw_weight
from .relax_match import Match, match_batch_matmul, match_conv, match_dense, match_dq_act, table_source
from .specs import BatchMatmulSpec, ConvSpec, DenseSpec
from .tables import has_vbmi, table_kernel
from .target_facts import int8_amx, int8_dot, num_cores

log = logging.getLogger("graphopt.int8")


class _Rewriter(LayoutRewriter):
    def __init__(self, mod, target, dot: str):
        super().__init__(mod, "graphopt_int8")
        self.dot = dot
        self.amx = dot == "vnni" and int8_amx(target)     # conv / dense on AMX tiles where amx_kernels takes them
        self.cores = num_cores(target)
        self.vbmi = has_vbmi(target)         # lower-int8's tables: one vpermi2b kernel, else TVM's take
        self.count = {"conv2d": 0, "dwconv2d": 0, "dwconv2d_vnni": 0, "dense": 0, "batch_matmul": 0, "residual_fused": 0,
                      "maxpool_nhwc": 0, "mean_nhwc": 0,
                      "table_lookups": 0, "table_lookups_graph_layout": 0, "int8_amx": 0,
                      "fp32_convs": 0, "fp32_matmuls": 0}

    def kernel(self, kind, spec, residual=False):
        def make():
            if kind == "conv":
                return conv2d_int8(spec, self.dot, self.cores, residual=residual)
            if kind == "dwconv":
                return dwconv2d_int8(spec, self.cores)
            if kind == "dwconv_vnni":
                return dw_quads.dwconv2d_quads(spec, self.cores)
            return dense_int8(spec, self.dot, self.cores)
        return self.add_kernel((kind, repr(spec), residual, self.dot), make, kind)

    # -- the rewrite of one block -------------------------------------------------------------------------
    # Hand-written rather than dpl's rewrite_call / rewrite_bindings, which replace one match at a time: chains are
    # all matched first (a binding claimed by one chain is not matched again, a residual add another chain took is
    # given up: match_root), then emitted in binding order, each kernel reading the physical NHWC / ROWS form an
    # earlier kernel left (self.phys) and the pool, mean and table bindings after it following that form.
    def rewrite_block(self, block, outside_uses):
        from tvm import relax
        blk = Block(block, outside_uses)
        matches: dict[int, Match] = {}
        claimed: set = set()
        for i, b in enumerate(blk.bindings):
            op = op_name(b.value)
            if op not in ("relax.nn.conv2d", "relax.matmul") or i in claimed:
                continue
            m = self.match_root(blk, i, op, claimed, match_conv, match_dense, log)
            if m is None and op == "relax.matmul" and self.dot == "vnni":    # activation x activation (x86)
                m = self.match_root(blk, i, op, claimed, match_conv, match_batch_matmul, log)
            if m is None:
                if match_dq_act(blk, b.value.args[0]) is not None:
                    self.count["fp32_convs" if op == "relax.nn.conv2d" else "fp32_matmuls"] += 1
                continue
            matches[m.root] = m
            claimed.update(m.interior)
            claimed.add(m.root)
        if not matches:
            return block, False
        drop = set()
        for m in matches.values():
            drop.update(m.interior)
        self.phys: dict = {}
        out = []
        for i, b in enumerate(blk.bindings):
            if i in drop:
                continue
            if i in matches:
                out.extend(self.emit_match(matches[i]))
                continue
            op = op_name(b.value)
            new = None
            if op == "relax.nn.max_pool2d":
                new = self.maxpool(b)
            elif op == "relax.mean":
                new = self.global_mean(b, blk)
            elif op in ("relax.maximum", "relax.minimum"):
                new = self.scalar_elementwise(b)
            elif op == "relax.take":
                new = self.lookup(b, blk)
            if new is not None:
                out.extend(new)
                continue
            out.append(b)
        return relax.DataflowBlock(out), True

    def emit_match(self, m: Match):
        from tvm import relax
        if m.kind == "batch_matmul":
            spec = BatchMatmulSpec(*m.spec_args)
            gv = self.add_kernel(("batch_matmul", spec), lambda: batch_matmul_int8(spec, self.dot), "batch_matmul")
            self.count["batch_matmul"] += 1
            shape = (*spec.batch, spec.M, spec.N)
            return [self.bind(m.out_var, relax.call_tir(gv, [m.a, m.b], relax.TensorType(list(shape),
                                                                                          spec.out_dtype)))]
        bindings = []
        zx_u = m.zx + (128 if m.in_dtype == "int8" else 0)
        if m.kind == "dwconv":
            N, C, H, W = m.attrs["xshape"]
            _, _, KH, KW = m.w.shape
            p = self.phys.get(m.xq)
            nhwc = p is not None and p.layout == "NHWC"
            spec = ConvSpec(N, H, W, C, C, KH, KW, m.attrs["stride"], m.attrs["pad"], m.attrs["dilation"],
                            "NHWC" if nhwc else "NCHW", p.channels if nhwc else 0, m.in_dtype, m.zx, m.epi)
            x = p.var if nhwc else m.xq
            Bi, M, Bf = epilogue_constants(m.w, m.sx, m.sw, zx_u, m.bias_i32, m.bias_f,
                                           m.sy if m.epi.mode != "f" else None, spec.OCp)
            quads = dw_quads.fits(spec, self.dot)      # VNNI over the filter's rows, else tap by tap
            wp = dw_quads.pack_weight(m.w, spec) if quads else pack_dw_weight(m.w)
            args = [x, relax.const(wp), relax.const(Bi), relax.const(M), relax.const(Bf)]
            gv = self.kernel("dwconv_vnni" if quads else "dwconv", spec)
            odt = m.epi.out_dtype
            y = self.dfvar("dwconv", (N, spec.OH, spec.OW, spec.OCp), odt)
            bindings.append(self.bind(y, relax.call_tir(gv, args, relax.TensorType(
                [N, spec.OH, spec.OW, spec.OCp], odt))))
            phys = Phys(y, "NHWC", spec.OCp)
            self.count["dwconv2d"] += 1
            self.count["dwconv2d_vnni"] += quads
        elif m.kind == "conv":
            N, C, H, W = m.attrs["xshape"]
            OC, _, KH, KW = m.w.shape
            p = self.phys.get(m.xq)
            if p is not None and p.layout == "NHWC":
                spec = ConvSpec(N, H, W, C, OC, KH, KW, m.attrs["stride"], m.attrs["pad"], m.attrs["dilation"],
                                "NHWC", p.channels, m.in_dtype, m.zx, m.epi, self.amx)
                x = p.var
            else:
                spec = ConvSpec(N, H, W, C, OC, KH, KW, m.attrs["stride"], m.attrs["pad"], m.attrs["dilation"],
                                "NCHW", 0, m.in_dtype, m.zx, m.epi, self.amx)
                x = m.xq
            wp = conv_weight(spec, m.w, self.dot)
            self.count["int8_amx"] += amx_kernels.conv_fits(spec)
            Bi, M, Bf = epilogue_constants(m.w, m.sx, m.sw, zx_u, m.bias_i32, m.bias_f,
                                           m.sy if m.epi.mode != "f" else None, spec.OCp)
            args = [x, relax.const(wp), relax.const(Bi), relax.const(M), relax.const(Bf)]
            residual = m.epi.mode == "qadd"
            if residual:
                r, bl = self.to_nhwc_padded(m.rq, spec.OCp)
                bindings.extend(bl)
                args.append(r)
                self.count["residual_fused"] += 1
            gv = self.kernel("conv", spec, residual)
            odt = m.epi.out_dtype
            y = self.dfvar("conv", (N, spec.OH, spec.OW, spec.OCp), odt)
            bindings.append(self.bind(y, relax.call_tir(gv, args, relax.TensorType(
                [N, spec.OH, spec.OW, spec.OCp], odt))))
            phys = Phys(y, "NHWC", spec.OCp)
            self.count["conv2d"] += 1
        else:
            xshape = m.attrs["xshape"]
            K, Mrows = xshape[-1], int(np.prod(xshape[:-1]))
            Nf = m.w.shape[0]
            p = self.phys.get(m.xq)
            if p is not None and p.layout == "ROWS":
                spec = DenseSpec(Mrows, K, Nf, p.channels, m.in_dtype, m.zx, m.epi, self.amx)
                x = p.var
            else:
                spec = DenseSpec(Mrows, K, Nf, 0, m.in_dtype, m.zx, m.epi, self.amx)
                x = m.xq
                if len(xshape) != 2:                 # [..., K] -> [M, K] rows
                    x = self.dfvar("rows", (Mrows, K), m.in_dtype)
                    bindings.append(self.bind(x, relax.op.reshape(m.xq, [Mrows, K])))
            wp = dense_weight(spec, m.w, self.dot)
            self.count["int8_amx"] += amx_kernels.dense_fits(spec)
            Bi, M, Bf = epilogue_constants(m.w, m.sx, m.sw, zx_u, m.bias_i32, m.bias_f,
                                           m.sy if m.epi.mode != "f" else None, spec.Np)
            gv = self.kernel("dense", spec)
            odt = m.epi.out_dtype
            y = self.dfvar("dense", (Mrows, spec.Np), odt)
            bindings.append(self.bind(y, relax.call_tir(gv, [x, relax.const(wp), relax.const(Bi),
                                                                     relax.const(M), relax.const(Bf)],
                                                               relax.TensorType([Mrows, spec.Np], odt))))
            phys = Phys(y, "ROWS", spec.Np)
            self.count["dense"] += 1
        bindings.extend(self.bind_view(m.out_var, phys, m.out_shape))
        self.phys[m.out_var] = phys
        return bindings

    def global_mean(self, b, blk):
        """mean(dequantize(q), axis=[2, 3]) with q in NHWC: dequantize and average in NHWC (no transpose)."""
        from tvm import relax
        v = b.value
        axes = [int(a) for a in v.attrs.axis] if v.attrs.axis is not None else None
        dq = blk.bound(v.args[0])
        if axes not in ([2, 3], [-2, -1]) or op_name(dq) != "relax.dequantize":
            return None
        p = self.phys.get(dq.args[0])
        if p is None or p.layout != "NHWC" or scalar(const_value(dq.args[1])) is None:
            return None
        n, h, w, c = shape_of(p.var)
        keep = bool(v.attrs.keepdims)
        t = self.dfvar("dq", (n, h, w, c), str(dq.attrs.out_dtype))
        m = self.dfvar("mean", (n, 1, 1, c) if keep else (n, c), str(dq.attrs.out_dtype))
        bl = [self.bind(t, relax.op.dequantize(p.var, dq.args[1], dq.args[2], axis=3, out_dtype=str(dq.attrs.out_dtype))),
              self.bind(m, relax.op.mean(t, axis=[1, 2], keepdims=keep))]
        logical = shape_of(b.var)
        if keep:
            bl += self.bind_view(b.var, Phys(m, "NHWC", c), logical)
        else:
            bl += self.bind_view(b.var, Phys(m, "ROWS", c), logical)
        self.count["mean_nhwc"] += 1
        return bl

    def scalar_elementwise(self, b):
        """maximum / minimum of a physical quantized tensor and a scalar constant (integer Relu from lower-int8):
        applied in the physical layout."""
        from tvm import relax
        v = b.value
        a0, a1 = v.args
        p = self.phys.get(a0)
        other = a1
        if p is None:
            p, other = self.phys.get(a1), a0
        if p is None or scalar(const_value(other)) is None:
            return None
        fn = relax.op.maximum if op_name(v) == "relax.maximum" else relax.op.minimum
        y = self.dfvar("ew", shape_of(p.var), dtype_of(p.var))
        phys = Phys(y, p.layout, p.channels)
        self.phys[b.var] = phys
        return [self.bind(y, fn(p.var, other))] + self.bind_view(b.var, phys, shape_of(b.var))

    def lookup(self, b, blk):
        """take(table[256], index of q) from lower-int8's tables (ONNX Gather(table, Cast(q, int32)), negative
        indices wrapped by the importer), indexed by the byte of q (s8 values wrap to the table's end, as ONNX's
        negative indices do): with q physical the lookup runs in the physical layout, else on q as the graph has
        it; either way as table_kernel where the target has VBMI, else as TVM's take."""
        from tvm import relax
        v = b.value
        values = const_value(v.args[0])
        if values is None or values.shape != (256,) or str(values.dtype) not in ("uint8", "int8"):
            return None
        q = table_source(blk, v.args[1])
        if q is None:
            return None
        p = self.phys.get(q)
        if p is None:                    # q in the graph's layout (an int8 dense layer's output, viewed [1, 128, N])
            self.count["table_lookups_graph_layout"] += 1
            if self.vbmi and dtype_of(q) in ("uint8", "int8"):
                return self._vbmi_lookup(q, values, b.var)
            byte = q                     # the byte indexes directly (no int32 index, no negative-index wrap, and no
            bl = []                      # take in TVM's "fast" mode, which warns)
            if dtype_of(q) == "int8":
                byte = self.dfvar("byte", shape_of(q), "uint8")
                bl.append(self.bind(byte, relax.op.astype(q, "uint8")))
            return bl + [self.bind(b.var, relax.op.take(relax.const(values), byte, axis=0, mode="clip"))]
        if dtype_of(p.var) not in ("uint8", "int8"):
            return None
        shape, odt = shape_of(p.var), str(values.dtype)
        y = self.dfvar("table", shape, odt)
        if self.vbmi:
            return self._vbmi_lookup(p.var, values, y) + self._table_result(b, p, y)
        byte = p.var                     # u8 indices: TVM's take reads them as they are (no int32 copy)
        bl = []
        if dtype_of(byte) == "int8":
            byte = self.dfvar("byte", shape, "uint8")
            bl.append(self.bind(byte, relax.op.astype(p.var, "uint8")))
        bl.append(self.bind(y, relax.op.take(relax.const(values), byte, axis=0, mode="clip")))
        return bl + self._table_result(b, p, y)

    def _vbmi_lookup(self, x, values, y):
        """Bindings of y = values[byte of x] by table_kernel: x as one flat row (reshapes are views), 64 lookups a
        step (TVM's take on the graph-layout GELU tables of an int8 BERT-style encoder: 43 us per 128 x 1024 call)."""
        from tvm import relax
        shape, idt, odt = shape_of(x), dtype_of(x), str(values.dtype)
        total = int(np.prod(shape))
        flat = self.dfvar("flat", (total,), idt)
        gv = self.add_kernel(("table", total, idt, odt), lambda: table_kernel(total, idt, odt, self.cores), "table")
        out = self.dfvar("table_flat", (total,), odt)
        return [self.bind(flat, relax.op.reshape(x, [total])),
                self.bind(out, relax.call_tir(gv, [flat, relax.const(values)], relax.TensorType([total], odt))),
                self.bind(y, relax.op.reshape(out, list(shape)))]

    def _table_result(self, b, p, y):
        """y (a table lookup of the physical p) as the physical form of b's var, with its logical view."""
        phys = Phys(y, p.layout, p.channels)
        self.phys[b.var] = phys
        self.count["table_lookups"] += 1
        return self.bind_view(b.var, phys, shape_of(b.var))

    def maxpool(self, b):
        """max_pool2d on a quantized tensor whose physical form is NHWC: pool in NHWC."""
        from tvm import relax
        v = b.value
        p = self.phys.get(v.args[0])
        a = v.attrs
        if p is None or p.layout != "NHWC" or str(a.layout) != "NCHW" or dtype_of(v.args[0]) not in ("uint8", "int8"):
            return None
        n, h, w, c = shape_of(p.var)
        out_shape = shape_of(b.var)
        dt = dtype_of(p.var)
        key = ("pool", n, h, w, c, out_shape, tuple(int(x) for x in a.pool_size), tuple(int(x) for x in a.strides),
               tuple(int(x) for x in a.padding), tuple(int(x) for x in a.dilation), dt)
        gv = self.add_kernel(key, lambda: maxpool_int8(n, h, w, c, out_shape[2], out_shape[3], key[6], key[7], key[8],
                                                       key[9], dt, self.cores), "maxpool")
        oshape = (n, out_shape[2], out_shape[3], c)
        y = self.dfvar("pool", oshape, dt)
        call = relax.call_tir(gv, [p.var], relax.TensorType(list(oshape), dt))
        phys = Phys(y, "NHWC", c)
        self.phys[b.var] = phys
        self.count["maxpool_nhwc"] += 1
        return [self.bind(y, call)] + self.bind_view(b.var, phys, out_shape)


def rewrite_int8(mod, target):
    """Replace the quantized conv2d / matmul chains of mod['main'] with graphopt's integer kernels.
    Returns (mod, facts); facts counts what was lowered (all zeros and mod unchanged when nothing matched,
    the target has no integer dot product, or the graph has no quantize ops)."""
    from tvm import relax
    dot = int8_dot(target)
    facts = {"int8_dot": dot, "int8_kernels": 0}
    if dot is None or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, facts
    gv_main = mod.get_global_var("main")
    func = mod[gv_main]
    text_ops = set()
    relax.analysis.post_order_visit(func, lambda e: text_ops.add(op_name(e)))
    if "relax.quantize" not in text_ops:
        return mod, facts
    rw = _Rewriter(mod, target, dot)
    mod, changed = rewrite_main(mod, rw)
    facts.update(rw.count)
    if changed:
        facts["int8_kernels"] = len(rw.new_funcs)
    return mod, facts


def int8_rewrite_pass(target):
    """rewrite_int8 as the module pass `graphopt.Int8Rewrite`, which tvm_lowering.build runs first (before
    LegalizeOps); its `facts` are rewrite_int8's once it ran."""
    return rewrite_pass("graphopt.Int8Rewrite", rewrite_int8, target)
