"""Winograd F(2x2, 3x3) for channels-last fp32 3x3 stride-1 convs (graphopt/targets/cpu_winograd.py,
cpu_winograd_kernel.py): the kernel against a float64 direct conv, whole graphs compiled with it matching onnxruntime
(graphopt.compile's own check), which convs it takes, and the target option winograd=off."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_builders import bn_node, bn_params, model, rnd, vi

import graphopt
from graphopt.errors import BadInput
from graphopt.targets.cpu import CpuTarget

tvm = pytest.importorskip("tvm")

from graphopt.targets import cpu_winograd  # noqa: E402
from graphopt.targets.cpu_tuning import pre_tuning_module  # noqa: E402
from graphopt.targets.cpu_winograd_kernel import KERNEL_ATTR, WinogradSpec, pack_weight, winograd_conv2d  # noqa: E402
from targets.test_cpu_schedules import conv, scheduled  # noqa: E402

LANES = CpuTarget().hw().fp32_lanes


def _direct(x, w, pad):
    """float64 NHWC conv of x [N, H, W, C] with OIHW w, and the sum of |products| per output (the error scale)."""
    pt, pl, pb, pr = pad
    xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    OH, OW = xp.shape[1] - 2, xp.shape[2] - 2
    y = np.zeros(x.shape[:1] + (OH, OW, w.shape[0]))
    mag = np.zeros_like(y)
    for a in range(3):
        for b in range(3):
            patch = xp[:, a:a + OH, b:b + OW]
            y += np.einsum("nhwc,kc->nhwk", patch, w[:, :, a, b].astype(np.float64))
            mag += np.einsum("nhwc,kc->nhwk", np.abs(patch), np.abs(w[:, :, a, b]).astype(np.float64))
    return y, mag


KERNELS = [  # N, H, W, C, K, pad, residual
    (1, 8, 8, 16, 32, (1, 1, 1, 1), False),
    (2, 9, 11, 24, 24, (1, 1, 1, 1), True),      # odd sizes: partial tiles; 24 channels: half vectors
    (1, 7, 10, 20, 16, (0, 0, 0, 0), False),     # no padding, an odd output height
    (1, 13, 5, 16, 48, (1, 0, 1, 0), True),      # padding on one axis only
    (1, 6, 7, 192, 192, (1, 1, 1, 1), True),     # 2.4 MB of transformed weights: channel blocks outside the tiles
]


@pytest.mark.parametrize("case", KERNELS, ids=lambda c: "x".join(map(str, c[:5])) + f"-p{''.join(map(str, c[5]))}")
def test_kernel_matches_direct_conv(case):
    N, H, W, C, K, pad, residual = case
    rng = np.random.default_rng(sum(case[:5]))
    x = rng.standard_normal((N, H, W, C)).astype(np.float32)
    w = rng.standard_normal((K, C, 3, 3)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    OW = W + pad[1] + pad[3] - 2
    m_bn, nb = cpu_winograd.pick_tile(-(-OW // 2), K, LANES)
    spec = WinogradSpec(N, H, W, C, K, pad, m_bn, nb, min(LANES, nb), (0.0, None), residual, (None, 3.0))
    ref, mag = _direct(x, w, pad)
    ref = np.maximum(ref + b, 0)
    args = [x, pack_weight(w, nb), b]
    if residual:
        r = rng.standard_normal(ref.shape).astype(np.float32)
        ref = np.minimum(ref + r, 3.0)
        args.append(r)
    lib = tvm.compile(tvm.IRModule({"main": winograd_conv2d(spec)}), target=CpuTarget().tvm_target())
    y = tvm.runtime.tensor(np.zeros(ref.shape, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
    err = np.abs(y.numpy() - ref)
    assert np.all(err <= 1e-5 * mag + 1e-6), err.max()


def test_weights_outer_where_the_transformed_weights_outgrow_l2():
    """Channel blocks run outside the tile blocks (the whole image's input transform first) where the transformed
    weights (16 C K fp32) are over 1 MB and over the transformed input: ResNet-50's 14x14 256 -> 256 convs (4 MB,
    7 tile rows: 1 thread, four convs, 5.5 ms with the weights streamed per tile row, 3.9 ms outside), not its
    56x56 64 -> 64 ones (256 KB) nor the 6x6 192 -> 192 kernel case above's opposite, a 56x56 map of 192 channels
    (its transformed input outweighs the weights)."""
    from graphopt.targets.cpu_winograd_kernel import weights_outer
    spec = lambda H, C, K: WinogradSpec(1, H, H, C, K, m_bn=7, nb=32)  # noqa: E731
    assert weights_outer(spec(14, 256, 256)) and weights_outer(spec(6, 192, 192))
    assert not weights_outer(spec(56, 64, 64)) and not weights_outer(spec(28, 128, 128))
    assert not weights_outer(spec(56, 192, 192))
    func = winograd_conv2d(WinogradSpec(1, 6, 7, 192, 192, m_bn=4, nb=32, vl=min(LANES, 32)))
    assert "weights_outer" in str(func.attrs[KERNEL_ATTR])


def m_block():
    """A ResNet-style block at batch 2 on an odd 13x11 map: 3x3 conv 24 -> 32 (input channels off the SIMD width)
    + bias + relu, 3x3 conv 32 -> 32 + batch norm + residual add + relu, then an unpadded 3x3 conv 32 -> 40 (computed
    at 48 channels by cpu_pad_channels, then sliced)."""
    nodes = [conv("x", "w1", "c1", "c1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             conv("r1", "w2", "c2", "c2", pads=[1, 1, 1, 1], bias=False), bn_node("c2", "b2", "bn2"),
             helper.make_node("Add", ["b2", "r1"], ["s"]), helper.make_node("Relu", ["s"], ["r2"]),
             conv("r2", "w3", "y", "c3", pads=[0, 0, 0, 0])]
    inits = [("w1", rnd(32, 24, 3, 3, scale=0.2)), ("w1_b", rnd(32, seed=1)),
             ("w2", rnd(32, 32, 3, 3, seed=2, scale=0.1)), *bn_params("bn2", 32, seed=3),
             ("w3", rnd(40, 32, 3, 3, seed=4, scale=0.1)), ("w3_b", rnd(40, seed=5))]
    return model(nodes, [vi("x", [2, 24, 13, 11])], [vi("y", None)], inits)


def m_not_taken():
    """3x3 convs Winograd F(2x2, 3x3) does not take: stride 2, dilation 2, depthwise, grouped; and a 5x5 conv."""
    nodes = [conv("x", "ws", "s", "strided", pads=[1, 1, 1, 1], strides=[2, 2]),
             conv("x", "wd", "d", "dilated", pads=[2, 2, 2, 2], dilations=[2, 2]),
             conv("x", "wdw", "dw", "depthwise", pads=[1, 1, 1, 1], group=32),
             conv("x", "wg", "g", "grouped", pads=[1, 1, 1, 1], group=2),
             conv("x", "w5", "f", "five", pads=[2, 2, 2, 2])]
    inits = [("ws", rnd(32, 32, 3, 3)), ("ws_b", rnd(32, seed=1)), ("wd", rnd(32, 32, 3, 3, seed=2)),
             ("wd_b", rnd(32, seed=3)), ("wdw", rnd(32, 1, 3, 3, seed=4)), ("wdw_b", rnd(32, seed=5)),
             ("wg", rnd(32, 16, 3, 3, seed=6)), ("wg_b", rnd(32, seed=7)), ("w5", rnd(32, 32, 5, 5, seed=8)),
             ("w5_b", rnd(32, seed=9))]
    return model(nodes, [vi("x", [1, 32, 16, 16])], [vi(n, None) for n in ("s", "d", "dw", "g", "f")], inits)


def test_block_matches_onnxruntime_and_fuses_epilogues(tmp_path):
    """All three convs become Winograd kernels (the residual add and the batch norm in the second one's) and the
    library passes graphopt.compile's check against onnxruntime, whose tolerance is not changed for it."""
    onnx.save(m_block(), str(tmp_path / "m.onnx"))
    art = graphopt.compile(str(tmp_path / "m.onnx"), out=tmp_path / "art", measure=False)
    rep = art.report
    assert rep["check"]["ok"], rep["check"]
    assert rep["winograd_convs"] == 3 and rep["winograd_residual_fused"] == 1, rep
    assert art.outputs[0]["shape"] == [2, 40, 11, 9]


def _winograd_kernels(path, target):
    mod = pre_tuning_module(onnx.load(str(path)), target)
    return [gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs]


def test_option_off_keeps_the_direct_conv(tmp_path):
    """winograd=off: no Winograd kernel, the convs are scheduled by the direct channels-last rule, and the library
    passes the check; auto (the default) makes the kernels."""
    onnx.save(m_block(), str(tmp_path / "m.onnx"))
    assert len(_winograd_kernels(tmp_path / "m.onnx", CpuTarget())) == 3
    assert _winograd_kernels(tmp_path / "m.onnx", CpuTarget(winograd="off")) == []
    rules = [rule for name, (rule, _, _) in scheduled(tmp_path / "m.onnx", CpuTarget(winograd="off")).items()
             if "conv2d" in name]
    assert rules == ["conv2d_nhwc"] * 3, rules
    art = graphopt.compile(str(tmp_path / "m.onnx"), out=tmp_path / "art", measure=False,
                           target_options={"winograd": "off"})
    assert art.report["check"]["ok"], art.report["check"]
    assert "winograd_convs" not in art.report and art.manifest["target"]["winograd"] == "off"


def test_tuning_leaves_the_winograd_kernels_alone(tmp_path):
    """graphopt tune selects no Winograd kernel (scheduled when made) for MetaSchedule; the direct convs it does."""
    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.cpu_tuning import select_tasks
    onnx.save(m_block(), str(tmp_path / "m.onnx"))
    for opt, expected in (("auto", 0), ("off", 3)):
        target = CpuTarget(winograd=opt)
        with target.tvm_target():
            tasks = ms.relax_integration.extract_tasks(pre_tuning_module(onnx.load(str(tmp_path / "m.onnx")), target),
                                                      target.tvm_target())
        assert len([t for t in select_tasks(tasks) if "conv2d" in t.task_name]) == expected, opt


def test_other_convs_stay_direct(tmp_path):
    onnx.save(m_not_taken(), str(tmp_path / "m.onnx"))
    art = graphopt.compile(str(tmp_path / "m.onnx"), out=tmp_path / "art", measure=False)
    assert art.report["check"]["ok"], art.report["check"]
    assert art.report["winograd_convs"] == 0, art.report


def test_small_convs_stay_direct(tmp_path):
    """Below the measured sizes (fewer than 16 input channels, a 3x3 output) the rule keeps the direct conv."""
    assert cpu_winograd.pays(56, 56, 16, 16) and cpu_winograd.pays(4, 4, 64, 64)
    assert cpu_winograd.pays(14, 14, 256, 256)
    assert not cpu_winograd.pays(56, 56, 8, 8) and not cpu_winograd.pays(3, 3, 256, 256)
    # small maps whose direct conv reads each weight block once for all rows (cpu_conv.weights_first) stay direct
    assert not cpu_winograd.pays(7, 7, 512, 512) and not cpu_winograd.pays(4, 4, 512, 512)
    nodes = [conv("x", "w", "y", "c", pads=[1, 1, 1, 1])]
    onnx.save(model(nodes, [vi("x", [1, 8, 20, 20])], [vi("y", None)], [("w", rnd(16, 8, 3, 3)), ("w_b", rnd(16))]),
              str(tmp_path / "m.onnx"))
    art = graphopt.compile(str(tmp_path / "m.onnx"), out=tmp_path / "art", measure=False)
    assert art.report["winograd_convs"] == 0 and art.report["winograd_skipped"] == 1, art.report


def test_tiles_fit_the_registers():
    """pick_tile: nb a multiple of the vector width dividing K (half a vector for 24 channels), accumulators plus
    weight vectors and a broadcast within the registers, and a row of 28 tiles in blocks that divide it."""
    for TW, K in ((28, 64), (14, 128), (7, 256), (4, 512), (5, 24), (80, 16)):
        m_bn, nb = cpu_winograd.pick_tile(TW, K, 16)
        v = max(1, nb // 16)
        assert K % nb == 0 and (nb % 16 == 0 or nb == 8) and m_bn * v + v + 1 <= 32, (TW, K, m_bn, nb)
    assert cpu_winograd.pick_tile(28, 64, 16)[0] in (4, 7, 14)
    assert cpu_winograd.pick_tile(5, 20, 16) is None
    m_bn, nb = cpu_winograd.pick_tile(28, 64, 8)           # AVX2: 16 registers
    assert m_bn * (nb // 8) + nb // 8 + 1 <= 16, (m_bn, nb)


def test_bad_option_is_one_line():
    with pytest.raises(BadInput) as e:
        CpuTarget(winograd="on")
    assert "winograd is auto" in str(e.value) and "\n" not in str(e.value)
