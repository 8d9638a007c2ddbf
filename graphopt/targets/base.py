"""What every target provides."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from graphopt.hardware import HardwareInfo


class Target:
    name = ""
    #: pipeline text run before lowering to rewrite ops the target cannot import (exact passes only)
    legalize = ""
    #: file name of the compiled library inside the artifact
    library = "model.so"

    def __init__(self, **options):
        self.options = options

    def hw(self) -> HardwareInfo:
        """Hardware constants passes use (graphopt.hardware): vector width for channel rounding, sparse block
        shape, int8 dot product, and the structure that pays on this target."""
        return HardwareInfo(target=self.name)

    def describe(self) -> dict:
        """What goes into the manifest about the target (kind, cpu, features)."""
        return {"name": self.name}

    def check_supported(self, model: onnx.ModelProto, where: str) -> None:
        """Raise UnsupportedModel listing every op the target cannot compile."""

    def lower(self, model: onnx.ModelProto, out_dir: Path, tuning_db: str | None = None) -> dict:
        """Compile model into out_dir/self.library; return facts for the report (compile seconds, ...)."""
        raise NotImplementedError

    def load(self, art_dir: Path, manifest: dict, threads: int | None = None):
        """Return a callable: list of input arrays in manifest order -> list of output arrays."""
        raise NotImplementedError

    def runs_here(self) -> bool:
        return True

    def numeric_hint(self) -> str | None:
        """What to try when the library missed the numeric check against onnxruntime (one clause), or None."""
        return None

    def measures_here(self) -> bool:
        """Whether latency measured here means anything (not under an emulator)."""
        return self.runs_here()


#: TVM refuses tensors whose data is not aligned to this many bytes (kAllocAlignment)
TVM_ALIGN = 64


def _aligned(a: np.ndarray) -> np.ndarray:
    """a itself when C-contiguous and 64-byte aligned, else an aligned copy."""
    a = np.require(a, requirements="C")      # not ascontiguousarray: it turns 0-d arrays into 1-d ones
    if a.ctypes.data % TVM_ALIGN == 0:
        return a
    raw = np.empty(a.nbytes + TVM_ALIGN, np.uint8)
    off = (-raw.ctypes.data) % TVM_ALIGN
    b = raw[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    b[...] = a
    return b


def to_tvm_cpu(arrays, tvm) -> list:
    """numpy inputs as TVM CPU tensors without a copy where possible (DLPack; ~0.4 us instead of ~16 us for
    tvm.runtime.tensor's allocate-and-copy, which dominated small models' latency). The VM never writes its
    inputs; outputs are copied out (to_numpy_list), so no result aliases the caller's arrays."""
    import tvm_ffi
    out = []
    for a in arrays:
        try:
            out.append(tvm_ffi.from_dlpack(_aligned(a)))
        except Exception:  # noqa: BLE001 - a dtype DLPack cannot carry (numpy < 1.25 bool, ...), empty arrays
            out.append(tvm.runtime.tensor(a))
    return out


def to_numpy_list(out) -> list[np.ndarray]:
    """VM results as numpy arrays the caller owns (copies; DLPack for CPU tensors, .numpy() otherwise)."""
    res = []
    for o in ([out] if hasattr(out, "numpy") else list(out)):
        try:
            res.append(np.from_dlpack(o).copy())
        except Exception:  # noqa: BLE001 - device tensors (cuda), dtypes numpy's DLPack lacks
            res.append(o.numpy())
    return res
