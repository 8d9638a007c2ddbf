"""targets/bf16/dw_pairs: the vdpbf16ps depthwise conv (vertical bf16 pairs) equals the float64 sums of its bf16
inputs and bf16-rounded weights to fp32 accuracy on every geometry it takes (3x3 / 5x5, stride 1 / 2, partial row
blocks and tiles, asymmetric padding, fp32 and bf16 outputs, bounds), stays within a bf16 step of the fp32-weight
tap-by-tap kernel, and takes only what it computes."""
import numpy as np
import pytest

from graphopt.targets.bf16 import dw_pairs
from graphopt.targets.bf16.depthwise import DwSpec, dwconv2d_bf16
from graphopt.targets.bf16.packing import bf16_bits
from graphopt.targets.x86_isa import host_flags
from targets.depthwise_geometries import GEOMETRIES, geometry_id

tvm = pytest.importorskip("tvm")

needs_bf16 = pytest.mark.skipif("avx512_bf16" not in host_flags(), reason="host has no AVX512-BF16")


def _target():
    return tvm.target.Target({"kind": "llvm", "mcpu": "cooperlake", "num-cores": 2})


def _run(func, args, out_shape, out_dtype):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=_target())
    y = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


def _from_bits(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def _case(C, H, W, K, st, pad, act, out_bf16, seed=0):
    rng = np.random.default_rng(seed)
    Cp = -(-C // 16) * 16
    x = bf16_bits(rng.standard_normal((1, H, W, Cp)).astype(np.float32))
    w = rng.standard_normal((C, 1, K, K)).astype(np.float32)
    b = np.pad(rng.standard_normal(C).astype(np.float32), (0, Cp - C))
    spec = DwSpec(1, H, W, C, Cp, K, K, (st, st), pad, (1, 1), act, in_bf16=True, out_bf16=out_bf16)
    return spec, x, w, b


@needs_bf16
@pytest.mark.parametrize("geom", GEOMETRIES, ids=geometry_id)
def test_sums_match_float64_of_the_bf16_operands(geom):
    C, H, W, K, st, pad = geom
    spec, x, w, b = _case(C, H, W, K, st, pad, (None, None), False)
    assert dw_pairs.fits(spec)
    y = _run(dw_pairs.dwconv2d_pairs(spec, 2), [x, dw_pairs.pack_weight(w, spec), b],
             (1, spec.OH, spec.OW, spec.Cp), "float32")
    wb = _from_bits(bf16_bits(w[:, 0])).astype(np.float64)          # [C, K, K]
    pt, pl, pb, pr = pad
    xp = np.pad(_from_bits(x[..., :C]).astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ref = np.zeros((1, spec.OH, spec.OW, C)) + b[:C]
    for i in range(K):
        for j in range(K):
            ref += xp[:, i:i + st * spec.OH:st, j:j + st * spec.OW:st, :] * wb[:, i, j]
    np.testing.assert_allclose(y[..., :C], ref, rtol=0, atol=2e-5 * K * K * (1 + np.abs(ref).max()))
    assert not y[..., C:].any()                      # padded channels: zero weights, zero bias


@needs_bf16
@pytest.mark.parametrize("geom", [GEOMETRIES[1], GEOMETRIES[3], GEOMETRIES[6]],
                         ids=geometry_id)
def test_bf16_output_within_a_step_of_the_tap_by_tap_kernel(geom):
    C, H, W, K, st, pad = geom
    spec, x, w, b = _case(C, H, W, K, st, pad, (0.0, 6.0), True, seed=1)
    shape = (1, spec.OH, spec.OW, spec.Cp)
    new = _from_bits(_run(dw_pairs.dwconv2d_pairs(spec, 1), [x, dw_pairs.pack_weight(w, spec), b], shape,
                          "uint16"))[..., :C]
    wk = np.zeros((K, K, spec.Cp), np.float32)
    wk[..., :C] = w[:, 0].transpose(1, 2, 0)
    old = _from_bits(_run(dwconv2d_bf16(spec), [x, wk, b], shape, "uint16"))[..., :C]
    assert new.min() >= 0.0 and new.max() <= 6.0 and 0 < np.mean(new == 6.0) < 0.5
    # the weights' bf16 rounding (2^-9 relative each) over K*K taps, plus one bf16 step of the output
    scale = np.abs(_from_bits(x)).max() * np.abs(w).max() * K * K
    np.testing.assert_allclose(new, old, rtol=2 ** -7, atol=2 ** -8 * scale)


def test_takes_only_what_it_computes():
    def spec(**kw):
        base = dict(N=1, H=8, W=8, C=32, Cx=32, KH=3, KW=3, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1),
                    act=(None, None), in_bf16=True, out_bf16=True)
        base.update(kw)
        return DwSpec(**base)
    assert dw_pairs.fits(spec()) and dw_pairs.fits(spec(KH=5, KW=5, stride=(2, 2)))
    assert not dw_pairs.fits(spec(in_bf16=False))                    # fp32 input: depthwise.py
    assert not dw_pairs.fits(spec(C=24, Cx=24))                       # 32-byte loads would pass the row end
    assert not dw_pairs.fits(spec(dilation=(2, 2)))
    assert not dw_pairs.fits(spec(KH=7, KW=7))
    assert not dw_pairs.fits(spec(stride=(1, 2)))

