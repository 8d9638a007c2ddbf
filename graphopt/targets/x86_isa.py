"""x86 ISA facts in one table: which SIMD features each LLVM mcpu has, and the host's features from /proc/cpuinfo.

Every x86 consumer reads this module: the cpu target's mcpu choice and hw() (targets/cpu.py), the int8 lowering's
dot product (targets/int8/) and the schedules' vector width (targets/cpu_schedules.py), so they cannot
disagree about a CPU. Features are graphopt's names for what its code generation cares about:

    sse4_2   x86-64-v2 baseline          avx2     AVX2 + FMA (256-bit)      avx512  AVX-512 F/BW/DQ/VL (512-bit)
    vnni     AVX-512 VNNI (vpdpbusd.512) vbmi     AVX-512 VBMI (vpermi2b)   vbmi2   AVX-512 VBMI2
    bf16     AVX-512 BF16                fp16     AVX-512 FP16              amx     AMX tiles (int8 and bf16)

(AVX-VNNI, the 256-bit VEX form of Alder Lake and later, is not `vnni`: graphopt's kernel is the 512-bit one.)
"""
from __future__ import annotations

#: feature -> the /proc/cpuinfo flags that must all be present
FLAGS: dict[str, frozenset[str]] = {
    "sse4_2": frozenset({"sse4_2"}),
    "avx2": frozenset({"avx2", "fma"}),
    "avx512": frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"}),
    "vnni": frozenset({"avx512_vnni"}),
    "vbmi": frozenset({"avx512vbmi"}),
    "vbmi2": frozenset({"avx512_vbmi2"}),
    "bf16": frozenset({"avx512_bf16"}),
    "fp16": frozenset({"avx512_fp16"}),
    "amx": frozenset({"amx_tile", "amx_int8", "amx_bf16"}),
}
#: LLVM target attribute (mattr "+name" / "-name") -> feature
MATTR: dict[str, str] = {"sse4.2": "sse4_2", "avx2": "avx2", "avx512f": "avx512", "avx512vnni": "vnni",
                         "avx512vbmi": "vbmi", "avx512vbmi2": "vbmi2", "avx512bf16": "bf16", "avx512fp16": "fp16",
                         "amx-tile": "amx"}

_V2 = frozenset({"sse4_2"})
_AVX2 = _V2 | {"avx2"}
_AVX512 = _AVX2 | {"avx512"}
_ICELAKE = _AVX512 | {"vnni", "vbmi", "vbmi2"}
_SPR = _ICELAKE | {"bf16", "fp16", "amx"}

#: LLVM mcpu -> features
MCPU_FEATURES: dict[str, frozenset[str]] = {
    "sapphirerapids": _SPR, "emeraldrapids": _SPR, "graniterapids": _SPR,
    "cooperlake": _AVX512 | {"vnni", "bf16"},
    "icelake-server": _ICELAKE, "icelake-client": _ICELAKE, "tigerlake": _ICELAKE,
    "cascadelake": _AVX512 | {"vnni"},
    "skylake-avx512": _AVX512, "cannonlake": _AVX512, "x86-64-v4": _AVX512,
    "znver4": _ICELAKE | {"bf16"}, "znver5": _ICELAKE | {"bf16"},
    "haswell": _AVX2, "broadwell": _AVX2, "skylake": _AVX2, "alderlake": _AVX2,
    "znver1": _AVX2, "znver2": _AVX2, "znver3": _AVX2, "x86-64-v3": _AVX2,
    "x86-64-v2": _V2,
    "x86-64": frozenset(),
}
#: what the cpu target picks for its host, newest first: the first whose features the host has. sapphirerapids
#: only with AMX and AVX512-FP16, since LLVM may use them; AMD hosts (no AMX) get cooperlake or haswell.
HOST_MCPUS = ("sapphirerapids", "cooperlake", "icelake-server", "cascadelake", "skylake-avx512", "haswell",
              "x86-64-v2", "x86-64")


def host_flags() -> set[str]:
    """The CPU flags of this machine (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: features the cpu target adds to its mcpu's (LLVM mattr) when the host has them and the mcpu picked for the host
#: lacks them (an AMD host gets cooperlake, which has no VBMI): only those graphopt's own kernels ask for
HOST_MATTR = {"vbmi": "+avx512vbmi"}


def host_mattr(mcpu: str, flags) -> list[str]:
    """LLVM mattr for features in HOST_MATTR the host has and mcpu lacks."""
    have, base = features_from_flags(flags), MCPU_FEATURES.get(mcpu, frozenset())
    return [attr for feat, attr in HOST_MATTR.items() if feat in have and feat not in base]


def features_from_flags(flags) -> set[str]:
    flags = set(flags)
    return {feat for feat, need in FLAGS.items() if need <= flags}


def pick_mcpu(flags) -> str:
    """The LLVM mcpu for a host with these /proc/cpuinfo flags."""
    have = features_from_flags(flags)
    return next(m for m in HOST_MCPUS if MCPU_FEATURES[m] <= have)


def features(mcpu: str, mattr=()) -> set[str]:
    """The features code for this LLVM mcpu (unknown: none) and mattr ("+avx512vnni", "-avx2", ...) may use."""
    out = set(MCPU_FEATURES.get(mcpu, ()))
    for a in mattr:
        a = str(a)
        feat = MATTR.get(a[1:])
        if feat and a[0] == "+":
            out.add(feat)
        elif feat and a[0] == "-":
            out.discard(feat)
    return out


def vector_bits(feats) -> int:
    return 512 if "avx512" in feats else 256 if "avx2" in feats else 128


def int8_dot(feats) -> str | None:
    """The integer dot product graphopt's int8 kernels use: 'vnni' (vpdpbusd), 'avx2' (plain int32 code), or None."""
    return "vnni" if "vnni" in feats else "avx2" if "avx2" in feats else None
