"""targets/conv_padding_rows: the share of kernel-row taps on a conv's top and bottom padding, and the bf16 and int8
conv kernels that skip those rows give bit for bit what the same kernels give computing every row."""
import numpy as np
import pytest

from graphopt.targets import bf16, conv_padding_rows as rows
from graphopt.targets import int8 as ci
from graphopt.targets.cpu import CpuTarget
from graphopt.targets.x86_isa import host_flags

tvm = pytest.importorskip("tvm")


def test_padding_row_share():
    assert rows.padding_row_share(7, 7, 3, 1, 1) == pytest.approx(2 / 21)       # ResNet-18's 7x7 maps
    assert rows.padding_row_share(14, 7, 3, 2, 1) == pytest.approx(1 / 21)      # stride 2: the top row only
    assert rows.padding_row_share(56, 56, 1, 1, 0) == 0
    assert rows.padding_row_share(7, 7, 3, 1, 1, dilation=2) == 0               # not handled: never bounded
    assert rows.pays(7, 7, 3, 1, 1) and rows.pays(28, 28, 3, 1, 1)
    assert not rows.pays(56, 56, 3, 1, 1) and not rows.pays(224, 112, 7, 2, 3)


def _bounded(func) -> bool:
    return "range(T.max(" in func.script()


def _run(func, args, shape, dtype):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=CpuTarget().tvm_target())
    y = tvm.runtime.tensor(np.zeros(shape, dtype))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


CASES = [(1, 7, 7, 32, 3, 1, 1), (2, 9, 8, 16, 3, 2, 1), (1, 10, 10, 16, 5, 2, 2)]   # N, H, W, C, K, stride, pad


@pytest.mark.skipif("avx512_bf16" not in host_flags(), reason="host has no AVX512-BF16")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_bf16_conv_skipping_padding_rows_is_bit_identical(case, monkeypatch):
    N, H, W, C, K, st, pd = case
    rng = np.random.default_rng(H * K)
    spec = bf16.ConvSpec(N, H, W, C, 32, K, K, (st, st), (pd,) * 4, (1, 1), "NHWC", C, act=(0.0, None))
    x = rng.standard_normal((N, H, W, C)).astype(np.float32)
    w = rng.standard_normal((32, C, K, K)).astype(np.float32)
    args = [x, bf16.pack_conv_weight(w, spec.C2), bf16.padded_bias(rng.standard_normal(32).astype(np.float32), 32,
                                                                  spec.OCp)]
    shape = (N, spec.OH, spec.OW, spec.OCp)
    bounded = bf16.conv2d_bf16(spec)
    monkeypatch.setattr(rows, "MIN_SHARE", 2.0)
    full = bf16.conv2d_bf16(spec)
    assert _bounded(bounded) and not _bounded(full)
    assert np.array_equal(_run(bounded, args, shape, "float32"), _run(full, args, shape, "float32"))


@pytest.mark.skipif("avx512_vnni" not in host_flags(), reason="host has no AVX-512 VNNI")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_int8_conv_skipping_padding_rows_is_bit_identical(case, monkeypatch):
    """Only a u8 input with zero point 0 pads with zeros; any other zero point keeps every row (its padding taps
    are part of the folded zero-point correction)."""
    N, H, W, C, K, st, pd = case
    rng = np.random.default_rng(H * K + 1)
    x = rng.integers(0, 256, (N, H, W, C)).astype(np.uint8)
    w = rng.integers(-128, 128, (32, C, K, K)).astype(np.int8)
    spec = ci.ConvSpec(N, H, W, C, 32, K, K, (st, st), (pd,) * 4, in_layout="NHWC", Cphys=C, in_dtype="uint8", zx=0,
                       epi=ci.Epilogue(mode="f", out_dtype="float32"))
    Bi, M, Bf = ci.epilogue_constants(w, 1.0, np.ones(32, np.float32), 0, None, None, None, spec.OCp)
    args = [x, ci.pack_conv_weight(w, spec.C4, "vnni"), Bi, M, Bf]
    shape = (N, spec.OH, spec.OW, spec.OCp)
    bounded = ci.conv2d_int8(spec, "vnni", 2)
    assert not _bounded(ci.conv2d_int8(ci.ConvSpec(**{**spec.__dict__, "zx": 3}), "vnni", 2))
    monkeypatch.setattr(rows, "MIN_SHARE", 2.0)
    full = ci.conv2d_int8(spec, "vnni", 2)
    assert _bounded(bounded) and not _bounded(full)
    assert np.array_equal(_run(bounded, args, shape, "float32"), _run(full, args, shape, "float32"))
