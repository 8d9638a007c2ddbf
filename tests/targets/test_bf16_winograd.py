"""targets/bf16/winograd: Winograd F(2x2, 3x3) with bf16 GEMMs against a float64 direct conv (within the error its
two bf16 roundings allow, computed from the Winograd-domain magnitudes), its epilogues and bf16 inputs / outputs,
which convs it takes, and whole graphs compiled with precision bf16 (graphopt.compile's bf16 check) with it and
with winograd=off. Skipped where the CPU lacks AVX512-BF16."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphopt.targets.x86_isa import host_flags

tvm = pytest.importorskip("tvm")

from graphopt.targets import bf16  # noqa: E402
from graphopt.targets.bf16 import winograd  # noqa: E402
from graphopt.targets.winograd_transforms import AT, BT, G  # noqa: E402

needs_bf16 = pytest.mark.skipif("avx512_bf16" not in host_flags(), reason="host has no AVX512-BF16")


def _target():
    return tvm.target.Target({"kind": "llvm", "mcpu": "cooperlake", "num-cores": 2})


def _as_float(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def reference(x, w, b, pad, residual=None, act=(0.0, None), act2=(None, None)):
    """(float64 direct conv NHWC with bias, bounds, residual and bounds; the error bound of the Winograd kernel:
    2^-7 x the output transform of sum_c |V| |U|, V and U each rounded to bf16 once (relative 2^-9))."""
    N, H, W, C = x.shape
    K = w.shape[0]
    pt, pl, pb, pr = pad
    OH, OW = H + pt + pb - 2, W + pl + pr - 2
    TH, TW = -(-OH // 2), -(-OW // 2)
    xp = np.zeros((N, TH * 2 + 2, TW * 2 + 2, C))
    xp[:, pt:pt + H, pl:pl + W] = x
    d = np.stack([np.stack([xp[:, i:i + TH * 2:2, j:j + TW * 2:2] for j in range(4)], -2) for i in range(4)], -3)
    V = np.einsum("ia,nthabc,jb->nthijc", BT, d, BT)                       # [N, TH, TW, 4, 4, C]
    U = np.einsum("ia,kcab,jb->ijck", G, w.astype(np.float64), G)          # [4, 4, C, K]
    mag = np.einsum("nthijc,ijck->nthijk", np.abs(V), np.abs(U))
    mag = np.einsum("ai,nthijk,bj->nthabk", np.abs(AT), mag, np.abs(AT))   # [N, TH, TW, 2, 2, K]
    mag = mag.transpose(0, 1, 3, 2, 4, 5).reshape(N, TH * 2, TW * 2, K)[:, :OH, :OW]
    ref = np.zeros((N, OH, OW, K))
    for kh in range(3):
        for kw in range(3):
            ref += np.einsum("nhwc,kc->nhwk", xp[:, kh:kh + OH, kw:kw + OW], w[:, :, kh, kw])

    def bound(v, lohi):
        lo, hi = lohi
        return np.clip(v, -np.inf if lo is None else lo, np.inf if hi is None else hi)
    ref = bound(ref + b, act)
    if residual is not None:
        ref = bound(ref + residual, act2)
    return ref, 2.0 ** -7 * mag + 1e-6


CASES = [  # H, W, C, OC, pad, Cphys, in_bf16, out_bf16, residual (None | "fp32" | "bf16")
    (8, 8, 16, 16, (1, 1, 1, 1), 16, False, False, None),
    (9, 7, 6, 20, (1, 1, 1, 1), 6, False, False, "fp32"),          # odd sizes and channel counts
    (13, 11, 24, 40, (1, 1, 1, 1), 32, True, True, None),          # a padded bf16 input; partial tile blocks
    (12, 12, 32, 32, (0, 0, 0, 0), 32, False, True, "bf16"),       # no padding; whole tile blocks stored bf16
    (10, 9, 16, 48, (0, 1, 1, 0), 16, True, False, "bf16"),        # asymmetric padding
    (9, 8, 16, 32, (1, 1, 1, 1), 16, False, True, None),           # stored bf16 with a partial last tile row
    (28, 28, 64, 64, (1, 1, 1, 1), 64, True, True, "bf16"),        # a ResNet block's shape (4 vectors a tile)
]


@needs_bf16
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}"
                         + "".join(f"-{t}" for t, on in (("inbf16", c[6]), ("outbf16", c[7])) if on)
                         + (f"-res{c[8]}" if c[8] else ""))
def test_kernel_matches_a_float64_conv(case):
    H, W, C, OC, pad, Cphys, in_bf16, out_bf16, res = case
    rng = np.random.default_rng(H * W + C + OC)
    x = rng.standard_normal((1, H, W, Cphys)).astype(np.float32)
    x[..., C:] = np.nan                               # a padded input's extra channels must not be read
    w = (rng.standard_normal((OC, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    spec = bf16.ConvSpec(1, H, W, C, OC, 3, 3, (1, 1), pad, (1, 1), "NHWC", Cphys, act=(0.0, None),
                         residual=res is not None, act2=(-1.0, 4.0), in_bf16=in_bf16, out_bf16=out_bf16,
                         res_bf16=res == "bf16")
    assert winograd.fits(spec)
    xin = bf16.bf16_bits(x) if in_bf16 else x
    xval = (_as_float(xin) if in_bf16 else x)[..., :C].astype(np.float64)
    r = rng.standard_normal((1, spec.OH, spec.OW, spec.OCp)).astype(np.float32)
    r[..., OC:] = 0                                   # another kernel's padded channels
    rin = bf16.bf16_bits(r) if res == "bf16" else r
    rval = (_as_float(rin) if res == "bf16" else r)[..., :OC].astype(np.float64)
    ref, tol = reference(xval, w, b, pad, rval if res else None, (0.0, None), (-1.0, 4.0))
    lib = tvm.compile(tvm.IRModule({"main": winograd.winograd_conv2d_bf16(spec)}), target=_target())
    args = [xin, winograd.pack_weight(w, spec), bf16.padded_bias(b, OC, spec.OCp)] + ([rin] if res else [])
    y = tvm.runtime.tensor(np.zeros((1, spec.OH, spec.OW, spec.OCp), np.uint16 if out_bf16 else np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
    got = _as_float(y.numpy()) if out_bf16 else y.numpy()
    if out_bf16:
        tol = tol + 2.0 ** -8 * np.abs(ref)           # one more rounding, to bf16
    assert np.all(np.abs(got[..., :OC] - ref) <= tol), np.abs(got[..., :OC] - ref).max()
    assert np.all(got[..., OC:] == 0)


def test_takes_only_3x3_stride_1_channels_last_convs():
    base = dict(dilation=(1, 1), in_layout="NHWC", Cphys=32)
    assert winograd.pays(bf16.ConvSpec(1, 56, 56, 32, 32, 3, 3, (1, 1), (1,) * 4, **base))
    assert not winograd.fits(bf16.ConvSpec(1, 56, 56, 32, 32, 3, 3, (2, 2), (1,) * 4, **base))
    assert not winograd.fits(bf16.ConvSpec(1, 56, 56, 32, 32, 1, 1, (1, 1), (0,) * 4, **base))
    assert not winograd.fits(bf16.ConvSpec(1, 56, 56, 32, 32, 3, 3, (1, 1), (2,) * 4, (2, 2), "NHWC", 32))
    assert not winograd.fits(bf16.ConvSpec(1, 56, 56, 32, 32, 3, 3, (1, 1), (1,) * 4))          # NCHW input
    assert not winograd.fits(bf16.ConvSpec(1, 56, 56, 32, 32, 3, 3, (1, 1), (1,) * 4, **base, amx=True))
    assert not winograd.pays(bf16.ConvSpec(1, 3, 3, 32, 32, 3, 3, (1, 1), (1,) * 4, **base))   # 3x3 output
    assert not winograd.pays(bf16.ConvSpec(1, 56, 56, 4, 32, 3, 3, (1, 1), (1,) * 4, **base))  # 4 channels


@needs_bf16
def test_resnet_bf16_takes_winograd_unless_off(zoo_onnx, tmp_path):
    """The zoo's ResNet compiled with precision bf16: its 3x3 stride-1 convs run as Winograd kernels and pass the
    bf16 check against onnxruntime's fp32 result; with winograd=off none do, and the check passes too."""
    import graphopt
    path = zoo_onnx("resnet")
    n3x3 = sum(1 for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"
               and any(a.name == "kernel_shape" and list(a.ints) == [3, 3] for a in n.attribute)
               and all(not (a.name == "strides" and list(a.ints) != [1, 1]) for a in n.attribute))
    art = graphopt.compile(str(path), out=tmp_path / "w", target_options={"precision": "bf16"}, measure=False)
    rep = art.report
    assert 0 < rep["bf16_winograd"] <= n3x3 and rep["check"]["ok"], rep
    off = graphopt.compile(str(path), out=tmp_path / "d", measure=False,
                           target_options={"precision": "bf16", "winograd": "off"})
    assert off.report["bf16_winograd"] == 0 and off.report["check"]["ok"]
    assert off.report["bf16_conv2d"] == rep["bf16_conv2d"]
