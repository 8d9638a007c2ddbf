"""targets/int8 on AMX (tdpbusd): which shapes the AMX kernels take, the AMX conv / dense kernels bit-exact against
the VNNI kernels of the same spec (and the s32 accumulators against numpy), and quantized models compiled with AMX
equal to the same models compiled without it (mcpu cooperlake: vpdpbusd only) and within onnxruntime's QDQ result
by the int8 tests' criterion (one quantization step). The kernel and model tests are skipped where the CPU lacks
AMX."""
import numpy as np
import pytest

from graphopt.targets.x86_isa import host_flags

tvm = pytest.importorskip("tvm")
from graphopt.targets import int8 as ci  # noqa: E402
from graphopt.targets.int8 import amx_kernels  # noqa: E402
from graphopt.targets.int8.kernels import conv_weight, dense_weight  # noqa: E402
from targets.int8_reference import reference_acc_conv  # noqa: E402
from targets.test_cpu_amx import OBJDUMP, _asm, _target  # noqa: E402

HAS_AMX = {"amx_tile", "amx_int8", "avx512_vnni"} <= host_flags()
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="host has no AMX (amx_tile, amx_int8) with AVX-512 VNNI")


def _run(func, args, out_shape, out_dtype):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=_target())
    y = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


@pytest.mark.parametrize("mcpu,mattr,amx", [
    ("sapphirerapids", (), True), ("sapphirerapids", ("-amx-tile",), False), ("cooperlake", (), False),
    ("znver4", (), False), ("skylake-avx512", (), False)])
def test_int8_amx_follows_the_target(mcpu, mattr, amx):
    assert ci.int8_amx(_target(mcpu, mattr)) == amx


@pytest.mark.parametrize("case,fits", [
    ((1, 56, 56, 64, 64, 3, 1, 1), True), ((1, 7, 7, 512, 512, 3, 1, 1), True),
    ((1, 56, 56, 64, 128, 1, 2, 0), True),       # 1x1 stride 2: a subsampled stage
    ((1, 224, 224, 3, 64, 7, 2, 3), True),       # ResNet's stem: a strip of 7 taps x 3 channels, 6 quads
    ((1, 224, 224, 3, 32, 3, 2, 1), False),      # MobileNetV2's stem: a strip of 3 quads, VNNI is faster
    ((1, 4, 4, 64, 64, 1, 1, 0), False),         # 16 pixels: fewer than a block's 32 rows
    ((1, 56, 56, 12, 64, 1, 1, 0), False),       # 3 quads, nothing to fold: too little for a tile step
    ((1, 112, 112, 16, 96, 1, 1, 0), False),     # a 1x1 conv of 4 quads: no faster than VNNI
], ids=["3x3-56", "3x3-7", "1x1-s2", "stem", "mbv2-stem", "tiny", "12ch-1x1",
                                                   "16ch-1x1"])
def test_amx_takes_the_shapes_it_runs_well(case, fits):
    N, H, W, C, OC, K, st, pd = case
    spec = ci.ConvSpec(N, H, W, C, OC, K, K, (st, st), (pd,) * 4, amx=True)
    assert amx_kernels.conv_fits(spec) == fits
    assert not amx_kernels.conv_fits(ci.ConvSpec(N, H, W, C, OC, K, K, (st, st), (pd,) * 4))
    assert amx_kernels.dense_fits(ci.DenseSpec(32, 64, 10, amx=True))
    assert not amx_kernels.dense_fits(ci.DenseSpec(1, 512, 1000, amx=True))


def _q_epilogue(rng, OC, dt="uint8"):
    zy = 7 if dt == "uint8" else -3
    lo, hi = (float(zy), 255.0) if dt == "uint8" else (float(zy), 127.0)
    return ci.Epilogue(mode="q", out_dtype=dt, zy=zy, lo=lo, hi=hi), rng.uniform(1e-3, 1e-2, OC).astype(np.float32)


CONVS = [  # N, C, Cphys, H, W, OC, K, stride, pad, layout, dtype
    (1, 64, 64, 8, 8, 64, 1, 1, 0, "NHWC", "uint8"),       # 1x1 reading its input in place
    (1, 24, 32, 8, 6, 64, 1, 1, 0, "NHWC", "uint8"),       # 1x1 in place over 8 physical quads (2 of them padding)
    (2, 32, 48, 9, 7, 48, 1, 1, 0, "NHWC", "int8"),        # 1x1 over padded channels, s8, a 16-channel last block
    (1, 64, 64, 13, 11, 80, 1, 2, 0, "NHWC", "uint8"),     # 1x1 stride 2
    (1, 64, 64, 10, 9, 64, 3, 1, 1, "NHWC", "uint8"),      # 3x3: padding columns computed and dropped
    (2, 24, 32, 10, 9, 32, 3, 1, 1, "NHWC", "int8"),       # 3x3 s8 over padded channels, 6 quads a step
    (1, 32, 32, 15, 13, 48, 3, 2, 1, "NHWC", "uint8"),     # 3x3 stride 2: phases
    (1, 20, 20, 12, 12, 32, 3, 2, 1, "NCHW", "uint8"),     # NCHW input, stride 2
    (1, 16, 16, 20, 20, 32, 5, 2, 2, "NCHW", "int8"),      # 5x5 stride 2, 4 quads a step
    (1, 96, 96, 7, 7, 64, 3, 1, 1, "NHWC", "uint8"),       # 24 quads: two steps of 16, the second half zeros
    (1, 3, 3, 30, 28, 64, 7, 2, 3, "NCHW", "uint8"),       # a stem: a strip of 7 taps x 3 channels
    (2, 3, 16, 17, 19, 48, 7, 2, 3, "NHWC", "int8"),       # a strip from a padded NHWC s8 input, odd sizes
    (1, 5, 5, 20, 20, 32, 3, 1, 1, "NCHW", "uint8"),       # a strip, stride 1: 15 bytes, 4 quads
    (1, 12, 12, 14, 14, 32, 7, 1, 3, "NCHW", "uint8"),     # a strip of 84 bytes: two steps of 16 quads
]


@needs_amx
@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"{c[1]}({c[2]})x{c[3]}x{c[4]}-{c[5]}-k{c[6]}s{c[7]}-{c[9]}"
                                                      f"-{c[10]}")
@pytest.mark.parametrize("order", ["by-size", "by-channels"])
def test_amx_conv_kernel_equals_vnni(case, order, monkeypatch):
    """order: amx.rows_first as the sizes pick it (by rows at these sizes) or forced to split by channel blocks."""
    from graphopt.targets import amx
    if order == "by-channels":
        monkeypatch.setattr(amx, "rows_first", lambda g: False)
    N, C, Cphys, H, W, OC, K, st, pd, layout, dt = case
    rng = np.random.default_rng(sum(case[:9]))
    lo, hi = (0, 256) if dt == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, (N, C, H, W)).astype(dt)
    w = rng.integers(-128, 128, (OC, C, K, K)).astype(np.int8)
    zx = int(rng.integers(lo, hi))
    zx_u = zx + (128 if dt == "int8" else 0)
    if layout == "NCHW":
        xin = x
    else:                                          # another kernel's NHWC output: channels padded with zeros
        xin = np.zeros((N, H, W, Cphys), dt)
        xin[..., :C] = x.transpose(0, 2, 3, 1)
    f = ci.Epilogue(mode="f", out_dtype="float32")
    for epi, sw in ((f, np.ones(OC, np.float32)), _q_epilogue(rng, OC)):
        out_dtype = epi.out_dtype
        spec = ci.ConvSpec(N, H, W, C, OC, K, K, (st, st), (pd,) * 4, in_layout=layout, Cphys=Cphys, in_dtype=dt,
                           zx=zx, epi=epi, amx=True)
        vnni = ci.ConvSpec(**{**spec.__dict__, "amx": False})
        assert amx_kernels.conv_fits(spec)
        bias = rng.integers(-5000, 5000, OC).astype(np.int32) if epi.mode == "q" else None
        Bi, M, Bf = ci.epilogue_constants(w, 0.02 if bias is not None else 1.0, sw, zx_u, bias, None,
                                          0.37 if bias is not None else None, spec.OCp)
        shape = (N, spec.OH, spec.OW, spec.OCp)
        y = _run(ci.conv2d_int8(spec, "vnni", 2), [xin, conv_weight(spec, w), Bi, M, Bf], shape, out_dtype)
        ref = _run(ci.conv2d_int8(vnni, "vnni", 2), [xin, conv_weight(vnni, w), Bi, M, Bf], shape, out_dtype)
        assert np.array_equal(y, ref)
        if epi.mode == "f":                        # unit scales: the s32 accumulators themselves (|acc| < 2^24)
            assert np.array_equal(y[..., :OC].astype(np.int64), reference_acc_conv(x, w, spec))
            assert np.all(y[..., OC:] == 0)


@needs_amx
def test_amx_conv_kernel_fused_residual_equals_vnni():
    rng = np.random.default_rng(5)
    N, C, H, W, OC = 1, 32, 8, 8, 48
    x = rng.integers(0, 256, (N, H, W, C)).astype(np.uint8)
    w = rng.integers(-127, 128, (OC, C, 3, 3)).astype(np.int8)
    r = rng.integers(0, 256, (N, H, W, 48)).astype(np.uint8)
    epi = ci.Epilogue(mode="qadd", out_dtype="uint8", zy=0, lo=0, hi=255, s1=0.05, z1=9, lo1=0, hi1=255,
                      res_dtype="uint8", sr=0.03, zr=120, s2=0.07, act2_lo=0.0)
    sw = rng.uniform(1e-3, 3e-3, OC).astype(np.float32)
    Bi, M, Bf = ci.epilogue_constants(w, 0.01, sw, 3, None, None, 0.05, 48)
    outs = []
    for amx in (True, False):
        spec = ci.ConvSpec(N, H, W, C, OC, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "NHWC", C, "uint8", 3, epi, amx)
        assert amx_kernels.conv_fits(spec) == amx
        outs.append(_run(ci.conv2d_int8(spec, "vnni", 2, residual=True), [x, conv_weight(spec, w), Bi, M, Bf, r],
                         (N, H, W, 48), "uint8"))
    assert np.array_equal(*outs)


@needs_amx
@pytest.mark.parametrize("M,K,N,Kphys,dt", [(64, 256, 100, 0, "uint8"), (50, 70, 40, 80, "uint8"),
                                            (196, 384, 1000, 0, "int8"), (33, 16, 16, 0, "uint8")])
def test_amx_dense_kernel_equals_vnni(M, K, N, Kphys, dt):
    rng = np.random.default_rng(M + K + N)
    lo, hi = (0, 256) if dt == "uint8" else (-128, 128)
    a = rng.integers(lo, hi, (M, max(K, Kphys))).astype(dt)
    a[:, K:] = 0                                   # another kernel's zero padding
    w = rng.integers(-128, 128, (N, K)).astype(np.int8)
    zx = int(rng.integers(lo, hi))
    zx_u = zx + (128 if dt == "int8" else 0)
    f = ci.Epilogue(mode="f", out_dtype="float32")
    for epi, sw in ((f, np.ones(N, np.float32)), _q_epilogue(rng, N, "int8")):
        spec = ci.DenseSpec(M, K, N, Kphys, dt, zx, epi, amx=True)
        vnni = ci.DenseSpec(M, K, N, Kphys, dt, zx, epi)
        assert amx_kernels.dense_fits(spec)
        q = epi.mode == "q"
        Bi, Mm, Bf = ci.epilogue_constants(w, 0.02 if q else 1.0, sw, zx_u, None, None, 0.3 if q else None, spec.Np)
        y = _run(ci.dense_int8(spec, "vnni", 2), [a, dense_weight(spec, w), Bi, Mm, Bf], (M, spec.Np),
                 epi.out_dtype)
        ref = _run(ci.dense_int8(vnni, "vnni", 2), [a, dense_weight(vnni, w), Bi, Mm, Bf], (M, spec.Np),
                   epi.out_dtype)
        assert np.array_equal(y, ref)
        if not q:
            assert np.array_equal(y[:, :N].astype(np.int64), (a[:, :K].astype(np.int64) - zx) @ w.T.astype(np.int64))


def _model():
    """3x3 conv (16 -> 32, relu) -> 3x3 stride-2 conv (32 -> 64, relu) -> 1x1 conv (64 -> 48) + a 1x1 stride-2
    projection (32 -> 48) -> add, relu -> NHWC -> MatMul over the channels of every pixel (64 rows, 48 -> 40)."""
    from onnx import helper
    from onnx_builders import model, rnd, vi
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4, strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"]),
             helper.make_node("Conv", ["r1", "w4"], ["c4"], strides=[2, 2]),
             helper.make_node("Add", ["c3", "c4"], ["s"]),
             helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t", "w5"], ["y"])]
    inits = [("w1", rnd(32, 16, 3, 3, scale=0.2)), ("b1", rnd(32)), ("w2", rnd(64, 32, 3, 3, scale=0.1)),
             ("b2", rnd(64)), ("w3", rnd(48, 64, 1, 1, scale=0.2)), ("b3", rnd(48)),
             ("w4", rnd(48, 32, 1, 1, scale=0.2)), ("w5", rnd(48, 40, scale=0.2))]
    return model(nodes, [vi("x", [1, 16, 16, 16])], [vi("y", None)], inits)


def _compile_both(path, tmp_path, calib):
    """The model quantized (QDQ, calib data) and compiled for this host (AMX) and for cooperlake (VNNI only)."""
    import graphopt
    arts = {}
    for label, opts in (("amx", {}), ("vnni", {"mcpu": "cooperlake"})):
        arts[label] = graphopt.compile(str(path), target="cpu", out=tmp_path / label, pipeline="quantize",
                                       data={"calib": {"x": calib}}, target_options=opts, measure=False)
    return arts


@needs_amx
def test_small_quantized_model_on_amx_equals_vnni_and_onnxruntime(tmp_path):
    import onnx

    from graphopt import ort
    from graphopt.passes.quantize import check_criterion, within_quant_steps
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    rng = np.random.default_rng(0)
    arts = _compile_both(path, tmp_path, rng.standard_normal((16, 16, 16, 16)).astype(np.float32))
    amx, vnni = arts["amx"].report, arts["vnni"].report
    assert amx["int8_dot"] == vnni["int8_dot"] == "vnni"
    assert amx["conv2d"] == 4 and amx["dense"] == 1 and amx["int8_amx"] == 5 and vnni["int8_amx"] == 0
    assert amx["fp32_convs"] == 0 and amx["check"]["ok"] and vnni["check"]["ok"]
    qdq = onnx.load(str(arts["amx"].path / "model.onnx"))
    for _ in range(3):
        x = rng.standard_normal((1, 16, 16, 16)).astype(np.float32)
        y_amx, y_vnni = arts["amx"].run({"x": x})["y"], arts["vnni"].run({"x": x})["y"]
        assert np.array_equal(y_amx, y_vnni)
        ref = ort.run(qdq, {"x": x})["y"]
        assert within_quant_steps({"y": ref}, {"y": y_amx}, check_criterion(qdq))["ok"]
    if OBJDUMP:
        assert "tdpbusd" in _asm(arts["amx"].path / "model.so")
        asm = _asm(arts["vnni"].path / "model.so")
        assert "vpdpbusd" in asm and "tdpbusd" not in asm and "ldtilecfg" not in asm


@needs_amx
def test_resnet_int8_on_amx_equals_vnni(zoo_onnx, tmp_path):
    rng = np.random.default_rng(1)
    path = zoo_onnx("resnet")
    import graphopt
    shape = tuple(graphopt.load(path).inputs[0].shape)
    arts = _compile_both(path, tmp_path, rng.standard_normal((16,) + shape[1:]).astype(np.float32))
    amx = arts["amx"].report
    assert amx["int8_amx"] > 0 and amx["fp32_convs"] == 0 and amx["check"]["ok"] and arts["vnni"].report["check"]["ok"]
    x = rng.standard_normal((1,) + shape[1:]).astype(np.float32)
    name = graphopt.load(path).outputs[0].name
    assert np.array_equal(arts["amx"].run({"x": x})[name], arts["vnni"].run({"x": x})[name])
