"""x86 CPU target: LLVM with the host's SIMD (AVX-512 / VNNI / AVX2) picked from the CPU's feature flags."""
from __future__ import annotations

import os
import time
from pathlib import Path

import onnx

from graphopt.errors import BadInput

from . import tvm_lowering
from .base import Target

# Newest first: the first LLVM cpu whose required flags the host has.
_MCPU_BY_FLAGS = [
    ("sapphirerapids", {"amx_tile", "avx512_fp16", "avx512_bf16", "avx512_vnni"}),
    ("cooperlake", {"avx512_bf16", "avx512_vnni", "avx512bw"}),
    ("icelake-server", {"avx512_vnni", "avx512_vbmi2", "avx512bw"}),
    ("cascadelake", {"avx512_vnni", "avx512bw"}),
    ("skylake-avx512", {"avx512f", "avx512bw", "avx512dq", "avx512vl"}),
    ("haswell", {"avx2", "fma"}),
    ("x86-64-v2", {"sse4_2"}),
]
KNOWN_MCPUS = [m for m, _ in _MCPU_BY_FLAGS] + ["x86-64"]


def host_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def pick_mcpu(flags: set[str]) -> str:
    for mcpu, need in _MCPU_BY_FLAGS:
        if need <= flags:
            return mcpu
    return "x86-64"


def vector_bits(mcpu: str) -> int:
    if mcpu in ("sapphirerapids", "cooperlake", "icelake-server", "cascadelake", "skylake-avx512"):
        return 512
    if mcpu == "haswell":
        return 256
    return 128


class CpuTarget(Target):
    name = "cpu"
    legalize = "decompose-rnn,lower-int8"

    def __init__(self, mcpu: str | None = None, cores: int | None = None, **options):
        super().__init__(**options)
        if options:
            raise BadInput(f"target cpu has no option '{next(iter(options))}'; its options: mcpu, cores")
        self.flags = host_cpu_flags()
        self.mcpu = mcpu or os.environ.get("GRAPHOPT_CPU_MCPU") or pick_mcpu(self.flags)
        if self.mcpu not in KNOWN_MCPUS:
            raise BadInput(f"target cpu: unknown mcpu '{self.mcpu}'; choose one of: {', '.join(KNOWN_MCPUS)}")
        self.cores = int(cores or os.cpu_count() or 1)

    def tvm_target(self):
        import tvm
        return tvm.target.Target({"kind": "llvm", "mcpu": self.mcpu, "num-cores": self.cores})

    def hw(self) -> dict:
        bits = vector_bits(self.mcpu)
        return {"vector_bits": bits, "fp32_lanes": bits // 32, "int8_dot": "vnni" if "avx512_vnni" in self.flags
                and self.mcpu in ("sapphirerapids", "cooperlake", "icelake-server", "cascadelake") else None}

    def describe(self) -> dict:
        return {"name": self.name, "llvm_mcpu": self.mcpu, "num_cores": self.cores, **self.hw()}

    def check_supported(self, model: onnx.ModelProto, where: str) -> None:
        tvm_lowering.check_importable(model, where)

    def lower(self, model: onnx.ModelProto, out_dir: Path, tuning_db: str | None = None) -> dict:
        from .cpu_int8 import import_int8
        from .cpu_schedules import schedule_module
        t0 = time.perf_counter()
        # import_int8 = import_onnx plus the rewrite of QDQ conv/matmul chains into graphopt's VNNI kernels
        mod, int8_facts = import_int8(model, self.tvm_target())
        ex = tvm_lowering.build(mod, self.tvm_target(), schedule=schedule_module, tuning_db=tuning_db)
        tvm_lowering.export(ex, Path(out_dir) / self.library)
        return {"compile_seconds": round(time.perf_counter() - t0, 3), **int8_facts}

    def load(self, art_dir: Path, manifest: dict, threads: int | None = None):
        return tvm_lowering.VMRunner(Path(art_dir) / self.library, threads=threads)

    def tune(self, model: onnx.ModelProto, db: str, trials: int, rpc: str | None = None, key: str | None = None,
             progress: bool = False) -> dict:
        from . import cpu_tuning
        return cpu_tuning.tune(model, self, db, trials, rpc=rpc, key=key,
                               progress=progress)
