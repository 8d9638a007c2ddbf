"""What the int8 lowering reads from a TVM target: which integer dot product its code may use, and its cores."""
from __future__ import annotations

from .. import x86_isa
from ..target_attrs import num_cores  # noqa: F401  (re-exported: the int8 package's callers read it here)


def _is_aarch64(target) -> bool:
    mtriple = str(target.attrs.get("mtriple", ""))
    return mtriple.startswith(("aarch64", "arm64"))


def _has_i8mm(target) -> bool:
    """FEAT_I8MM (usdot): TVM derives feature.has_matmul_i8 from the LLVM cpu and mattr (neoverse-v1 has it)."""
    mattr = {str(a) for a in target.attrs.get("mattr", [])}
    if "-i8mm" in mattr:
        return False
    if "+i8mm" in mattr:
        return True
    try:
        return bool(target.attrs.get("feature.has_matmul_i8", False))
    except Exception:  # noqa: BLE001
        return False


def int8_dot(target) -> str | None:
    """Which integer dot product the target's code may use: 'vnni' (AVX-512 VNNI), 'avx2' (x86 without VNNI:
    exact int32 fallback, vectorized by LLVM), 'usdot' (aarch64 with FEAT_I8MM: NEON usdot), or None (anything
    else, aarch64 without I8MM included: leave quantized graphs on the fp32 path)."""
    if target is None or str(target.kind.name) != "llvm":
        return None
    if _is_aarch64(target):
        return "usdot" if _has_i8mm(target) else None
    feats = x86_features(target)
    return None if feats is None else x86_isa.int8_dot(feats)


def int8_amx(target) -> bool:
    """Whether the target's code may use AMX tiles for the int8 conv / dense kernels (AMX with VNNI: the kernels
    AMX does not take stay on vpdpbusd)."""
    feats = x86_features(target)
    return feats is not None and {"amx", "vnni"} <= feats


def x86_features(target) -> set[str] | None:
    """graphopt's x86 features (x86_isa) of an LLVM target's mcpu and mattr; None for a target that is not x86."""
    if target is None or str(target.kind.name) != "llvm":
        return None
    mtriple = str(target.attrs.get("mtriple", ""))
    if mtriple and not any(a in mtriple for a in ("x86_64", "i686", "amd64")):
        return None
    return x86_isa.features(str(target.attrs.get("mcpu", "")), target.attrs.get("mattr", []))


