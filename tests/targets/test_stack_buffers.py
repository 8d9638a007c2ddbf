"""targets/stack_buffers: the "graphopt_cpu" TIR pipeline keeps kernels' small constant-size scratch buffers on the
stack (no TVMBackendAllocWorkspace call left for them), leaves larger ones in TVM's workspace pool, and the
compiled kernels compute what numpy does, in parallel loops and in loops long enough that a per-iteration stack
allocation would overflow the stack."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm.script import tirx as T  # noqa: E402

from graphopt.targets import stack_buffers  # noqa: E402
from graphopt.targets.cpu import CpuTarget  # noqa: E402

ROWS = 20000


def scratch_kernel(scratch: int, parallel: bool):
    """Y[i, j] = 2 X[i, j] + 2 X[i, 15 - j], through a `scratch`-float local buffer allocated per row (its 16
    values spread over the whole buffer, which TVM would otherwise compact to the part used)."""
    loop = T.parallel if parallel else T.serial
    step = (scratch - 1) // 15

    @T.prim_func(s_tir=True)
    def main(X: T.Buffer((ROWS, 16), "float32"), Y: T.Buffer((ROWS, 16), "float32")):
        T.func_attr({"tirx.noalias": True, "global_symbol": "main"})
        with T.sblock("root"):
            for i in loop(ROWS):
                with T.sblock("row"):
                    T.reads(X[0:ROWS, 0:16])
                    T.writes(Y[0:ROWS, 0:16])
                    acc = T.alloc_buffer((scratch,), "float32", scope="local")
                    for j in range(16):
                        acc[j * step] = X[i, j] * T.float32(2.0)
                    for j in range(16):
                        Y[i, j] = acc[j * step] + acc[(15 - j) * step]
    return main


def lowered_host_text(func, pipeline: str) -> str:
    """The host module's TIR after `pipeline`'s finalization passes (where allocations become workspace calls)."""
    from tvm.tirx.build import split_host_device_mods
    from tvm.tirx.compilation_pipeline import get_tir_pipeline

    target = CpuTarget().tvm_target()
    mod = tvm.tirx.transform.BindTarget(target.with_host(target))(tvm.IRModule({"main": func}))
    main, finalize_host, _ = get_tir_pipeline(pipeline)
    host, _ = split_host_device_mods(main(mod))
    return finalize_host()(host).script()


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_small_scratch_buffers_leave_the_workspace_pool(parallel):
    name = stack_buffers.register()
    small = scratch_kernel(1024, parallel)        # 4 KB
    assert "TVMBackendAllocWorkspace" in lowered_host_text(small, "default")     # TVM 0.27's own lowering
    assert "TVMBackendAllocWorkspace" not in lowered_host_text(small, name)
    large = scratch_kernel(stack_buffers.STACK_BUFFER_BYTES // 4 + 16, parallel)
    assert "TVMBackendAllocWorkspace" in lowered_host_text(large, name)


@pytest.mark.parametrize("scratch", [16, 1024, stack_buffers.STACK_BUFFER_BYTES // 4])
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_stack_scratch_kernels_compute_what_numpy_does(scratch, parallel):
    # 20,000 rows of a 16 KB buffer: 320 MB of stack if each iteration allocated its own
    lib = tvm.compile(tvm.IRModule({"main": scratch_kernel(scratch, parallel)}), target=CpuTarget().tvm_target(),
                      tir_pipeline=stack_buffers.register())
    x = np.random.default_rng(0).standard_normal((ROWS, 16)).astype("float32")
    y = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), y)
    np.testing.assert_array_equal(y.numpy(), 2 * x + 2 * x[:, ::-1])


def test_register_is_idempotent():
    assert stack_buffers.register() == stack_buffers.register() == stack_buffers.PIPELINE
