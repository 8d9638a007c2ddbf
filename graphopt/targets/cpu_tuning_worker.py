"""Runs inside MetaSchedule's builder worker processes (imported by module path, so keep it importable and
light): registers a build function that does what MetaSchedule's default build does minus the import of
tvm.s_tir.tensor_intrin, which costs 30-50 s per fresh worker (mostly CUDA intrinsics) and made half the
builds time out."""
from __future__ import annotations

BUILD_FUNC = "graphopt.cpu_tuning.build"
EXPORT_FUNC = "graphopt.cpu_tuning.export"


def _build(mod, target, _params):
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return build(mod, target=target)


def _export(rt_mod) -> str:
    import os
    import tempfile

    from tvm.support.tar import tar

    path = os.path.join(tempfile.mkdtemp(prefix="graphopt-ms-"), "tvm_tmp_mod." + tar.output_format)
    rt_mod.export_library(path, fcompile=tar)
    return path


def initialize() -> None:
    """Worker initializer: register the build/export functions under their global names."""
    import tvm_ffi

    tvm_ffi.register_global_func(BUILD_FUNC, _build, override=True)
    tvm_ffi.register_global_func(EXPORT_FUNC, _export, override=True)


def in_process_builder():
    """A MetaSchedule builder that builds in the calling process: no worker start-up per batch (seconds on a
    loaded 2-core machine), at the price of no build timeout. Used for small trial budgets."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for bi in build_inputs:
                try:
                    results.append(BuilderResult(_export(_build(bi.mod, bi.target, None)), None))
                except Exception as e:  # noqa: BLE001 - a candidate that does not build is reported, not raised
                    results.append(BuilderResult(None, f"InProcessBuilder: {type(e).__name__}: {e}"))
            return results

    return InProcessBuilder()
