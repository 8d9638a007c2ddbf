"""What a target tells passes about its hardware: `HardwareInfo`, handed to passes as `PassContext.hw`.

Targets build it (Target.hw()); passes read it to pick their defaults: prune-channels and factorize-lowrank round
kept channels / ranks to `structure.channels`, sparsify takes `structure.blocks` (or 1x1 where `unstructured` pays).
`Structure` says which sparsity / structure pays on the target's generated code:

    channels      kept channel counts pay in steps of this many (the fp32 vector lanes on CPUs, the warp on cuda)
    blocks        a block-sparse weight shape (rows, cols) over the weight seen as [out, in] that the target's
                  kernels exploit (cuda: 32x1 BSR), or None
    nm            an N:M pattern the hardware accelerates (cuda: 2:4 sparse tensor cores on sm_80+), or None
    unstructured  unstructured sparsity pays (arm-sve: with int8 weights; its kernels are vector-length agnostic)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .metadata import block_shape


def _pair(value, what: str):
    if value is None:
        return None
    try:
        return block_shape(tuple(value) if isinstance(value, list) else value)
    except (TypeError, ValueError):
        raise ValueError(f"HardwareInfo: {what} {value!r} is not a (rows, cols) pair of positive integers") from None


@dataclass(frozen=True)
class Structure:
    channels: int = 1
    blocks: tuple[int, int] | None = None
    nm: tuple[int, int] | None = None
    unstructured: bool = False

    def __post_init__(self):
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"Structure: channels {self.channels!r} must be a whole number >= 1")
        object.__setattr__(self, "blocks", _pair(self.blocks, "structure.blocks"))
        object.__setattr__(self, "nm", _pair(self.nm, "structure.nm"))
        if self.nm is not None and self.nm[0] >= self.nm[1]:
            raise ValueError(f"Structure: nm {self.nm!r} must keep fewer (N) than it groups (M)")


@dataclass(frozen=True)
class HardwareInfo:
    """Hardware constants passes use. `vector_bits` is None where the width is scalable (SVE) or not a SIMD
    width (cuda); `sve_vector_bits` is the SVE length artifacts run with (arm-sve); `int8_dot` the integer dot
    product graphopt's int8 kernels use (vnni, avx2, usdot, dp4a) or None."""
    target: str = ""
    fp32_lanes: int = 16
    vector_bits: int | None = None
    int8_dot: str | None = None
    warp_size: int | None = None
    sve_vector_bits: int | None = None
    structure: Structure = field(default_factory=Structure)

    def __post_init__(self):
        if isinstance(self.fp32_lanes, bool) or not isinstance(self.fp32_lanes, int) or self.fp32_lanes < 1:
            raise ValueError(f"HardwareInfo: fp32_lanes {self.fp32_lanes!r} must be a whole number >= 1")
        if not isinstance(self.structure, Structure):
            raise ValueError(f"HardwareInfo: structure must be a Structure, not {type(self.structure).__name__}")

    @property
    def sparse_block(self) -> tuple[int, int] | None:
        """The block-sparse weight shape (rows, cols) the target's kernels use (graphopt.metadata's form)."""
        return self.structure.blocks

    def describe(self) -> dict:
        """The manifest's view: the fields that are set (JSON-ready: tuples become lists), without the target."""
        out = {}
        for k, v in asdict(self).items():
            if k == "target" or v is None:
                continue
            if k == "structure":
                v = {sk: list(sv) if isinstance(sv, tuple) else sv for sk, sv in v.items() if sv is not None}
            out[k] = list(v) if isinstance(v, tuple) else v
        if self.sparse_block:
            out["sparse_block"] = list(self.sparse_block)
        return out

    def summary(self) -> str:
        """One line: what pays on this target."""
        s = self.structure
        parts = [f"{self.vector_bits}-bit vectors"] if self.vector_bits else []
        if self.sve_vector_bits:
            parts.append(f"scalable vectors (SVE, run at {self.sve_vector_bits} bits)")
        parts.append(f"channels in steps of {s.channels}")
        if s.blocks:
            parts.append(f"{s.blocks[0]}x{s.blocks[1]} sparse blocks")
        if s.nm:
            parts.append(f"{s.nm[0]}:{s.nm[1]} sparsity")
        if s.unstructured:
            parts.append("unstructured sparsity" + (" with int8" if self.int8_dot else ""))
        if self.int8_dot:
            parts.append(f"int8 dot product {self.int8_dot}")
        return ", ".join(parts)


#: what passes assume without a target: 16 fp32 lanes (AVX-512), channels in steps of 16
GENERIC = HardwareInfo(fp32_lanes=16, structure=Structure(channels=16))
