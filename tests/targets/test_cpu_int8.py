"""targets/cpu_int8: the u8 x s8 -> s32 kernels are exact against numpy (VNNI and the AVX2 fallback), the x86
library really uses vpdpbusd (and the fallback never vpmaddubsw), quantized graphs compiled through the Relax
rewrite match onnxruntime on the same QDQ model.onnx within one quantization step, and the accuracy budgets on
real data (scikit-learn digits) hold on the compiled library: CNN <= 0.5 points, MobileNetV2-style <= 1 point."""
import shutil
import subprocess
import warnings

import numpy as np
import onnx
import pytest
import torch
import tvm

from graphopt.datasets import train_classifier
import torch.nn as nn
from onnx import helper

import digits
import graphopt
import onnx_builders as ob
from graphopt import PassContext, PassManager, ort
from graphopt.graph import to_onnx
from graphopt.passes.quantize import check_criterion, within_quant_steps
from graphopt.targets import int8 as ci
from targets.int8_reference import reference_acc_conv
from graphopt.targets import tvm_lowering
from graphopt.targets.cpu import CpuTarget
from graphopt.targets.x86_isa import host_flags

tvm = pytest.importorskip("tvm")

HAS_VNNI = "avx512_vnni" in host_flags()
HAS_AVX2 = "avx2" in host_flags()
OBJDUMP = shutil.which("objdump")
DOTS = [pytest.param("vnni", marks=pytest.mark.skipif(not HAS_VNNI, reason="host has no AVX-512 VNNI")),
        pytest.param("avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="host has no AVX2"))]


def _target(dot):
    mcpu = "cascadelake" if dot == "vnni" else "haswell"
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})


def _build(func, dot):
    return tvm.compile(tvm.IRModule({"main": func}), target=_target(dot))


def _disasm(path) -> str:
    return subprocess.run([OBJDUMP, "-d", str(path)], capture_output=True, text=True, check=True).stdout


# ---------------------------------------------------------------------------------------------------------------
# kernels against numpy
# ---------------------------------------------------------------------------------------------------------------

CONVS = [  # N, C, H, W, OC, K, stride, pad, layout, dtype
    (1, 3, 13, 11, 20, 3, 1, 1, "NCHW", "uint8"),
    (1, 16, 8, 8, 32, 3, 2, 1, "NHWC", "uint8"),
    (1, 32, 7, 7, 48, 1, 1, 0, "NHWC", "uint8"),
    (2, 8, 9, 9, 16, 3, 1, 1, "NCHW", "int8"),
    (1, 5, 10, 10, 24, 5, 2, 2, "NCHW", "uint8"),
    (1, 16, 6, 8, 48, 1, 1, 0, "NHWC", "uint8"),    # short reduction: the smaller tile (kernels.SHORT_TILE_ACC)
]


def _run(lib, args, out_shape, out_dtype):
    y = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


@pytest.mark.parametrize("dot", DOTS)
@pytest.mark.parametrize("case", CONVS, ids=lambda c: "x".join(map(str, c[:6])) + f"-s{c[6]}-{c[8]}-{c[9]}")
def test_conv_kernel_is_exact(case, dot):
    N, C, H, W, OC, K, st, pd, layout, dt = case
    rng = np.random.default_rng(sum(case[:6]))
    lo, hi = (0, 256) if dt == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, (N, C, H, W)).astype(dt)
    w = rng.integers(-128, 128, (OC, C, K, K)).astype(np.int8)   # -128 included: worst-case products
    zx = int(rng.integers(lo, hi))
    spec = ci.ConvSpec(N, H, W, C, OC, K, K, (st, st), (pd,) * 4, in_layout=layout, Cphys=C, in_dtype=dt, zx=zx,
                       epi=ci.Epilogue(mode="f", out_dtype="float32"))
    acc = reference_acc_conv(x, w, spec)
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    zx_u = zx + (128 if dt == "int8" else 0)
    # mode f with unit scales: the fp32 output is the s32 accumulator itself (|acc| < 2^24)
    Bi, M, Bf = ci.epilogue_constants(w, 1.0, np.ones(OC, np.float32), zx_u, None, None, None, spec.OCp)
    lib = _build(ci.conv2d_int8(spec, dot, 2), dot)
    out_shape = (N, spec.OH, spec.OW, spec.OCp)
    y = _run(lib, [xin, ci.pack_conv_weight(w, spec.C4, dot), Bi, M, Bf], out_shape, "float32")
    assert np.array_equal(y[..., :OC].astype(np.int64), acc)
    assert np.all(y[..., OC:] == 0)
    # mode q: bias, requantize, relu bounds
    bias = rng.integers(-5000, 5000, OC).astype(np.int32)
    sx, sw, sy, zy = 0.02, rng.uniform(1e-3, 1e-2, OC).astype(np.float32), 0.37, 7
    spec.epi = ci.Epilogue(mode="q", out_dtype="uint8", zy=zy, lo=float(zy), hi=255.0)
    Bi, M, Bf = ci.epilogue_constants(w, sx, sw, zx_u, bias, None, sy, spec.OCp)
    lib = _build(ci.conv2d_int8(spec, dot, 2), dot)
    q = _run(lib, [xin, ci.pack_conv_weight(w, spec.C4, dot), Bi, M, Bf], out_shape, "uint8")
    real = (acc + bias).astype(np.float64) * (np.float32(sx) * sw.astype(np.float64))
    ref = np.clip(np.rint(real / sy) + zy, zy, 255)
    d = np.abs(q[..., :OC].astype(np.int64) - ref)
    assert d.max() <= 1 and np.mean(d == 0) > 0.999


@pytest.mark.parametrize("dot", DOTS)
def test_conv_kernel_fused_residual(dot):
    rng = np.random.default_rng(5)
    N, C, H, W, OC = 1, 16, 6, 6, 32
    x = rng.integers(0, 256, (N, H, W, C)).astype(np.uint8)
    w = rng.integers(-127, 128, (OC, C, 3, 3)).astype(np.int8)
    r = rng.integers(0, 256, (N, H, W, OC)).astype(np.uint8)
    zx, s1, z1, sr, zr, s2, z2 = 3, 0.05, 9, 0.03, 120, 0.07, 0
    sx, sw = 0.01, rng.uniform(1e-3, 3e-3, OC).astype(np.float32)
    epi = ci.Epilogue(mode="qadd", out_dtype="uint8", zy=z2, lo=0, hi=255, s1=s1, z1=z1, lo1=0, hi1=255,
                      res_dtype="uint8", sr=sr, zr=zr, s2=s2)
    spec = ci.ConvSpec(N, H, W, C, OC, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "NHWC", C, "uint8", zx, epi)
    Bi, M, Bf = ci.epilogue_constants(w, sx, sw, zx, None, None, s1, spec.OCp)
    lib = _build(ci.conv2d_int8(spec, dot, 2, residual=True), dot)
    y = _run(lib, [x, ci.pack_conv_weight(w, spec.C4, dot), Bi, M, Bf, r], (N, H, W, OC), "uint8")
    acc = reference_acc_conv(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), w, spec)
    t = np.clip(np.rint(acc * (np.float32(sx) * sw.astype(np.float64)) / s1) + z1, 0, 255)
    ref = np.clip(np.rint(((t - z1) * s1 + (r.astype(np.float64) - zr) * sr) / s2) + z2, 0, 255)
    d = np.abs(y.astype(np.int64) - ref)
    assert d.max() <= 1 and np.mean(d == 0) > 0.999


@pytest.mark.parametrize("dot", DOTS)
@pytest.mark.parametrize("M,K,N,dt", [(1, 512, 1000, "uint8"), (4, 30, 10, "uint8"), (3, 64, 48, "int8")])
def test_dense_kernel_is_exact(M, K, N, dt, dot):
    rng = np.random.default_rng(M + K + N)
    lo, hi = (0, 256) if dt == "uint8" else (-128, 128)
    a = rng.integers(lo, hi, (M, K)).astype(dt)
    w = rng.integers(-128, 128, (N, K)).astype(np.int8)
    zx = int(rng.integers(lo, hi))
    spec = ci.DenseSpec(M, K, N, 0, dt, zx, ci.Epilogue(mode="f", out_dtype="float32"))
    zx_u = zx + (128 if dt == "int8" else 0)
    Bi, Mm, Bf = ci.epilogue_constants(w, 1.0, np.ones(N, np.float32), zx_u, None, None, None, spec.Np)
    lib = _build(ci.dense_int8(spec, dot, 2), dot)
    y = _run(lib, [a, ci.pack_dense_weight(w, spec.K4, dot), Bi, Mm, Bf], (M, spec.Np), "float32")
    ref = (a.astype(np.int64) - zx) @ w.T.astype(np.int64)
    assert np.array_equal(y[:, :N].astype(np.int64), ref)


@pytest.mark.parametrize("dot", DOTS)
@pytest.mark.parametrize("K,pd", [(1, 0), (3, 1)], ids=["1x1-direct", "3x3-padded"])
def test_conv_reads_only_the_logical_channels_of_a_padded_nhwc_input(K, pd, dot):
    """An NHWC input another kernel left with its channels padded to 16 (24 -> 32): the conv reduces over the 24
    logical channels (6 quads, not 8), in place for a 1x1 conv without padding; the padded channels' values (garbage
    here) never reach the sums."""
    rng = np.random.default_rng(7)
    C, Cphys, OC, H = 24, 32, 40, 9
    x = rng.integers(0, 256, (1, H, H, Cphys)).astype(np.uint8)
    w = rng.integers(-128, 128, (OC, C, K, K)).astype(np.int8)
    zx = 5
    spec = ci.ConvSpec(1, H, H, C, OC, K, K, (1, 1), (pd,) * 4, in_layout="NHWC", Cphys=Cphys, in_dtype="uint8",
                       zx=zx, epi=ci.Epilogue(mode="f", out_dtype="float32"))
    assert spec.C4 == 24
    acc = reference_acc_conv(np.ascontiguousarray(x[..., :C].transpose(0, 3, 1, 2)), w, spec)
    Bi, M, Bf = ci.epilogue_constants(w, 1.0, np.ones(OC, np.float32), zx, None, None, None, spec.OCp)
    y = _run(_build(ci.conv2d_int8(spec, dot, 2), dot), [x, ci.pack_conv_weight(w, spec.C4, dot), Bi, M, Bf],
             (1, spec.OH, spec.OW, spec.OCp), "float32")
    assert np.array_equal(y[..., :OC].astype(np.int64), acc)


@pytest.mark.parametrize("C,H,K,st,layout,dt", [(24, 9, 3, 1, "NHWC", "uint8"), (20, 10, 3, 2, "NCHW", "uint8"),
                                                 (32, 7, 5, 1, "NCHW", "int8"), (48, 16, 3, 1, "NHWC", "uint8"),
                                                 (32, 11, 3, 2, "NHWC", "int8")])   # strided: no padded copy
def test_depthwise_kernel_is_exact(C, H, K, st, layout, dt):
    rng = np.random.default_rng(C + H)
    lo, hi = (0, 256) if dt == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, (1, C, H, H)).astype(dt)
    w = rng.integers(-128, 128, (C, 1, K, K)).astype(np.int8)
    zx, pd = int(rng.integers(lo, hi)), K // 2
    spec = ci.ConvSpec(1, H, H, C, C, K, K, (st, st), (pd,) * 4, (1, 1), layout, C, dt, zx,
                       ci.Epilogue(mode="f", out_dtype="float32"))
    Bi, M, Bf = ci.epilogue_constants(w, 1.0, np.ones(C, np.float32), zx + (128 if dt == "int8" else 0), None, None,
                                      None, spec.OCp)
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    lib = tvm.compile(tvm.IRModule({"main": ci.dwconv2d_int8(spec, 2)}), target=_target("avx2"))
    y = _run(lib, [xin, ci.pack_dw_weight(w), Bi, M, Bf], (1, spec.OH, spec.OW, spec.OCp), "float32")
    xp = np.pad(x.astype(np.int64) - zx, ((0, 0), (0, 0), (pd, pd), (pd, pd)))
    ref = np.zeros((1, C, spec.OH, spec.OW), np.int64)
    for i in range(K):
        for j in range(K):
            ref += xp[:, :, i:i + st * spec.OH:st, j:j + st * spec.OW:st] * w[None, :, 0, i, j, None, None].astype(np.int64)
    assert np.array_equal(y[..., :C].astype(np.int64), ref.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("dt", ["uint8", "int8"])
def test_maxpool_kernel_is_exact(dt):
    rng = np.random.default_rng(2)
    N, H, W, C, K, S, P = 1, 11, 12, 32, 3, 2, 1
    OH, OW = (H + 2 * P - K) // S + 1, (W + 2 * P - K) // S + 1
    lo, hi = (0, 256) if dt == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, (N, H, W, C)).astype(dt)
    f = ci.maxpool_int8(N, H, W, C, OH, OW, (K, K), (S, S), (P, P, P, P), (1, 1), dt)
    y = _run(tvm.compile(tvm.IRModule({"main": f}), target=_target("avx2")), [x], (N, OH, OW, C), dt)
    xp = np.pad(x.astype(np.int64), ((0, 0), (P, P), (P, P), (0, 0)), constant_values=-1000)
    ref = np.full((N, OH, OW, C), -1000)
    for i in range(K):
        for j in range(K):
            ref = np.maximum(ref, xp[:, i:i + S * OH:S, j:j + S * OW:S, :])
    assert np.array_equal(y.astype(np.int64), ref)


@pytest.mark.skipif(OBJDUMP is None or not (HAS_VNNI and HAS_AVX2), reason="needs objdump and a VNNI host")
def test_instructions(tmp_path):
    spec = ci.ConvSpec(1, 8, 8, 16, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "NHWC", 16, "uint8", 0, ci.Epilogue())
    for dot in ("vnni", "avx2"):
        p = tmp_path / f"{dot}.so"
        _build(ci.conv2d_int8(spec, dot, 2), dot).export_library(str(p))
        asm = _disasm(p)
        assert ("vpdpbusd" in asm) == (dot == "vnni")
        assert "vpmaddubsw" not in asm         # saturating int16 pair sums: never used


@pytest.mark.skipif(not HAS_VNNI, reason="host has no AVX-512 VNNI")
@pytest.mark.parametrize("kind", ["conv", "residual", "depthwise"])
def test_epilogues_are_vector_code(kind):
    """The requantize epilogues round with a vectorizable llvm.nearbyint: tirx.nearbyint is registered not
    vectorizable in TVM 0.27 and turned every epilogue into scalar code (MobileNetV2 int8: 2.9 -> 1.85 ms)."""
    epi = ci.Epilogue(mode="q", out_dtype="uint8", zy=3, lo=3.0, hi=255.0)
    if kind == "residual":
        epi = ci.Epilogue(mode="qadd", out_dtype="uint8", zy=120, lo=0, hi=255, s1=0.05, z1=128, lo1=0, hi1=255,
                          res_dtype="uint8", sr=0.03, zr=120, s2=0.07)
    spec = ci.ConvSpec(1, 8, 8, 32, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "NHWC", 32, "uint8", 5, epi)
    func = ci.dwconv2d_int8(spec, 2) if kind == "depthwise" else \
        ci.conv2d_int8(spec, "vnni", 2, residual=kind == "residual")
    ll = _build(func, "vnni").mod.inspect_source("ll")
    assert "<16 x float> @llvm.nearbyint.v16f32" in ll
    assert "float @llvm.nearbyint.f32(" not in ll


def test_quantizing_division_of_the_residual_epilogue_is_exact_without_a_divide():
    """The fused residual's last QuantizeLinear divides by its scale (as onnxruntime's does; a multiply by 1/scale
    differs on rounding ties): the epilogue computes the correctly rounded quotient with two FMAs
    (epilogue.divide_exact) instead of vdivps, and cpu_vector_math leaves that form alone."""
    from graphopt.targets.cpu_vector_math import vectorizable_math
    epi = ci.Epilogue(mode="qadd", out_dtype="uint8", zy=120, lo=0, hi=255, s1=0.05, z1=128, lo1=0, hi1=255,
                      res_dtype="uint8", sr=0.03, zr=120, s2=0.07)
    spec = ci.ConvSpec(1, 4, 4, 16, 16, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), "NHWC", 16, "uint8", 5, epi)
    script = vectorizable_math(ci.conv2d_int8(spec, "vnni", 1, residual=True)).script()
    assert '"llvm.fma"' in script and ") / T.float32(0.07" not in script


@pytest.mark.parametrize("b", [0.0235, 1 / 3, 0.007843137, 0.05511, 12.5])
def test_divide_exact_is_the_correctly_rounded_quotient(b):
    """divide_exact(a, b) compiled (16 lanes) equals numpy's float32 a / b bit for bit: random values and values
    within two ulps of the ties (k + 1/2) * b, where a one-ulp error would move the rounding by a whole step."""
    from tvm import te, tirx
    from tvm.s_tir import Schedule

    from graphopt.targets.int8.epilogue import divide_exact
    n = 1 << 18
    A = te.placeholder((n,), "float32", name="A")
    Y = te.compute((n,), lambda i: divide_exact(A[i], b), name="Y")
    sch = Schedule(te.create_prim_func([A, Y]))
    _, lanes = sch.split(sch.get_loops(sch.get_sblock("Y"))[0], [None, 16])
    sch.vectorize(lanes)
    lib = tvm.compile(sch.mod, target=CpuTarget().tvm_target())
    rng = np.random.default_rng(7)
    ties = ((rng.integers(-300, 300, n // 2) + 0.5) * np.float32(b)).astype(np.float32).view(np.int32)
    ties = (ties + rng.integers(-2, 3, n // 2).astype(np.int32)).view(np.float32)
    a = np.concatenate([rng.uniform(-300 * b, 300 * b, n // 2).astype(np.float32), ties])
    y = tvm.runtime.tensor(np.zeros(n, np.float32))
    lib["main"](tvm.runtime.tensor(a), y)
    assert np.array_equal(y.numpy(), a / np.float32(b))


def test_int8_dot_selection():
    T = tvm.target.Target
    assert ci.int8_dot(T({"kind": "llvm", "mcpu": "cascadelake"})) == "vnni"
    assert ci.int8_dot(T({"kind": "llvm", "mcpu": "sapphirerapids"})) == "vnni"
    assert ci.int8_dot(T({"kind": "llvm", "mcpu": "skylake-avx512"})) == "avx2"
    assert ci.int8_dot(T({"kind": "llvm", "mcpu": "haswell"})) == "avx2"
    assert ci.int8_dot(T({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1"})) == "usdot"


# ---------------------------------------------------------------------------------------------------------------
# whole graphs: the Relax rewrite against onnxruntime on the same QDQ model
# ---------------------------------------------------------------------------------------------------------------

def _quantized(path_or_graph, calib, pipeline="quantize,lower-int8", eval_=None):
    g = graphopt.load(path_or_graph) if not hasattr(path_or_graph, "nodes") else path_or_graph
    data = {"calib": calib}
    if eval_ is not None:
        data["eval"] = eval_
    res = PassManager.parse(pipeline).run(g, PassContext(data=data))
    return to_onnx(res.graph), res


def _compile(model, tmp_path, name="m"):
    path = tmp_path / f"{name}.so"
    facts = ci.build_library(model, path, CpuTarget().tvm_target())
    return tvm_lowering.VMRunner(path), facts, path


def _check_against_ort(model, runner, feeds_list):
    crit = check_criterion(model)
    for feeds in feeds_list:
        ref = ort.run(model, feeds)
        got = dict(zip(ref, runner([feeds[i.name] for i in model.graph.input])))
        chk = within_quant_steps(ref, got, crit)
        assert chk["ok"], chk


def _top1_compiled(runner, x, y):
    return float(np.mean([np.argmax(runner([xi[None]])[0]) == yi for xi, yi in zip(x, y)]))


def _top1_ort(model, x, y):
    sess = ort.session(model)
    return float(np.mean([np.argmax(sess.run(None, {"x": xi[None]})[0]) == yi for xi, yi in zip(x, y)]))


def test_digits_cnn_int8_compiled_accuracy(tmp_path):
    """Acceptance: the digits CNN loses at most 0.5 points of top-1 in int8, measured on the compiled library."""
    x_tr, y_tr, x_te, y_te = digits.load_digits_split()
    fp32 = to_onnx(graphopt.load(str(digits.teacher_path())))
    q, _ = _quantized(str(digits.teacher_path()), {"x": x_tr[:256]})
    runner, facts, so = _compile(q, tmp_path)
    assert facts["int8_dot"] in ("vnni", "avx2")
    assert facts["conv2d"] == 3 and facts["dense"] == 1 and facts["maxpool_nhwc"] == 1 and facts["mean_nhwc"] == 1
    _check_against_ort(q, runner, [{"x": x_te[i:i + 1]} for i in range(0, 450, 50)])
    acc_fp, acc_int8 = _top1_ort(fp32, x_te, y_te), _top1_compiled(runner, x_te, y_te)
    assert acc_fp - acc_int8 <= 0.005, (acc_fp, acc_int8)
    if OBJDUMP and facts["int8_dot"] == "vnni":
        assert "vpdpbusd" in _disasm(so)


class _IR(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        h = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                   nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                   nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetV2Digits(nn.Module):
    """MobileNetV2-style (inverted residuals with depthwise 3x3, ReLU6, linear bottlenecks) for 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(_IR(16, 16, 1, 2), _IR(16, 24, 2, 4), _IR(24, 24, 1, 4), _IR(24, 32, 1, 4))
        self.head = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _train_mobilenet_v2_digits(path, epochs=8):
    x_tr, y_tr, _, _ = digits.load_digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)                    # the initial weights too: the same model on every run
        model = train_classifier(MobileNetV2Digits(), x_tr, y_tr, epochs, lr=3e-3, seed=0)
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.from_numpy(x_tr[:1]),), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                              dynamo=False, training=torch.onnx.TrainingMode.PRESERVE)
    finally:
        torch.set_num_threads(threads)


def test_mobilenet_v2_style_int8_compiled_accuracy(tmp_path):
    """Acceptance: a MobileNetV2-style model with depthwise convs loses at most 1 point (per-channel weights,
    accuracy-aware fp32 fallback), measured on the compiled library."""
    x_tr, y_tr, x_te, y_te = digits.load_digits_split()
    path = tmp_path / "mnv2.onnx"
    _train_mobilenet_v2_digits(path)
    fp32 = to_onnx(graphopt.load(path))
    q, res = _quantized(str(path), {"x": x_tr[:256]}, "quantize{max_drop=1.0},lower-int8",
                        eval_={"x": x_tr[-300:], "labels": y_tr[-300:]})
    runner, facts, _ = _compile(q, tmp_path)
    assert facts["conv2d"] >= 9 and facts["dwconv2d"] == 4 and facts["fp32_convs"] == 0
    assert facts["dwconv2d_vnni"] == (4 if facts["int8_dot"] == "vnni" else 0)   # dw_quads on every VNNI host
    assert facts["residual_fused"] >= 1
    _check_against_ort(q, runner, [{"x": x_te[i:i + 1]} for i in range(0, 450, 90)])
    acc_fp, acc_int8 = _top1_ort(fp32, x_te, y_te), _top1_compiled(runner, x_te, y_te)
    assert acc_fp >= 0.95
    assert acc_fp - acc_int8 <= 0.01, (acc_fp, acc_int8)


@pytest.mark.parametrize("name,acts", [("resnet", "u8"), ("mobilenet_v3", "u8"), ("resnet", "s8"),
                                       ("mlp_digits", "u8"), ("mobilenet_v3", "u8,ops=compute"),
                                       ("resnet", "u8,ops=compute")])
def test_zoo_models_match_onnxruntime(zoo_onnx, tmp_path, name, acts):
    """Every zoo model's QDQ graph compiles to integer kernels and matches onnxruntime on it; ops=compute too (its
    activations between the convs are fp32 or tables, the kernels' inputs still int8)."""
    path = zoo_onnx(name)
    g = graphopt.load(path)
    shape = tuple(g.inputs[0].shape)
    rng = np.random.default_rng(0)
    gen = (lambda n: rng.random((n,) + shape[1:]).astype(np.float32)) if "digits" in name else \
        (lambda n: rng.standard_normal((n,) + shape[1:]).astype(np.float32))
    q, _ = _quantized(path, {"x": gen(16)}, f"quantize{{activations={acts},calib_samples=16}},lower-int8")
    runner, facts, _ = _compile(q, tmp_path, name)
    assert facts["conv2d"] + facts["dense"] >= 2
    if name == "resnet":
        assert facts["residual_fused"] >= 1 and facts["fp32_convs"] == 0
    _check_against_ort(q, runner, [{"x": gen(1)} for _ in range(3)])


@pytest.mark.parametrize("lead", [(4,), (2, 5)], ids=["2d", "3d"])
def test_matmul_with_constant_weight(tmp_path, lead):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"], name="mm"), helper.make_node("Add", ["t", "b"], ["u"]),
             helper.make_node("Relu", ["u"], ["v"]), helper.make_node("MatMul", ["v", "w2"], ["y"], name="mm2")]
    m = ob.model(nodes, [ob.vi("x", [*lead, 40])], [ob.vi("y", [*lead, 10])],
                 [("w", ob.rnd(40, 24)), ("b", ob.rnd(24, seed=3)), ("w2", ob.rnd(24, 10, seed=4))])
    g = graphopt.load(m)
    q, _ = _quantized(g, {"x": rng.standard_normal((8, *lead, 40)).astype(np.float32)})     # 8 samples of x
    runner, facts, _ = _compile(q, tmp_path)
    assert facts["dense"] == 2 and facts["fp32_matmuls"] == 0
    _check_against_ort(q, runner, [{"x": rng.standard_normal((*lead, 40)).astype(np.float32)} for _ in range(3)])


def test_dense_layers_whose_outputs_are_added_stay_integer(tmp_path):
    """An LSTM cell's gates, x W_ih + b_ih + h W_hh + b_hh as Gemms whose quantized outputs are added (captcha-crnn's
    unrolled LSTM): the dense kernel has no residual input, so each Gemm is its own integer kernel (quantized
    output) and the add runs after them; before, the matcher took the add into the chain and then refused the
    whole Gemm, which ran in fp32 (80 of that model's Gemms)."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Gemm", ["x", "wi", "bi"], ["gi"], name="gemm_ih", transB=1),
             helper.make_node("Gemm", ["h", "wh", "bh"], ["gh"], name="gemm_hh", transB=1),
             helper.make_node("Add", ["gi", "gh"], ["y"], name="gates")]
    m = ob.model(nodes, [ob.vi("x", [1, 64]), ob.vi("h", [1, 32])], [ob.vi("y", [1, 128])],
                 [("wi", ob.rnd(128, 64)), ("bi", ob.rnd(128, seed=3)), ("wh", ob.rnd(128, 32, seed=4)),
                  ("bh", ob.rnd(128, seed=5))])
    calib = {"x": rng.standard_normal((8, 1, 64)).astype(np.float32),
             "h": np.tanh(rng.standard_normal((8, 1, 32))).astype(np.float32)}
    q, _ = _quantized(graphopt.load(m), calib)
    runner, facts, _ = _compile(q, tmp_path)
    assert facts["dense"] == 2 and facts["fp32_matmuls"] == 0
    _check_against_ort(q, runner, [{"x": rng.standard_normal((1, 64)).astype(np.float32),
                                    "h": np.tanh(rng.standard_normal((1, 32))).astype(np.float32)}
                                   for _ in range(3)])


def test_rewrite_is_the_first_pass_of_the_build_pipeline(tmp_path):
    """The int8 rewrite is a TVM module pass (graphopt.Int8Rewrite) that build() runs before TVM's own passes
    (LegalizeOps would turn the quantized chains into fp32 loops first); its facts are read back from the pass."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"], name="mm"), helper.make_node("Relu", ["t"], ["y"])]
    m = ob.model(nodes, [ob.vi("x", [4, 32])], [ob.vi("y", [4, 16])], [("w", ob.rnd(32, 16))])
    q, _ = _quantized(graphopt.load(m), {"x": rng.standard_normal((8, 4, 32)).astype(np.float32)})
    target = CpuTarget().tvm_target()
    rewrite = ci.int8_rewrite_pass(target)
    assert isinstance(rewrite, tvm.transform.ModulePass) and rewrite.info.name == "graphopt.Int8Rewrite"
    assert rewrite.info.opt_level == 0

    @tvm.instrument.pass_instrument
    class Order:
        def __init__(self):
            self.names = []

        def run_before_pass(self, _mod, info):
            self.names.append(info.name)

    order = Order()
    with tvm.transform.PassContext(instruments=[order]):
        ex = tvm_lowering.build(ci.import_qdq(q), target, passes=[rewrite])
    names = [n for n in order.names if n != "sequential"]
    assert names[0] == "graphopt.Int8Rewrite" and names.index("LegalizeOps") > 0
    assert rewrite.facts["dense"] == 1 and rewrite.facts["int8_kernels"] == 1
    tvm_lowering.export(ex, tmp_path / "m.so")
    _check_against_ort(q, tvm_lowering.VMRunner(tmp_path / "m.so"),
                       [{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(2)])


def test_fp32_and_weight_only_graphs_are_left_alone(zoo_onnx, tmp_path):
    m = to_onnx(graphopt.load(zoo_onnx("mlp_digits")))
    mod, facts = ci.import_int8(m, CpuTarget().tvm_target())
    assert facts["int8_kernels"] == 0
    w4 = to_onnx(PassManager.parse("quantize{scheme=weight_int4}").run(graphopt.load(zoo_onnx("mlp_digits"))).graph)
    folded = ci.prepare_onnx(w4)
    assert not any(n.op_type == "DequantizeLinear" for n in folded.graph.node)
    runner, facts, _ = _compile(w4, tmp_path)
    x = np.random.default_rng(0).random((1, 1, 8, 8)).astype(np.float32)
    ref = ort.run(w4, {"x": x})["y"]
    assert np.allclose(runner([x])[0], ref, rtol=1e-4, atol=1e-5)


def test_graphopt_compile_uses_int8_kernels(tmp_path):
    """Through graphopt.compile: --calib data reaches the pass, the cpu target lowers to int8 kernels, the
    self-check uses the one-step criterion, the artifact's model.onnx is the QDQ graph onnxruntime runs."""
    x_tr, y_tr, x_te, y_te = digits.load_digits_split()
    art = graphopt.compile(str(digits.teacher_path()), target="cpu", out=tmp_path / "art", pipeline="quantize",
                           data={"calib": {"x": x_tr[:128]}}, measure=False)
    rep = art.report
    assert rep["int8_kernels"] >= 3 and rep["conv2d"] == 3 and rep["check"]["ok"]
    assert "quant_step" in rep["check"]["criterion"]
    assert "lower-int8" in art.manifest["pipeline"]["legalize"]
    model = onnx.load(str(art.path / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    ref = ort.run(model, {"x": x_te[:1]})["y"]
    assert within_quant_steps({"y": ref}, {"y": art.run({"x": x_te[:1]})["y"]}, check_criterion(model))["ok"]
    acc = np.mean([np.argmax(art.run({"x": x[None]})["y"]) == y for x, y in zip(x_te, y_te)])
    fp = _top1_ort(to_onnx(graphopt.load(str(digits.teacher_path()))), x_te, y_te)
    assert fp - acc <= 0.005
    if OBJDUMP and rep["int8_dot"] == "vnni":
        assert "vpdpbusd" in _disasm(art.path / "model.so")


@pytest.mark.skipif(not HAS_AVX2, reason="host has no AVX2")
def test_avx2_target_graph(tmp_path):
    x_tr, _, x_te, _ = digits.load_digits_split()
    q, _ = _quantized(str(digits.teacher_path()), {"x": x_tr[:64]})
    path = tmp_path / "avx2.so"
    facts = ci.build_library(q, path, target=_target("avx2"))
    assert facts["int8_dot"] == "avx2" and facts["conv2d"] == 3
    _check_against_ort(q, tvm_lowering.VMRunner(path), [{"x": x_te[i:i + 1]} for i in range(0, 450, 90)])
    if OBJDUMP:
        asm = _disasm(path)
        assert "vpdpbusd" not in asm and "vpmaddubsw" not in asm


def _gelu_tail_qdq_model(rows=32, k=256, n=64):
    """GELU's tail as onnxruntime's quantizer writes it: Erf's u8 output (scale 1/127.5, zero point 128)
    dequantized, + dequantize(1.0), quantized (same scale, zero point 0), then a quantized MatMul on a 3-D
    activation. 1.0 is 127.5 steps: every element of the add lands on a rounding tie."""
    s, s_one, sy = np.float32(1 / 127.5), np.float32(1 / 255), np.float32(0.03)
    u8 = onnx.TensorProto.UINT8
    w = np.clip(np.rint(np.random.default_rng(3).standard_normal((k, n)) * 40), -127, 127).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z128"], ["a"]),
             helper.make_node("DequantizeLinear", ["one_q", "s_one", "z0"], ["one"]),
             helper.make_node("Add", ["a", "one"], ["t"]),
             helper.make_node("QuantizeLinear", ["t", "s", "z0"], ["tq"]),
             helper.make_node("DequantizeLinear", ["tq", "s", "z0"], ["td"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["td", "wd"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "sy", "z128"], ["out"])]
    inits = [("s", np.array(s)), ("s_one", np.array(s_one)), ("sy", np.array(sy)),
             ("z128", np.array(128, np.uint8)), ("z0", np.array(0, np.uint8)), ("one_q", np.array(255, np.uint8)),
             ("w", w), ("sw", np.full(n, 0.002, np.float32)), ("zw", np.zeros(n, np.int8))]
    return ob.model(nodes, [ob.vi("q", [1, rows, k], u8)], [ob.vi("out", [1, rows, n], u8)], inits)


def test_fp32_ops_between_qdq_round_like_onnxruntime(tmp_path):
    """The fp32 path of a QDQ graph rounds as onnxruntime does: a dequantized value is rounded to float32 before
    the add that follows (LLVM would contract it into an FMA) and QuantizeLinear divides by its scale. On rounding
    ties one unit in the last place is a whole quantization step: before, 9% of this MatMul's outputs were a step
    off (2% in minilm-l3-paraphrase's first BERT layer; at its output 47% were more than a step off)."""
    from graphopt.targets.cpu_schedules import schedule_module
    m = _gelu_tail_qdq_model()
    path = tmp_path / "gelu.so"
    facts = ci.build_library(m, path, CpuTarget().tvm_target(), schedule=schedule_module)
    assert facts["dense"] == 1
    q = np.random.default_rng(0).integers(0, 256, (1, 32, 256)).astype(np.uint8)
    ref = ort.run(m, {"q": q})["out"]
    got = np.asarray(tvm_lowering.VMRunner(path)([q])[0]).reshape(ref.shape)
    assert np.array_equal(got, ref), f"{np.mean(got != ref):.2%} of the outputs differ"


def test_requantize_divides_by_the_scale(tmp_path):
    """QuantizeLinear(DequantizeLinear(q)) to a scale 4x the input's: (q - 128) / 4 steps, so every other element
    is a rounding tie; x * (1 / s) instead of x / s moved 24 of the 256 values by a step."""
    from graphopt.targets.cpu_schedules import schedule_module
    u8 = onnx.TensorProto.UINT8
    nodes = [helper.make_node("DequantizeLinear", ["q", "s_in", "z"], ["x"]),
             helper.make_node("QuantizeLinear", ["x", "s_out", "z"], ["out"])]
    inits = [("s_in", np.array(0.054818872, np.float32)), ("s_out", np.array(0.21927549, np.float32)),
             ("z", np.array(128, np.uint8))]
    m = ob.model(nodes, [ob.vi("q", [4, 256], u8)], [ob.vi("out", [4, 256], u8)], inits)
    path = tmp_path / "rq.so"
    ci.build_library(m, path, CpuTarget().tvm_target(), schedule=schedule_module)
    q = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    ref = ort.run(m, {"q": q})["out"]
    got = np.asarray(tvm_lowering.VMRunner(path)([q])[0]).reshape(ref.shape)
    assert np.array_equal(got, ref), f"{np.mean(got != ref):.2%} of the outputs differ"


def test_fused_residual_add_rounds_like_onnxruntime(tmp_path):
    """Conv -> QuantizeLinear -> DequantizeLinear -> Add(dequantized residual) -> QuantizeLinear, fused into one
    kernel (mode qadd). The residual's scale is half the output's, so every element with an odd residual lands on
    a rounding tie: the kernel must round each dequantized value to float32 (no FMA) and divide by the output
    scale, as onnxruntime does (before: 11% of the outputs a step off)."""
    from graphopt.targets.cpu_schedules import schedule_module
    u8 = onnx.TensorProto.UINT8
    C, OC, H, s2 = 16, 32, 8, np.float32(0.0517)
    w = np.random.default_rng(1).integers(-127, 128, (OC, C, 3, 3)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "s1", "z"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "s1", "z"], ["cd"]),
             helper.make_node("DequantizeLinear", ["r", "sr", "z"], ["rd"]),
             helper.make_node("Add", ["cd", "rd"], ["a"]),
             helper.make_node("QuantizeLinear", ["a", "s2", "z"], ["out"])]
    inits = [("sx", np.array(0.0173, np.float32)), ("zx", np.array(7, np.uint8)), ("w", w),
             ("sw", np.full(OC, 0.00091, np.float32)), ("zw", np.zeros(OC, np.int8)), ("s1", np.array(s2)),
             ("sr", np.array(s2 / 2)), ("s2", np.array(s2)), ("z", np.array(128, np.uint8))]
    m = ob.model(nodes, [ob.vi("x", [1, C, H, H], u8), ob.vi("r", [1, OC, H, H], u8)],
                 [ob.vi("out", [1, OC, H, H], u8)], inits)
    path = tmp_path / "res.so"
    facts = ci.build_library(m, path, CpuTarget().tvm_target(), schedule=schedule_module)
    assert facts["residual_fused"] == 1
    rng = np.random.default_rng(0)
    x, r = (rng.integers(0, 256, (1, c, H, H)).astype(np.uint8) for c in (C, OC))
    ref = ort.run(m, {"x": x, "r": r})["out"]
    got = np.asarray(tvm_lowering.VMRunner(path)([x, r])[0]).reshape(ref.shape)
    assert np.array_equal(got, ref), f"{np.mean(got != ref):.2%} of the outputs differ"


class _HardswishNet(torch.nn.Module):
    """conv -> hardswish -> depthwise conv -> sigmoid-gated -> conv: activations between int8 kernels that
    lower-int8 turns into tables (graphopt/passes/lower_int8_tables.py)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c2 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        h = nn.functional.hardswish(self.c1(x))
        h = self.dw(h)
        return self.c2(h * torch.sigmoid(h))


@pytest.mark.parametrize("acts", ["u8", "s8"])
def test_activation_tables_run_in_the_kernels_layout(tmp_path, acts):
    """The hardswish / x*sigmoid(x) chains between int8 kernels become table lookups applied to the kernels' NHWC
    tensors: no NCHW round trip (transpose) is left between the convs, and the library matches onnxruntime."""
    g = graphopt.from_torch(_HardswishNet().eval(), (torch.zeros(1, 3, 12, 12),))
    calib = {"x": np.random.default_rng(0).normal(size=(16, 3, 12, 12)).astype(np.float32)}
    model, res = _quantized(g, calib, pipeline=f"quantize{{activations={acts}}},lower-int8")
    assert res.records[-1]["info"]["rewritten"].get("table", 0) >= 2
    runner, facts, _ = _compile(model, tmp_path)
    assert facts["table_lookups"] >= 2 and facts["conv2d"] == 2 and facts["dwconv2d"] == 1
    mod, _ = ci.import_int8(model, CpuTarget().tvm_target())
    ops = []
    tvm.relax.analysis.post_order_visit(mod["main"], lambda e: ops.append(getattr(getattr(e, "op", None), "name", "")))
    assert ops.count("relax.permute_dims") <= 2       # into NHWC at the input, back to NCHW at the output only
    feeds = [{"x": np.random.default_rng(s).normal(size=(1, 3, 12, 12)).astype(np.float32)} for s in range(3)]
    _check_against_ort(model, runner, feeds)


def _qdq_batch_matmul(a, b, sa, za, sb, zb, sy, zy, odt):
    """DequantizeLinear(a), DequantizeLinear(b) -> MatMul -> QuantizeLinear, a and b graph inputs."""
    types = {"uint8": onnx.TensorProto.UINT8, "int8": onnx.TensorProto.INT8}
    inits = [onnx.numpy_helper.from_array(np.array(v, dtype=d), n) for v, d, n in
             ((sa, np.float32, "sa"), (za, a.dtype, "za"), (sb, np.float32, "sb"), (zb, b.dtype, "zb"),
              (sy, np.float32, "sy"), (zy, odt, "zy"))]
    nodes = [onnx.helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["da"]),
             onnx.helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["db"]),
             onnx.helper.make_node("MatMul", ["da", "db"], ["m"]),
             onnx.helper.make_node("QuantizeLinear", ["m", "sy", "zy"], ["y"])]
    g = onnx.helper.make_graph(nodes, "qdq_bmm", [onnx.helper.make_tensor_value_info(n, types[str(x.dtype)], x.shape)
                                                  for n, x in (("a", a), ("b", b))],
                               [onnx.helper.make_tensor_value_info("y", types[odt], None)], inits)
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)])


@pytest.mark.skipif(not HAS_VNNI, reason="host has no AVX-512 VNNI")
@pytest.mark.parametrize("batch,M,K,N,adt,bdt,odt", [((1, 4), 128, 64, 128, "uint8", "uint8", "uint8"),
                                                      ((2,), 20, 7, 32, "int8", "uint8", "int8"),
                                                      ((1, 2), 16, 128, 64, "uint8", "int8", "uint8"),
                                                      ((3,), 24, 33, 48, "int8", "int8", "int8")])
def test_batch_matmul_kernel_matches_onnxruntime(batch, M, K, N, adt, bdt, odt):
    """The integer batch matmul (two quantized activations, zero points of any value, K not a multiple of 4) gives
    onnxruntime's QDQ result within one step, and the same values on all but a few ties."""
    from graphopt.targets.int8.kernels import batch_matmul_int8
    from graphopt.targets.int8.specs import BatchMatmulSpec
    rng = np.random.default_rng(M + K + N)
    ia, ib = np.iinfo(adt), np.iinfo(bdt)
    a = rng.integers(ia.min, ia.max + 1, (*batch, M, K)).astype(adt)
    b = rng.integers(ib.min, ib.max + 1, (*batch, K, N)).astype(bdt)
    za, zb = int(rng.integers(ia.min, ia.max)), int(rng.integers(ib.min, ib.max))
    sa, sb = 0.02, 0.03
    sy = float(np.abs((sa * (a - np.float64(za))) @ (sb * (b - np.float64(zb)))).max() / 100)
    zy = 3 if odt == "uint8" else -2
    mult = float(np.float32(np.float64(np.float32(sa) * np.float32(sb)) / sy))
    spec = BatchMatmulSpec(batch, M, K, N, adt, za, bdt, zb, mult, zy, odt)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "cooperlake", "num-cores": 2})
    got = _run(tvm.compile(tvm.IRModule({"main": batch_matmul_int8(spec)}), target=target), [a, b], (*batch, M, N), odt)
    ref = ort.run(_qdq_batch_matmul(a, b, sa, za, sb, zb, sy, zy, odt), {"a": a, "b": b})["y"]
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01


class _Attention(torch.nn.Module):
    """Self-attention on [1, 16, 32] with 2 heads of 16: QK^T [1, 2, 16, 16] / 4 -> softmax -> PV [1, 2, 16, 16]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.proj = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(1, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(1, 16, 32))


@pytest.mark.skipif(not HAS_VNNI, reason="host has no AVX-512 VNNI")
def test_quantized_attention_matmuls_run_as_integer_kernels(tmp_path):
    """Both of attention's activation x activation matmuls in a QDQ graph become the integer batch matmul (none is
    left to fp32), and the library matches onnxruntime within the quantized check's steps."""
    g = graphopt.from_torch(_Attention().eval(), (torch.zeros(1, 16, 32),))
    calib = {"x": np.random.default_rng(0).normal(size=(16, 16, 32)).astype(np.float32)}
    model, _ = _quantized(g, calib, pipeline="quantize,lower-int8")
    runner, facts, _ = _compile(model, tmp_path)
    assert facts["batch_matmul"] == 2 and facts["fp32_matmuls"] == 0 and facts["dense"] == 2
    feeds = [{"x": np.random.default_rng(s).normal(size=(1, 16, 32)).astype(np.float32)} for s in range(3)]
    _check_against_ort(model, runner, feeds)


class _GeluMLP(torch.nn.Module):
    """dense -> GELU -> dense on [1, 8, 32]: the quantized GELU between two int8 dense layers becomes a table applied
    to the first layer's output as the graph has it (a BERT-style encoder's FFN)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


@pytest.mark.skipif("avx512vbmi" not in host_flags(), reason="host has no AVX-512 VBMI")
def test_tables_after_dense_layers_take_the_vbmi_kernel(tmp_path):
    """A table on a dense layer's output (graph layout) runs as the vpermi2b kernel, not TVM's scalar take, and the
    library matches onnxruntime."""
    g = graphopt.from_torch(_GeluMLP().eval(), (torch.zeros(1, 8, 32),))
    calib = {"x": np.random.default_rng(0).normal(size=(16, 8, 32)).astype(np.float32)}
    model, res = _quantized(g, calib, pipeline="quantize,lower-int8")
    assert res.records[-1]["info"]["rewritten"].get("table", 0) >= 1
    runner, facts, _ = _compile(model, tmp_path)
    assert facts["table_lookups_graph_layout"] >= 1 and facts["dense"] == 2
    mod, _ = ci.import_int8(model, CpuTarget().tvm_target())
    assert any("table" in gv.name_hint for gv in mod.get_global_vars())
    feeds = [{"x": np.random.default_rng(s).normal(size=(1, 8, 32)).astype(np.float32)} for s in range(3)]
    _check_against_ort(model, runner, feeds)


@pytest.mark.skipif("avx512vbmi" not in host_flags(), reason="host has no AVX-512 VBMI")
@pytest.mark.parametrize("total,din,dout", [(64 * 9, "uint8", "uint8"), (64 * 700 + 37, "uint8", "int8"),
                                            (50, "int8", "int8"), (64 * 3 + 1, "int8", "uint8")])
def test_table_kernel_is_exact(total, din, dout):
    """The vpermi2b table lookup (int8/tables.py) against numpy's indexing by the index's byte, with a tail of
    fewer than 64 values and the parallel path; its disassembly has vpermi2b / vpermt2b."""
    from graphopt.targets.int8.tables import table_kernel
    target = tvm.target.Target({"kind": "llvm", "mcpu": "cooperlake", "mattr": ["+avx512vbmi"], "num-cores": 2})
    lib = tvm.compile(tvm.IRModule({"main": table_kernel(total, din, dout, 2)}), target=target)
    rng = np.random.default_rng(total)
    info_in, info_out = np.iinfo(din), np.iinfo(dout)
    x = rng.integers(info_in.min, info_in.max + 1, total).astype(din)
    tab = rng.integers(info_out.min, info_out.max + 1, 256).astype(dout)
    np.testing.assert_array_equal(_run(lib, [x, tab], (total,), dout), tab[x.view(np.uint8)])
    if total >= 64:
        asm = tvm.tirx.build(tvm.IRModule({"main": table_kernel(total, din, dout, 2)}), target=target)
        assert any(op in asm.inspect_source("asm") for op in ("vpermi2b", "vpermt2b"))
