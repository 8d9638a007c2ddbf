"""targets/int8/dw_quads: the VNNI depthwise conv (vertical byte quads, vpdpbusd) is exact against numpy's s64
reference and bit for bit equal to the tap-by-tap kernel, on every geometry it takes (3x3 / 5x5, stride 1 / 2,
partial row blocks and tiles, asymmetric padding, u8 and s8 inputs, requantizing and fp32 epilogues), with LLVM's
byte shuffle lowered with VBMI (the hosts' mcpu) and without it (cascadelake); it takes only what it computes."""
import numpy as np
import pytest

from graphopt.targets import int8 as ci
from graphopt.targets.int8 import dw_quads
from graphopt.targets.x86_isa import host_flags
from targets.depthwise_geometries import GEOMETRIES, geometry_id

tvm = pytest.importorskip("tvm")

HAS_VNNI = "avx512_vnni" in host_flags()
needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason="host has no AVX-512 VNNI")


def _target(vbmi: bool):
    if vbmi:
        return tvm.target.Target({"kind": "llvm", "mcpu": "cooperlake", "mattr": ["+avx512vbmi"], "num-cores": 2})
    return tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})


def _run(func, target, args, out_shape, out_dtype):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    y = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


def _case(C, H, W, K, st, pad, dt, epi, seed=0):
    rng = np.random.default_rng(seed)
    lo, hi = (0, 256) if dt == "uint8" else (-128, 128)
    Cp = -(-C // 16) * 16
    x = rng.integers(lo, hi, (1, H, W, Cp)).astype(dt)
    w = rng.integers(-128, 128, (C, 1, K, K)).astype(np.int8)
    zx = int(rng.integers(lo, hi))
    spec = ci.ConvSpec(1, H, W, C, C, K, K, (st, st), pad, (1, 1), "NHWC", Cp, dt, zx, epi)
    scale = rng.uniform(0.001, 0.004, C).astype(np.float32) if epi.mode == "q" else np.ones(C, np.float32)
    Bi, M, Bf = ci.epilogue_constants(w, 1.0, scale, zx + (128 if dt == "int8" else 0), None, None,
                                      1.0 if epi.mode == "q" else None, spec.OCp)
    return spec, x, w, zx, (Bi, M, Bf)


def _reference_sums(x, w, zx, spec):
    """s64 depthwise sums over the logical channels, zero point subtracted, padding as zero."""
    C, K, st = w.shape[0], spec.KH, spec.stride[0]
    pt, pl, pb, pr = spec.pad
    xp = np.pad(x[..., :C].astype(np.int64) - zx, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ref = np.zeros((1, spec.OH, spec.OW, C), np.int64)
    for i in range(K):
        for j in range(K):
            ref += xp[:, i:i + st * spec.OH:st, j:j + st * spec.OW:st, :] * w[None, None, None, :, 0, i, j]
    return ref


@needs_vnni
@pytest.mark.parametrize("geom", GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("dt", ["uint8", "int8"])
def test_sums_are_exact(geom, dt):
    C, H, W, K, st, pad = geom
    spec, x, w, zx, (Bi, M, Bf) = _case(C, H, W, K, st, pad, dt, ci.Epilogue(mode="f", out_dtype="float32"))
    assert dw_quads.fits(spec, "vnni")
    y = _run(dw_quads.dwconv2d_quads(spec, 2), _target(vbmi=True),
             [x, dw_quads.pack_weight(w, spec), Bi, M, Bf], (1, spec.OH, spec.OW, spec.OCp), "float32")
    assert np.array_equal(y[..., :C].astype(np.int64), _reference_sums(x, w, zx, spec))


@needs_vnni
@pytest.mark.parametrize("vbmi", [True, False], ids=["vbmi", "no_vbmi"])
@pytest.mark.parametrize("geom", [GEOMETRIES[1], GEOMETRIES[3], GEOMETRIES[6]],
                         ids=geometry_id)
def test_requantized_output_equals_the_tap_by_tap_kernel(geom, vbmi):
    C, H, W, K, st, pad = geom
    epi = ci.Epilogue(mode="q", out_dtype="uint8", zy=3, lo=3.0, hi=200.0)   # a clamp inside u8: ReLU6-like
    spec, x, w, zx, consts = _case(C, H, W, K, st, pad, "uint8", epi, seed=1)
    shape = (1, spec.OH, spec.OW, spec.OCp)
    target = _target(vbmi)
    new = _run(dw_quads.dwconv2d_quads(spec, 1), target, [x, dw_quads.pack_weight(w, spec), *consts], shape, "uint8")
    old = _run(ci.dwconv2d_int8(spec, 1), target, [x, ci.pack_dw_weight(w), *consts], shape, "uint8")
    assert np.array_equal(new[..., :C], old[..., :C])
    assert len(np.unique(new[..., :C])) > 20       # not all clamped


def test_takes_only_what_it_computes():
    def spec(**kw):
        base = dict(N=1, H=8, W=8, C=32, OC=32, KH=3, KW=3, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1),
                    in_layout="NHWC", Cphys=32, in_dtype="uint8", zx=0, epi=ci.Epilogue())
        base.update(kw)
        return ci.ConvSpec(**base)
    assert dw_quads.fits(spec(), "vnni")
    assert not dw_quads.fits(spec(), "avx2") and not dw_quads.fits(spec(), "usdot")
    assert not dw_quads.fits(spec(in_layout="NCHW", Cphys=0), "vnni")
    assert not dw_quads.fits(spec(C=24, OC=24, Cphys=24), "vnni")          # 16-byte loads would pass the row end
    assert not dw_quads.fits(spec(dilation=(2, 2)), "vnni")
    assert not dw_quads.fits(spec(KH=7, KW=7), "vnni")
    assert not dw_quads.fits(spec(stride=(1, 2)), "vnni")
    assert not dw_quads.fits(spec(epi=ci.Epilogue(mode="qadd")), "vnni")


def test_weight_packing_places_each_filter_row_once_per_output_row():
    rng = np.random.default_rng(3)
    for K, st in dw_quads.ROWS:
        w = rng.integers(-128, 128, (20, 1, K, K)).astype(np.int8)
        spec = ci.ConvSpec(1, 16, 16, 20, 20, K, K, (st, st), (K // 2,) * 4, (1, 1), "NHWC", 32, "uint8", 0,
                           ci.Epilogue())
        wq = dw_quads.pack_weight(w, spec)          # [CB, R, KW, NQ, 16, 4]
        R = wq.shape[1]
        for r in range(R):
            got = wq[:, r].transpose(0, 3, 2, 4, 1).reshape(-1, 4 * wq.shape[3], K)[:20]   # [C, row slot, KW]
            assert np.array_equal(got[:, r * st:r * st + K], w[:, 0])
            assert not got[:, :r * st].any() and not got[:, r * st + K:].any()
