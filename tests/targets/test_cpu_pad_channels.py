"""Convs whose output channel count no register tile fits (graphopt/targets/cpu_pad_channels.py): computed at a padded
count in both layouts of the cpu target, with onnxruntime's results."""
from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_builders import model, rnd, vi

import graphopt
from graphopt.targets.cpu import CpuTarget

tvm = pytest.importorskip("tvm")

from graphopt.targets import cpu_pad_channels, tvm_lowering  # noqa: E402
from targets.test_cpu_schedules import conv, scheduled  # noqa: E402

LAYOUTS = ["nchw", "nhwc"]


#: the step where the convs' channels are vectorized: the SIMD width, at least 8
WIDE = max(8, CpuTarget().hw().fp32_lanes)


def m_conv(oc, ic=16, hw=20):
    """3x3 conv + bias + relu with `oc` output channels."""
    nodes = [conv("x", "w", "c", "c", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    return model(nodes, [vi("x", [1, ic, hw, hw])], [vi("y", None)],
                 [("w", rnd(oc, ic, 3, 3)), ("w_b", rnd(oc, seed=1))])


def m_chain():
    """A 17-channel conv with batch-norm arithmetic and Clip (relu6), read by a 1x1 conv (which takes the padded
    channels) and by a residual add with another 17-channel conv's output (which reads the slice); a depthwise conv
    over the 17 channels and a grouped conv."""
    nodes = [conv("x", "w1", "c1", "c1", pads=[1, 1, 1, 1], bias=False),
             helper.make_node("Mul", ["c1", "s1"], ["m1"]), helper.make_node("Add", ["m1", "t1"], ["a1"]),
             helper.make_node("Clip", ["a1", "lo", "hi"], ["r1"]),
             conv("r1", "w2", "c2", "c2"),                                        # 17 -> 8, 1x1
             conv("x", "w3", "c3", "c3", pads=[1, 1, 1, 1]),                      # 16 -> 17
             helper.make_node("Add", ["r1", "c3"], ["s"]),
             conv("s", "wd", "d", "dw", pads=[1, 1, 1, 1], group=17),             # depthwise, 17 channels
             conv("c2", "wg", "g", "grouped", pads=[1, 1, 1, 1], group=2)]        # 8 -> 34 in 2 groups
    inits = [("w1", rnd(17, 16, 3, 3)), ("s1", rnd(1, 17, 1, 1, seed=1) + 1), ("t1", rnd(1, 17, 1, 1, seed=2)),
             ("lo", np.array(0.0, np.float32)), ("hi", np.array(6.0, np.float32)),
             ("w2", rnd(8, 17, 1, 1, seed=3)), ("w2_b", rnd(8, seed=4)),
             ("w3", rnd(17, 16, 3, 3, seed=5)), ("w3_b", rnd(17, seed=6)),
             ("wd", rnd(17, 1, 3, 3, seed=7)), ("wd_b", rnd(17, seed=8)),
             ("wg", rnd(34, 4, 3, 3, seed=9)), ("wg_b", rnd(34, seed=10))]
    return model(nodes, [vi("x", [1, 16, 12, 12])], [vi("d", None), vi("g", None)], inits)


def test_padded_counts():
    """Counts without a divisor from 4 to 12 go up to the next multiple of 8; counts with one, and counts that would
    more than double, stay."""
    assert [cpu_pad_channels.padded_count(c) for c in (17, 131, 34, 13, 51)] == [24, 136, 40, 16, 56]
    assert [cpu_pad_channels.padded_count(c) for c in (1, 2, 3, 7, 12, 16, 20, 24, 60, 255)] == [None] * 10


def test_channels_last_padded_counts():
    """Channels-last with AVX-512 every count above 8 goes up to the next multiple of 16; with AVX2 (8 lanes) only the
    untileable ones, to the next multiple of 8."""
    counts = (8, 9, 12, 16, 17, 24, 40, 60, 85, 131, 136, 255, 256)
    assert [cpu_pad_channels.nhwc_padded_count(c, 16) for c in counts] == \
        [None, 16, 16, None, 32, 32, 48, 64, 96, 144, 144, 256, None]
    assert [cpu_pad_channels.nhwc_padded_count(c, 8) for c in counts] == \
        [None, None, None, None, 24, None, None, None, None, 136, None, None, None]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("oc", [17, 131])
def test_prime_channel_conv_matches_onnxruntime(oc, layout, tmp_path):
    onnx.save(m_conv(oc), str(tmp_path / "m.onnx"))
    art = graphopt.compile(str(tmp_path / "m.onnx"), out=tmp_path / "art", measure=False,
                           target_options={"layout": layout})
    assert art.report["check"]["ok"], art.report["check"]
    # 20 pixels a row do not fill vectors: the NCHW rule vectorizes the channels too, in whole vectors
    assert art.report["padded_conv_channels"] == [f"{oc}->{cpu_pad_channels.padded_count(oc, WIDE)}"]
    assert art.outputs[0]["shape"] == [1, oc, 20, 20]


@pytest.mark.parametrize("layout,hw", [("nchw", 32), ("nchw", 20), ("nhwc", 32)])
def test_prime_channel_conv_gets_full_tiles(layout, hw, tmp_path):
    """The 17-channel conv ran in one-channel tiles (NCHW `pixels m_bn=1`; channels-last it stayed NCHW). It is now
    scheduled at 24 channels where the NCHW rule vectorizes along a row that fills vectors (6 to 12 channels a
    tile), else at the SIMD width (NCHW channel tiles of 20-pixel rows, channels-last: whole vectors); bias and relu
    stay in its tile, and one slice kernel gives the 17 channels."""
    onnx.save(m_conv(17, hw=hw), str(tmp_path / "m.onnx"))
    s = scheduled(tmp_path / "m.onnx", CpuTarget(layout=layout, winograd="off"))     # the direct conv's tiles
    convs = {n: v for n, v in s.items() if "conv2d" in n}
    assert len(convs) == 1, list(s)
    (name, (rule, _, notes)), = convs.items()
    note = " ".join(notes)
    assert "add" in name and "relu" in name, name          # the epilogue stayed in the conv's kernel
    assert rule == ("conv2d" if layout == "nchw" else "conv2d_nhwc"), rule
    if layout == "nchw" and hw == 32:
        assert "16->24 " in note and "m_bn=1 " not in note, note
        assert any(f"pixels m_bn={m} " in note for m in (6, 8, 12)), note
    else:
        oc_bn = int(re.search(r"oc_bn=(\d+)", note).group(1))
        assert f"16->{cpu_pad_channels.padded_count(17, WIDE)} " in note, note
        assert oc_bn % CpuTarget().hw().fp32_lanes == 0, note
    assert sum("strided_slice" in n for n in s) == 1, list(s)


@pytest.mark.parametrize("oc", [24, 136])
def test_channels_last_conv_off_the_simd_width_gets_whole_vectors(oc, tmp_path):
    """Channels-last, 24 and 136 channels (multiples of 8, not of 16) ran in tiles of 8 channels, half an AVX-512
    register (`oc_bn=8`); the conv is now computed at the next multiple of the SIMD width in tiles of whole vectors,
    with bias, relu and the slice back to `oc` channels in its kernel, and matches onnxruntime."""
    lanes = CpuTarget().hw().fp32_lanes
    padded = cpu_pad_channels.nhwc_padded_count(oc, lanes)      # None with AVX2: 8 lanes fit both counts
    onnx.save(m_conv(oc, hw=32), str(tmp_path / "m.onnx"))
    art = graphopt.compile(str(tmp_path / "m.onnx"), out=tmp_path / "art", measure=False,
                           target_options={"layout": "nhwc"})
    assert art.report["check"]["ok"], art.report["check"]
    assert art.report.get("padded_conv_channels") == ([f"{oc}->{padded}"] if padded else None)
    assert art.outputs[0]["shape"] == [1, oc, 32, 32]
    s = scheduled(tmp_path / "m.onnx", CpuTarget(layout="nhwc", winograd="off"))      # the direct conv's tiles
    convs = {n: v for n, v in s.items() if "conv2d" in n}
    assert len(convs) == 1, list(s)
    (name, (rule, _, notes)), = convs.items()
    note = " ".join(notes)
    assert rule == "conv2d_nhwc" and "add" in name and "relu" in name, (name, rule)
    assert ("strided_slice" in name) == bool(padded), name
    assert f"16->{padded or oc} " in note, note
    assert int(re.search(r"oc_bn=(\d+)", note).group(1)) % lanes == 0, note


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padded_conv_reading_a_slice_of_a_padded_conv(layout, tmp_path):
    """Two padded 3x3 convs in a row: the second reads the first one's slice (taking 17 padded channels whole would
    cost more than the slice), which was never written, so the module named an undefined variable and did not build
    (a MobileNetV3 squeeze-excite: 72 -> 18 -> 72, both padded channels-last)."""
    nodes = [conv("x", "w1", "c1", "c1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             conv("r1", "w2", "y", "c2", pads=[1, 1, 1, 1])]
    m = model(nodes, [vi("x", [1, 16, 12, 12])], [vi("y", None)],
              [("w1", rnd(17, 16, 3, 3)), ("w1_b", rnd(17, seed=1)), ("w2", rnd(17, 17, 3, 3, seed=2)),
               ("w2_b", rnd(17, seed=3))])
    onnx.save(m, str(tmp_path / "m.onnx"))
    art = graphopt.compile(str(tmp_path / "m.onnx"), out=tmp_path / "art", measure=False,
                           target_options={"layout": layout})
    assert art.report["check"]["ok"], art.report["check"]
    assert len(art.report["padded_conv_channels"]) == 2, art.report["padded_conv_channels"]


def test_padding_is_carried_absorbed_and_sliced():
    """In m_chain: the two 17-channel convs are padded to 24; batch-norm arithmetic and the Clip carry the padding
    (their constants padded), the 1x1 conv reads the 24 channels with zero weights for the 7 padded ones, the residual
    add of the two padded chains stays padded, and the depthwise conv (not padded) reads a slice; the grouped conv's
    34 channels (2 groups) are left alone."""
    from tvm import relax

    target = CpuTarget(layout="nchw")
    mod = tvm_lowering.import_onnx(m_chain())
    out, facts = cpu_pad_channels.pad_channels(mod, target.tvm_target(), nhwc=False)
    assert facts == {"padded_conv_channels": ["17->24", "17->24"]}
    calls = []
    relax.analysis.post_order_visit(out["main"], lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    convs = sorted((tuple(int(d) for d in c.args[1].ty.shape), int(c.attrs.groups)) for c in calls
                   if getattr(c.op, "name", None) == "relax.nn.conv2d")
    assert convs == [((8, 24, 1, 1), 1), ((17, 1, 3, 3), 17), ((24, 16, 3, 3), 1), ((24, 16, 3, 3), 1),
                     ((34, 4, 3, 3), 2)], convs
    slices = [c for c in calls if getattr(c.op, "name", None) == "relax.strided_slice"]
    assert len(slices) == 1 and [int(d) for d in slices[0].ty.shape] == [1, 17, 12, 12]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chain_matches_onnxruntime(layout, tmp_path):
    onnx.save(m_chain(), str(tmp_path / "chain.onnx"))
    art = graphopt.compile(str(tmp_path / "chain.onnx"), out=tmp_path / "art", measure=False,
                           target_options={"layout": layout})
    assert art.report["check"]["ok"], art.report["check"]
    rules = {n: v[0] for n, v in scheduled(tmp_path / "chain.onnx", CpuTarget(layout=layout, winograd="off")).items()}
    assert None not in rules.values(), rules
