"""NVIDIA GPU target: dlight's GPU schedules for dense operators, graphopt's block-sparse kernels for Gemm / MatMul /
1x1-Conv weights with zero blocks, and device code compiled ahead of time with nvcc.

Device code. TVM's CUDA codegen hands its CUDA C++ to the runtime's CUDA module factory, which compiles it through
the `tvm_callback_cuda_compile` hook; without a CUDA driver that factory is not loaded, and TVM keeps a fallback
module that holds the *source* (compiled only when loaded, so the GPU host would need a compiler). graphopt does
not depend on either: while building it registers its own `tvm_callback_cuda_compile` (nvcc -fatbin, used when a
driver is present), and it exports through `export_library(fpack_imports=...)`, where the serialized CUDA module
is rewritten from fmt "cuda" (source) to fmt "fatbin" with SASS for each requested arch (sm_80 and sm_90 by
default) plus PTX for the newest one, so newer GPUs JIT from PTX. TVM's CUDA loader passes any of
cubin / fatbin / PTX to cuModuleLoadData, so the artifact loads on a GPU host with only the TVM runtime.

Serialized module format (TVM 0.27, `runtime.ModulePackImportsToTensor`; checked when parsing, an unexpected layout
is an error, never a silent source-only artifact):
    u64 nbytes | vec<u64> import-tree row_ptr | vec<u64> child indices | per module: str kind, bytes payload
    ("_lib", the host library itself, has no payload); cuda payload: str fmt | map fname -> FunctionInfo | bytes code
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import onnx

from graphopt.errors import BadInput, GraphoptError
from graphopt.hardware import HardwareInfo, Structure

from . import block_sparse, tvm_lowering
from .base import Target, to_numpy_list

DEFAULT_ARCHS = ("sm_80", "sm_90")
FATBIN_MAGIC = 0xBA55ED50
NEEDS_GPU = ("running a cuda artifact needs an NVIDIA GPU and its driver (libcuda), and this machine has none; "
             "copy the artifact folder to a GPU host ({archs}) and run it there")


class CudaBuildError(GraphoptError):
    """nvcc failed, or a kernel would not run on the GPU: a bug in graphopt's lowering, not in the model."""
    exit_code = 1


# ----------------------------------------------------------------------------------------------------------------
# nvcc

def parse_archs(archs) -> tuple[str, ...]:
    if archs is None:
        return DEFAULT_ARCHS
    items = archs.replace(";", ",").split(",") if isinstance(archs, str) else list(archs)
    out = []
    for a in items:
        a = str(a).strip().lower()
        if not a:
            continue
        m = re.fullmatch(r"(?:sm_?)?(\d{2,3})", a)
        if not m or int(m.group(1)) < 75:
            raise BadInput(f"target cuda: bad arch '{a}'; give SM versions like sm_80,sm_90 (sm_75 or newer)")
        out.append(f"sm_{m.group(1)}")
    if not out:
        raise BadInput("target cuda: archs is empty; give SM versions like sm_80,sm_90")
    return tuple(sorted(set(out), key=lambda s: int(s[3:])))


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


def gencode_flags(archs) -> list[str]:
    """SASS for every arch, PTX for the newest (forward compatible with later GPUs)."""
    flags = []
    for a in archs:
        v = a[3:]
        flags += ["-gencode", f"arch=compute_{v},code=sm_{v}"]
    v = archs[-1][3:]
    return flags + ["-gencode", f"arch=compute_{v},code=compute_{v}"]


def nvcc_fatbin(source: str, archs=DEFAULT_ARCHS) -> bytes:
    """Compile TVM's CUDA C++ into one fatbin (no fast-math: results must match onnxruntime)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaBuildError("target cuda: nvcc not found (looked on PATH, $CUDA_HOME, /usr/local/cuda); install the "
                             "CUDA toolkit on the compiling machine; the GPU host needs none")
    with tempfile.TemporaryDirectory(prefix="graphopt-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(source)
        cmd = [nvcc, "-fatbin", "-O3", *gencode_flags(archs), "-w", "--expt-relaxed-constexpr",
               "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
               "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit status {proc.returncode}"
            first = next((ln for ln in lines if "error" in ln.lower()), last)
            raise CudaBuildError(f"target cuda: nvcc failed on the generated kernels: {first}")
        return out.read_bytes()


@contextmanager
def nvcc_compile_hook(archs):
    """While building, TVM's CUDA module factory (present where a driver is) compiles with our nvcc fatbin."""
    import tvm
    import tvm_ffi
    previous = tvm.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def compile_cuda(code, *_):
        return bytearray(nvcc_fatbin(code, archs))

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)


# ----------------------------------------------------------------------------------------------------------------
# fatbin and packed-module inspection

def fatbin_entries(blob: bytes, offset: int = 0) -> list[dict]:
    """Entries of the fatbin at offset: [{"kind": "sass"|"ptx", "arch": 80, "offset", "size"}]."""
    magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", blob, offset)
    if magic != FATBIN_MAGIC:
        raise ValueError("not a fatbin")
    out, pos, end = [], offset + hsize, offset + hsize + fsize
    while pos + 16 <= end:
        kind, _v, ehsize, psize = struct.unpack_from("<HHIQ", blob, pos)
        arch = struct.unpack_from("<I", blob, pos + 28)[0]
        if kind not in (1, 2) or ehsize < 32:
            raise ValueError(f"unexpected fatbin entry kind {kind}")
        out.append({"kind": "ptx" if kind == 1 else "sass", "arch": int(arch), "offset": pos + ehsize,
                    "size": int(psize)})
        pos += ehsize + psize
    return out


def device_code_summary(blob: bytes) -> dict:
    """Every fatbin in blob (a file's bytes): {"sass": ["sm_80", ...], "ptx": ["compute_90"], "fatbins": n}."""
    sass, ptx, n = set(), set(), 0
    for m in re.finditer(re.escape(struct.pack("<I", FATBIN_MAGIC)), blob):
        try:
            entries = fatbin_entries(blob, m.start())
        except (ValueError, struct.error):
            continue
        n += 1
        for e in entries:
            (sass if e["kind"] == "sass" else ptx).add(f"{'sm' if e['kind'] == 'sass' else 'compute'}_{e['arch']}")
    key = lambda s: int(s.split("_")[1])  # noqa: E731
    return {"sass": sorted(sass, key=key), "ptx": sorted(ptx, key=key), "fatbins": n}


class _Reader:
    def __init__(self, buf: bytes, pos: int = 0):
        self.buf, self.pos = buf, pos

    def u64(self) -> int:
        v = struct.unpack_from("<Q", self.buf, self.pos)[0]
        self.pos += 8
        return v

    def raw(self) -> bytes:
        n = self.u64()
        if self.pos + n > len(self.buf):
            raise ValueError("length past the end")
        v = self.buf[self.pos:self.pos + n]
        self.pos += n
        return v

    def skip(self, n: int):
        self.pos += n
        if self.pos > len(self.buf):
            raise ValueError("length past the end")


def parse_packed(blob: bytes) -> tuple[bytes, list[tuple[str, bytes | None]]]:
    """TVM's packed imports -> (import tree bytes, [(kind, payload or None for _lib)])."""
    rd = _Reader(blob)
    nbytes = rd.u64()
    if nbytes != len(blob) - 8:
        raise ValueError(f"blob says {nbytes} bytes, has {len(blob) - 8}")
    for _ in range(2):                      # import tree: row_ptr, child_indices
        rd.skip(8 * rd.u64())
    tree = blob[8:rd.pos]
    mods = []
    while rd.pos < len(blob):
        kind = rd.raw().decode()
        mods.append((kind, None if kind == "_lib" else rd.raw()))
    return tree, mods


def parse_cuda_payload(payload: bytes) -> tuple[str, bytes, list[str], bytes]:
    """cuda module payload -> (fmt, fmap bytes, kernel names, code)."""
    rd = _Reader(payload)
    fmt = rd.raw().decode()
    start = rd.pos
    names = []
    for _ in range(rd.u64()):
        names.append(rd.raw().decode())     # key
        rd.raw()                            # FunctionInfo.name
        rd.skip(4 * rd.u64())               # arg types (DLDataType)
        for _ in range(rd.u64()):           # launch parameter tags
            rd.raw()
        rd.skip(4 * rd.u64())               # per-argument extra tags
    fmap = payload[start:rd.pos]
    code = rd.raw()
    if rd.pos != len(payload):
        raise ValueError("trailing bytes after the code")
    return fmt, fmap, names, code


def _str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def compile_packed(blob: bytes, archs) -> tuple[bytes, list[str]]:
    """Rewrite every CUDA module holding source into one holding an nvcc fatbin; return (blob, kernel names)."""
    tree, mods = parse_packed(blob)
    out = [tree]
    kernels = []
    for kind, payload in mods:
        out.append(_str(kind.encode()))
        if payload is None:
            continue
        if kind == "cuda":
            fmt, fmap, names, code = parse_cuda_payload(payload)
            kernels += names
            if fmt == "cuda":
                code = nvcc_fatbin(code.decode(), archs)
                fmt = "fatbin"
            missing = set(archs) - set(device_code_summary(code)["sass"])
            if missing:
                raise CudaBuildError(f"target cuda: the device code lacks {', '.join(sorted(missing))} (fmt {fmt})")
            payload = _str(fmt.encode()) + fmap + _str(code)
        out.append(_str(payload))
    body = b"".join(out)
    return struct.pack("<Q", len(body)) + body, kernels


def _c_array(blob: bytes, symbol: str = "__tvm_ffi__library_bin") -> str:
    rows = [",".join(map(str, blob[i:i + 40])) for i in range(0, len(blob), 40)]
    return ("#ifdef __cplusplus\nextern \"C\" {\n#endif\n"
            f"extern const unsigned char {symbol}[];\n"
            f"const unsigned char {symbol}[{len(blob)}] = {{\n" + ",\n".join(rows) + "\n};\n"
            "#ifdef __cplusplus\n}\n#endif\n")


def aot_pack_imports(archs, record: dict):
    """An fpack_imports for export_library: TVM's packed imports with device code compiled by nvcc."""
    def pack(mod, is_system_lib, symbol_prefix, workspace_dir):
        import tvm
        if is_system_lib or symbol_prefix:
            raise CudaBuildError("target cuda: system-lib export is not supported")
        blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())
        try:
            blob, kernels = compile_packed(blob, archs)
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            import tvm as _tvm
            raise CudaBuildError(f"target cuda: unexpected TVM module layout ({e}); graphopt's AOT device code "
                                 f"supports TVM 0.27, this is {_tvm.__version__}") from None
        record["kernels"] = kernels
        path = os.path.join(workspace_dir, "devc.c")
        Path(path).write_text(_c_array(blob))
        return path
    return pack


def packed_blob(lib_path: Path) -> bytes:
    """The packed imports inside an exported library (needs TVM's runtime loaded in this process)."""
    import ctypes

    import tvm  # noqa: F401  - makes libtvm_runtime's symbols global for dlopen
    lib = ctypes.CDLL(str(Path(lib_path).absolute()))
    addr = ctypes.addressof(ctypes.c_char.in_dll(lib, "__tvm_ffi__library_bin"))
    n = struct.unpack("<Q", ctypes.string_at(addr, 8))[0]
    return ctypes.string_at(addr, n + 8)


_HOST_FLOAT = re.compile(r"= (fadd|fsub|fmul|fdiv|frem|fneg)\b|@llvm\.(fma|fmuladd|exp|log|sqrt|pow)\."
                         r"|@(expf|tanhf|logf|powf|sqrtf)\b")


def host_float_ops(ex) -> list[str]:
    """Host functions of a built executable that do floating-point arithmetic (compute left on the CPU)."""
    host = [m for m in ex.mod.imports if m.kind == "llvm"]
    bad = []
    for m in host:
        ir = m.inspect_source("ll")
        for fn in re.finditer(r"^define [^@]*@\"?([\w.$]+)\"?\(.*?^}", ir, re.M | re.S):
            body = fn.group(0)
            if _HOST_FLOAT.search(body):
                bad.append(fn.group(1))
    return bad


# ----------------------------------------------------------------------------------------------------------------
# scheduling

_STORE = re.compile(r"^\s*[A-Za-z_][\w.]*\[[^\n]*\] = ", re.M)
_BOUND = re.compile(r"T\.thread_binding\(|T\.launch_thread\(|\"(blockIdx|threadIdx)\.[xyz]\"")


def _has_thread_binding(script: str) -> bool:
    return bool(_BOUND.search(script))


def _is_compute(script: str) -> bool:
    """Does the function store anything? (TVM's Python API has no TIR visitor; the printed script is enough)."""
    return bool(_STORE.search(script))


def unbound_functions(mod) -> list[str]:
    """PrimFuncs that compute but are bound to no GPU thread: TVM would compile them as host code."""
    from tvm import tirx
    out = []
    for gv, f in mod.functions.items():
        if isinstance(f, tirx.PrimFunc):
            text = f.script()
            if _is_compute(text) and not _has_thread_binding(text):
                out.append(gv.name_hint)
    return sorted(out)


def schedule_gpu(mod, target):
    """dlight's GPU rules for every PrimFunc not scheduled yet; then make sure every kernel is bound to threads."""
    from tvm.s_tir import dlight as dl
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                      dl.gpu.Fallback())(mod)
    unbound = unbound_functions(mod)
    if unbound:
        more = " ..." if len(unbound) > 6 else ""
        raise CudaBuildError(f"target cuda: no GPU schedule for {', '.join(unbound[:6])}{more}: it would run as host "
                             f"code; please report this model")
    return mod


# ----------------------------------------------------------------------------------------------------------------
# running

def runs_on(cc: tuple[int, int], sass, ptx) -> bool:
    """Can a GPU of compute capability cc run this device code? SASS runs on its own major version at the same or a
    higher minor; PTX is compiled by the driver for any GPU at least as new."""
    for a in sass:
        v = int(a.split("_")[1])
        if v // 10 == cc[0] and v % 10 <= cc[1]:
            return True
    return any(int(p.split("_")[1]) <= cc[0] * 10 + cc[1] for p in ptx)


def device_capability() -> tuple[int, int] | None:
    try:
        import tvm
        major, minor = str(tvm.cuda(0).compute_version).split(".")[:2]
        return int(major), int(minor)
    except Exception:  # noqa: BLE001
        return None


def gpu_available() -> bool:
    try:
        import tvm
        if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
            return False
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - no driver, no runtime: no GPU
        return False


class CudaRunner:
    """Loads model.so into a Relax VM on GPU 0 and runs `main` on numpy inputs."""

    def __init__(self, lib_path: Path, device_id: int = 0):
        import tvm
        from tvm import relax
        self._tvm = tvm
        try:
            lib = tvm.runtime.load_module(str(lib_path))
        except Exception as e:
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise GraphoptError(f"{lib_path}: cannot load the compiled library ({why})") from e
        self.dev = tvm.cuda(device_id)
        self.vm = relax.VirtualMachine(lib, self.dev)
        self.main = self.vm["main"]

    def _args(self, arrays):
        return [self._tvm.runtime.tensor(a, device=self.dev) for a in arrays]

    def __call__(self, arrays):
        return to_numpy_list(self.main(*self._args(arrays)))

    def time(self, arrays, repeat: int, warmup: int = 2) -> list[float]:
        args = self._args(arrays)
        for _ in range(warmup):
            self.main(*args)
        self.dev.sync()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self.main(*args)
            self.dev.sync()
            times.append(time.perf_counter() - t0)
        return times


# ----------------------------------------------------------------------------------------------------------------

class CudaTarget(Target):
    name = "cuda"
    legalize = "decompose-rnn"

    def __init__(self, archs=None, sparse="auto", min_sparsity=None, **options):
        super().__init__(**options)
        if options:
            raise BadInput(f"target cuda has no option '{next(iter(options))}'; its options: archs, sparse, "
                           f"min_sparsity")
        self.archs = parse_archs(archs)
        if isinstance(sparse, str):
            sparse = sparse.strip().lower()
        if sparse in (True, "auto", "on", "true", "1", 1):
            self.sparse = True
        elif sparse in (False, "off", "false", "0", 0, None):
            self.sparse = False
        else:
            raise BadInput(f"target cuda: sparse must be auto or off, not '{sparse}'")
        try:
            self.min_sparsity = float(block_sparse.DEFAULT_MIN_SPARSITY if min_sparsity is None else min_sparsity)
        except (TypeError, ValueError):
            raise BadInput(f"target cuda: min_sparsity must be a number in (0, 1), not '{min_sparsity}'") from None
        if not 0.0 < self.min_sparsity < 1.0:
            raise BadInput(f"target cuda: min_sparsity must be in (0, 1), not {self.min_sparsity}")

    def tvm_target(self):
        """Code is generated for the oldest requested arch; nvcc builds SASS for each one. 48 KiB of static shared
        memory and 1024 threads per block hold on every GPU from sm_75 on."""
        import tvm
        return tvm.target.Target({"kind": "cuda", "arch": self.archs[0], "max_shared_memory_per_block": 49152,
                                  "max_threads_per_block": 1024, "thread_warp_size": 32})

    def hw(self) -> HardwareInfo:
        """sparse_block (rows, cols) = (output features, input features): 32x1 puts one block row on one warp
        (the BSR kernels of block_sparse/ use it); 2:4 is what sm_80+ sparse tensor cores accelerate (graphopt's
        cuda lowering still compiles 2:4 weights dense)."""
        return HardwareInfo(target=self.name, fp32_lanes=32, warp_size=32, int8_dot="dp4a",
                            structure=Structure(channels=32, blocks=(32, 1), nm=(2, 4)))

    def describe(self) -> dict:
        return {"name": self.name, "codegen_arch": self.archs[0], "sass": list(self.archs),
                "ptx": f"compute_{self.archs[-1][3:]}", "block_sparse": self.sparse,
                "min_sparsity": self.min_sparsity, **self.hw().describe()}

    def check_supported(self, model: onnx.ModelProto, where: str) -> None:
        tvm_lowering.check_importable(model, where)

    def lower(self, model: onnx.ModelProto, out_dir: Path, tuning_db: str | None = None) -> dict:
        t0 = time.perf_counter()
        if find_nvcc() is None:
            raise CudaBuildError("target cuda: nvcc not found (looked on PATH, $CUDA_HOME, /usr/local/cuda); "
                                 "install the CUDA toolkit on the compiling machine; the GPU host needs none")
        mod = tvm_lowering.import_onnx(model)
        facts: dict = {}
        if self.sparse:
            res = block_sparse.rewrite(mod, "cuda", block_sparse.weight_table(model), self.min_sparsity)
            mod = res.mod
            facts.update(res.facts())
        target = self.tvm_target()
        with nvcc_compile_hook(self.archs):
            ex = tvm_lowering.build(mod, target, schedule=schedule_gpu, tuning_db=tuning_db)
        on_host = host_float_ops(ex)
        if on_host:
            raise CudaBuildError(f"target cuda: {', '.join(on_host[:6])} would compute on the host CPU; please "
                                 f"report this model")
        record: dict = {}
        lib = Path(out_dir) / self.library
        ex.mod.export_library(str(lib), fpack_imports=aot_pack_imports(self.archs, record))
        code = device_code_summary(lib.read_bytes())
        missing = set(self.archs) - set(code["sass"])
        if missing and record.get("kernels"):
            raise CudaBuildError(f"target cuda: {lib.name} lacks device code for {', '.join(sorted(missing))}")
        facts.update({"compile_seconds": round(time.perf_counter() - t0, 3),
                      "device_kernels": len(record.get("kernels", [])),
                      "device_code": {"sass": code["sass"], "ptx": code["ptx"]}})
        return facts

    def _code(self, manifest: dict | None = None) -> tuple[list, list]:
        t = (manifest or {}).get("target", {})
        return list(t.get("sass", self.archs)), [t.get("ptx", f"compute_{self.archs[-1][3:]}")]

    def load(self, art_dir: Path, manifest: dict, threads: int | None = None):
        sass, ptx = self._code(manifest)
        if not gpu_available():
            raise GraphoptError(f"{art_dir}: {NEEDS_GPU.format(archs=', '.join(sass) + ' or newer')}")
        cc = device_capability()
        if cc is not None and not runs_on(cc, sass, ptx):
            sm = f"sm_{cc[0]}{cc[1]}"
            raise GraphoptError(f"{art_dir}: built for {', '.join(sass)} (PTX {ptx[0]}), and this GPU is {sm}; "
                                f"recompile for cuda with archs including {sm}")
        return CudaRunner(Path(art_dir) / self.library)

    def runs_here(self) -> bool:
        if not gpu_available():
            return False
        cc = device_capability()
        return cc is None or runs_on(cc, *self._code())

    def tune(self, model: onnx.ModelProto, db: str, trials: int, rpc: str | None = None, key: str | None = None,
             progress: bool = False) -> dict:
        raise BadInput("target cuda: tuning is not supported yet (compile uses dlight's GPU schedules and graphopt's "
                       "block-sparse kernels); tune needs a GPU to measure on")
