"""Kernel scratch buffers on the stack instead of TVM's workspace pool.

TVM 0.27 lowers every buffer a kernel allocates in a scope other than "global" (our tile accumulators, staged
quads, cache_write tiles: scope "local") to a TVMBackendAllocWorkspace / TVMBackendFreeWorkspace pair, however
small, and a buffer allocated inside a parallel loop pays that pair on every iteration. MobileNetV2 int8 made
7,300 such calls per inference (4 to 1,344 bytes each; 4-5% of its perf samples in the pool's functions). Older TVM kept
constant-size CPU buffers under 1 KB on the stack; its LowerTVMBuiltin still honours the `disable_lower_builtin`
annotation on an allocation, which leaves it to LLVM's codegen as an alloca at the entry of the function that runs
it (the parallel body's closure for buffers inside a parallel loop, so one per worker thread).

`register()` adds the TIR pipeline "graphopt_cpu": TVM's default s_tir pipeline with one host pass before
LowerTVMBuiltin that annotates every constant-size allocation of at most STACK_BUFFER_BYTES bytes (larger ones,
the packing and staging buffers, stay in the pool: their allocation is small next to the work that fills them,
and worker threads' stacks are finite). Python has no TIR mutator in 0.27, so the pass rebuilds the container
statements (sequences, loops, attributes, branches) on the path to each allocation and shares everything else.
"""
from __future__ import annotations

PIPELINE = "graphopt_cpu"
#: largest buffer put on the stack (bytes); every one of a function's buffers below it may be live at once in
#: its frame, and TVM's worker threads run on the default 8 MB thread stack
STACK_BUFFER_BYTES = 16 * 1024
ANNOTATION = "disable_lower_builtin"


def _bytes(buffer) -> int | None:
    """The buffer's size in bytes, or None when its shape is not constant."""
    n = 1
    for d in buffer.shape:
        if not hasattr(d, "value"):
            return None
        n *= int(d.value)
    dt = buffer.dtype
    return n * max(int(dt.bits), 8) * int(dt.lanes) // 8


def _walk(stmt, fn):
    """`stmt` with every AllocBuffer replaced by fn(it) (None: kept); unchanged subtrees are shared."""
    from tvm.tirx import stmt as S

    if isinstance(stmt, S.AllocBuffer):
        new = fn(stmt)
        return stmt if new is None else new
    if isinstance(stmt, S.SeqStmt):
        seq = [_walk(s, fn) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else S.SeqStmt(seq, stmt.span)
    if isinstance(stmt, S.For):
        body = _walk(stmt.body, fn)
        return stmt if body.same_as(stmt.body) else S.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body,
                                                          stmt.thread_binding, stmt.annotations, stmt.step,
                                                          stmt.span)
    if isinstance(stmt, S.AttrStmt):
        body = _walk(stmt.body, fn)
        return stmt if body.same_as(stmt.body) else S.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body,
                                                               stmt.span)
    if isinstance(stmt, S.IfThenElse):
        then = _walk(stmt.then_case, fn)
        other = None if stmt.else_case is None else _walk(stmt.else_case, fn)
        if then.same_as(stmt.then_case) and (other is None or other.same_as(stmt.else_case)):
            return stmt
        return S.IfThenElse(stmt.condition, then, other, stmt.span)
    if isinstance(stmt, S.While):
        body = _walk(stmt.body, fn)
        return stmt if body.same_as(stmt.body) else S.While(stmt.condition, body, stmt.span)
    return stmt


def on_stack(alloc):
    """The AllocBuffer annotated for the stack, or None where it stays in the workspace pool."""
    import tvm
    from tvm.tirx import stmt as S

    size = _bytes(alloc.buffer)
    if size is None or size > STACK_BUFFER_BYTES or ANNOTATION in alloc.annotations:
        return None
    annotations = dict(alloc.annotations)
    annotations[ANNOTATION] = tvm.tirx.IntImm("bool", 1)
    return S.AllocBuffer(alloc.buffer, annotations=annotations)


def stack_buffers_pass():
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="graphopt.StackBuffers")
    def run(mod, _ctx):
        funcs = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc):
                body = _walk(func.body, on_stack)
                func = func if body.same_as(func.body) else func.with_body(body)
            funcs[gv] = func
        return tvm.IRModule(funcs, attrs=mod.attrs)
    return run


def register() -> str:
    """Register (once) and name the TIR pipeline that tvm.compile(..., tir_pipeline=...) takes for CPU builds."""
    import tvm
    from tvm.s_tir import pipeline as s_tir_pipeline
    from tvm.tirx import compilation_pipeline as tir_pipeline

    if PIPELINE not in tir_pipeline.PIPELINE_MAP:
        def factory():
            main, finalize_host, finalize_device = s_tir_pipeline.default_s_tir_pipeline()

            def host():
                return tvm.transform.Sequential([stack_buffers_pass(), finalize_host()])
            return main, host, finalize_device
        tir_pipeline.register_tir_pipeline(PIPELINE, factory)
    return PIPELINE
