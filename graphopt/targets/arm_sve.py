"""arm-sve target: aarch64 with SVE (Neoverse-V1 class), cross-compiled here, run under qemu-aarch64.

Compiling needs the aarch64 GNU toolchain (model.so is linked with aarch64-linux-gnu-g++). Running
(`graphopt run`, the compile self-check against onnxruntime) needs qemu-aarch64 plus graphopt's native runner
linked against the aarch64 TVM runtime (graphopt/targets/arm_runner); tools/setup_arm.sh installs all of it.

The code is vector-length agnostic: the schedule splits the innermost spatial loop by `4 * vscale` lanes (fp32),
so one model.so runs on every SVE vector length. The length used when running under qemu comes from the target
option `vector_bits` (default 256), overridden by the environment variable GRAPHOPT_SVE_VECTOR_BITS.

Quantized (QDQ) graphs: the legalization runs lower-int8 and lower() hands int8.int8_rewrite_pass to the build
pipeline, like the x86 target, so Conv / MatMul / Gemm chains run as graphopt's integer kernels; their 16x4 u8 x s8 -> s32 micro
kernel is NEON `usdot` (FEAT_I8MM, which Neoverse-V1 has). These kernels use fixed 128-bit NEON vectors, not
scalable ones; fp32 ops left in the graph keep the SVE rule. Graphs without QuantizeLinear are unchanged.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from graphopt.errors import BadInput, GraphoptError, reraise_if_strict
from graphopt.hardware import HardwareInfo, Structure

from . import tvm_lowering
from .arm_runner import build as runner_build
from .base import Target

log = logging.getLogger("graphopt.arm_sve")

TRIPLE = "aarch64-linux-gnu"
CXX = f"{TRIPLE}-g++"
QEMU = "qemu-aarch64"
#: where Debian's libc6-arm64-cross puts the aarch64 loader and libc (qemu's -L / QEMU_LD_PREFIX)
SYSROOT = Path(f"/usr/{TRIPLE}")
MCPU = "neoverse-v1"
MATTR = ["+v8.2a", "+sve"]
VECTOR_BITS = (128, 256, 512, 1024, 2048)
DEFAULT_VECTOR_BITS = 256
ENV_VECTOR_BITS = "GRAPHOPT_SVE_VECTOR_BITS"
#: the integer dot product of graphopt's int8 kernels on this target: NEON usdot (u8 x s8 -> s32, FEAT_I8MM);
#: what int8.int8_dot() says for tvm_target() (a constant here so hw() does not import TVM)
INT8_DOT = "usdot"
#: fp32 lanes per 128-bit vscale granule
LANES_PER_VSCALE = 4
SETUP_HINT = "run tools/setup_arm.sh"
#: PrimFunc attributes (the same keys the cpu target uses)
SCHEDULED_ATTR = "tirx.is_scheduled"
RULE_ATTR = "graphopt.schedule_rule"
#: a block runs its outer loops in parallel only when it has at least this many iterations in all
MIN_PARALLEL_WORK = 1 << 14


def _check_bits(bits, where: str) -> int:
    try:
        b = int(bits)
    except (TypeError, ValueError):
        b = None
    if b not in VECTOR_BITS:
        raise BadInput(f"{where}: SVE vector length {bits!r} is not one of {', '.join(map(str, VECTOR_BITS))} (bits)")
    return b


class ArmSveTarget(Target):
    name = "arm-sve"
    legalize = "fold-batchnorm,decompose-rnn,lower-int8,conv1d-as-2d"     # BN folded as on the cpu target

    def __init__(self, vector_bits: int | None = None, **options):
        super().__init__(**options)
        if options:
            raise BadInput(f"target arm-sve has no option '{next(iter(options))}'; its options: vector_bits")
        self.vector_bits = _check_bits(DEFAULT_VECTOR_BITS if vector_bits is None else vector_bits,
                                       "target arm-sve option vector_bits")

    # ---- what the passes and the manifest see ----
    def hw(self) -> HardwareInfo:
        """Vector-length agnostic code: channels in steps of one 128-bit granule (4 fp32 lanes per vscale);
        unstructured sparsity with int8 (usdot) weights; the SVE length artifacts run with."""
        return HardwareInfo(target=self.name, fp32_lanes=LANES_PER_VSCALE, int8_dot=INT8_DOT,
                            sve_vector_bits=self.vector_bits,
                            structure=Structure(channels=LANES_PER_VSCALE, unstructured=True))

    def describe(self) -> dict:
        return {"name": self.name, "llvm_mtriple": TRIPLE, "llvm_mcpu": MCPU, "llvm_mattr": list(MATTR),
                "vector_bits": "scalable", **self.hw().describe()}

    def tvm_target(self):
        import tvm
        return tvm.target.Target({"kind": "llvm", "mtriple": TRIPLE, "mcpu": MCPU, "mattr": list(MATTR)})

    def run_vector_bits(self) -> int:
        """The SVE vector length artifacts run with under qemu: $GRAPHOPT_SVE_VECTOR_BITS, else the option."""
        env = os.environ.get(ENV_VECTOR_BITS)
        return _check_bits(env, f"${ENV_VECTOR_BITS}") if env else self.vector_bits

    # ---- compile ----
    def check_supported(self, model: onnx.ModelProto, where: str) -> None:
        tvm_lowering.check_importable(model, where)

    def lower(self, model: onnx.ModelProto, out_dir: Path, tuning_db: str | None = None) -> dict:
        import tvm.support.cc
        if shutil.which(CXX) is None:
            raise GraphoptError(f"target arm-sve: the aarch64 cross compiler {CXX} is not installed; {SETUP_HINT}")
        from .int8 import import_qdq, int8_rewrite_pass
        t0 = time.perf_counter()
        mod = import_qdq(model)
        # build's pipeline starts with the rewrite of QDQ conv / matmul chains into graphopt's integer (usdot)
        # kernels; those are marked scheduled, so the SVE rule below leaves them alone
        int8 = int8_rewrite_pass(self.tvm_target())
        try:
            ex = tvm_lowering.build(mod, self.tvm_target(), schedule=schedule, tuning_db=tuning_db, passes=[int8])
        except Exception as e:  # noqa: BLE001 - a scheduled function did not build: check each one, drop those
            reraise_if_strict(e)
            if isinstance(e, GraphoptError):
                raise
            log.debug("arm-sve: build failed (%s); building again with every schedule verified", _last_line(e))
            ex = tvm_lowering.build(mod, self.tvm_target(), schedule=functools.partial(schedule, verify=True),
                                    tuning_db=tuning_db, passes=[int8])
        path = Path(out_dir) / self.library
        tvm_lowering.export(ex, path, cross_compiler=tvm.support.cc.cross_compiler(CXX))
        if runner_build.elf_machine(path) != runner_build.EM_AARCH64:
            raise GraphoptError(f"target arm-sve: {path} is not an aarch64 library; check {CXX}")
        return {"compile_seconds": round(time.perf_counter() - t0, 3), **int8.facts}

    def tune(self, model: onnx.ModelProto, db: str, trials: int, rpc: str | None = None, key: str | None = None,
             progress: bool = False) -> dict:
        raise BadInput("target arm-sve cannot be tuned: MetaSchedule has no SVE rules and timings under qemu are "
                       "meaningless; compile uses graphopt's scalable-vector schedule")

    # ---- run ----
    def setup_problem(self) -> str | None:
        """What is missing to run arm-sve artifacts on this machine (one line), or None."""
        missing = [tool for tool in (QEMU,) if shutil.which(tool) is None]
        if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists():
            missing.append(f"the aarch64 C library ({SYSROOT})")
        if missing:
            return f"{' and '.join(missing)} not installed"
        return runner_build.runtime_problem()

    def runs_here(self) -> bool:
        """True when qemu-aarch64 and the aarch64 runtime are installed, so the compile self-check can run."""
        return self.setup_problem() is None

    def measures_here(self) -> bool:
        """Latency under an instruction-set emulator means nothing: never measure."""
        return False

    def load(self, art_dir: Path, manifest: dict, threads: int | None = None):
        problem = self.setup_problem()
        if problem is None:
            try:
                exe = runner_build.ensure_runner()
            except runner_build.SetupError as e:
                problem = str(e)
        if problem is not None:
            raise GraphoptError(f"target arm-sve cannot run here: {problem}; {SETUP_HINT}")
        lib = Path(art_dir).absolute() / self.library
        if runner_build.elf_machine(lib) != runner_build.EM_AARCH64:
            raise GraphoptError(f"{lib}: not an aarch64 library; recompile the artifact for arm-sve")
        return QemuRunner(exe, lib, self.run_vector_bits(), threads=threads)


# --------------------------------------------------------------------------------------------------
# running under qemu
# --------------------------------------------------------------------------------------------------

def write_tensor(path: Path, a: np.ndarray) -> None:
    """The runner's tensor file: "GOT1", dtype string, ndim, int64 shape, uint64 byte count, raw data."""
    a = np.asarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    a = np.array(a, order="C", copy=not a.flags.c_contiguous)   # (ascontiguousarray makes 0-d arrays 1-d)
    dt = a.dtype.name.encode()
    with open(path, "wb") as f:
        f.write(b"GOT1" + struct.pack("<I", len(dt)) + dt + struct.pack("<I", a.ndim)
                + struct.pack(f"<{a.ndim}q", *a.shape) + struct.pack("<Q", a.nbytes))
        f.write(a.tobytes())


def read_tensor(path: Path) -> np.ndarray:
    b = Path(path).read_bytes()
    if b[:4] != b"GOT1":
        raise GraphoptError(f"{path}: not a tensor file written by the arm runner")
    o = 4
    (n,) = struct.unpack_from("<I", b, o)
    o += 4
    dtype = b[o:o + n].decode()
    o += n
    (ndim,) = struct.unpack_from("<I", b, o)
    o += 4
    shape = struct.unpack_from(f"<{ndim}q", b, o)
    o += 8 * ndim
    (nbytes,) = struct.unpack_from("<Q", b, o)
    o += 8
    return np.frombuffer(b[o:o + nbytes], dtype=np.dtype(dtype)).reshape(shape).copy()


class QemuRunner:
    """Runs model.so's `main` in the native runner under qemu-aarch64 with a fixed SVE vector length."""

    def __init__(self, runner: Path, lib: Path, vector_bits: int, threads: int | None = None,
                 timeout_s: float = 1800):
        self.runner, self.lib, self.vector_bits = Path(runner), Path(lib), int(vector_bits)
        self.threads, self.timeout_s = threads, timeout_s
        self.last_vector_bits = None

    def command(self, in_dir: Path, out_dir: Path) -> list[str]:
        libs = runner_build.lib_dir()
        # One TVM worker thread unless asked otherwise: the thread pool's spin-waiting under an emulator on a
        # busy machine made runs up to 25x slower; the parallel loops still go through the runtime's launcher.
        guest_env = [f"LD_LIBRARY_PATH={libs}", f"TVM_NUM_THREADS={int(self.threads or 1)}"]
        env_args = [a for kv in guest_env for a in ("-E", kv)]
        # sve-default-vector-length takes the length in bytes
        return [QEMU, "-cpu", f"max,sve=on,sve-default-vector-length={self.vector_bits // 8}", "-L", str(SYSROOT),
                *env_args, str(self.runner), str(self.lib), str(in_dir), str(out_dir)]

    def __call__(self, arrays):
        with tempfile.TemporaryDirectory(prefix="graphopt-arm-") as tmp:
            in_dir, out_dir = Path(tmp) / "in", Path(tmp) / "out"
            in_dir.mkdir()
            out_dir.mkdir()
            for i, a in enumerate(arrays):
                write_tensor(in_dir / f"{i}.bin", np.asarray(a))
            env = dict(os.environ, QEMU_LD_PREFIX=str(SYSROOT))
            cmd = self.command(in_dir, out_dir)
            try:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                raise GraphoptError(f"{self.lib}: the arm runner did not finish within {self.timeout_s:.0f} s "
                                    f"under {QEMU}") from None
            if r.returncode != 0 or not (out_dir / "count").is_file():
                lines = (r.stderr or r.stdout or "").strip().splitlines()
                why = lines[-1] if lines else f"exit status {r.returncode}"
                raise GraphoptError(f"{self.lib}: running under {QEMU} (SVE {self.vector_bits} bits) failed: {why}")
            vl = int((out_dir / "sve_vl_bytes").read_text().strip())
            if vl * 8 != self.vector_bits:
                raise GraphoptError(f"{self.lib}: asked {QEMU} for {self.vector_bits}-bit SVE vectors but the runner "
                                    f"ran with {vl * 8 if vl > 0 else 'no'} SVE; check the qemu version (>= 6.2)")
            self.last_vector_bits = vl * 8
            n = int((out_dir / "count").read_text().strip())
            return [read_tensor(out_dir / f"{i}.bin") for i in range(n)]


# --------------------------------------------------------------------------------------------------
# schedule: scalable vectors
# --------------------------------------------------------------------------------------------------

def schedule(mod, target, verify: bool = False):
    """Apply the SVE rule to every PrimFunc not scheduled yet (e.g. by a tuning record).

    Rule, per root-level block of a fused PrimFunc: take the innermost spatial loop; when the block writes
    it with unit stride in the last dimension and every read uses it with unit stride in the last dimension
    or not at all (elementwise ops, NCHW conv along W, dense along the output features, ...), move it inside
    the block's reduction loops, split it by `4 * vscale` (predicated tail, disable_predication=False),
    vectorize the inner part and run the outer spatial loops in parallel when the block is big enough.
    With verify, each scheduled function is built on its own first and left as it was when that fails
    (ArmSveTarget.lower builds without verify, and again with it only when the whole build fails)."""
    from tvm import tirx

    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and SCHEDULED_ATTR in func.attrs and int(func.attrs[SCHEDULED_ATTR]):
            continue
        new = schedule_func(func, target, verify=verify)
        if new is not None:
            updates[gv] = new
    for gv, f in updates.items():
        mod[gv] = f
    return mod


def schedule_func(func, target, verify: bool = True):
    """The scheduled PrimFunc, or None when the rule applies to no block (or, with verify, the result does not
    build for target)."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import Schedule

    named = func if (func.attrs is not None and "global_symbol" in func.attrs) else func.with_attr("global_symbol",
                                                                                                  "main")
    try:
        # scalable lanes must be int32 (`4 * vscale`), so are the loops they split: narrow int64 indices first
        narrowed = tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": named}))["main"]
    except Exception as e:  # noqa: BLE001 - e.g. a buffer too large for int32 indices
        log.debug("sve rule: cannot narrow indices to int32: %s", _last_line(e))
        return None
    sch = Schedule(narrowed)
    done = []
    try:
        for block in list(sch.get_child_blocks(sch.get_sblock("root"))):
            name = sch.get(block).name_hint
            try:
                if _vectorize_block(sch, block):
                    done.append(name)
            except Exception as e:  # noqa: BLE001 - a primitive refused: this block stays as it is
                log.debug("sve rule: block %s not scheduled: %s", name, str(e) if os.environ.get("GRAPHOPT_SVE_DEBUG") else _last_line(e))
    except Exception as e:  # noqa: BLE001
        log.debug("sve rule: %s", _last_line(e))
        return None
    if not done:
        return None
    out = sch.mod["main"]
    if verify and not _builds(out, target):
        log.debug("sve rule: scheduled function does not build; left as it was (blocks %s)", done)
        return None
    if func.attrs is None or "global_symbol" not in func.attrs:
        out = out.without_attr("global_symbol")
    return out.with_attr(SCHEDULED_ATTR, True).with_attr(RULE_ATTR, "sve-generic")


def _last_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def _builds(func, target) -> bool:
    import tvm
    try:
        with target:
            tvm.compile(tvm.IRModule({"main": func}), target=target)
        return True
    except Exception as e:  # noqa: BLE001
        log.debug("sve rule: build failed: %s", _last_line(e))
        return False


def _vars_of(e) -> list:
    from tvm import tirx
    return list(tirx.analysis.undefined_vars(e, []))


def _uses(e, var) -> bool:
    return any(v.same_as(var) for v in _vars_of(e))


def _walk(e, fn) -> None:
    """Call fn on every node of the TIR expression e (pre-order)."""
    from tvm.ir.expr import Expr
    fn(e)
    for attr in ("a", "b", "value", "condition", "true_value", "false_value"):
        sub = getattr(e, attr, None)
        if isinstance(sub, Expr):
            _walk(sub, fn)
    for attr in ("args", "indices"):
        subs = getattr(e, attr, None)
        if subs is not None and not isinstance(subs, (str, bytes)):
            for s in subs:
                if isinstance(s, Expr):
                    _walk(s, fn)


def _is_load(node) -> bool:
    from tvm.ir.expr import TensorLoad   # tirx.BufferLoad is a function building one in TVM 0.27
    return isinstance(node, TensorLoad)


def _unit_or_absent(index, var) -> bool:
    """index is var + something free of var (stride 1), or does not use var at all."""
    import tvm
    from tvm import tirx
    if not _uses(index, var):
        return True
    lin = tvm.sym.detect_linear_equation(index, [var])
    return len(lin) == 2 and isinstance(lin[0], tirx.IntImm) and int(lin[0].value) == 1


def _vector_access_ok(store, var) -> bool:
    """The store writes var with unit stride in its last dimension only; every load uses var (if at all) the
    same way; the value is plain arithmetic (no calls: padding's if_then_else and math functions stay scalar)."""
    from tvm import tirx
    from tvm.ir.expr import Call
    idx = list(store.indices)
    if not idx or not _uses(idx[-1], var) or not _unit_or_absent(idx[-1], var):
        return False
    if any(_uses(i, var) for i in idx[:-1]):
        return False
    ok = [True]

    def check(node):
        if _is_load(node):
            ind = list(node.indices)
            if any(_uses(i, var) for i in ind[:-1]) or (ind and not _unit_or_absent(ind[-1], var)):
                ok[0] = False
        elif isinstance(node, tirx.Select) and _uses(node.condition, var):
            ok[0] = False
        elif isinstance(node, Call):
            # TVM 0.27's LLVM codegen cannot emit math intrinsics (exp, tanh, sigmoid, floor, ...) on scalable
            # vectors ("Can't fetch the lanes of a scalable vector"); if_then_else would read out of bounds
            ok[0] = False
    _walk(store.value, check)
    return ok[0]


def _vectorize_block(sch, block) -> bool:
    from tvm import tirx
    from tvm.s_tir import SBlockRealize

    blk = sch.get(block)
    loops = sch.get_loops(block)
    if not loops or blk.alloc_buffers or blk.match_buffers:
        return False
    if not isinstance(blk.body, tirx.BufferStore):
        return False
    if blk.init is not None and not isinstance(blk.init, tirx.BufferStore):
        return False
    realize = sch.get(loops[-1]).body
    if not isinstance(realize, SBlockRealize) or not realize.block.same_as(blk):
        return False   # not a perfect loop nest
    fors = [sch.get(lp) for lp in loops]
    if any(not isinstance(f.extent, tirx.IntImm) for f in fors):
        return False
    if any(int(f.kind) != 0 for f in fors):   # already parallel / vectorized / bound
        return False
    if not (isinstance(realize.predicate, tirx.IntImm) and int(realize.predicate.value) == 1):
        return False
    kinds = []
    for f in fors:
        users = [iv for iv, val in zip(blk.iter_vars, realize.iter_values) if _uses(val, f.loop_var)]
        if any(iv.iter_type not in (tirx.IterVar.DataPar, tirx.IterVar.CommReduce) for iv in users):
            return False
        kinds.append("R" if any(iv.iter_type == tirx.IterVar.CommReduce for iv in users) else "S")
    # the innermost spatial loop with more than one iteration
    cand = [i for i, (k, f) in enumerate(zip(kinds, fors)) if k == "S" and int(f.extent.value) > 1]
    if not cand:
        return False
    v = cand[-1]
    if any(kinds[i] == "S" and int(fors[i].extent.value) > 1 for i in range(v + 1, len(fors))):
        return False
    # the vector loop must drive exactly one block iter, as itself (the form LegalizeOps / FuseTIR produce);
    # the access pattern is then checked on that iter
    bound = [iv for iv, val in zip(blk.iter_vars, realize.iter_values) if _uses(val, fors[v].loop_var)]
    if len(bound) != 1:
        return False
    val = realize.iter_values[list(blk.iter_vars).index(bound[0])]
    if not (isinstance(val, tirx.Var) and val.same_as(fors[v].loop_var)):
        return False
    if not _vector_access_ok(blk.body, bound[0].var):
        return False

    after = loops[v + 1:]
    if after:
        sch.reorder(*after, loops[v])
    _, inner = sch.split(loops[v], factors=[None, LANES_PER_VSCALE * tirx.vscale()], disable_predication=False)
    # vectorize while the block still has its init (vectorize needs a complete or reduction block), then
    # move the init out of the reduction loops
    sch.vectorize(inner)
    # parallel outer spatial loops: the leading run of spatial loops before the first reduction loop / vector loop
    total = 1
    for f in fors:
        total *= int(f.extent.value)
    lead = []
    for i, k in enumerate(kinds):
        if i == v or k != "S":
            break
        lead.append(loops[i])
    lead_ext = 1
    for i in range(len(lead)):
        lead_ext *= int(fors[i].extent.value)
    if lead and lead_ext > 1 and total >= MIN_PARALLEL_WORK:
        fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        sch.parallel(fused)
    if blk.init is not None:
        first_r = next(i for i, k in enumerate(kinds) if k == "R")
        init = sch.decompose_reduction(block, loops[first_r])
        _vectorize_init(sch, init, blk.name_hint)
    return True


def _vectorize_init(sch, init, name: str) -> None:
    """The init nest (decompose_reduction's copy of the spatial loops) stores zeros along the vector loop:
    vectorize it too unless it already is."""
    from tvm import tirx
    try:
        loops = sch.get_loops(init)
        inner = sch.get(loops[-1])
        if int(inner.kind) != 0:
            return
        ext = inner.extent
        if isinstance(ext, tirx.IntImm):
            if int(ext.value) <= 1:
                return
            _, vec = sch.split(loops[-1], factors=[None, LANES_PER_VSCALE * tirx.vscale()], disable_predication=False)
            sch.vectorize(vec)
        else:   # the copy of the vector loop itself (extent 4 * vscale)
            sch.vectorize(loops[-1])
    except Exception as e:  # noqa: BLE001 - the init stays scalar
        log.debug("sve rule: init of %s not vectorized: %s", name, _last_line(e))
