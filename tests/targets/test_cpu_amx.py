"""targets/bf16 on AMX: which bf16 kernels a target gets (AMX tiles where it has AMX, vdpbf16ps otherwise), the AMX
conv / dense kernels against numpy on the same bf16-rounded operands, and small models and the zoo's ResNet
compiled with precision bf16 on AMX within the bf16 bound of onnxruntime's fp32 result. The kernel and model tests
are skipped where the CPU lacks AMX."""
import shutil
import subprocess

import numpy as np
import pytest

from graphopt.targets.x86_isa import host_flags

tvm = pytest.importorskip("tvm")
from graphopt.targets import bf16  # noqa: E402
from graphopt.targets.bf16 import amx_kernels  # noqa: E402
from targets.test_cpu_bf16 import _close, _rounded  # noqa: E402  (the bf16 kernels' rounding and bound)

HAS_AMX = {"amx_tile", "amx_bf16", "avx512_bf16"} <= host_flags()
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="host has no AMX (amx_tile, amx_bf16) with AVX512-BF16")
OBJDUMP = shutil.which("objdump")


def _target(mcpu="sapphirerapids", mattr=()):
    spec = {"kind": "llvm", "mcpu": mcpu, "num-cores": 2}
    return tvm.target.Target({**spec, "mattr": list(mattr)} if mattr else spec)


def _run(func, args, out_shape, out_dtype="float32"):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=_target())
    y = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()



@pytest.mark.parametrize("mcpu,mattr,dot", [
    ("sapphirerapids", (), "amx"), ("sapphirerapids", ("-amx-tile",), "avx512bf16"), ("cooperlake", (), "avx512bf16"),
    ("znver4", (), "avx512bf16"), ("icelake-server", (), None)])
def test_bf16_dot_follows_the_target(mcpu, mattr, dot):
    assert bf16.bf16_dot(_target(mcpu, mattr)) == dot


@pytest.mark.parametrize("case,fits", [
    ((1, 56, 56, 64, 64, 3, 1, 1), True), ((1, 7, 7, 512, 512, 3, 1, 1), True),
    ((1, 56, 56, 64, 128, 1, 2, 0), True),       # 1x1 stride 2: a subsampled stage
    ((1, 56, 56, 64, 128, 3, 2, 1), True),       # 3x3 stride 2: four phases
    ((1, 224, 224, 3, 64, 7, 2, 3), True),       # the stem: a strip, 7 taps of 3 channels in 11 pairs
    ((1, 4, 4, 64, 64, 1, 1, 0), False),         # 16 pixels: fewer than a block's 32 rows
    ((1, 56, 56, 6, 64, 1, 1, 0), False),        # 3 pairs, nothing to fold: too little for a tile step
], ids=["3x3-56", "3x3-7", "1x1-s2", "3x3-s2", "stem", "tiny", "6ch-1x1"])
def test_amx_takes_the_shapes_it_runs_well(case, fits):
    N, H, W, C, OC, K, st, pd = case
    spec = bf16.ConvSpec(N, H, W, C, OC, K, K, (st, st), (pd,) * 4, amx=True)
    assert amx_kernels.conv_fits(spec) == fits
    assert not amx_kernels.conv_fits(bf16.ConvSpec(N, H, W, C, OC, K, K, (st, st), (pd,) * 4))


def _conv_ref(x, w, st, pd, dil=1):
    """float64 NHWC conv of bf16-rounded NCHW x, OIHW w: (sum, sum of |products|)."""
    N, C, H, W = x.shape
    OC, _, K, _ = w.shape
    xr, wr = _rounded(x), _rounded(w)
    xp = np.pad(xr, ((0, 0), (0, 0), (pd, pd), (pd, pd)))
    OH = (H + 2 * pd - dil * (K - 1) - 1) // st + 1
    OW = (W + 2 * pd - dil * (K - 1) - 1) // st + 1
    ref, mag = np.zeros((N, OH, OW, OC)), np.zeros((N, OH, OW, OC))
    for kh in range(K):
        for kw in range(K):
            patch = xp[:, :, kh * dil:kh * dil + st * OH:st, kw * dil:kw * dil + st * OW:st]
            ref += np.einsum("nchw,oc->nhwo", patch, wr[:, :, kh, kw])
            mag += np.einsum("nchw,oc->nhwo", np.abs(patch), np.abs(wr[:, :, kh, kw]))
    return ref, mag


CONVS = [  # N, C, H, W, OC, K, stride, pad, dilation, layout, in_bf16, out_bf16
    (1, 64, 8, 8, 64, 1, 1, 0, 1, "NHWC", False, False),      # 1x1, fp32 in
    (1, 64, 8, 8, 64, 1, 1, 0, 1, "NHWC", True, True),        # 1x1 on bf16 bits in place, bf16 out
    (2, 64, 13, 11, 48, 1, 2, 0, 1, "NHWC", True, False),     # 1x1 stride 2, a 16-channel last block
    (1, 64, 10, 9, 48, 3, 1, 1, 1, "NHWC", True, True),       # 3x3: padding columns computed and dropped
    (2, 24, 10, 9, 32, 3, 1, 1, 1, "NCHW", False, False),     # NCHW fp32 in, 12 pairs a step
    (1, 40, 9, 12, 16, 3, 1, 2, 2, "NHWC", False, True),      # dilation 2, pairs padded 20 -> 32
    (1, 32, 6, 6, 32, 5, 1, 2, 1, "NHWC", True, False),       # 5x5
    (1, 32, 15, 13, 48, 3, 2, 1, 1, "NHWC", True, True),      # 3x3 stride 2: phases
    (2, 16, 20, 20, 32, 5, 3, 2, 1, "NHWC", False, False),    # 5x5 stride 3
    (1, 3, 30, 28, 64, 7, 2, 3, 1, "NCHW", False, True),      # the stem: a strip (7 taps x 3 channels a row)
    (1, 4, 12, 11, 32, 3, 1, 1, 1, "NHWC", True, False),      # a strip of stride 1 (pixels of 2 pairs)
    (1, 3, 12, 12, 32, 3, 1, 1, 1, "NHWC", False, False),     # 3 channels at stride 1: odd pixels, folded
    (1, 6, 12, 12, 32, 3, 1, 2, 2, "NHWC", False, False),     # folded and dilated
]


@needs_amx
@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"{c[1]}x{c[2]}x{c[3]}-{c[4]}-k{c[5]}s{c[6]}d{c[8]}-{c[9]}"
                                                      f"-{'b' if c[10] else 'f'}{'b' if c[11] else 'f'}")
def test_amx_conv_kernel_matches_numpy(case):
    N, C, H, W, OC, K, st, pd, dil, layout, in_bf16, out_bf16 = case
    rng = np.random.default_rng(sum(case[:9]))
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((OC, C, K, K)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    spec = bf16.ConvSpec(N, H, W, C, OC, K, K, (st, st), (pd,) * 4, (dil, dil), layout, C, act=(0.0, None),
                         in_bf16=in_bf16, out_bf16=out_bf16, amx=True)
    assert amx_kernels.conv_fits(spec)
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    xin = bf16.bf16_bits(xin) if in_bf16 else xin
    args = [xin, bf16.conv_weight(spec, w), bf16.padded_bias(b, OC, spec.OCp)]
    y = _run(bf16.conv2d_bf16(spec), args, (N, spec.OH, spec.OW, spec.OCp), "uint16" if out_bf16 else "float32")
    ref, mag = _conv_ref(x, w, st, pd, dil)
    ref = np.maximum(ref + b, 0)
    if out_bf16:
        assert np.array_equal(y[..., OC:], np.zeros_like(y[..., OC:]))
        got = (y.astype(np.uint32) << 16).view(np.float32)[..., :OC]
        assert np.all(np.abs(got - ref) <= 2 ** -8 * np.abs(ref) + 1e-5 * (mag + np.abs(b)) + 1e-6)
    else:
        _close(y[..., :OC], ref, mag + np.abs(b))
        assert np.all(y[..., OC:] == 0)


@needs_amx
def test_amx_conv_kernel_residual_and_hard_swish_epilogues():
    N, C, H, W, OC, K = 1, 32, 8, 8, 48, 3
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, H, W, C)).astype(np.float32)
    w = rng.standard_normal((OC, C, K, K)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    ref, mag = _conv_ref(x.transpose(0, 3, 1, 2), w, 1, 1)
    spec = bf16.ConvSpec(N, H, W, C, OC, K, K, (1, 1), (1,) * 4, (1, 1), "NHWC", C, act=(0.0, None), residual=True,
                         act2=(None, 6.0), amx=True)
    r = rng.standard_normal((N, H, W, spec.OCp)).astype(np.float32)
    args = [x, bf16.conv_weight(spec, w), bf16.padded_bias(b, OC, spec.OCp)]
    y = _run(bf16.conv2d_bf16(spec), args + [r], (N, H, W, spec.OCp))
    _close(y[..., :OC], np.minimum(np.maximum(ref + b, 0) + r[..., :OC], 6), mag + np.abs(b) + np.abs(r[..., :OC]))
    spec_b = bf16.ConvSpec(**{**spec.__dict__, "res_bf16": True})      # the residual as bf16 bits
    y = _run(bf16.conv2d_bf16(spec_b), args + [bf16.bf16_bits(r)], (N, H, W, spec.OCp))
    rr = _rounded(r[..., :OC])
    _close(y[..., :OC], np.minimum(np.maximum(ref + b, 0) + rr, 6), mag + np.abs(b) + np.abs(rr))
    spec = bf16.ConvSpec(N, H, W, C, OC, K, K, (1, 1), (1,) * 4, (1, 1), "NHWC", C, hswish=(1.0, 0.5), amx=True)
    y = _run(bf16.conv2d_bf16(spec), args, (N, H, W, spec.OCp))
    v = ref + b
    hs = v * np.clip(v + 3, 0, 6) / 6 + 0.5
    _close(y[..., :OC], hs, (mag + np.abs(b)) * (1 + np.abs(v)))
    assert np.all(y[..., OC:] == 0)


@needs_amx
@pytest.mark.parametrize("case", [CONVS[3], CONVS[8], CONVS[9]], ids=["3x3", "5x5s3", "stem"])
def test_amx_block_orders_give_the_same_bits(case, monkeypatch):
    """amx.rows_first picks the order threads split the blocks in (by rows or by channel blocks) from the sizes;
    both orders compute every block alike, so the outputs are equal bit for bit."""
    from graphopt.targets import amx
    N, C, H, W, OC, K, st, pd, dil, layout, in_bf16, out_bf16 = case
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    spec = bf16.ConvSpec(N, H, W, C, OC, K, K, (st, st), (pd,) * 4, (dil, dil), layout, C, act=(0.0, None),
                         in_bf16=in_bf16, out_bf16=out_bf16, amx=True)
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    xin = bf16.bf16_bits(xin) if in_bf16 else xin
    args = [xin, bf16.conv_weight(spec, rng.standard_normal((OC, C, K, K)).astype(np.float32)),
            bf16.padded_bias(rng.standard_normal(OC).astype(np.float32), OC, spec.OCp)]
    outs = []
    for first in (True, False):
        monkeypatch.setattr(amx, "rows_first", lambda g, first=first: first)
        outs.append(_run(bf16.conv2d_bf16(spec), args, (N, spec.OH, spec.OW, spec.OCp),
                         "uint16" if out_bf16 else "float32"))
    assert np.array_equal(outs[0], outs[1])
    assert np.any(outs[0] != 0)


@needs_amx
@pytest.mark.parametrize("M,K,N,Kphys", [(32, 256, 64, 0), (50, 70, 40, 80), (196, 384, 1000, 0)])
def test_amx_dense_kernel_matches_numpy(M, K, N, Kphys):
    rng = np.random.default_rng(M + K + N)
    spec = bf16.DenseSpec(M, K, N, Kphys, (-1.0, 1.0), amx=True)
    assert amx_kernels.dense_fits(spec)
    a = rng.standard_normal((M, max(K, Kphys))).astype(np.float32)
    a[:, K:] = 0                                   # another kernel's zero padding
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    y = _run(bf16.dense_bf16(spec), [a, bf16.pack_dense_weight(w, spec.K2w), bf16.padded_bias(b, N, spec.Np)],
             (M, spec.Np))
    ref = np.clip(_rounded(a[:, :K]) @ _rounded(w).T + b, -1, 1)
    _close(y[:, :N], ref, np.abs(_rounded(a[:, :K])) @ np.abs(_rounded(w)).T + np.abs(b))


def _asm(path):
    return subprocess.run([OBJDUMP, "-d", str(path)], capture_output=True, text=True, check=True).stdout


def _conv_dense_model(batch=1):
    """3x3 conv (32 -> 64, relu) -> 1x1 conv (64 -> 48) + a 1x1 projection of x (32 -> 48) -> NHWC -> MatMul over
    the channels of every pixel (64 rows, 48 -> 40): a 3x3 conv, 1x1 convs, a residual add and a dense layer."""
    from onnx import helper
    from onnx_builders import model, rnd, vi
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
             helper.make_node("Conv", ["x", "w3"], ["c3"]),
             helper.make_node("Add", ["c2", "c3"], ["s"]),
             helper.make_node("Transpose", ["s"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t", "w4"], ["y"])]
    inits = [("w1", rnd(64, 32, 3, 3, scale=0.1)), ("b1", rnd(64)), ("w2", rnd(48, 64, 1, 1, scale=0.2)),
             ("b2", rnd(48)), ("w3", rnd(48, 32, 1, 1, scale=0.2)), ("w4", rnd(48, 40, scale=0.2))]
    return model(nodes, [vi("x", [batch, 32, 8, 8])], [vi("y", None)], inits)


@needs_amx
def test_small_model_on_amx_matches_onnxruntime(tmp_path):
    """compile --precision bf16 on an AMX host: the convs and the dense layer run on AMX tiles (tdpbf16ps in the
    library), within the bf16 bound of onnxruntime fp32."""
    import onnx

    import graphopt
    path = tmp_path / "m.onnx"
    onnx.save(_conv_dense_model(), str(path))
    art = graphopt.compile(str(path), out=tmp_path / "a", target_options={"precision": "bf16"}, measure=False)
    rep = art.report
    assert rep["bf16_dot"] == "amx" and rep["bf16_conv2d"] == 3 and rep["bf16_dense"] == 1
    assert rep["bf16_amx"] == 4 and rep["fp32_convs"] == 0
    assert rep["check"]["ok"] and rep["check"]["max_relative_error"] < 0.05
    if OBJDUMP:
        assert "tdpbf16ps" in _asm(tmp_path / "a" / "model.so")


@needs_amx
def test_avx512bf16_path_without_amx(tmp_path):
    """The same model for an mcpu without AMX (cooperlake): no AMX kernel, vdpbf16ps only, the same check."""
    import onnx

    import graphopt
    path = tmp_path / "m.onnx"
    onnx.save(_conv_dense_model(), str(path))
    art = graphopt.compile(str(path), out=tmp_path / "a", target_options={"precision": "bf16", "mcpu": "cooperlake"},
                           measure=False)
    rep = art.report
    assert rep["bf16_dot"] == "avx512bf16" and rep["bf16_amx"] == 0 and rep["bf16_conv2d"] == 3
    assert rep["check"]["ok"] and rep["check"]["max_relative_error"] < 0.05
    if OBJDUMP:
        asm = _asm(tmp_path / "a" / "model.so")
        assert "vdpbf16ps" in asm and "tdpbf16ps" not in asm and "ldtilecfg" not in asm


@needs_amx
def test_resnet_bf16_on_amx(zoo_onnx, tmp_path):
    import graphopt
    art = graphopt.compile(str(zoo_onnx("resnet")), out=tmp_path / "r", target_options={"precision": "bf16"},
                           measure=False)
    rep = art.report
    assert rep["bf16_dot"] == "amx" and rep["bf16_amx"] > 0 and rep["fp32_convs"] == 0
    assert rep["check"]["ok"] and rep["check"]["max_relative_error"] < 0.05
