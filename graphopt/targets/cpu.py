"""x86 CPU target: LLVM with the host's SIMD (AVX-512 / VNNI / AVX2) picked from the CPU's feature flags; precision
fp32 (default) or bf16 (conv / matmul with bf16 inputs and fp32 accumulation on AVX512-BF16: targets/bf16)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import onnx

from graphopt.errors import BadInput, printable
from graphopt.hardware import HardwareInfo, Structure

from . import tvm_lowering, x86_isa
from .base import Target

KNOWN_MCPUS = list(x86_isa.MCPU_FEATURES)
#: what the target option `precision` (compile --precision, [target] precision) may be
PRECISIONS = ("fp32", "bf16")


def _check_precision(precision, mcpu: str) -> str:
    """precision, checked: one of PRECISIONS, and bf16 only where the mcpu has AVX512-BF16."""
    if precision not in PRECISIONS:
        raise BadInput(f"target cpu: precision must be one of {', '.join(PRECISIONS)}; got "
                       f"{printable(repr(precision))}")
    if precision == "bf16" and "bf16" not in x86_isa.features(mcpu):
        raise BadInput(f"target cpu: precision bf16 needs AVX512-BF16, which mcpu '{mcpu}' does not have; use "
                       f"precision fp32 (or an mcpu with it, e.g. cooperlake, sapphirerapids, znver4)")
    return precision


class CpuTarget(Target):
    name = "cpu"
    # fold-batchnorm first, as onnxruntime's and OpenVINO's graph optimizers do: an unfolded BatchNormalization
    # became a subtract / divide / multiply / add epilogue in every conv kernel (ResNet-50, 1 thread, graphopt bench:
    # 67.8 ms against 61.5 folded)
    legalize = "fold-batchnorm,decompose-rnn,lower-int8,conv1d-as-2d"

    def __init__(self, mcpu: str | None = None, cores: int | None = None, precision: str | None = None,
                 layout: str | None = None, winograd: str | None = None, **options):
        super().__init__(**options)
        if options:
            raise BadInput(f"target cpu has no option '{next(iter(options))}'; its options: mcpu, cores, precision, "
                           f"layout, winograd")
        if layout not in (None, "nhwc", "nchw"):
            raise BadInput(f"target cpu: layout is nhwc (convolutions channels-last) or nchw (the default); got "
                           f"{printable(repr(layout))}")
        # nhwc by default: 1.1-1.5x faster on CNNs; every model of the suite (zoo and 30 third-party ones) builds
        # and passes its check channels-last (silero-vad's bad_alloc and the stack/squeeze layout rules fixed in
        # cpu_layout, the pruned PP-OCRv4 recognizer's check judged in logit space: api.logit_space)
        self.layout = layout or "nhwc"
        if winograd not in (None, "auto", "off"):
            raise BadInput(f"target cpu: winograd is auto (the default: Winograd F(2x2,3x3) for the channels-last "
                           f"3x3 stride-1 convs where it is faster, fp32 and bf16) or off; got "
                           f"{printable(repr(winograd))}")
        self.winograd = winograd or "auto"
        picked = mcpu or os.environ.get("GRAPHOPT_CPU_MCPU")
        self.mcpu = picked or x86_isa.pick_mcpu(x86_isa.host_flags())
        # the host's features its mcpu lacks that graphopt's kernels use (VBMI on an AMD host): only when the mcpu
        # was picked for this host, never added to one the user named
        self.mattr = [] if picked else x86_isa.host_mattr(self.mcpu, x86_isa.host_flags())
        if self.mcpu not in KNOWN_MCPUS:
            raise BadInput(f"target cpu: unknown mcpu '{self.mcpu}'; choose one of: {', '.join(KNOWN_MCPUS)}")
        if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int) or cores < 1):
            raise BadInput(f"target cpu: cores must be a whole number of cores, at least 1; got {printable(repr(cores))}")
        self.cores = cores or os.cpu_count() or 1
        self.precision = _check_precision(precision or "fp32", self.mcpu)

    def tvm_target(self):
        import tvm
        spec = {"kind": "llvm", "mcpu": self.mcpu, "num-cores": self.cores}
        if self.mattr:
            spec["mattr"] = list(self.mattr)
        return tvm.target.Target(spec)

    def hw(self) -> HardwareInfo:
        """Channel counts pay in fp32 vector-width steps; int8 dot products where the ISA has them."""
        feats = x86_isa.features(self.mcpu, self.mattr)
        bits = x86_isa.vector_bits(feats)
        return HardwareInfo(target=self.name, vector_bits=bits, fp32_lanes=bits // 32,
                            int8_dot=x86_isa.int8_dot(feats), structure=Structure(channels=bits // 32))

    def describe(self) -> dict:
        return {"name": self.name, "llvm_mcpu": self.mcpu, **({"llvm_mattr": self.mattr} if self.mattr else {}),
                "num_cores": self.cores, "precision": self.precision, "layout": self.layout,
                "winograd": self.winograd,
                **self.hw().describe()}

    def check_supported(self, model: onnx.ModelProto, where: str) -> None:
        tvm_lowering.check_importable(model, where)

    def numeric_hint(self):
        """Channels-last convolutions sum in another order than NCHW ones: a model that amplifies float32 rounding
        may land on the other side of the check in one layout (a pruned PP-OCRv4 recognizer's 6625-way softmax
        output did, at 2.8x onnxruntime's float64 error against NCHW's 1.4x, before the check read it in logit
        space). Rebuilding in the same process cannot help: TVM resolves the second library's kernels, which have
        the first one's names, to the first library."""
        return "the NCHW build may pass: --target-option layout=nchw" if self.layout == "nhwc" else None

    def lower(self, model: onnx.ModelProto, out_dir: Path, tuning_db: str | None = None) -> dict:
        from .int8 import import_qdq, int8_rewrite_pass
        from .cpu_layout import nhwc_pass
        from .cpu_pad_channels import pad_channels_pass
        from .cpu_schedules import schedule_module
        t0 = time.perf_counter()
        mod = import_qdq(model)
        # build's pipeline starts with the Relax rewrites: QDQ conv / matmul chains -> graphopt's VNNI kernels; fp32
        # convs with output channel counts the register tiles fit badly are padded (cpu_pad_channels; not for bf16,
        # whose kernels pad channels to 16 themselves), then the fp32 conv chains go channels-last (cpu_layout);
        # with precision bf16 the fp32 conv / matmul chains then become bf16 kernels (vdpbf16ps) in the layout
        # they are in, so that the ops between them (SiLU, SE blocks, pooling, resize, concat) stay channels-last too
        passes = [int8_rewrite_pass(self.tvm_target())]
        if self.precision == "fp32":
            passes.append(pad_channels_pass(self.tvm_target(), nhwc=self.layout == "nhwc"))
        if self.layout == "nhwc":
            passes.append(nhwc_pass(self.tvm_target(), any_channels=self.precision == "bf16"))
        if self.layout == "nhwc" and self.precision == "fp32" and self.winograd == "auto":
            from .cpu_winograd import winograd_pass
            passes.append(winograd_pass(self.tvm_target()))    # 3x3 stride-1 NHWC convs, where measured faster
        if self.precision == "bf16":
            from .bf16 import bf16_rewrite_pass
            passes.append(bf16_rewrite_pass(self.tvm_target(), winograd=self.winograd == "auto"))
        if self.layout == "nhwc":
            from .cpu_pool import maxpool_pass
            passes.append(maxpool_pass(self.tvm_target()))      # the fp32 NHWC max pools left (cpu_pool)
        ex = tvm_lowering.build(mod, self.tvm_target(), schedule=schedule_module, tuning_db=tuning_db, passes=passes)
        tvm_lowering.export(ex, Path(out_dir) / self.library)
        facts = {"compile_seconds": round(time.perf_counter() - t0, 3)}
        for p in passes:
            facts.update(p.facts)
        return facts

    def load(self, art_dir: Path, manifest: dict, threads: int | None = None):
        return tvm_lowering.VMRunner(Path(art_dir) / self.library, threads=threads)

    def tune(self, model: onnx.ModelProto, db: str, trials: int, rpc: str | None = None, key: str | None = None,
             progress: bool = False) -> dict:
        from . import cpu_tuning
        return cpu_tuning.tune(model, self, db, trials, rpc=rpc, key=key,
                               progress=progress)
