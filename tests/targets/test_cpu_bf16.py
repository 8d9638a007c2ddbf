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
HAS_AMX = HAS_BF16 and {"amx_tile", "amx_bf16"} <= host_flags()
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
    (1, 24, 6, 10, 16, 1, 1, 0, "NHWC"),     # 24 channels: the input stage in 8-lane vectors
    (1, 3, 16, 16, 32, 7, 2, 3, "NHWC"),     # a ResNet stem: its 7 taps x 3 channels read as 11 pairs (fold_kw)
    (1, 5, 12, 11, 16, 3, 1, 1, "NHWC"),     # folded, stride 1: odd pixels' runs start between pairs
]


def test_odd_channel_counts_fold_their_kernel_rows():
    stem = bf16.ConvSpec(1, 224, 224, 3, 64, 7, 7, (2, 2), (3,) * 4, in_layout="NHWC", Cphys=3)
    assert stem.fold_kw and stem.fold_pairs == 11
    assert not bf16.ConvSpec(1, 224, 224, 3, 64, 7, 7, (2, 2), (3,) * 4).fold_kw      # NCHW: the padded stage
    assert bf16.conv_weight(stem, np.zeros((64, 3, 7, 7), np.float32)).shape == (4, 7, 1, 11, 16, 2)
    assert not bf16.ConvSpec(1, 56, 56, 64, 64, 3, 3, (1, 1), (1,) * 4).fold_kw      # even: nothing to save
    assert not bf16.ConvSpec(1, 56, 56, 3, 64, 1, 1).fold_kw                           # one tap per row


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
    args = [xin, bf16.conv_weight(spec, w), bf16.padded_bias(b, OC, spec.OCp)]
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
    _close(y[..., :OC], np.clip(ref2 + b + r[..., :OC], 0, 6), mag + np.abs(b) + np.abs(r[..., :OC]))
    # the residual as bf16 bits (another bf16 kernel's output): the rounded values added
    spec = bf16.ConvSpec(**{**spec.__dict__, "res_bf16": True})
    y = _run(_build(bf16.conv2d_bf16(spec)), args + [bf16.bf16_bits(r)], (N, OH, OW, spec.OCp))
    rr = _rounded(r[..., :OC])
    _close(y[..., :OC], np.clip(ref2 + b + rr, 0, 6), mag + np.abs(b) + np.abs(rr))


@needs_bf16
@pytest.mark.parametrize("case", [(16, 10, 12, 40, 1, 1, 0), (32, 9, 9, 16, 1, 2, 0), (16, 8, 7, 32, 3, 1, 1)],
                         ids=["1x1", "1x1-s2", "3x3-pad"])
def test_conv_kernel_with_bf16_input_and_output(case):
    """A conv reading bf16 bits (another conv's bf16 output; an unpadded one reads them in place) computes what
    it computes from the same values in fp32, and its bf16 output is exactly its fp32 output rounded to nearest
    even (vcvtneps2bf16)."""
    C, H, W, OC, K, st, pd = case
    rng = np.random.default_rng(C + H + OC)
    x = rng.standard_normal((1, H, W, C)).astype(np.float32)
    w = rng.standard_normal((OC, C, K, K)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    xb = bf16.bf16_bits(x)
    xr = (xb.astype(np.uint32) << 16).view(np.float32)
    args = dict(stride=(st, st), pad=(pd,) * 4, in_layout="NHWC", Cphys=C, act=(0.0, 6.0))
    base = bf16.ConvSpec(1, H, W, C, OC, K, K, **args)
    wp, bp = bf16.pack_conv_weight(w, base.C2), bf16.padded_bias(b, OC, base.OCp)
    shape = (1, base.OH, base.OW, base.OCp)
    ref = _run(_build(bf16.conv2d_bf16(base)), [xr, wp, bp], shape)
    got = _run(_build(bf16.conv2d_bf16(bf16.ConvSpec(1, H, W, C, OC, K, K, **args, in_bf16=True))),
               [xb, wp, bp], shape)
    assert np.array_equal(got, ref)
    lib = _build(bf16.conv2d_bf16(bf16.ConvSpec(1, H, W, C, OC, K, K, **args, in_bf16=True, out_bf16=True)))
    yb = tvm.runtime.tensor(np.zeros(shape, np.uint16))
    lib["main"](*[tvm.runtime.tensor(a) for a in (xb, wp, bp)], yb)
    assert np.array_equal(yb.numpy(), bf16.bf16_bits(ref))


@needs_bf16
@pytest.mark.parametrize("out_bf16", [False, True], ids=["fp32-out", "bf16-out"])
def test_conv_kernel_hard_swish_epilogue(out_bf16):
    """The HardSwish epilogue (v * clip(v + 3, 0, 6) / 6 * scale + shift after the bias and bounds) against numpy;
    the channels padded from 20 to 32 stay zero despite the shift."""
    rng = np.random.default_rng(7)
    x = (3 * rng.standard_normal((1, 6, 7, 16))).astype(np.float32)
    w = rng.standard_normal((20, 16, 3, 3)).astype(np.float32)
    b = rng.standard_normal(20).astype(np.float32)
    spec = bf16.ConvSpec(1, 6, 7, 16, 20, 3, 3, (1, 1), (1,) * 4, (1, 1), "NHWC", 16, act=(-4.0, None),
                         hswish=(0.75, -0.5), out_bf16=out_bf16)
    shape = (1, spec.OH, spec.OW, spec.OCp)
    lib = _build(bf16.conv2d_bf16(spec))
    y = tvm.runtime.tensor(np.zeros(shape, np.uint16 if out_bf16 else np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, bf16.pack_conv_weight(w, spec.C2), bf16.padded_bias(b, 20, 32))], y)
    got = y.numpy()
    if out_bf16:
        got = (got.astype(np.uint32) << 16).view(np.float32)
    xp = np.pad(_rounded(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    wr = _rounded(w)
    v = np.zeros((1, 6, 7, 20))
    for kh in range(3):
        for kw in range(3):
            v += np.einsum("nhwc,oc->nhwo", xp[:, kh:kh + 6, kw:kw + 7], wr[:, :, kh, kw])
    v = np.maximum(v + b, -4.0)
    ref = v * np.clip(v + 3, 0, 6) / 6 * 0.75 - 0.5
    tol = 2 ** -8 * np.abs(ref) + 1e-4 if out_bf16 else 1e-4 * (1 + np.abs(ref))
    assert np.all(np.abs(got[..., :20] - ref) <= tol), np.abs(got[..., :20] - ref).max()
    assert np.all(got[..., 20:] == 0)


@needs_bf16
@pytest.mark.parametrize("in_bf16", [False, True], ids=["fp32-in", "bf16-in"])
def test_conv_kernel_skips_the_padded_channels_of_its_input(in_bf16):
    """A conv reading another kernel's NHWC output of 24 channels padded to 32 reduces over the 24 (12 pairs) only:
    NaN in the padding channels does not reach the output (it did when the padding was multiplied by zero weights,
    a third more work)."""
    rng = np.random.default_rng(24)
    x = rng.standard_normal((1, 6, 5, 32)).astype(np.float32)
    x[..., 24:] = np.nan
    w = rng.standard_normal((40, 24, 1, 1)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    spec = bf16.ConvSpec(1, 6, 5, 24, 40, 1, 1, in_layout="NHWC", Cphys=32, in_bf16=in_bf16)
    assert spec.C2 == 12
    xin = bf16.bf16_bits(x) if in_bf16 else x
    y = _run(_build(bf16.conv2d_bf16(spec)), [xin, bf16.pack_conv_weight(w, spec.C2), bf16.padded_bias(b, 40, 48)],
             (1, 6, 5, 48))
    xr = _rounded(x[..., :24])
    ref = np.einsum("nhwc,oc->nhwo", xr, _rounded(w[:, :, 0, 0])) + b
    _close(y[..., :40], ref, np.einsum("nhwc,oc->nhwo", np.abs(xr), np.abs(_rounded(w[:, :, 0, 0]))) + np.abs(b))


DWCONVS = [  # N, H, W, C, Cx, K, stride, pad (top, left, bottom, right), dilation
    (1, 9, 11, 20, 20, 3, 1, (1, 1, 1, 1), 1),      # odd channels: 20 -> 32 inside the kernel
    (2, 10, 9, 24, 32, 3, 2, (0, 0, 1, 1), 1),      # batch 2, stride 2, TF-style padding, input padded to 32
    (1, 12, 12, 48, 48, 5, 1, (2, 2, 2, 2), 1),     # 5x5 (PP-OCR's detector)
    (1, 13, 8, 16, 16, 3, 1, (2, 2, 2, 2), 2),      # dilation 2
    (1, 7, 7, 40, 48, 3, 2, (1, 1, 1, 1), 1),       # stride 2 on an odd size
]


def _dw_reference(x, w, b, spec):
    """float64 depthwise conv of x [N, H, W, Cx] (channels past C ignored) with w [KH, KW, Cp], plus b, bounded;
    and the sum of |products| (the accumulation's error scale)."""
    C, (pt, pl, pb, pr), (sh, sw), (dh, dw) = spec.C, spec.pad, spec.stride, spec.dilation
    xp = np.pad(x.astype(np.float64)[..., :C], ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ref = np.zeros((spec.N, spec.OH, spec.OW, C))
    mag = np.zeros_like(ref)
    for i in range(spec.KH):
        for j in range(spec.KW):
            patch = xp[:, i * dh:i * dh + sh * spec.OH:sh, j * dw:j * dw + sw * spec.OW:sw]
            ref += patch * w[i, j, :C]
            mag += np.abs(patch * w[i, j, :C])
    lo, hi = spec.act
    return np.clip(ref + b[:C], lo, hi), mag + np.abs(b[:C])


@needs_bf16
@pytest.mark.parametrize("case", DWCONVS,
                         ids=lambda c: f"n{c[0]}-{c[1]}x{c[2]}x{c[3]}-cx{c[4]}-k{c[5]}-s{c[6]}-d{c[8]}")
def test_depthwise_kernel_matches_numpy(case):
    """The depthwise kernel (fp32 arithmetic) against float64 numpy on the same inputs: fp32 in and out, bf16 bits in
    (the rounded values, exactly as from fp32 input holding them), bf16 bits out (exactly the fp32 result rounded to
    nearest even); the channels from C up to the padded count come out zero."""
    N, H, W, C, Cx, K, st, pad, dil = case
    rng = np.random.default_rng(sum(case[:6]))
    x = rng.standard_normal((N, H, W, Cx)).astype(np.float32)
    spec = bf16.DwSpec(N, H, W, C, Cx, K, K, (st, st), pad, (dil, dil), act=(-1.0, 6.0))
    w = np.zeros((K, K, spec.Cp), np.float32)
    w[..., :C] = rng.standard_normal((K, K, C))
    b = np.zeros(spec.Cp, np.float32)
    b[:C] = rng.standard_normal(C)
    shape = (N, spec.OH, spec.OW, spec.Cp)
    y = _run(_build(bf16.dwconv2d_bf16(spec)), [x, w, b], shape)
    ref, mag = _dw_reference(x, w, b, spec)
    _close(y[..., :C], ref, mag)
    assert np.all(y[..., C:] == 0)
    xb = bf16.bf16_bits(x)
    xr = (xb.astype(np.uint32) << 16).view(np.float32)
    from_rounded = _run(_build(bf16.dwconv2d_bf16(spec)), [xr, w, b], shape)
    bits_in = bf16.DwSpec(N, H, W, C, Cx, K, K, (st, st), pad, (dil, dil), act=(-1.0, 6.0), in_bf16=True)
    assert np.array_equal(_run(_build(bf16.dwconv2d_bf16(bits_in)), [xb, w, b], shape), from_rounded)
    both = bf16.DwSpec(N, H, W, C, Cx, K, K, (st, st), pad, (dil, dil), act=(-1.0, 6.0), in_bf16=True, out_bf16=True)
    yb = tvm.runtime.tensor(np.zeros(shape, np.uint16))
    _build(bf16.dwconv2d_bf16(both))["main"](*[tvm.runtime.tensor(a) for a in (xb, w, b)], yb)
    assert np.array_equal(yb.numpy(), bf16.bf16_bits(from_rounded))


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
@pytest.mark.parametrize("batch,M,K,N,scale_op,scale", [((1, 4), 128, 64, 128, "divide", 8.0),
                                                         ((3,), 20, 7, 32, "multiply", 0.5),
                                                         ((2,), 5, 33, 48, None, 1.0)])
def test_batch_matmul_kernel_matches_numpy(batch, M, K, N, scale_op, scale):
    """Both operands rounded to bf16 in the kernel (an odd K's last pair zero-padded), the scale in the epilogue."""
    rng = np.random.default_rng(M + K + N)
    x = rng.standard_normal((*batch, M, K)).astype(np.float32)
    y = rng.standard_normal((*batch, K, N)).astype(np.float32)
    spec = bf16.BatchMatmulSpec(batch, M, K, N, scale_op, scale)
    z = _run(_build(bf16.batch_matmul_bf16(spec)), [x, y], (*batch, M, N))
    factor = 1 / scale if scale_op == "divide" else scale
    ref = (_rounded(x) @ _rounded(y)) * factor
    _close(z, ref, (np.abs(_rounded(x)) @ np.abs(_rounded(y))) * factor)


def _attention(seq=24, heads=2, d=32, scale="Div"):
    """Self-attention core: Q K^T / sqrt(d) (or * 1/sqrt(d)) -> Softmax -> @ V, on inputs q, k, v [1, heads, seq, d]."""
    from onnx import TensorProto, helper
    shape = [1, heads, seq, d]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("q", "k", "v")]
    c = np.float32(np.sqrt(d) if scale == "Div" else 1 / np.sqrt(d))
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node(scale, ["s", "c"], ["ss"]),
             helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["out"])]
    g = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
                          [helper.make_tensor("c", TensorProto.FLOAT, [], [float(c)])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@needs_bf16
@pytest.mark.parametrize("seq,scale,bf16_mms", [(32, "Div", 2), (48, "Mul", 2), (24, "Div", 1)],
                         ids=["div", "mul", "seq24"])
def test_attention_matmuls_run_in_bf16(tmp_path, seq, scale, bf16_mms):
    """QK^T (its scale fused) and PV compiled with precision bf16 become the bf16 batch matmul where the output has a
    multiple of 16 columns (seq 24: QK^T's 24 columns stay fp32, PV's 32 go bf16), and the whole graph passes
    compile's bf16 check against onnxruntime fp32, whose bound counts those matmuls' reductions."""
    import onnx

    import graphopt
    path = tmp_path / "attention.onnx"
    onnx.save(_attention(seq, scale=scale), str(path))
    art = graphopt.compile(str(path), out=tmp_path / "a", target_options={"precision": "bf16"}, measure=False)
    rep = art.report
    assert rep["bf16_batch_matmul"] == bf16_mms and rep["fp32_matmuls"] == 2 - bf16_mms
    assert rep["check"]["ok"] and rep["check"]["max_relative_error"] < 0.05
    assert rep["check"]["reduction_length"] == max(seq, 32)   # the inner dimensions: PV's seq, QK^T's d = 32


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
    assert man["target"]["precision"] == "bf16" and rep["bf16_dot"] == ("amx" if HAS_AMX else "avx512bf16")
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
    assert rep["bf16_stored_bf16"] > 0            # a block's first conv hands its second one bf16 bits
    assert rep["check"]["ok"] and rep["check"]["max_relative_error"] < 0.05


def test_bf16_check_rejects_what_is_off():
    from graphopt.bf16_check import BF16_UNIT, relative_error
    ref = np.linspace(-1, 1, 101)
    assert relative_error(ref, ref + BF16_UNIT / 4) < BF16_UNIT
    assert relative_error(ref, ref * 1.5) == pytest.approx(0.5)
    assert relative_error(ref, np.where(ref > 0.5, np.nan, ref)) == float("inf")
    assert relative_error(ref, ref[:-1]) == float("inf")


def _inverted_residual(stride=1, batch=1, mid=72, k=3):
    """MobileNetV2's block after a stem: conv 3x3 -> BN -> Clip(0, 6) -> [1x1 conv -> BN -> Clip -> depthwise k x k
    -> BN -> Clip -> 1x1 conv -> BN -> + the block's input], Clip written as the importer sees it from PyTorch (min /
    max inputs), channel counts that are not multiples of 16 (24 -> mid = 72 -> 24)."""
    from onnx import helper
    from onnx_builders import bn_node, bn_params, model, rnd, vi
    nodes, inits = [], [("lo", np.array(0.0, np.float32)), ("hi", np.array(6.0, np.float32))]
    convs = [("stem", "x", 24, 3, 1, 1, True), ("expand", "stem_a", mid, 1, 1, 1, True),
             ("dw", "expand_a", mid, k, stride, mid, True), ("project", "dw_a", 24, 1, 1, 1, False)]
    cin = 8
    for i, (name, src, cout, k, st, group, clip) in enumerate(convs):
        inits += [(f"{name}_w", rnd(cout, cin // group, k, k, seed=i))] + bn_params(name, cout, seed=i)
        nodes += [helper.make_node("Conv", [src, f"{name}_w"], [f"{name}_c"], name=name, pads=[k // 2] * 4,
                                   strides=[st, st], group=group), bn_node(f"{name}_c", f"{name}_n", name)]
        if clip:
            nodes.append(helper.make_node("Clip", [f"{name}_n", "lo", "hi"], [f"{name}_a"], name=f"{name}_clip"))
        cin = cout
    if stride == 1:
        nodes.append(helper.make_node("Add", ["project_n", "stem_a"], ["y"], name="residual"))
    else:
        nodes.append(helper.make_node("Identity", ["project_n"], ["y"], name="out"))
    return model(nodes, [vi("x", [batch, 8, 14, 14])], [vi("y", None)], inits)


def _main_bindings(mod):
    """(op name or None, value) of every binding of mod['main'], in order."""
    from tvm import relax
    return [(getattr(getattr(b.value, "op", None), "name", None), b.value)
            for blk in mod["main"].body.blocks for b in blk.bindings if isinstance(b.value, (relax.Call, relax.Var))]


@needs_bf16
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_inverted_residual_stays_nhwc_between_kernels(stride, layout):
    """The ReLU6 clips end their conv chains (the importer's max / min kernels are read as bounds) and the depthwise
    conv reads the 1x1 conv's NHWC output: the block runs as three bf16 conv kernels and the depthwise kernel with
    no layout change between them, whether the bf16 rewrite sees the imported NCHW graph (layout nchw) or the
    channels-last one (layout nhwc, the default: after cpu_layout.to_nhwc). The only permute_dims left read the
    graph's input or make its output. (Before, every clip ran on an NCHW view of the conv before it and the
    depthwise conv read that.) The expand conv hands the depthwise kernel bf16 bits and the depthwise kernel hands
    the project conv bf16 bits (before, both were fp32: the depthwise conv ran on the fp32 NHWC schedule)."""
    from graphopt.targets.bf16.rewrite import rewrite_bf16
    from graphopt.targets.cpu_layout import to_nhwc
    from graphopt.targets.int8 import import_qdq
    mod = import_qdq(_inverted_residual(stride))
    if layout == "nhwc":
        mod = to_nhwc(mod, _target())
    mod, facts = rewrite_bf16(mod, _target())
    assert facts["bf16_conv2d"] == 3 and facts["bf16_residual_fused"] == (1 if stride == 1 else 0)
    # expand, depthwise and stem outputs as bf16 bits: the stem's is read by the expand conv and, at stride 1, added
    # as the project conv's residual (bf16 bits, widened in its epilogue)
    assert facts["bf16_stored_bf16"] == 3 and facts["bf16_residual_bf16"] == (1 if stride == 1 else 0)
    ops = _main_bindings(mod)
    kernels = [i for i, (op, _) in enumerate(ops) if op in ("relax.call_tir", "relax.nn.conv2d")]
    params = set(mod["main"].params)
    for i, (op, value) in enumerate(ops):
        if op == "relax.permute_dims":
            assert value.args[0] in params or i > kernels[-1], [o for o, _ in ops]
    assert not [v for op, v in ops if op == "relax.nn.conv2d"]
    # channels-last, the input's NHWC transpose hands the stem bf16 bits (bf16_inputs): one more call_tir
    converted = 1 if layout == "nhwc" else 0
    assert facts["bf16_converted_inputs"] == converted
    assert sum(op == "relax.call_tir" for op, _ in ops) == 4 + converted
    assert facts["bf16_dwconv2d"] == 1 and facts["fp32_dwconv2d_nhwc"] == 0


@needs_bf16
@pytest.mark.parametrize("stride,batch,mid,k", [(1, 1, 72, 3), (2, 1, 72, 3), (2, 2, 36, 3), (1, 2, 20, 5)],
                         ids=["s1", "s2", "s2-batch2-36ch", "s1-batch2-20ch-5x5"])
def test_inverted_residual_bf16_matches_onnxruntime(tmp_path, stride, batch, mid, k):
    """The same block compiled with precision bf16 passes compile's bf16 check against onnxruntime fp32 (padded
    channels 72 -> 80, 36 -> 48, 20 -> 32 and 24 -> 32 included; with stride 2 the stem hands the expand conv bf16
    bits; the depthwise kernel reads and stores bf16 bits)."""
    import onnx

    import graphopt
    path = tmp_path / "block.onnx"
    onnx.save(_inverted_residual(stride, batch, mid, k), str(path))
    art = graphopt.compile(str(path), out=tmp_path / "a", target_options={"precision": "bf16"}, measure=False)
    rep = art.report
    assert rep["bf16_conv2d"] == 3 and rep["bf16_dwconv2d"] == 1 and rep["fp32_dwconv2d_nhwc"] == 0
    assert rep["bf16_dwconv2d_pairs"] == 1        # bf16 bits in, padded channels: vdpbf16ps over the rows
    assert rep["bf16_residual_fused"] == rep["bf16_residual_bf16"] == (stride == 1) and rep["bf16_stored_bf16"] == 3
    assert rep["check"]["ok"] and rep["check"]["max_relative_error"] < 0.05


@needs_bf16
def test_bf16_check_compares_a_saturated_sigmoid_map_in_logit_space(tmp_path):
    """A detector-style head (conv -> conv -> Sigmoid) whose map sits near 0 on the check's inputs (logits -10 to
    -14, as PP-OCRv4's detector on random inputs): relative to the map's tiny largest value, bf16's logit error is
    magnified by the logits' size, so the check compares the Sigmoid output in logit space, probabilities clipped
    at bf16_check.PROBABILITY_FLOOR (onnxruntime's own Sigmoid is off by up to 58% of a probability of 1e-7), and
    says so."""
    import onnx
    from onnx import TensorProto, helper

    import graphopt
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((64, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((1, 64, 3, 3)) * 0.05).astype(np.float32)
    b2 = np.array([-12.0], np.float32)
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (b2, "b2"))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["z"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["z"], ["map"])]
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("map", TensorProto.FLOAT, [1, 1, 32, 32])], inits)
    path = tmp_path / "head.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    art = graphopt.compile(str(path), out=tmp_path / "a", target_options={"precision": "bf16"}, measure=False)
    chk = art.report["check"]
    assert chk["ok"] and chk["logit_space"] == ["map"]
    assert chk["max_relative_error"] < chk["bound"] / 4


def _depthwise_between_hardswish(c=24):
    """conv 3x3 -> depthwise 3x3 -> HardSwish -> depthwise 3x3 -> 1x1 conv (PP-OCRv4 detector-style depthwise convs:
    one whose output an activation the chain does not take reads, one reading that activation), c channels."""
    from onnx import helper
    from onnx_builders import model, rnd, vi
    inits = [("wa", rnd(c, 8, 3, 3, seed=1)), ("wd1", rnd(c, 1, 3, 3, seed=2)), ("wd2", rnd(c, 1, 3, 3, seed=3)),
             ("wb", rnd(16, c, 1, 1, seed=4))]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1] * 4),
             helper.make_node("Conv", ["a", "wd1"], ["d1"], pads=[1] * 4, group=c),
             helper.make_node("HardSwish", ["d1"], ["h"]),
             helper.make_node("Conv", ["h", "wd2"], ["d2"], pads=[1] * 4, group=c),
             helper.make_node("Conv", ["d2", "wb"], ["y"])]
    return model(nodes, [vi("x", [1, 8, 12, 12])], [vi("y", None)], inits)


@needs_bf16
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_channels_last_depthwise_takes_the_bf16_kernel_only_between_bf16_kernels(layout):
    """A channels-last depthwise conv runs as the bf16 depthwise kernel only where it both reads and stores bf16
    bits; the detector's (one feeding a HardSwish, one reading it) stay on the fp32 NHWC schedule, which fuses the
    HardSwish into the conv's kernel. After the imported NCHW graph (layout nchw) every depthwise conv takes the
    kernel (the fp32 alternative there would switch layouts around it)."""
    from graphopt.targets.bf16.rewrite import rewrite_bf16
    from graphopt.targets.cpu_layout import to_nhwc
    from graphopt.targets.int8 import import_qdq
    mod = import_qdq(_depthwise_between_hardswish())
    if layout == "nhwc":
        mod = to_nhwc(mod, _target(), any_channels=True)
    mod, facts = rewrite_bf16(mod, _target())
    assert facts["bf16_conv2d"] == 2
    if layout == "nhwc":
        assert facts["bf16_dwconv2d"] == 0 and facts["fp32_dwconv2d_nhwc"] == 2 and facts["bf16_stored_bf16"] == 0
        # the input's NHWC transpose and the second depthwise conv hand their convs bf16 bits
        assert facts["bf16_converted_inputs"] == 2
    else:
        assert facts["bf16_dwconv2d"] == 2 and facts["fp32_dwconv2d_nhwc"] == 0
        assert facts["bf16_converted_inputs"] == 0


@needs_bf16
def test_depthwise_convs_of_untileable_channel_counts_take_the_bf16_kernel(tmp_path):
    """Depthwise convs of 12 channels go channels-last in a bf16 build (to_nhwc any_channels), where the fp32 NHWC
    schedule has no tile for them: they run as the bf16 depthwise kernel wherever they are (here around a
    HardSwish), and the build passes its check."""
    import onnx

    import graphopt
    path = tmp_path / "m.onnx"
    onnx.save(_depthwise_between_hardswish(12), str(path))
    art = graphopt.compile(str(path), out=tmp_path / "a", target_options={"precision": "bf16"}, measure=False)
    rep = art.report
    assert rep["bf16_dwconv2d"] == 2 and rep["fp32_dwconv2d_nhwc"] == 0 and rep["check"]["ok"]


@needs_bf16
def test_bf16_build_keeps_convs_of_any_channel_count_channels_last(tmp_path):
    """With precision bf16 a conv whose output channels are not a multiple of 8 (12 here, like PP-OCRv4's detector
    neck) goes channels-last too: the bf16 kernels pad channels to 16 themselves, so the fp32 rule that pins such a
    conv to NCHW would only add transposes (and NCHW input stages) around it. The fp32 build keeps the rule; the
    bf16 build runs both convs as bf16 kernels, the first handing the second bf16 bits, and passes its check."""
    import onnx
    from onnx import helper
    from onnx_builders import model, rnd, vi

    import graphopt
    from graphopt.targets.cpu_layout import to_nhwc
    from graphopt.targets.int8 import import_qdq
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["b"], pads=[1] * 4), helper.make_node("Relu", ["b"], ["y"])]
    m = model(nodes, [vi("x", [1, 16, 10, 10])], [vi("y", None)], [("w1", rnd(12, 16, 3, 3, seed=1)),
                                                                     ("w2", rnd(32, 12, 3, 3, seed=2))])

    def layouts(mod):
        return [str(v.attrs.data_layout) for op, v in _main_bindings(mod) if op == "relax.nn.conv2d"]
    assert layouts(to_nhwc(import_qdq(m), _target())) == ["NCHW", "NHWC"]
    assert layouts(to_nhwc(import_qdq(m), _target(), any_channels=True)) == ["NHWC", "NHWC"]
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    art = graphopt.compile(str(path), out=tmp_path / "a", target_options={"precision": "bf16"}, measure=False)
    assert art.report["bf16_conv2d"] == 2 and art.report["bf16_stored_bf16"] == 1 and art.report["check"]["ok"]


@needs_bf16
def test_fp32_ops_hand_convs_bf16_bits_only_where_convs_alone_read_them(tmp_path):
    """A tensor an fp32 op makes (a HardSwish, the input's NHWC transpose) that only bf16 convs read is converted to
    bf16 bits by an elementwise op fused into its producer (the convs then skip their input stage); not when another
    op reads it too (the residual Add), nor a Concat's output (its fused kernel ran 2.7x slower with the conversion
    in PP-OCRv4's detector). The build passes the bf16 check."""
    import onnx
    from onnx import helper
    from onnx_builders import model, rnd, vi

    import graphopt
    from graphopt.targets.bf16.rewrite import rewrite_bf16
    from graphopt.targets.cpu_layout import to_nhwc
    from graphopt.targets.int8 import import_qdq
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4),
             helper.make_node("HardSwish", ["a"], ["h"]),                      # read by a conv and the Add
             helper.make_node("Conv", ["h", "w2"], ["b"], pads=[1] * 4),
             helper.make_node("Add", ["b", "h"], ["s"]),
             helper.make_node("HardSwish", ["s"], ["g"]),                      # read by one conv only: converted
             helper.make_node("Conv", ["g", "w3"], ["c"]),
             helper.make_node("HardSwish", ["c"], ["e"]),
             helper.make_node("Concat", ["c", "e"], ["cat"], axis=1),          # a Concat: not converted
             helper.make_node("Conv", ["cat", "w4"], ["y"])]
    m = model(nodes, [vi("x", [2, 8, 9, 9])], [vi("y", None)],
              [("w1", rnd(16, 8, 3, 3, seed=1)), ("w2", rnd(16, 16, 3, 3, seed=2)), ("w3", rnd(16, 16, 1, 1, seed=3)),
               ("w4", rnd(8, 32, 1, 1, seed=4))])
    _, facts = rewrite_bf16(to_nhwc(import_qdq(m), _target(), any_channels=True), _target())
    assert facts["bf16_conv2d"] == 4 and facts["bf16_converted_inputs"] == 2    # g and the input's NHWC transpose
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    art = graphopt.compile(str(path), out=tmp_path / "a", target_options={"precision": "bf16"}, measure=False)
    assert art.report["bf16_converted_inputs"] == 2 and art.report["check"]["ok"]


def _conv_hard_swish_conv(form):
    """conv 3x3 -> HardSwish -> * 0.8 + 0.1 (one-element constants: PP-LCNet's affine blocks) -> 1x1 conv. form
    "op": the ONNX HardSwish op; "clip": PaddlePaddle's export (Add 3, Clip 0 6, Mul, Div 6)."""
    from onnx import helper
    from onnx_builders import model, rnd, vi
    inits = [("w1", rnd(24, 8, 3, 3, seed=1)), ("w2", rnd(16, 24, 1, 1, seed=2)), ("three", np.array(3.0, np.float32)),
             ("zero", np.array(0.0, np.float32)), ("six", np.array(6.0, np.float32)),
             ("s", np.array([0.8], np.float32)), ("t", np.array([0.1], np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4)]
    if form == "op":
        nodes.append(helper.make_node("HardSwish", ["a"], ["h"]))
    else:
        nodes += [helper.make_node("Add", ["a", "three"], ["a3"]), helper.make_node("Clip", ["a3", "zero", "six"], ["c"]),
                  helper.make_node("Mul", ["a", "c"], ["m"]), helper.make_node("Div", ["m", "six"], ["h"])]
    nodes += [helper.make_node("Mul", ["s", "h"], ["hs"]), helper.make_node("Add", ["hs", "t"], ["ht"]),
              helper.make_node("Conv", ["ht", "w2"], ["y"])]
    return model(nodes, [vi("x", [1, 8, 10, 10])], [vi("y", None)], inits)


@needs_bf16
@pytest.mark.parametrize("form", ["op", "clip"])
def test_hard_swish_after_a_conv_is_its_epilogue(tmp_path, form):
    """A HardSwish (either form) and the one-element affine after it end the conv's chain: the conv hands the next
    one bf16 bits and no elementwise op is left between them (before, the HardSwish and the affine ran as a kernel
    of their own, reading and writing the conv's fp32 output: 0.74 ms of PP-OCRv4's detector); the build passes
    its check."""
    import onnx

    import graphopt
    from graphopt.targets.bf16.rewrite import rewrite_bf16
    from graphopt.targets.cpu_layout import to_nhwc
    from graphopt.targets.int8 import import_qdq
    m = _conv_hard_swish_conv(form)
    mod, facts = rewrite_bf16(to_nhwc(import_qdq(m), _target(), any_channels=True), _target())
    assert facts["bf16_conv2d"] == 2 and facts["bf16_hswish_fused"] == 1 and facts["bf16_stored_bf16"] == 1
    ops = {op for op, _ in _main_bindings(mod)}
    assert not ops & {"relax.add", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum"}, ops
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    art = graphopt.compile(str(path), out=tmp_path / "a", target_options={"precision": "bf16"}, measure=False)
    assert art.report["bf16_hswish_fused"] == 1 and art.report["check"]["ok"]
