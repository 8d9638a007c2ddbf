"""What every target provides."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx


class Target:
    name = ""
    #: pipeline text run before lowering to rewrite ops the target cannot import (exact passes only)
    legalize = ""
    #: file name of the compiled library inside the artifact
    library = "model.so"

    def __init__(self, **options):
        self.options = options

    def hw(self) -> dict:
        """Hardware constants passes should use (vector width for channel rounding, sparse block shape, ...)."""
        return {}

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

    def measures_here(self) -> bool:
        """Whether latency measured here means anything (not under an emulator)."""
        return self.runs_here()


def to_numpy_list(out) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [o.numpy() for o in out]
