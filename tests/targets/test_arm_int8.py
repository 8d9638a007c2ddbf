"""arm-sve int8: quantized (QDQ) Conv / MatMul / Gemm chains lower to graphopt's integer kernels with NEON `usdot`
(u8 x s8 -> s32, FEAT_I8MM) on aarch64. The kernels are exact against numpy under qemu-aarch64; whole quantized
graphs compiled for arm-sve match onnxruntime on the same QDQ model.onnx within one quantization step at several
SVE vector lengths; the aarch64 model.so really contains usdot; the report says the int8 kernels were used.

Building and running need tools/setup_arm.sh (see test_arm_sve.py); without it those tests are skipped."""
import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import helper

import digits
import graphopt
import onnx_builders as ob
from graphopt import ort
from graphopt.quant_check import check_criterion, within_quant_steps
from graphopt.targets import arm_sve
from graphopt.targets import int8 as ci
from graphopt.targets import tvm_lowering
from graphopt.targets.arm_runner import build as runner_build
from targets.int8_reference import reference_acc_conv
from targets.test_arm_sve import OBJDUMP, VECTOR_BITS, needs_arm
from targets.test_cpu_int8 import MobileNetV2Digits

tvm = pytest.importorskip("tvm")
HAS_OBJDUMP = shutil.which(OBJDUMP) is not None


def _arm_target():
    return arm_sve.ArmSveTarget().tvm_target()


def _disasm(path) -> str:
    return subprocess.run([OBJDUMP, "-d", str(path)], capture_output=True, text=True, check=True).stdout


# ---------------------------------------------------------------------------------------------------------------
# no emulator needed
# ---------------------------------------------------------------------------------------------------------------

def test_int8_dot_selection_aarch64():
    T = tvm.target.Target
    assert ci.int8_dot(_arm_target()) == "usdot" == arm_sve.ArmSveTarget().hw().int8_dot
    assert ci.int8_dot(T({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1"})) == "usdot"
    assert ci.int8_dot(T({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})) is None   # v8.0
    assert ci.int8_dot(T({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                          "mattr": ["+v8.2a", "+i8mm"]})) == "usdot"
    assert ci.int8_dot(T({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1",
                          "mattr": ["-i8mm"]})) is None
    assert "lower-int8" in arm_sve.ArmSveTarget.legalize


def test_usdot_kernels_lower_to_the_neon_intrinsic():
    """The tensorized 16x4 block becomes four llvm.aarch64.neon.usdot calls on int32x4 slices (TIR level; the
    instructions in model.so are checked below with objdump)."""
    spec = ci.ConvSpec(1, 6, 6, 16, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "NHWC", 16, "uint8", 0, ci.Epilogue())
    for f in (ci.conv2d_int8(spec, "usdot"), ci.dense_int8(ci.DenseSpec(4, 40, 24), "usdot")):
        text = f.script()
        assert text.count("llvm.aarch64.neon.usdot") == 1 and "vpdpbusd" not in text   # in a 4x unrolled loop
        assert str(f.attrs[ci.KERNEL_ATTR]).endswith("_usdot")
    # usdot uses the VNNI weight packing ([.., 16, 4]: 16 channels x 4 reduction bytes)
    w = np.arange(32 * 8, dtype=np.int64).reshape(32, 8).astype(np.int8)
    assert np.array_equal(ci.pack_dense_weight(w, 8, "usdot"), ci.pack_dense_weight(w, 8, "vnni"))


def test_fp32_graphs_are_left_alone(zoo_onnx):
    m = onnx.load(str(zoo_onnx("mlp_digits")))
    mod, facts = ci.import_int8(m, _arm_target())
    assert facts == {"int8_dot": "usdot", "int8_kernels": 0}
    assert all(not str(gv.name_hint).startswith("graphopt_int8") for gv in mod.get_global_vars())


# ---------------------------------------------------------------------------------------------------------------
# kernels against numpy, under qemu
# ---------------------------------------------------------------------------------------------------------------

def _kernel_module(kernels):
    """kernels: [(PrimFunc, [input arrays], (out shape, out dtype))] -> a Relax module whose main takes every
    input array in order and returns the tuple of the kernels' outputs."""
    from tvm import relax
    bb = relax.BlockBuilder()
    params, flat = [], []
    for k, (_, arrays, _) in enumerate(kernels):
        for i, a in enumerate(arrays):
            params.append(relax.Var(f"k{k}_{i}", relax.TensorType(list(a.shape), str(a.dtype))))
            flat.append(a)
    with bb.function("main", params):
        with bb.dataflow():
            outs, p = [], 0
            for k, (f, arrays, (shape, dtype)) in enumerate(kernels):
                name = f"kernel{k}"
                f = f.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True) \
                    .with_attr("op_pattern", 8).with_attr("tirx.noalias", True)
                gv = bb.add_func(f, name)
                outs.append(bb.emit(relax.call_tir(gv, params[p:p + len(arrays)],
                                                   relax.TensorType(list(shape), dtype))))
                p += len(arrays)
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get(), flat


def _run_kernels_under_qemu(kernels, tmp_path, bits=(128, 512)):
    """Build the kernels into one aarch64 library, run it under qemu at each vector length:
    ({bits: outputs}, library path)."""
    import tvm.support.cc
    mod, flat = _kernel_module(kernels)
    ex = tvm_lowering.build(mod, _arm_target())
    lib = tmp_path / "kernels.so"
    tvm_lowering.export(ex, lib, cross_compiler=tvm.support.cc.cross_compiler(arm_sve.CXX))
    exe = runner_build.ensure_runner()
    res = {}
    for b in bits:
        runner = arm_sve.QemuRunner(exe, lib.absolute(), b)
        res[b] = runner(flat)
        assert runner.last_vector_bits == b
    return res, lib


def _ref_dwconv(x, w, zx, st, pd, OH, OW):
    K = w.shape[-1]
    xp = np.pad(x.astype(np.int64) - zx, ((0, 0), (0, 0), (pd, pd), (pd, pd)))
    ref = np.zeros((x.shape[0], x.shape[1], OH, OW), np.int64)
    for i in range(K):
        for j in range(K):
            ref += xp[:, :, i:i + st * OH:st, j:j + st * OW:st] * w[None, :, 0, i, j, None, None].astype(np.int64)
    return ref.transpose(0, 2, 3, 1)


@needs_arm
def test_kernels_are_exact_under_qemu(tmp_path):
    """conv2d (NCHW u8 with padding, NHWC direct, s8 input), dense (u8 / s8, K not a multiple of 4), depthwise and
    max pooling, built for aarch64 in one library and run under qemu at 128 and 512 bits: bit-exact s32
    accumulators (mode f with unit scales) and integer pooling."""
    rng = np.random.default_rng(0)
    kernels, checks = [], []
    f_epi = lambda: ci.Epilogue(mode="f", out_dtype="float32")   # noqa: E731

    for N, C, H, W, OC, K, st, pd, layout, dt in [(1, 3, 9, 7, 20, 3, 1, 1, "NCHW", "uint8"),
                                                   (1, 16, 6, 6, 32, 1, 1, 0, "NHWC", "uint8"),
                                                   (2, 8, 7, 7, 16, 3, 2, 1, "NCHW", "int8")]:
        lo, hi = (0, 256) if dt == "uint8" else (-128, 128)
        x = rng.integers(lo, hi, (N, C, H, W)).astype(dt)
        w = rng.integers(-128, 128, (OC, C, K, K)).astype(np.int8)     # -128 included: worst-case products
        zx = int(rng.integers(lo, hi))
        spec = ci.ConvSpec(N, H, W, C, OC, K, K, (st, st), (pd,) * 4, in_layout=layout, Cphys=C, in_dtype=dt,
                           zx=zx, epi=f_epi())
        zx_u = zx + (128 if dt == "int8" else 0)
        Bi, M, Bf = ci.epilogue_constants(w, 1.0, np.ones(OC, np.float32), zx_u, None, None, None, spec.OCp)
        xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        kernels.append((ci.conv2d_int8(spec, "usdot", 1), [xin, ci.pack_conv_weight(w, spec.C4, "usdot"), Bi, M, Bf],
                        ((N, spec.OH, spec.OW, spec.OCp), "float32")))
        checks.append(lambda y, acc=reference_acc_conv(x, w, spec), OC=OC: (
            np.array_equal(y[..., :OC].astype(np.int64), acc) and np.all(y[..., OC:] == 0)))

    for M_, K_, N_, dt in [(4, 30, 10, "uint8"), (3, 64, 48, "int8"), (1, 128, 40, "uint8")]:
        lo, hi = (0, 256) if dt == "uint8" else (-128, 128)
        a = rng.integers(lo, hi, (M_, K_)).astype(dt)
        w = rng.integers(-128, 128, (N_, K_)).astype(np.int8)
        zx = int(rng.integers(lo, hi))
        spec = ci.DenseSpec(M_, K_, N_, 0, dt, zx, f_epi())
        Bi, Mm, Bf = ci.epilogue_constants(w, 1.0, np.ones(N_, np.float32), zx + (128 if dt == "int8" else 0), None,
                                           None, None, spec.Np)
        kernels.append((ci.dense_int8(spec, "usdot", 1), [a, ci.pack_dense_weight(w, spec.K4, "usdot"), Bi, Mm, Bf],
                        ((M_, spec.Np), "float32")))
        checks.append(lambda y, ref=(a.astype(np.int64) - zx) @ w.T.astype(np.int64), N_=N_: (
            np.array_equal(y[:, :N_].astype(np.int64), ref)))

    # requantizing epilogue (mode q: bias, scales, relu bounds): within one step of float64, nearly all exact
    N, C, H, OC = 1, 16, 6, 32
    x = rng.integers(0, 256, (N, H, H, C)).astype(np.uint8)
    w = rng.integers(-128, 128, (OC, C, 3, 3)).astype(np.int8)
    bias = rng.integers(-5000, 5000, OC).astype(np.int32)
    sx, sw, sy, zy, zx = 0.02, rng.uniform(1e-3, 1e-2, OC).astype(np.float32), 0.37, 7, 5
    spec = ci.ConvSpec(N, H, H, C, OC, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "NHWC", C, "uint8", zx,
                       ci.Epilogue(mode="q", out_dtype="uint8", zy=zy, lo=float(zy), hi=255.0))
    Bi, M, Bf = ci.epilogue_constants(w, sx, sw, zx, bias, None, sy, spec.OCp)
    kernels.append((ci.conv2d_int8(spec, "usdot", 1), [x, ci.pack_conv_weight(w, spec.C4, "usdot"), Bi, M, Bf],
                    ((N, H, H, OC), "uint8")))
    acc = reference_acc_conv(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), w, spec)
    qref = np.clip(np.rint((acc + bias) * (np.float32(sx) * sw.astype(np.float64)) / sy) + zy, zy, 255)
    checks.append(lambda q, qref=qref: (np.abs(q.astype(np.int64) - qref).max() <= 1
                                        and np.mean(q == qref) > 0.999))

    # depthwise (generic vector code, no dot product) and integer max pooling
    for C, H, K, st, layout, dt in [(24, 9, 3, 1, "NHWC", "uint8"), (20, 8, 3, 2, "NCHW", "int8")]:
        lo, hi = (0, 256) if dt == "uint8" else (-128, 128)
        x = rng.integers(lo, hi, (1, C, H, H)).astype(dt)
        w = rng.integers(-128, 128, (C, 1, K, K)).astype(np.int8)
        zx, pd = int(rng.integers(lo, hi)), K // 2
        spec = ci.ConvSpec(1, H, H, C, C, K, K, (st, st), (pd,) * 4, (1, 1), layout, C, dt, zx, f_epi())
        Bi, M, Bf = ci.epilogue_constants(w, 1.0, np.ones(C, np.float32), zx + (128 if dt == "int8" else 0), None,
                                          None, None, spec.OCp)
        xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        kernels.append((ci.dwconv2d_int8(spec, 1), [xin, ci.pack_dw_weight(w), Bi, M, Bf],
                        ((1, spec.OH, spec.OW, spec.OCp), "float32")))
        checks.append(lambda y, ref=_ref_dwconv(x, w, zx, st, pd, spec.OH, spec.OW), C=C: (
            np.array_equal(y[..., :C].astype(np.int64), ref)))
    for dt in ("uint8", "int8"):
        N, H, W, C, K, S, P = 1, 11, 12, 32, 3, 2, 1
        OH, OW = (H + 2 * P - K) // S + 1, (W + 2 * P - K) // S + 1
        lo, hi = (0, 256) if dt == "uint8" else (-128, 128)
        x = rng.integers(lo, hi, (N, H, W, C)).astype(dt)
        kernels.append((ci.maxpool_int8(N, H, W, C, OH, OW, (K, K), (S, S), (P, P, P, P), (1, 1), dt), [x],
                        ((N, OH, OW, C), dt)))
        xp = np.pad(x.astype(np.int64), ((0, 0), (P, P), (P, P), (0, 0)), constant_values=-1000)
        ref = np.full((N, OH, OW, C), -1000)
        for i in range(K):
            for j in range(K):
                ref = np.maximum(ref, xp[:, i:i + S * OH:S, j:j + S * OW:S, :])
        checks.append(lambda y, ref=ref: np.array_equal(y.astype(np.int64), ref))

    results, lib = _run_kernels_under_qemu(kernels, tmp_path)
    for bits, outs in results.items():
        assert len(outs) == len(checks)
        bad = [i for i, (chk, y) in enumerate(zip(checks, outs)) if not chk(y)]
        assert not bad, f"kernels {bad} differ from numpy at {bits} bits"
    if HAS_OBJDUMP:
        assert re.search(r"\tusdot\s", _disasm(lib)), "no usdot instruction in the kernels"


# ---------------------------------------------------------------------------------------------------------------
# whole quantized graphs: graphopt.compile for arm-sve against onnxruntime on the same QDQ model.onnx
# ---------------------------------------------------------------------------------------------------------------

def _compile_q(model, tmp_path, calib, name):
    art = graphopt.compile(model, target="arm-sve", out=tmp_path / name, pipeline="quantize{scheme=int8}",
                           data={"calib": calib}, measure=False)
    rep = art.report
    # the compile's own check ran model.so under qemu (default 256 bits) against onnxruntime on model.onnx
    assert rep["check"]["ok"] is True and "quant_step" in rep["check"]["criterion"], rep["check"]
    assert rep["int8_dot"] == "usdot" and rep["int8_kernels"] >= 2, rep
    assert "lower-int8" in art.manifest["pipeline"]["legalize"]
    assert art.manifest["target"]["int8_dot"] == "usdot"
    if HAS_OBJDUMP:
        asm = _disasm(art.path / "model.so")
        assert len(re.findall(r"\tusdot\s", asm)) >= 4, "no usdot instructions in model.so"
    return art


def _check_lengths(art, name, feeds_list):
    """Run the artifact under qemu at every vector length on each feed; compare with onnxruntime on the QDQ
    model.onnx under the one-step criterion (the worst figures per length are printed: pytest -s)."""
    model = onnx.load(str(art.path / "model.onnx"))
    crit = check_criterion(model)
    refs = [ort.run(model, feeds) for feeds in feeds_list]
    for bits in VECTOR_BITS:
        runner = arm_sve.ArmSveTarget(vector_bits=bits).load(art.path, art.manifest)
        worst_frac, worst_steps, worst_err = 1.0, 0.0, 0.0
        for feeds, ref in zip(feeds_list, refs):
            got = dict(zip(ref, runner(art.check_inputs(feeds))))
            assert runner.last_vector_bits == bits
            chk = within_quant_steps(ref, got, crit)
            assert chk["ok"], (bits, chk)
            for o in chk["outputs"].values():
                worst_frac = min(worst_frac, o["within_one_step"])
                worst_steps = max(worst_steps, o["max_steps"] or 0.0)
                worst_err = max(worst_err, o["max_abs_error"])
        print(f"{name} @ {bits} bits: within one step {worst_frac:.4f}, max {worst_steps:.3f} steps, "
              f"max abs error {worst_err:.3g}")


@needs_arm
def test_quantized_cnn_matches_onnxruntime(tmp_path):
    """The digits CNN (3 convs with BN folded, ReLU, max pool, global average pool, Gemm): every conv and the Gemm
    run as usdot kernels, the pooling on the integers in NHWC."""
    x_tr, _, x_te, _ = digits.load_digits_split()
    art = _compile_q(str(digits.teacher_path()), tmp_path, {"x": x_tr[:128]}, "cnn")
    rep = art.report
    assert rep["conv2d"] == 3 and rep["dense"] == 1 and rep["fp32_convs"] == 0 and rep["fp32_matmuls"] == 0
    assert rep["maxpool_nhwc"] == 1 and rep["mean_nhwc"] == 1
    _check_lengths(art, "cnn", [{"x": x_te[i:i + 1]} for i in range(0, 400, 100)])


def _matmul_gemm_model():
    """x [6, 40] -> Gemm(transB, bias) -> Relu -> MatMul [24, 10] -> Add -> y: both dense forms."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["t"], name="gemm", transB=1),
             helper.make_node("Relu", ["t"], ["u"]),
             helper.make_node("MatMul", ["u", "w2"], ["v"], name="mm"),
             helper.make_node("Add", ["v", "b2"], ["y"])]
    return ob.model(nodes, [ob.vi("x", [6, 40])], [ob.vi("y", [6, 10])],
                    [("w", ob.rnd(24, 40)), ("b", ob.rnd(24, seed=3)), ("w2", ob.rnd(24, 10, seed=4)),
                     ("b2", ob.rnd(10, seed=5))])


@needs_arm
def test_quantized_matmul_gemm_matches_onnxruntime(tmp_path):
    rng = np.random.default_rng(1)
    art = _compile_q(_matmul_gemm_model(), tmp_path, {"x": rng.standard_normal((10, 6, 40)).astype(np.float32)},
                     "mlp")                                       # 10 samples of x [6, 40]
    assert art.report["dense"] == 2 and art.report["fp32_matmuls"] == 0
    _check_lengths(art, "matmul_gemm", [{"x": rng.standard_normal((6, 40)).astype(np.float32)} for _ in range(3)])


@needs_arm
def test_quantized_depthwise_residual_net_matches_onnxruntime(tmp_path):
    """MobileNetV2-style blocks (untrained weights: only agreement with onnxruntime matters here): 1x1 convs with
    ReLU6, depthwise 3x3 convs, fused residual adds, global average pool, Gemm."""
    import torch
    import warnings
    torch.manual_seed(0)
    model = MobileNetV2Digits().eval()
    path = tmp_path / "mnv2.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 1, 8, 8),), str(path), input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False)
    x_tr, _, x_te, _ = digits.load_digits_split()
    art = _compile_q(str(path), tmp_path, {"x": x_tr[:64]}, "mnv2")
    rep = art.report
    assert rep["dwconv2d"] == 4 and rep["conv2d"] >= 9 and rep["residual_fused"] >= 1 and rep["fp32_convs"] == 0
    _check_lengths(art, "mnv2", [{"x": x_te[i:i + 1]} for i in range(0, 300, 100)])
