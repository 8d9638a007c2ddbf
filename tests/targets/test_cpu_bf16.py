"""targets/bf16: the bf16 kernels (AVX512-BF16 vdpbf16ps, fp32 accumulation) against numpy on the same bf16-rounded
operands, the x86 library really holds vdpbf16ps, and whole fp32 graphs compiled with precision bf16 stay within the
bf16 bound of onnxruntime's fp32 result. Skipped where the CPU lacks AVX512-BF16."""
import shutil
import subprocess

import numpy as np
import pytest

from graphopt.targets.x86_isa import host_flags

tvm = pytest.importorskip("tvm")
from graphopt.targets import bf16  # noqa: E402

HAS_BF16 = "avx512_bf16" in host_flags()
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="host has no AVX512-BF16")
OBJDUMP = shutil.which("objdump")


def _target():
    return tvm.target.Target({"kind": "llvm", "mcpu": "cooperlake", "num-cores": 2})


def _build(func):
    return tvm.compile(tvm.IRModule({"main": func}), target=_target())


def _run(lib, args, out_shape):
    y = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


def _rounded(x):
    """float64 values of x rounded to bf16 the way the kernels round (nearest even)."""
    return (bf16.bf16_bits(x).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _close(got, ref, magnitude):
    """fp32 accumulation of exact bf16 products: the error is a few fp32 ulps of the sum of |products|."""
    assert np.all(np.abs(got - ref) <= 1e-5 * magnitude + 1e-6), np.abs(got - ref).max()


def test_bf16_rounding_is_nearest_even():
    x = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5, 0.0, 3.0e38], np.float32)   # ties go to even
    assert np.array_equal(bf16.bf16_bits(x), [0x3F80, 0x3F82, 0xC020, 0x0000, 0x7F62])


CONVS = [  # N, C, H, W, OC, K, stride, pad, layout
    (1, 3, 13, 11, 20, 3, 1, 1, "NCHW"),
    (1, 16, 8, 8, 32, 3, 2, 1, "NHWC"),
    (1, 32, 7, 7, 48, 1, 1, 0, "NHWC"),
    (2, 7, 9, 9, 16, 3, 1, 1, "NCHW"),
]


@needs_bf16
@pytest.mark.parametrize("case", CONVS, ids=lambda c: "x".join(map(str, c[:6])) + f"-s{c[6]}-{c[8]}")
def test_conv_kernel_matches_numpy(case):
    N, C, H, W, OC, K, st, pd, layout = case
    rng = np.random.default_rng(sum(case[:6]))
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((OC, C, K, K)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    spec = bf16.ConvSpec(N, H, W, C, OC, K, K, (st, st), (pd,) * 4, (1, 1), layout, C, act=(0.0, None))
    OH, OW = spec.OH, spec.OW
    xr, wr = _rounded(x), _rounded(w)
    xp = np.pad(xr, ((0, 0), (0, 0), (pd, pd), (pd, pd)))
    ref = np.zeros((N, OH, OW, OC))
    mag = np.zeros((N, OH, OW, OC))
    for kh in range(K):
        for kw in range(K):
            patch = xp[:, :, kh:kh + st * OH:st, kw:kw + st * OW:st]
            ref += np.einsum("nchw,oc->nhwo", patch, wr[:, :, kh, kw])
            mag += np.einsum("nchw,oc->nhwo", np.abs(patch), np.abs(wr[:, :, kh, kw]))
    ref = np.maximum(ref + b, 0)
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    args = [xin, bf16.pack_conv_weight(w, spec.C2), bf16.padded_bias(b, OC, spec.OCp)]
    y = _run(_build(bf16.conv2d_bf16(spec)), args, (N, OH, OW, spec.OCp))
    _close(y[..., :OC], ref, mag + np.abs(b))
    assert np.all(y[..., OC:] == 0)
    # residual add and a clip after it
    spec = bf16.ConvSpec(N, H, W, C, OC, K, K, (st, st), (pd,) * 4, (1, 1), layout, C, residual=True,
                         act2=(0.0, 6.0))
    r = rng.standard_normal((N, OH, OW, spec.OCp)).astype(np.float32)
    y = _run(_build(bf16.conv2d_bf16(spec)), args + [r], (N, OH, OW, spec.OCp))
    ref2 = np.zeros((N, OH, OW, OC))
    for kh in range(K):
        for kw in range(K):
            ref2 += np.einsum("nchw,oc->nhwo", xp[:, :, kh:kh + st * OH:st, kw:kw + st * OW:st], wr[:, :, kh, kw])
    ref2 = np.clip(ref2 + b + r[..., :OC], 0, 6)
    _close(y[..., :OC], ref2, mag + np.abs(b) + np.abs(r[..., :OC]))


@needs_bf16
@pytest.mark.parametrize("M,K,N", [(1, 512, 1000), (4, 30, 10), (128, 384, 48)])
def test_dense_kernel_matches_numpy(M, K, N):
    rng = np.random.default_rng(M + K + N)
    a = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    spec = bf16.DenseSpec(M, K, N, act=(-1.0, 1.0))
    y = _run(_build(bf16.dense_bf16(spec)), [a, bf16.pack_dense_weight(w, spec.K2), bf16.padded_bias(b, N, spec.Np)],
             (M, spec.Np))
    ref = np.clip(_rounded(a) @ _rounded(w).T + b, -1, 1)
    _close(y[:, :N], ref, np.abs(_rounded(a)) @ np.abs(_rounded(w)).T + np.abs(b))


@needs_bf16
@pytest.mark.skipif(OBJDUMP is None, reason="no objdump")
def test_library_uses_vdpbf16ps(tmp_path):
    spec = bf16.ConvSpec(1, 8, 8, 16, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "NHWC", 16)
    p = tmp_path / "k.so"
    _build(bf16.conv2d_bf16(spec)).export_library(str(p))
    asm = subprocess.run([OBJDUMP, "-d", str(p)], capture_output=True, text=True, check=True).stdout
    assert "vdpbf16ps" in asm and "graphopt_dpbf16ps" not in asm      # the wrapper is inlined away


# ---------------------------------------------------------------------------------------------------------------
# the precision option: target, compile --precision, build [target] precision
# ---------------------------------------------------------------------------------------------------------------

def test_precision_option_is_checked():
    from graphopt.errors import BadInput
    from graphopt.targets.cpu import CpuTarget
    assert CpuTarget(mcpu="cooperlake").describe()["precision"] == "fp32"
    assert CpuTarget(mcpu="cooperlake", precision="bf16").describe()["precision"] == "bf16"
    assert CpuTarget(mcpu="sapphirerapids", precision="bf16").precision == "bf16"
    for mcpu, precision, needle in [("cooperlake", "fp16", "precision must be one of fp32, bf16"),
                                    ("cascadelake", "bf16", "needs AVX512-BF16"), ("haswell", "bf16", "needs")]:
        with pytest.raises(BadInput, match=needle) as e:
            CpuTarget(mcpu=mcpu, precision=precision)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv,needle", [
    (["--precision", "fp16"], "precision must be one of fp32, bf16"),
    (["--precision", "bf16", "--target-option", "precision=fp32"], "disagree"),
    (["--precision", "bf16", "--target", "cuda"], "target cuda has no option 'precision'"),
])
def test_compile_refuses_bad_precision(zoo_onnx, tmp_path, capsys, argv, needle):
    from graphopt.cli import main
    assert main(["compile", str(zoo_onnx("cnn_digits")), "-o", str(tmp_path / "a"), "--no-bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graphopt: error:") and needle in err and "\n" not in err


@needs_bf16
def test_compile_precision_bf16_cli(zoo_onnx, tmp_path, capsys):
    """compile --precision bf16: the convs and the dense layer run as bf16 kernels, the check is the bf16 one and
    its numbers are in report.json, the library holds vdpbf16ps."""
    import json

    from graphopt.cli import main
    out = tmp_path / "a"
    assert main(["compile", str(zoo_onnx("cnn_digits")), "-o", str(out), "--no-bench", "--precision", "bf16"]) == 0
    assert "bf16 error vs onnxruntime fp32" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    man = json.loads((out / "manifest.json").read_text())
    assert man["target"]["precision"] == "bf16" and rep["bf16_dot"] == "avx512bf16"
    assert rep["bf16_conv2d"] >= 2 and rep["bf16_dense"] >= 1 and rep["fp32_convs"] == 0
    chk = rep["check"]
    assert chk["ok"] and chk["criterion"].startswith("bf16") and chk["reference"] == "onnxruntime fp32"
    assert 0 < chk["max_relative_error"] <= chk["bound"]
    if OBJDUMP:
        asm = subprocess.run([OBJDUMP, "-d", str(out / "model.so")], capture_output=True, text=True).stdout
        assert "vdpbf16ps" in asm


@needs_bf16
def test_resnet_bf16_folds_norms_and_fuses_residuals(zoo_onnx, tmp_path):
    """A ResNet with unfolded BatchNorms: every conv runs in bf16 with its norm folded and the residual adds fused,
    and the result stays within the bf16 bound of onnxruntime's fp32 result (and within a few bf16 steps in
    practice)."""
    import graphopt
    art = graphopt.compile(str(zoo_onnx("resnet")), out=tmp_path / "r", target_options={"precision": "bf16"},
                           measure=False)
    rep = art.report
    assert rep["bf16_conv2d"] > 0 and rep["fp32_convs"] == 0 and rep["bf16_residual_fused"] > 0
    assert rep["check"]["ok"] and rep["check"]["max_relative_error"] < 0.05


def test_bf16_check_rejects_what_is_off():
    from graphopt.bf16_check import BF16_UNIT, relative_error
    ref = np.linspace(-1, 1, 101)
    assert relative_error(ref, ref + BF16_UNIT / 4) < BF16_UNIT
    assert relative_error(ref, ref * 1.5) == pytest.approx(0.5)
    assert relative_error(ref, np.where(ref > 0.5, np.nan, ref)) == float("inf")
    assert relative_error(ref, ref[:-1]) == float("inf")


@pytest.mark.parametrize("C,H,K,st,layout", [(24, 9, 3, 1, "NHWC"), (20, 10, 3, 2, "NCHW"), (32, 7, 5, 1, "NHWC")])
def test_depthwise_kernel_matches_numpy(C, H, K, st, layout):
    """The fp32 NHWC depthwise kernel that keeps MobileNet-style chains NHWC between bf16 convs."""
    rng = np.random.default_rng(C + H)
    x = rng.standard_normal((1, C, H, H)).astype(np.float32)
    w = rng.standard_normal((C, 1, K, K)).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    pd = K // 2
    spec = bf16.ConvSpec(1, H, H, C, C, K, K, (st, st), (pd,) * 4, (1, 1), layout, C, act=(0.0, 6.0))
    wk = np.zeros((K, K, spec.OCp), np.float32)
    wk[:, :, :C] = w[:, 0].transpose(1, 2, 0)
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    y = _run(_build(bf16.dwconv2d_nhwc(spec)), [xin, wk, bf16.padded_bias(b, C, spec.OCp)],
             (1, spec.OH, spec.OW, spec.OCp))
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pd, pd), (pd, pd)))
    ref = np.zeros((1, spec.OH, spec.OW, C)) + b
    for kh in range(K):
        for kw in range(K):
            ref += (xp[:, :, kh:kh + st * spec.OH:st, kw:kw + st * spec.OW:st] * w[:, 0, kh, kw, None, None]
                    ).transpose(0, 2, 3, 1)
    assert np.allclose(y[..., :C], np.clip(ref, 0, 6), rtol=1e-5, atol=1e-5)
