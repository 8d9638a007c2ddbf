"""graphopt's default CPU schedules (graphopt/targets/cpu_schedules.py and the cpu_conv / cpu_matmul / cpu_reduce
rules): every rule is exercised by a small model that must compile and match onnxruntime, and the scheduled TIR
is inspected to make sure the rule really applied (parallel + vectorized loops, packed weights)."""
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

from graphopt.targets import cpu_schedules  # noqa: E402
from graphopt.targets.cpu_tuning import pre_tuning_module  # noqa: E402
from graphopt.targets.cpu_winograd_kernel import KERNEL_ATTR  # noqa: E402


def conv(x, w, y, name, **attrs):
    return helper.make_node("Conv", [x, w] + ([f"{w}_b"] if attrs.pop("bias", True) else []), [y], name=name, **attrs)


def m_conv_epilogues():
    """3x3 conv + bias + relu (pixel variant, width 16), 1x1 conv, residual add, relu."""
    nodes = [conv("x", "w1", "c1", "c1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             conv("r1", "w2", "c2", "c2"), helper.make_node("Add", ["c2", "c1"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    inits = [("w1", rnd(32, 16, 3, 3)), ("w1_b", rnd(32, seed=1)), ("w2", rnd(32, 32, 1, 1, seed=2)),
             ("w2_b", rnd(32, seed=3))]
    return model(nodes, [vi("x", [1, 16, 16, 16])], [vi("y", None)], inits)


def m_conv_strided_small():
    """stride-2 3x3 conv and a conv on a 7x7 map (channel-vectorized variant), no bias, BN-style arithmetic."""
    nodes = [conv("x", "w1", "c1", "c1", pads=[1, 1, 1, 1], strides=[2, 2], bias=False),
             helper.make_node("Mul", ["c1", "s1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Sigmoid", ["a1"], ["g1"]), helper.make_node("Mul", ["a1", "g1"], ["h1"]),
             conv("h1", "w2", "y", "c2", pads=[1, 1, 1, 1])]
    inits = [("w1", rnd(32, 8, 3, 3)), ("s1", rnd(1, 32, 1, 1, seed=4)), ("b1", rnd(1, 32, 1, 1, seed=5)),
             ("w2", rnd(48, 32, 3, 3, seed=6)), ("w2_b", rnd(48, seed=7))]
    return model(nodes, [vi("x", [1, 8, 14, 14])], [vi("y", None)], inits)


def m_grouped_depthwise():
    """grouped conv with wide groups, grouped conv with narrow groups, depthwise stride 1 and 2 + relu6."""
    nodes = [conv("x", "wg", "g", "grouped", pads=[1, 1, 1, 1], group=2),
             conv("g", "wn", "n", "narrow", pads=[1, 1, 1, 1], group=16),
             conv("n", "wd", "d", "dw1", pads=[1, 1, 1, 1], group=64),
             helper.make_node("Clip", ["d", "lo", "hi"], ["d6"]),
             conv("d6", "wd2", "y", "dw2", pads=[1, 1, 1, 1], strides=[2, 2], group=64)]
    inits = [("wg", rnd(64, 16, 3, 3)), ("wg_b", rnd(64, seed=1)), ("wn", rnd(64, 4, 3, 3, seed=2)),
             ("wn_b", rnd(64, seed=3)), ("wd", rnd(64, 1, 3, 3, seed=4)), ("wd_b", rnd(64, seed=5)),
             ("wd2", rnd(64, 1, 3, 3, seed=6)), ("wd2_b", rnd(64, seed=7)),
             ("lo", np.array(0.0, np.float32)), ("hi", np.array(6.0, np.float32))]
    return model(nodes, [vi("x", [1, 32, 20, 20])], [vi("y", None)], inits)


def m_pooling():
    nodes = [helper.make_node("MaxPool", ["x"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["p1"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["p2"], ["y"])]
    return model(nodes, [vi("x", [1, 16, 32, 32])], [vi("y", None)])


def m_transformer():
    """dense layers (Gemm-like MatMul + bias, GELU via Erf), attention batch matmuls, softmax, layer norm,
    a non-trailing reduction (generic rule)."""
    d, h, s = 64, 4, 32
    nodes = [
        helper.make_node("MatMul", ["x", "wqkv"], ["qkv0"]), helper.make_node("Add", ["qkv0", "bqkv"], ["qkv"]),
        helper.make_node("Reshape", ["qkv", "shp"], ["qkv5"]),
        helper.make_node("Transpose", ["qkv5"], ["qkvt"], perm=[2, 0, 3, 1, 4]),
        helper.make_node("Split", ["qkvt"], ["q5", "k5", "v5"], axis=0, num_outputs=3),
        helper.make_node("Squeeze", ["q5", "ax0"], ["q"]), helper.make_node("Squeeze", ["k5", "ax0"], ["k"]),
        helper.make_node("Squeeze", ["v5", "ax0"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["att0"]), helper.make_node("Mul", ["att0", "scale"], ["att1"]),
        helper.make_node("Softmax", ["att1"], ["att"], axis=-1),
        helper.make_node("MatMul", ["att", "v"], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["o4t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o4t", "shp2"], ["o"]),
        helper.make_node("Add", ["o", "x"], ["r"]),
        helper.make_node("LayerNormalization", ["r", "ln_g", "ln_b"], ["ln"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["ln", "w1"], ["f0"]), helper.make_node("Add", ["f0", "b1"], ["f1"]),
        helper.make_node("Div", ["f1", "sqrt2"], ["f2"]), helper.make_node("Erf", ["f2"], ["f3"]),
        helper.make_node("Add", ["f3", "one"], ["f4"]), helper.make_node("Mul", ["f1", "f4"], ["f5"]),
        helper.make_node("Mul", ["f5", "half"], ["f6"]),
        helper.make_node("Gemm", ["f6_2d", "w2", "b2"], ["g"], transB=1),
        helper.make_node("Reshape", ["f6", "shp3"], ["f6_2d"]),
        helper.make_node("ReduceSum", ["g3", "ax1"], ["y"], keepdims=1),
        helper.make_node("Reshape", ["g", "shp4"], ["g3"]),
    ]
    # keep topological order
    order = ["qkv0", "qkv", "qkv5", "qkvt", "q5", "q", "k", "v", "kt", "att0", "att1", "att", "o4", "o4t", "o", "r",
             "ln", "f0", "f1", "f2", "f3", "f4", "f5", "f6", "f6_2d", "g", "g3", "y"]
    by_out = {}
    for n in nodes:
        by_out[n.output[0]] = n
    nodes = [by_out[o] for o in order if o in by_out]
    inits = [("wqkv", rnd(d, 3 * d)), ("bqkv", rnd(3 * d, seed=1)),
             ("shp", np.array([1, s, 3, h, d // h], np.int64)), ("ax0", np.array([0], np.int64)),
             ("scale", np.array(1 / np.sqrt(d // h), np.float32)), ("shp2", np.array([1, s, d], np.int64)),
             ("ln_g", rnd(d, seed=2) + 1), ("ln_b", rnd(d, seed=3)), ("w1", rnd(d, 2 * d, seed=4)),
             ("b1", rnd(2 * d, seed=5)), ("sqrt2", np.array(np.sqrt(2), np.float32)),
             ("one", np.array(1, np.float32)), ("half", np.array(0.5, np.float32)),
             ("shp3", np.array([s, 2 * d], np.int64)), ("w2", rnd(48, 2 * d, seed=6)), ("b2", rnd(48, seed=7)),
             ("shp4", np.array([1, s, 48], np.int64)), ("ax1", np.array([1], np.int64))]
    return model(nodes, [vi("x", [1, s, d])], [vi("y", None)], inits, opset=18)


def m_reductions():
    """a sum over the last axis (row reduction), a mean and a softmax over a middle axis (column reductions)."""
    nodes = [helper.make_node("ReduceSum", ["x", "ax2"], ["s"], keepdims=0),
             helper.make_node("ReduceMean", ["x", "ax1"], ["mn"], keepdims=1),
             helper.make_node("Softmax", ["x"], ["sm"], axis=1)]
    return model(nodes, [vi("x", [2, 48, 64])], [vi("s", None), vi("mn", None), vi("sm", None)],
                 [("ax2", np.array([2], np.int64)), ("ax1", np.array([1], np.int64))], opset=18)


MODELS = {
    "conv_epilogues": m_conv_epilogues,
    "conv_strided_small": m_conv_strided_small,
    "grouped_depthwise": m_grouped_depthwise,
    "pooling": m_pooling,
    "transformer": m_transformer,
    "reductions": m_reductions,
}


@pytest.fixture
def nchw(monkeypatch):
    """Lower without the channels-last conversion, so the NCHW rules (still used for convs it leaves NCHW: odd channel
    counts, models with a ConvTranspose whose kernel is not its stride) get the convs."""
    from graphopt.targets import cpu_layout
    monkeypatch.setattr(cpu_layout, "to_nhwc", lambda mod, target, *_: mod)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sched_models")
    paths = {}
    for name, fn in MODELS.items():
        p = d / f"{name}.onnx"
        onnx.save(fn(), str(p))
        paths[name] = p
    return paths


def scheduled(model_path, target=None):
    """{function name: (rule, script)} after graphopt's default schedules (before building)."""
    target = target or CpuTarget()
    mod = pre_tuning_module(onnx.load(str(model_path)), target)
    consts = cpu_schedules.constant_params(mod)
    out = {}
    for gv, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc):
            new, rule, notes = cpu_schedules.schedule_func(f, target.tvm_target(), consts.get(gv.name_hint, set()))
            out[gv.name_hint] = (rule, new.script(), notes)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_compiles_and_matches_onnxruntime(model_files, name, tmp_path):
    art = graphopt.compile(str(model_files[name]), out=tmp_path / "art", measure=False)
    assert art.report["check"]["ok"], art.report["check"]


def _rules(sched):
    return {name: rule for name, (rule, _, _) in sched.items()}


def test_conv_rules_parallel_vectorized_and_packed(model_files, nchw):
    s = scheduled(model_files["conv_epilogues"])
    convs = {n: v for n, v in s.items() if "conv2d" in n}
    assert len(convs) == 2
    for name, (rule, script, notes) in convs.items():
        assert rule == "conv2d", (name, rule)
        assert "T.parallel" in script and "T.vectorized" in script, name
        # constant weight repacked at compile time by a layout-rewrite preprocess block
        assert "meta_schedule.layout_rewrite_preproc" in script, name
    notes = " ".join(" ".join(v[2]) for v in convs.values())
    assert "pixels" in notes  # unit-stride, width 16: pixels vectorized
    s2 = scheduled(model_files["conv_strided_small"])
    notes2 = " ".join(" ".join(v[2]) for n, v in s2.items() if v[0] == "conv2d")
    assert notes2.count("channels") == 2  # stride 2 and width 7: output channels vectorized


def test_epilogue_fused_into_conv_tile(model_files, nchw):
    s = scheduled(model_files["conv_epilogues"])
    # the second conv's function: conv + bias + residual add + relu
    (name, (rule, script, _)), = [(n, v) for n, v in s.items() if n.count("add") >= 2 and "relu" in n]
    assert rule == "conv2d"
    # bias, residual add and relu are computed inside the tile loop: one parallel loop nest, relu inlined
    assert script.count("T.parallel") == 1, script
    assert "T.max" in script


def test_grouped_and_depthwise_rules(model_files, nchw):
    s = scheduled(model_files["grouped_depthwise"])
    rules = sorted(r for n, (r, _, _) in s.items() if "conv2d" in n)
    # wide and narrow groups -> conv rule (narrow: pixels vectorized, channels of one group per tile);
    # both depthwise convs -> window rule
    assert rules.count("conv2d") == 2 and rules.count("depthwise") == 2, rules
    notes = [" ".join(v[2]) for n, v in s.items() if v[0] == "conv2d"]
    assert any("grouped=True" in n and "pixels m_bn=4" in n for n in notes), notes
    dw = [v for n, v in s.items() if v[0] == "depthwise"]
    assert all("T.vectorized" in script for _, script, _ in dw)
    # the stride-2 depthwise conv reads a de-interleaved padded plane (even / odd columns)
    assert any("% T.int64(2)" in script for _, script, _ in dw)


def test_pooling_rules(model_files):
    s = scheduled(model_files["pooling"])
    r = _rules(s)
    assert r.get("max_pool2d") == "depthwise" and r.get("avg_pool2d") == "depthwise", r
    assert any(rule == "reduction" for n, rule in r.items() if "mean" in n or "global" in n or "avg" not in n), r


def test_transformer_rules(model_files):
    s = scheduled(model_files["transformer"])
    r = _rules(s)
    mm = [n for n in r if "matmul" in n]
    assert mm and all(r[n] == "matmul" for n in mm), r
    assert r.get("softmax") == "reduction" and r.get("layer_norm") == "reduction", r
    assert any(rule == "generic" for rule in r.values()), r
    for n in mm:
        assert "T.parallel" in s[n][1] and "T.vectorized" in s[n][1]


def test_reduction_rules(model_files):
    s = scheduled(model_files["reductions"])
    r = _rules(s)
    assert r.get("sum") == "reduction", r
    assert r.get("mean") == "generic" and r.get("softmax") == "generic", r
    assert any("column reduction" in " ".join(v[2]) for v in s.values())
    for name in ("sum", "mean", "softmax"):
        assert "T.vectorized" in s[name][1], name


def test_every_function_scheduled_in_zoo_models(zoo_onnx):
    """Real exported models: every fused function gets some rule (none left naive)."""
    for name in ("resnet", "mobilenet_v3", "vit"):
        s = scheduled(zoo_onnx(name))
        left = [n for n, (rule, script, _) in s.items() if rule is None and KERNEL_ATTR not in script]  # Winograd's
        assert not left, (name, left)


@pytest.mark.parametrize("mcpu,lanes", [("cooperlake", 16), ("skylake-avx512", 16), ("haswell", 8), ("x86-64", 4)])
def test_lanes_from_target(mcpu, lanes):
    t = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    assert cpu_schedules.fp32_lanes(t) == lanes
    t2 = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64", "mattr": ["+avx512f"]})
    assert cpu_schedules.fp32_lanes(t2) == 16


def test_avx2_target_compiles_correctly(model_files, tmp_path):
    art = graphopt.compile(str(model_files["conv_epilogues"]), out=tmp_path / "avx2", measure=False,
                           target_options={"mcpu": "haswell"})
    assert art.report["check"]["ok"]


def test_scheduled_functions_are_not_refused():
    """schedule_module marks what it scheduled (tirx.is_scheduled, opaque op pattern) and leaves functions
    MetaSchedule already scheduled alone."""
    from tvm import te

    a = te.placeholder((4096,), "float32", name="a")
    b = te.compute((4096,), lambda i: a[i] + 1.0, name="b")
    add = te.create_prim_func([a, b])

    mod = tvm.IRModule({"add": add.with_attr("tirx.is_scheduled", True)})
    target = CpuTarget().tvm_target()
    out = cpu_schedules.schedule_module(mod, target)
    tvm.ir.assert_structural_equal(out["add"].body, add.body)
    assert int(out["add"].attrs["op_pattern"]) == 8
    out2 = cpu_schedules.schedule_module(tvm.IRModule({"add": add}), target)
    assert out2["add"].attrs[cpu_schedules.RULE_ATTR] == "generic"


# ----------------------------------------------------------------------------- a fused Pad after the epilogue
# PP-OCRv6's detector (rapidocr 3.10) came out wrong by up to 1.0: the next conv's auto_pad=SAME_UPPER padding is a
# Pad that FuseOps puts at the end of the previous conv's function, and computing that Pad inside the conv's tiles
# (reverse_compute_at) wrote only the interior, so the border held whatever the memory held before.

def m_conv_same_upper():
    """3x3 stride-2 conv (channel tile) and a 2x2 SAME_UPPER conv (pixel tile), each followed by bias, relu and
    the next 2x2 SAME_UPPER conv's asymmetric padding."""
    nodes = [conv("x", "w1", "c1", "c1", pads=[1, 1, 1, 1], strides=[2, 2]), helper.make_node("Relu", ["c1"], ["r1"]),
             conv("r1", "w2", "c2", "c2", kernel_shape=[2, 2], auto_pad="SAME_UPPER"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             conv("r2", "w3", "y", "c3", kernel_shape=[2, 2], auto_pad="SAME_UPPER")]
    inits = [("w1", rnd(16, 3, 3, 3)), ("w1_b", rnd(16, seed=1)), ("w2", rnd(8, 16, 2, 2, seed=2)),
             ("w2_b", rnd(8, seed=3)), ("w3", rnd(4, 8, 2, 2, seed=4)), ("w3_b", rnd(4, seed=5))]
    return model(nodes, [vi("x", [1, 3, 64, 64])], [vi("y", None)], inits)


def m_conv_same_upper_no_epilogue():
    """a conv without bias or activation: the next conv's padding is the first block after it."""
    nodes = [conv("x", "w1", "c1", "c1", pads=[1, 1, 1, 1], bias=False),
             conv("c1", "w2", "y", "c2", kernel_shape=[2, 2], auto_pad="SAME_UPPER")]
    inits = [("w1", rnd(16, 3, 3, 3)), ("w2", rnd(4, 16, 2, 2, seed=2)), ("w2_b", rnd(4, seed=3))]
    return model(nodes, [vi("x", [1, 3, 32, 32])], [vi("y", None)], inits)


def m_depthwise_same_upper():
    nodes = [conv("x", "wd", "d", "dw", pads=[1, 1, 1, 1], group=8), helper.make_node("Relu", ["d"], ["r"]),
             conv("r", "w2", "y", "c2", kernel_shape=[2, 2], auto_pad="SAME_UPPER")]
    inits = [("wd", rnd(8, 1, 3, 3)), ("wd_b", rnd(8, seed=1)), ("w2", rnd(4, 8, 2, 2, seed=2)), ("w2_b", rnd(4, seed=3))]
    return model(nodes, [vi("x", [1, 8, 32, 32])], [vi("y", None)], inits)


def m_matmul_pad():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Pad", ["r", "pads"], ["y"])]
    inits = [("w", rnd(64, 64)), ("b", rnd(64, seed=1)), ("pads", np.array([0, 0, 1, 3], np.int64))]
    return model(nodes, [vi("x", [64, 64])], [vi("y", None)], inits)


PAD_MODELS = {"conv_same_upper": (m_conv_same_upper, "conv2d"),
              "conv_same_upper_no_epilogue": (m_conv_same_upper_no_epilogue, "conv2d"),
              "depthwise_same_upper": (m_depthwise_same_upper, "depthwise"), "matmul_pad": (m_matmul_pad, "matmul")}


def _run_prim(lib, func, inputs, fill):
    out = func.params[-1]
    o = tvm.runtime.tensor(np.full([int(d) for d in out.shape], fill, str(out.dtype)))
    lib["main"](*[tvm.runtime.tensor(a) for a in inputs], o)
    return o.numpy()


@pytest.mark.parametrize("name", list(PAD_MODELS))
def test_fused_pad_epilogue_writes_every_element(name, tmp_path, nchw):
    """Each function ending in a Pad, scheduled by its fast rule, writes every output element: run with the output
    buffer pre-filled with NaN and with 7.0, it gives exactly what the unscheduled function gives."""
    make, rule = PAD_MODELS[name]
    path = tmp_path / f"{name}.onnx"
    onnx.save(make(), str(path))
    target = CpuTarget()
    mod = pre_tuning_module(onnx.load(str(path)), target)
    consts = cpu_schedules.constant_params(mod)
    padded = [(gv, f) for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "pad" in gv.name_hint]
    assert padded, list(mod.functions)
    rng = np.random.default_rng(0)
    for gv, func in padded:
        new, got_rule, _ = cpu_schedules.schedule_func(func, target.tvm_target(), consts.get(gv.name_hint, set()))
        assert got_rule == rule, (gv.name_hint, got_rule)    # fixed in the fast rule, not by falling back
        libs = [tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target.tvm_target())
                for f in (func, new)]
        inputs = [rng.standard_normal([int(d) for d in p.shape]).astype(str(p.dtype)) for p in func.params[:-1]]
        ref = _run_prim(libs[0], func, inputs, 0.0)
        for fill in (np.nan, 7.0):
            got = _run_prim(libs[1], func, inputs, fill)
            assert not np.isnan(got).any(), gv.name_hint
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def test_full_coverage_check_rejects_a_dropped_border():
    """check_full_coverage refuses a schedule whose Pad consumer was computed inside the producer's tiles."""
    from tvm import te

    from graphopt.targets.cpu_sched_common import check_full_coverage

    a = te.placeholder((64,), "float32", name="a")
    b = te.compute((64,), lambda i: a[i] * 2.0, name="b")
    c = te.compute((65,), lambda j: tvm.tirx.if_then_else(j < 64, b[j], tvm.tirx.const(0.0, "float32")), name="c")
    mod = tvm.IRModule({"main": te.create_prim_func([a, c])})
    fine = tvm.s_tir.Schedule(mod)
    check_full_coverage(fine)
    sch = tvm.s_tir.Schedule(mod)
    outer, _ = sch.split(sch.get_loops(sch.get_sblock("b"))[0], [None, 16])
    sch.reverse_compute_at(sch.get_sblock("c"), outer)
    with pytest.raises(ValueError, match="64 of its 65"):
        check_full_coverage(sch)


_THREADS_SCRIPT = """
import sys, numpy as np, onnx, tvm, graphopt
from graphopt import ort
m = onnx.load(sys.argv[1])
art = graphopt.compile(sys.argv[1], out=sys.argv[2], measure=False)
assert art.report["check"]["repeatable"] and art.report["check"]["second_input"]["ok"], art.report["check"]
name = m.graph.input[0].name
shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
worst = 0.0
for threads in (1, None, 2, 1, None):   # None (a plain run) after 1: every thread of the pool again
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        ref = ort.run(m.SerializeToString(), {name: x})
        got = art.run({name: x}, threads=threads)
        assert tvm.get_global_func("runtime.NumThreads")() == (threads or 2)   # the pool really runs that many
        worst = max(worst, max(float(np.abs(ref[k] - got[k]).max() / max(1.0, np.abs(ref[k]).max())) for k in ref))
print(worst)
"""


@pytest.mark.parametrize("name", list(PAD_MODELS))
def test_fused_pad_models_match_onnxruntime_at_1_and_2_threads(name, tmp_path):
    """The whole graphs, compiled and run in a process whose TVM thread pool has 2 threads, at 1 and 2 threads,
    several inputs each, several times: onnxruntime's results every time."""
    import os
    import subprocess
    import sys

    path = tmp_path / f"{name}.onnx"
    onnx.save(PAD_MODELS[name][0](), str(path))
    env = dict(os.environ, TVM_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(path), str(tmp_path / "art")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-4


def test_libraries_with_the_same_kernel_names_in_one_process(tmp_path):
    """Two compiled libraries whose kernels have the same names but other shapes, loaded and run interleaved in
    one process, each give their own model's results."""
    from graphopt import ort

    arts, models = [], []
    for i, (c, hw) in enumerate(((16, 32), (8, 24))):
        nodes = [conv("x", "w1", "c1", "c1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["y"])]
        m = model(nodes, [vi("x", [1, 3, hw, hw])], [vi("y", None)],
                  [("w1", rnd(c, 3, 3, 3, seed=i)), ("w1_b", rnd(c, seed=i + 1))])
        onnx.save(m, str(tmp_path / f"m{i}.onnx"))
        arts.append(graphopt.compile(str(tmp_path / f"m{i}.onnx"), out=tmp_path / f"a{i}", measure=False))
        models.append(m)
    names = [set(cpu_schedules.constant_params(pre_tuning_module(m, CpuTarget()))) for m in models]
    assert names[0] & names[1]      # the same kernel names, other shapes
    for _ in range(2):
        for art, m in zip(arts, models):
            shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
            x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
            ref = ort.run(m.SerializeToString(), {"x": x})["y"]
            np.testing.assert_allclose(art.run({"x": x})["y"], ref, rtol=1e-4, atol=1e-4)


def test_long_softmax_rows_are_summed_in_partial_results(tmp_path):
    """A 6625-way softmax (PP-OCR's CTC head; 6625 = 5^3 x 53, no SIMD width divides it) is rfactor-ed into partial
    sums: summed in one float32 accumulator it was 10x further from the float64 result than onnxruntime, which
    failed the pruned recognizers' compile check."""
    m = model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [vi("x", [4, 6625])], [vi("y", None)], opset=13)
    onnx.save(m, str(tmp_path / "softmax.onnx"))
    s = scheduled(tmp_path / "softmax.onnx")
    assert "rfactor=2" in " ".join(s["softmax"][2]), s["softmax"][2]
    art = graphopt.compile(str(tmp_path / "softmax.onnx"), out=tmp_path / "art", measure=False)
    x = np.random.default_rng(0).standard_normal((4, 6625)).astype(np.float32) * 3
    x[:, 7] += 15                               # one class near probability 1, as in a CTC head
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    assert np.abs(art.run({"x": x})["y"] - e / e.sum(-1, keepdims=True)).max() < 1e-5


def test_conv_chains_run_channels_last(model_files):
    """With layout=nhwc fp32 convs with a multiple of 8 output channels are lowered NHWC and scheduled by the
    channels-last rule (weights repacked at compile time)."""
    s = scheduled(model_files["conv_epilogues"], CpuTarget(layout="nhwc", winograd="off"))
    convs = {n: v for n, v in s.items() if "conv2d" in n}
    assert len(convs) == 2 and {v[0] for v in convs.values()} == {"conv2d_nhwc"}, _rules(s)
    assert all("meta_schedule.layout_rewrite_preproc" in v[1] for v in convs.values())


def test_wide_depthwise_window_stays_within_unroll_bounds(tmp_path):
    """A 5x5 depthwise conv over 240 channels (PP-OCRv4's recognizer): its tile (5 pixels x 48 channels) with the whole
    window unrolled was 6000 elements of straight-line code, over check_vectorized_loops' bound, so the channels-last
    rule failed and the conv ran as a plain loop nest; the window is now unrolled only as far as the bound allows."""
    nodes = [conv("x", "w1", "c1", "c1"), conv("c1", "wd", "y", "dw", pads=[2, 2, 2, 2], group=240)]
    m = model(nodes, [vi("x", [1, 16, 12, 20])], [vi("y", None)],
              [("w1", rnd(240, 16, 1, 1)), ("w1_b", rnd(240, seed=1)), ("wd", rnd(240, 1, 5, 5, seed=2)),
               ("wd_b", rnd(240, seed=3))])
    onnx.save(m, str(tmp_path / "dw.onnx"))
    s = scheduled(tmp_path / "dw.onnx", CpuTarget(layout="nhwc"))
    notes = [" ".join(v[2]) for v in s.values() if v[0] == "conv2d_nhwc"]
    assert any("k5x5 depthwise" in n for n in notes), _rules(s)
    art = graphopt.compile(str(tmp_path / "dw.onnx"), out=tmp_path / "art", measure=False,
                           target_options={"layout": "nhwc"})
    assert art.report["check"]["ok"], art.report["check"]


@pytest.mark.fast
def test_depthwise_5x5_tiles_unroll_their_whole_window():
    """A 5x5 depthwise tile is small enough that all 25 taps unroll (four 5x5 depthwise convs of 240 channels at
    12x80 on 1 thread: 48 channels x 5 pixels, window rows looped, 0.96 ms; 16 x 10 unrolled 0.69), with at least
    MIN_UNROLLED_DEPTHWISE_ACC accumulators; 3x3 windows (unrolled either way) and 7x7 ones (no such tile) keep the
    tiles they had."""
    from graphopt.targets import cpu_conv
    from graphopt.targets.cpu_sched_common import MAX_UNROLLED_LANES
    for width, ch in ((80, 240), (80, 480), (28, 240), (14, 672), (7, 1152)):
        oc_bn, ow_bn = cpu_conv._nhwc_tile(width, ch, 16, "depthwise", None, 25)
        acc = ow_bn * -(-oc_bn // 16)
        assert 25 * oc_bn * ow_bn <= MAX_UNROLLED_LANES and cpu_conv.MIN_UNROLLED_DEPTHWISE_ACC <= acc, (width, ch)
    for width, ch in ((56, 144), (14, 576), (112, 32)):
        assert cpu_conv._nhwc_tile(width, ch, 16, "depthwise", None, 9) == \
            cpu_conv._nhwc_tile(width, ch, 16, "depthwise", None, 1)
    assert cpu_conv._nhwc_tile(56, 96, 16, "depthwise", None, 49) == (48, 4)


def test_half_vector_depthwise_tile_keeps_few_accumulators(tmp_path):
    """A depthwise conv of 24 channels (half an AVX-512 register: tiles of 8 channels) on rows of 56 took 28-pixel
    tiles, 28 accumulators beside the unrolled window's weights (spilled: 2x slower than 14-pixel tiles); a depthwise
    tile now holds at most MAX_DEPTHWISE_ACC accumulator vectors."""
    from graphopt.targets import cpu_conv
    m = model([conv("x", "wd", "y", "dw", pads=[1, 1, 1, 1], group=24)], [vi("x", [1, 24, 6, 56])], [vi("y", None)],
              [("wd", rnd(24, 1, 3, 3)), ("wd_b", rnd(24, seed=1))])
    onnx.save(m, str(tmp_path / "dw.onnx"))
    notes = [" ".join(v[2]) for v in scheduled(tmp_path / "dw.onnx", CpuTarget(layout="nhwc")).values()
             if v[0] == "conv2d_nhwc"]
    assert len(notes) == 1 and "depthwise" in notes[0], notes
    oc_bn, ow_bn = (int(re.search(rf"{k}=(\d+)", notes[0]).group(1)) for k in ("oc_bn", "ow_bn"))
    assert ow_bn * -(-oc_bn // CpuTarget().hw().fp32_lanes) <= cpu_conv.MAX_DEPTHWISE_ACC, notes
    art = graphopt.compile(str(tmp_path / "dw.onnx"), out=tmp_path / "art", measure=False,
                           target_options={"layout": "nhwc"})
    assert art.report["check"]["ok"], art.report["check"]


@pytest.mark.parametrize("hw,ch,outer", [(7, 256, "weights"), (28, 64, "rows")])
def test_conv_with_weights_beyond_l2_runs_channel_blocks_outside_rows(tmp_path, hw, ch, outer):
    """A channels-last 3x3 conv of 256 -> 256 channels (2.4 MB of fp32 weights) on a 7x7 map runs its channel blocks
    outside its rows (each block's weights read once; rows outside, ResNet-18's 7x7x512 convs read 9.4 MB per output
    row: 4.1 ms against onnxruntime's 1.9); 64 -> 64 channels on a 28x28 map (147 KB of weights, re-read from L2)
    keep rows outside. Both match onnxruntime on 1 and 2 threads."""
    m = model([conv("x", "w", "c", "c", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
              [vi("x", [1, ch, hw, hw])], [vi("y", None)], [("w", rnd(ch, ch, 3, 3)), ("w_b", rnd(ch, seed=1))])
    onnx.save(m, str(tmp_path / "c.onnx"))
    sched = scheduled(tmp_path / "c.onnx", CpuTarget(layout="nhwc", winograd="off"))
    notes = [" ".join(v[2]) for v in sched.values() if v[0] == "conv2d_nhwc"]
    assert len(notes) == 1 and f"outer={outer}" in notes[0], notes
    for threads in (1, 2):
        art = graphopt.compile(str(tmp_path / "c.onnx"), out=tmp_path / f"art{threads}", measure=False,
                               target_options={"layout": "nhwc", "winograd": "off"}, threads=threads)
        assert art.report["check"]["ok"], art.report["check"]


def test_batched_matmul_with_a_constant_weight_reads_each_panel_once(tmp_path):
    """A [1, 4, 4, K] activation times a constant [K, N] weight (ConvNeXt's MLP on a 7x7 map: M = 7 rows in 7 batch
    entries) runs the batch loops inside the weight-panel loop: the batch-outer order streamed ConvNeXt-T's 9.4 MB
    weights once per batch entry (4.5 ms per matmul, onnxruntime 2.1). It matches onnxruntime on 1 and 2 threads."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    m = model(nodes, [vi("x", [1, 4, 4, 64])], [vi("y", None)], [("w", rnd(64, 96)), ("b", rnd(96, seed=1))])
    onnx.save(m, str(tmp_path / "mm.onnx"))
    notes = [" ".join(v[2]) for v in scheduled(tmp_path / "mm.onnx").values() if v[0] == "matmul"]
    assert len(notes) == 1 and "batch inside panels" in notes[0], notes
    for threads in (1, 2):
        art = graphopt.compile(str(tmp_path / "mm.onnx"), out=tmp_path / f"art{threads}", measure=False,
                               threads=threads)
        assert art.report["check"]["ok"], art.report["check"]


def test_odd_channel_conv_after_channels_last_chain_is_nchw(tmp_path):
    """A conv with 6 output channels (not a multiple of 8, and too few for cpu_pad_channels to pad) after an NHWC conv
    is named NCHW / OIHW explicitly: left to follow its NHWC input it kept OIHW weights, which no conv rule takes
    (PP-OCRv4's recognizer head, 60 channels before such counts were padded, ran 6.4 ms as a loop nest)."""
    nodes = [conv("x", "w1", "c1", "c1"), conv("c1", "w2", "y", "c2", pads=[0, 1, 0, 1], kernel_shape=[1, 3])]
    m = model(nodes, [vi("x", [1, 16, 1, 40])], [vi("y", None)],
              [("w1", rnd(64, 16, 1, 1)), ("w1_b", rnd(64, seed=1)), ("w2", rnd(6, 64, 1, 3, seed=2)),
               ("w2_b", rnd(6, seed=3))])
    onnx.save(m, str(tmp_path / "odd.onnx"))
    rules = sorted(r for n, r in _rules(scheduled(tmp_path / "odd.onnx", CpuTarget(layout="nhwc"))).items()
                   if "conv2d" in n)
    assert rules == ["conv2d", "conv2d_nhwc"], rules
    art = graphopt.compile(str(tmp_path / "odd.onnx"), out=tmp_path / "art", measure=False,
                           target_options={"layout": "nhwc"})
    assert art.report["check"]["ok"], art.report["check"]
