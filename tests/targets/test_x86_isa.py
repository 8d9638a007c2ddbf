"""One x86 ISA table: every consumer (cpu target hw, int8 lowering, schedules) agrees about each mcpu, and the host's
mcpu is picked sensibly from /proc/cpuinfo flags of real AMD EPYC and Intel Xeon machines."""
import pytest

from graphopt.targets import cpu_schedules, int8, x86_isa
from graphopt.targets.cpu import KNOWN_MCPUS, CpuTarget

pytestmark = pytest.mark.fast

_BASE = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
         "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl cpuid pni pclmulqdq ssse3 fma cx16 pcid sse4_1 "
         "sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm abm fsgsbase bmi1 avx2 smep bmi2 erms "
         "invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves arat umip rdpid").split()
_AVX512 = "avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512vbmi avx512_vbmi2 gfni vaes vpclmulqdq".split()
#: AMD EPYC 9004 (Zen 4): AVX-512 with VNNI and BF16, no FP16, no AMX
EPYC_GENOA = set(_BASE + _AVX512 + "avx512_bf16 avx512_vnni avx512_bitalg avx512_vpopcntdq svm sse4a clzero "
                                   "wbnoinvd".split())
#: AMD EPYC 7003 (Zen 3): AVX2 only
EPYC_MILAN = set(_BASE + "svm sse4a clzero vaes vpclmulqdq".split())
#: Intel Xeon 4th gen (Sapphire Rapids): AVX-512 with VNNI, BF16, FP16 and AMX
XEON_SPR = set(_BASE + _AVX512 + "avx_vnni avx512_bf16 avx512_vnni avx512_bitalg avx512_vpopcntdq avx512_fp16 "
                                 "amx_bf16 amx_tile amx_int8 serialize tsxldtrk".split())
#: Intel Xeon E5 v3 (Haswell)
XEON_HASWELL = set(_BASE) - {"adx", "rdseed", "smap", "clflushopt", "clwb", "sha_ni", "xsavec", "xsaves", "umip",
                              "rdpid"}


def _consumers(mcpu):
    """(hw()'s int8_dot, the int8 lowering's dot, hw()'s fp32 lanes, the schedules' fp32 lanes) for an mcpu."""
    t = CpuTarget(mcpu=mcpu)
    hw, tvm_t = t.hw(), t.tvm_target()
    return hw.int8_dot, int8.int8_dot(tvm_t), hw.fp32_lanes, cpu_schedules.fp32_lanes(tvm_t)


def test_haswell_has_no_vnni_in_any_consumer():
    assert "vnni" not in x86_isa.features("haswell")
    assert _consumers("haswell") == ("avx2", "avx2", 8, 8)


@pytest.mark.parametrize("mcpu", KNOWN_MCPUS)
def test_every_consumer_agrees(mcpu):
    hw_dot, lowering_dot, hw_lanes, sched_lanes = _consumers(mcpu)
    assert hw_dot == lowering_dot and hw_lanes == sched_lanes
    assert (hw_dot == "vnni") == ("vnni" in x86_isa.MCPU_FEATURES[mcpu])


@pytest.mark.parametrize("flags,mcpu,dot,lanes", [
    (EPYC_GENOA, "cooperlake", "vnni", 16),
    (XEON_SPR, "sapphirerapids", "vnni", 16),
    (EPYC_MILAN, "haswell", "avx2", 8),
    (XEON_HASWELL, "haswell", "avx2", 8),
    (XEON_SPR - {"avx512_fp16"}, "cooperlake", "vnni", 16),       # no AMX/FP16 code without both
    ({"sse2", "sse4_2"}, "x86-64-v2", None, 4),
])
def test_host_detection_from_cpuinfo_flags(monkeypatch, flags, mcpu, dot, lanes):
    monkeypatch.delenv("GRAPHOPT_CPU_MCPU", raising=False)
    monkeypatch.setattr(x86_isa, "host_flags", lambda: set(flags))
    t = CpuTarget()
    assert t.mcpu == mcpu and t.hw().int8_dot == dot and t.hw().fp32_lanes == lanes == t.hw().structure.channels
    assert x86_isa.MCPU_FEATURES[mcpu] <= x86_isa.features_from_flags(flags)    # never code the host cannot run
    assert ("amx" in x86_isa.features(mcpu)) == (mcpu == "sapphirerapids")


def test_mattr_adds_and_removes_features():
    assert x86_isa.int8_dot(x86_isa.features("cascadelake", ["-avx512vnni"])) == "avx2"
    assert x86_isa.int8_dot(x86_isa.features("haswell", ["+avx512vnni"])) == "vnni"
    assert x86_isa.vector_bits(x86_isa.features("x86-64", ["+avx512f"])) == 512


def test_host_features_the_picked_mcpu_lacks_become_mattr(monkeypatch):
    """An AMD Zen 4 host gets cooperlake (no VBMI in LLVM's cooperlake) plus +avx512vbmi for the table kernels; a
    Sapphire Rapids host has VBMI in its mcpu; a host without VBMI gets none; an mcpu the user names gets none."""
    monkeypatch.delenv("GRAPHOPT_CPU_MCPU", raising=False)
    genoa = EPYC_GENOA | {"avx512vbmi"}
    for flags, mattr in ((genoa, ["+avx512vbmi"]), (XEON_SPR | {"avx512vbmi"}, []), (EPYC_GENOA - {"avx512vbmi"}, []),
                         (EPYC_MILAN, [])):
        monkeypatch.setattr(x86_isa, "host_flags", lambda f=flags: set(f))
        t = CpuTarget()
        assert t.mattr == mattr and list(t.tvm_target().attrs.get("mattr", [])) == mattr
        assert ("vbmi" in x86_isa.features(t.mcpu, t.mattr)) == ("avx512vbmi" in flags)
    monkeypatch.setattr(x86_isa, "host_flags", lambda: set(genoa))
    assert CpuTarget(mcpu="cooperlake").mattr == []
