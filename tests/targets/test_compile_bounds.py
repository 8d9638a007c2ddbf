"""No compile that never ends: schedules keep vector and unroll widths bounded, so strided convolutions over
long rows of prime width (audio front ends) compile in seconds, checked by the compile watchdog."""
import re

import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_builders as ob
from graphopt import ort
from graphopt.artifact import Artifact
from watchdog import compile_bounded


def strided_conv():
    """One Conv over a [1, 1, 1, 4096] row, 32 taps, stride 2: 2033 output pixels (a prime width, 19 x 107)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], strides=[1, 2], name="conv")]
    return ob.model(nodes, [ob.vi("x", [1, 1, 1, 4096])], [ob.vi("y", [1, 1, 1, 2033])], [("w", ob.rnd(1, 1, 1, 32))])


def audio_front_end():
    """wav2vec-style feature encoder on one second of 16 kHz audio: 1-D convs with strides 5, 2, 2, 2, 3 and
    ReLUs; the output widths (3199, 1599, 799, 399, 132) include ones with no divisor of a SIMD width."""
    layers = [(1, 8, 10, 5), (8, 8, 3, 2), (8, 8, 3, 2), (8, 16, 2, 2), (16, 16, 4, 3)]
    nodes, inits, x, width = [], [], "x", 16000
    for i, (cin, cout, k, s) in enumerate(layers):
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], strides=[s], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        inits += [(f"w{i}", ob.rnd(cout, cin, k, seed=i)), (f"b{i}", ob.rnd(cout, seed=10 + i))]
        x, width = f"r{i}", (width - k) // s + 1
    return ob.model(nodes, [ob.vi("x", [1, 1, 16000])], [ob.vi(x, [1, 16, width])], inits)


@pytest.mark.parametrize("build", [strided_conv, audio_front_end])
def test_strided_convs_compile_in_bounded_time_and_match_onnxruntime(build, tmp_path):
    model = build()
    onnx.save(model, str(tmp_path / "m.onnx"))
    cpu_s, path = compile_bounded(tmp_path / "m.onnx", target="cpu", out=str(tmp_path / "art"), measure=False)
    x = np.random.default_rng(0).standard_normal(
        [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    got = Artifact(path).run({"x": x})
    ref = ort.run(model, {"x": x})
    name = model.graph.output[0].name
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-4)


def test_window_schedule_never_vectorizes_a_whole_long_row():
    """The depthwise / window rule splits a prime-width row into SIMD-sized vectors (it vectorized all 2033
    pixels, which LLVM needed minutes to compile)."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax, tirx

    from graphopt.targets.cpu_sched_common import MAX_VECTOR_LANES
    from graphopt.targets.cpu_schedules import schedule_func
    from graphopt.targets.tvm_lowering import import_onnx
    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    mod = import_onnx(strided_conv())
    with target:
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    funcs = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    assert len(funcs) == 1
    func, rule, _ = schedule_func(funcs[0], target)
    assert rule == "depthwise"
    widths = [int(w) for w in re.findall(r"T\.vectorized\((?:T\.int64\()?(\d+)", func.script())]
    assert widths and max(widths) <= MAX_VECTOR_LANES


def test_check_refuses_wide_vector_and_unroll_loops():
    """The check every rule's result goes through rejects a vector or unrolled loop beyond the bounds."""
    tvm = pytest.importorskip("tvm")
    from tvm.s_tir import Schedule
    from tvm.script import tirx as T

    from graphopt.targets.cpu_sched_common import check_vectorized_loops

    @T.prim_func(s_tir=True)
    def add(a: T.Buffer((4, 2048), "float32"), b: T.Buffer((4, 2048), "float32")):
        for i, j in T.grid(4, 2048):
            with T.sblock("b"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = a[vi, vj] + T.float32(1)

    def scheduled(how):
        sch = Schedule(tvm.IRModule({"main": add}))
        i, j = sch.get_loops(sch.get_sblock("b"))
        how(sch, i, j)
        return sch

    check_vectorized_loops(scheduled(lambda s, i, j: s.vectorize(s.split(j, [None, 16])[1])))
    with pytest.raises(ValueError, match="vectorized loop .* 2048 iterations"):
        check_vectorized_loops(scheduled(lambda s, i, j: s.vectorize(j)))
    with pytest.raises(ValueError, match="unrolled loop .* 128 iterations"):
        check_vectorized_loops(scheduled(lambda s, i, j: s.unroll(s.split(j, [None, 128])[1])))
    with pytest.raises(ValueError, match="unrolled and vectorized into 8192 elements"):
        check_vectorized_loops(scheduled(lambda s, i, j: (s.unroll(i), s.unroll(s.split(j, [None, 32, 64])[1]),
                                                          s.vectorize(s.get_loops(s.get_sblock("b"))[-1]))))
