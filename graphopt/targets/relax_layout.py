"""What the int8 and bf16 rewrites share: kernels added to the module as scheduled, opaque PrimFuncs, tensors kept in
a physical layout between kernels (NHWC with channels padded, or [rows, padded columns]) with logical views
(permute_dims / strided_slice / reshape) emitted for the ops that read the graph's own layout, the walk over
the dataflow blocks of `main` that rebuilds it, the call-by-call rewrite of every Relax function (rewrite_calls),
and the module pass that runs a rewrite in build's pipeline."""
from __future__ import annotations

from dataclasses import dataclass

from .relax_bindings import dtype_of, free_vars, shape_of


@dataclass
class Phys:
    """Physical (kernel-side) form of a tensor: NHWC with padded channels, or ROWS [M, padded columns]."""
    var: object
    layout: str        # NHWC | ROWS
    channels: int


class LayoutRewriter:
    """Base of a rewriter: subclasses define rewrite_block(block, outside_uses) -> (block, changed)."""

    def __init__(self, mod, prefix: str):
        from tvm import relax
        self.bb = relax.BlockBuilder(mod)
        self.prefix = prefix           # of the kernels' and the new vars' names
        self.funcs: dict = {}          # kernel key -> GlobalVar
        self.new_funcs: list = []
        self.phys: dict = {}           # logical var -> Phys
        self._n = 0

    def name(self, base):
        self._n += 1
        return f"{self.prefix}_{base}{self._n}"

    def add_kernel(self, key, make, base: str):
        """The GlobalVar of the kernel for key, made (make() -> scheduled PrimFunc) and added on first use, marked
        scheduled and opaque (op_pattern 8) so that the default schedules and FuseOps leave it alone."""
        if key in self.funcs:
            return self.funcs[key]
        name = self.name(base)
        f = make().with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True) \
            .with_attr("op_pattern", 8).with_attr("tirx.noalias", True)
        gv = self.funcs[key] = self.bb.add_func(f, name)
        self.new_funcs.append((gv, f))
        return gv

    def match_root(self, blk, i: int, op: str, claimed: set, match_conv, match_dense, log):
        """The chain rooted at binding i (a conv2d or matmul) by match_conv / match_dense, with a conv's residual
        add given up when another chain already fused it; None when nothing matches, the chain overlaps a claimed
        one, or the matcher meets an unexpected form (that op then stays on TVM's fp32 path)."""
        from graphopt.errors import reraise_if_strict
        try:
            m = match_conv(blk, i) if op == "relax.nn.conv2d" else match_dense(blk, i)
            if m is not None and m.kind == "conv" and any(j in claimed for j in m.interior + [m.root]):
                m = match_conv(blk, i, residual=False)   # the add was fused into the other branch
        except Exception as e:  # noqa: BLE001 - an unexpected form stays on the fp32 path
            reraise_if_strict(e)
            log.debug("%s match failed at %s: %s", self.prefix, blk.bindings[i].var, e)
            return None
        if m is None or any(j in claimed for j in m.interior + [m.root]):
            return None
        return m

    def dfvar(self, base, shape, dtype):
        from tvm import relax
        return relax.DataflowVar(self.name(base), relax.TensorType(list(shape), dtype))

    def bind(self, var, call):
        """VarBinding of var to the normalized call (struct info inferred and checked against var's)."""
        from tvm import relax
        return relax.VarBinding(var, self.bb.normalize(call))

    def bind_view(self, orig_var, phys: Phys, logical_shape, logical_layout: str = "NCHW"):
        """orig_var = logical (NCHW or NHWC / [M, N] / N-d rows) view of the physical tensor."""
        from tvm import relax
        bindings = []
        src = phys.var
        if phys.layout == "NHWC" and logical_layout == "NHWC":
            if phys.channels == logical_shape[3]:
                return [relax.VarBinding(orig_var, src)]
            return [self.bind(orig_var, relax.op.strided_slice(src, axes=[3], begin=[0], end=[int(logical_shape[3])]))]
        if phys.layout == "NHWC":
            n, h, w, c = shape_of(src)
            t = self.dfvar("nchw", (n, c, h, w), dtype_of(src))
            bindings.append(self.bind(t, relax.op.permute_dims(src, [0, 3, 1, 2])))
            src = t
        elif len(logical_shape) != 2:       # rows [M, Np] of an N-d matmul: slice, then the logical shape
            if phys.channels != logical_shape[-1]:
                t = self.dfvar("cols", (shape_of(src)[0], logical_shape[-1]), dtype_of(src))
                bindings.append(self.bind(t, relax.op.strided_slice(src, axes=[1], begin=[0],
                                                                    end=[int(logical_shape[-1])])))
                src = t
            bindings.append(self.bind(orig_var, relax.op.reshape(src, [int(d) for d in logical_shape])))
            return bindings
        if phys.channels != logical_shape[1]:
            sl = relax.op.strided_slice(src, axes=[1], begin=[0], end=[int(logical_shape[1])])
            bindings.append(self.bind(orig_var, sl))
        elif bindings:
            last = bindings.pop()
            bindings.append(relax.VarBinding(orig_var, last.value))
        else:
            bindings.append(relax.VarBinding(orig_var, src))
        return bindings

    def to_nhwc_padded(self, var, channels, layout: str = "NCHW"):
        """(NHWC tensor with `channels` channels, bindings) for a var in `layout` (NCHW or NHWC): its physical form
        when it has one."""
        from tvm import relax
        p = self.phys.get(var)
        if p is not None and p.layout == "NHWC" and p.channels == channels:
            return p.var, []
        dt = dtype_of(var)
        if layout == "NHWC":
            n, h, w, c = shape_of(var)
            t, bl = var, []
        else:
            n, c, h, w = shape_of(var)
            t = self.dfvar("nhwc", (n, h, w, c), dt)
            bl = [self.bind(t, relax.op.permute_dims(var, [0, 2, 3, 1]))]
        if channels != c:
            t2 = self.dfvar("nhwc_pad", (n, h, w, channels), dt)
            bl.append(self.bind(t2, relax.op.nn.pad(t, [0, 0, 0, 0, 0, 0, 0, channels - c])))
            t = t2
        return t, bl


def rewrite_main(mod, rw: LayoutRewriter):
    """Run rw.rewrite_block over the dataflow blocks of mod['main'] (each told which of its vars are used after it).
    Returns (mod, changed): when changed, the module with rw's kernels added and dead bindings removed."""
    from tvm import relax
    gv_main = mod.get_global_var("main")
    func = mod[gv_main]
    seq = func.body
    outside = set(free_vars(seq.body))
    blocks, changed = [], False
    for bi, block in enumerate(seq.blocks):
        later = set(outside)
        for other in seq.blocks[bi + 1:]:
            for b in other.bindings:
                later.update(free_vars(b.value))
        if isinstance(block, relax.DataflowBlock):
            # non-dataflow vars of the block are its outputs
            later.update(b.var for b in block.bindings if not isinstance(b.var, relax.DataflowVar))
            nb, ch = rw.rewrite_block(block, later)
            blocks.append(nb)
            changed |= ch
        else:
            blocks.append(block)
    if not changed:
        return mod, False
    new_func = relax.Function(func.params, relax.SeqExpr(blocks, seq.body), func.ret_ty, func.is_pure, func.attrs)
    mod = rw.bb.get()
    mod[gv_main] = new_func
    return relax.transform.DeadCodeElimination(["main"])(mod), True


def rewrite_calls(mod, fn):
    """mod with every Relax call of every Relax function replaced by fn(builder, call), visited post-order (fn
    returns the call itself to keep it; it may emit bindings through the block builder)."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Calls(relax.PyExprMutator):
        def visit_call_(self, op):  # noqa: N802 - TVM's visitor naming
            new = self.visit_expr_post_order(op)
            return fn(self.builder_, new) if isinstance(new, relax.Call) else new

    rw = _Calls(mod)
    for gv, f in list(mod.functions.items()):
        if isinstance(f, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(f))
    return rw.builder_.get()


def rewrite_counted(mod, rw: LayoutRewriter):
    """rewrite_main(mod, rw) where mod has a `main`; returns (mod, the rewriter's counts: its `count` dict)."""
    if "main" in [gv.name_hint for gv in mod.get_global_vars()]:
        mod, _ = rewrite_main(mod, rw)
    return mod, dict(rw.count)


def rewrite_pass(name: str, rewrite, target):
    """rewrite(mod, target) -> (mod, facts) as a TVM module pass called `name` (opt_level 0: every PassContext runs
    it), for tvm_lowering.build(passes=...). The facts of its last run are read back as the pass's `facts`."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name=name)
    class RewritePass:
        def __init__(self):
            self.facts: dict = {}

        def transform_module(self, mod, _ctx):
            mod, self.facts = rewrite(mod, target)
            return mod

    return RewritePass()
