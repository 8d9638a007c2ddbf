"""Shared TVM lowering: ONNX -> Relax import, fusion, schedules, build, export, load."""
from __future__ import annotations

import os
import time
from pathlib import Path

import onnx

from graphopt.errors import BadInput, GraphoptError, UnsupportedModel, reraise_if_strict
from graphopt.graph import MAX_IR_VERSION
from graphopt.targets.amx import request_amx


def supported_onnx_ops() -> set[str]:
    from tvm.relax.frontend.onnx import onnx_frontend
    return set(onnx_frontend._get_convert_map())


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _wrong_in_tvm(node: onnx.NodeProto) -> str | None:
    """Node forms TVM 0.27 imports but computes wrongly (found by tools/conformance.py): refuse, never ship them."""
    op = node.op_type
    if op == "Attention":
        return "TVM's 'Attention' converter is the com.microsoft contrib op, not ONNX's standard Attention"
    if op == "BatchNormalization" and (_attr(node, "training_mode", 0) or len(node.output) > 1):
        return "training-mode BatchNormalization"
    if op == "LayerNormalization" and len([o for o in node.output if o]) > 1:
        return "LayerNormalization's Mean/InvStdDev outputs"
    if op == "ConvTranspose" and _attr(node, "output_shape") is not None:
        return "ConvTranspose with output_shape (use pads/output_padding)"
    if op == "IsInf" and (_attr(node, "detect_positive", 1) != 1 or _attr(node, "detect_negative", 1) != 1):
        return "IsInf with detect_positive/detect_negative"
    if op == "Dropout" and len([o for o in node.output if o]) > 1:
        return "Dropout's mask output"
    return None


def check_importable(model: onnx.ModelProto, where: str, extra_ok: set[str] = frozenset()) -> None:
    from graphopt.control_flow import refuse_dynamic_control_flow
    refuse_dynamic_control_flow(model, where)       # If / Loop left after folding: one line naming the node
    ok = supported_onnx_ops() | set(extra_ok)
    wrong = [(n.name or "?", n.op_type, why) for n in model.graph.node if (why := _wrong_in_tvm(n))]
    if wrong:
        name, op, why = wrong[0]
        more = f" (and {len(wrong) - 1} more node(s))" if len(wrong) > 1 else ""
        raise UnsupportedModel(f"{where}: node '{name}' ({op}): {why} is not supported by the TVM lowering{more}; "
                               f"rewrite it before compiling")
    missing = [(n.name or "?", n.op_type) for n in model.graph.node if n.op_type not in ok]
    if missing:
        ops = sorted({op for _, op in missing})
        nodes = ", ".join(f"'{name}' ({op})" for name, op in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise UnsupportedModel(f"{where}: TVM cannot import op type(s) {', '.join(ops)}: nodes {nodes}{more}; "
                               f"rewrite them into standard ops before compiling")


def import_onnx(model: onnx.ModelProto, where: str = "model"):
    """ONNX -> Relax IRModule with weights bound as constants."""
    from tvm.relax.frontend.onnx import from_onnx

    check_importable(model, where)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)   # onnxruntime-era IR; newer onnx writes newer
    inits = {i.name for i in model.graph.initializer}
    shape_dict, dtype_dict = {}, {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
        if any(d < 0 for d in dims):
            raise BadInput(f"{where}: input '{vi.name}' is not static; bind it with --input-shape {vi.name}=...")
        shape_dict[vi.name] = dims
        dtype_dict[vi.name] = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
    try:
        return from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=False)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise UnsupportedModel(f"{where}: TVM's ONNX importer failed: {msg[-1] if msg else type(e).__name__}") from e


def build(mod, target, schedule=None, tuning_db: str | None = None, passes=()):
    """Run `passes` (module passes: the targets' Relax rewrites into graphopt's kernels, e.g.
    int8.int8_rewrite_pass), fuse, schedule (our default rules, then tuning records where they exist), and build."""
    import tvm
    from tvm import relax

    from . import stack_buffers

    # LLVM (CPU) builds keep kernels' small scratch buffers on the stack (stack_buffers.py)
    tir = stack_buffers.register() if target.kind.name == "llvm" else "default"

    def compile_(m):
        return tvm.compile(m, target=target, tir_pipeline=tir)

    with target:
        seq = [*passes, relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
               relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
               relax.transform.FuseOps(), relax.transform.FuseTIR(),
               # kernels that only reshape / squeeze become R.reshape, a view the VM makes without a copy (after
               # graphopt's schedules TVM no longer sees them as reshapes): all 16 copy kernels of the bf16 BERT-style
               # encoder go; end to end within the noise (the copies are small), but fewer calls
               relax.transform.RewriteDataflowReshape()]
        mod = tvm.transform.Sequential(seq)(mod)
        if tuning_db:
            from tvm.s_tir import meta_schedule as ms
            try:
                db = ms.database.JSONDatabase(work_dir=tuning_db, allow_missing=False)
            except Exception as e:  # noqa: BLE001 - TVM's reader raises bare errors on files it cannot parse
                msg = str(e).strip().splitlines()
                why = msg[-1] if msg else type(e).__name__
                raise BadInput(f"{tuning_db}: TVM cannot read this tuning database ({why}); tune again with "
                               f"`graphopt tune`") from None
            with db:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        if schedule is None:
            return compile_(mod)
        scheduled = schedule(mod, target)
        try:
            return compile_(scheduled)
        except Exception as e:   # a schedule rule broke the build: TVM's own lowering is slower but correct
            reraise_if_strict(e)
            import warnings
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            warnings.warn(f"graphopt: default schedules failed to build ({first[:200]}); building unscheduled")
            return compile_(mod)


#: TVM's LLVM code carries DWARF debug info, about as large as the code of an unrolled RNN (1.2 MB of a 4.7 MB
#: library for a 40-step bidirectional LSTM): the linker drops it
LINK_OPTIONS = ["-Wl,--strip-debug"]


def export(executable, path: Path, cross_compiler=None) -> None:
    if cross_compiler is None:
        executable.export_library(str(path), options=LINK_OPTIONS)
    else:
        executable.export_library(str(path), fcompile=cross_compiler, options=LINK_OPTIONS)


def _affinity():
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):        # not Linux
        return None


def _restore_affinity(cores) -> None:
    if cores is not None and _affinity() != cores:
        try:
            os.sched_setaffinity(0, cores)
        except OSError:
            pass


#: the TVM_NUM_THREADS value the last VMRunner wrote, and the last value found there that a runner did not write
#: (the user's or the CLI's --threads: what a runner without a thread count uses)
_THREADS_WE_SET = None
_USER_THREADS = None


class VMRunner:
    """Loads model.so into a Relax VM on the CPU and runs `main` on numpy inputs."""

    def __init__(self, lib_path: Path, threads: int | None = None):
        import tvm
        from tvm import relax

        global _THREADS_WE_SET, _USER_THREADS
        cfg = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
        cores = _affinity()
        env = os.environ.get("TVM_NUM_THREADS")
        if env != _THREADS_WE_SET:      # set by the user (or the CLI's --threads), not by a runner
            _USER_THREADS = int(env) if env and env.isdigit() and int(env) > 0 else None
        if threads:
            n = int(threads)
        elif _USER_THREADS:
            n = _USER_THREADS
        else:
            n = len(cores) if cores else (os.cpu_count() or 1)
        # TVM sizes its pool once, when first used, from $TVM_NUM_THREADS or else its own count of "big" cores
        # (one on a VM without cpufreq), and the pool never grows again in this process: name the count before.
        # Always this runner's count: TVM's parallel launch reads the variable on every call and runs serially
        # when it says 1, so a runner for all cores made after a 1-thread one (compile's check, then its latency
        # report) ran on 1 thread (ResNet-18's report: 21.9 ms against onnxruntime's 2-thread 12.2)
        os.environ["TVM_NUM_THREADS"] = _THREADS_WE_SET = str(n)
        if cfg is not None:
            cfg(1, n)
        # TVM's pool pins the calling thread to its first core; threads started from it later (onnxruntime's, torch's)
        # would inherit that one core: a 2-thread onnxruntime session beside graphopt would run on 1 core
        _restore_affinity(cores)
        self._tvm = tvm
        request_amx()      # the AMX kernels (targets/amx.py): Linux hands out the tile state on request only
        try:
            lib = tvm.runtime.load_module(str(lib_path))
        except Exception as e:
            raise GraphoptError(f"{lib_path}: cannot load the compiled library ({str(e).strip().splitlines()[-1]})") from e
        self.vm = relax.VirtualMachine(lib, tvm.cpu())
        self.main = self.vm["main"]

    def __call__(self, arrays):
        from .base import to_numpy_list, to_tvm_cpu
        return to_numpy_list(self.main(*to_tvm_cpu(arrays, self._tvm)))

    def time(self, arrays, repeat: int, warmup: int = 2) -> list[float]:
        args = [self._tvm.runtime.tensor(a) for a in arrays]
        for _ in range(warmup):
            self.main(*args)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self.main(*args)
            times.append(time.perf_counter() - t0)
        return times
