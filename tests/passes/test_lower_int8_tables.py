"""lower-int8's lookup tables (graphopt/passes/lower_int8_tables.py): a quantized elementwise chain becomes
Gather(table, Cast(q, int32)). Structure (Before/Expected, the table checked against ONNX's definition computed in
numpy), exactness in onnxruntime (the PassManager's check and a direct comparison on every input value),
idempotence, and what must not become a table."""
import numpy as np
import onnx
import pytest

import graphopt
from graph_compare import assert_same_graph, parse, run_pipeline
from graphopt import PassManager, ort
from graphopt.graph import to_onnx

pytestmark = pytest.mark.fast


def _q(v, s, z, dtype):
    """ONNX QuantizeLinear: round half to even, saturate."""
    info = np.iinfo(dtype)
    return np.clip(np.rint(np.float32(v) / np.float32(s)) + z, info.min, info.max).astype(dtype)


def _dq(q, s, z):
    return ((q.astype(np.int32) - z).astype(np.float32) * np.float32(s)).astype(np.float32)


SCALED = """
g (float[1,2,3,3] x) => (float[1,2,3,3] y)
<float s = {0.05}, uint8 z = {128}, float c = {1.5}, float s2 = {0.1}, uint8 z2 = {10}>
{
    q = QuantizeLinear(x, s, z)
    d = DequantizeLinear(q, s, z)
    m = Mul(d, c)
    a = Sigmoid(m)
    q2 = QuantizeLinear(a, s2, z2)
    y = DequantizeLinear(q2, s2, z2)
}"""


def test_scaled_sigmoid_becomes_a_table_holding_what_onnx_defines():
    got = run_pipeline(SCALED, "lower-int8")
    byte = np.arange(256, dtype=np.uint8)
    sig = (1 / (1 + np.exp(-(_dq(byte, 0.05, 128) * np.float32(1.5)).astype(np.float64)))).astype(np.float32)
    table = _q(sig, 0.1, 10, np.uint8)
    values = ", ".join(str(int(v)) for v in table)
    expected = f"""
g (float[1,2,3,3] x) => (float[1,2,3,3] y)
<float s = {{0.05}}, uint8 z = {{128}}, float s2 = {{0.1}}, uint8 z2 = {{10}}, uint8[256] t = {{{values}}}>
{{
    q = QuantizeLinear(x, s, z)
    i = Cast <to = 6> (q)
    q2 = Gather <axis = 0> (t, i)
    y = DequantizeLinear(q2, s2, z2)
}}"""
    try:
        assert_same_graph(got, expected)
    except AssertionError:
        # onnxruntime's sigmoid may differ from numpy's in the last float bit, moving a value on a rounding tie:
        # the structure must still match, and the table may differ from numpy's by at most one step
        tab = next(onnx.numpy_helper.to_array(i) for i in got.graph.initializer if i.dims == [256])
        assert np.abs(tab.astype(int) - table.astype(int)).max() <= 1
        assert [n.op_type for n in got.graph.node] == ["QuantizeLinear", "Cast", "Gather", "DequantizeLinear"]


def _hardswish(act: str) -> str:
    """x -> conv -> Q -> hardswish written out with a QDQ pair after every op (as onnxruntime's quantizer
    writes it), x used twice (x * relu6(x + 3) / 6) -> Q -> conv."""
    z, zt = ("128", "uint8") if act == "u8" else ("0", "int8")
    return f"""
g (float[1,4,6,6] x) => (float[1,4,6,6] y)
<float s = {{0.04}}, {zt} z = {{{z}}}, float s1 = {{0.03}}, float s2 = {{0.02}}, float s3 = {{0.01}},
 float three = {{3.0}}, float six = {{6.0}}, float zero = {{0.0}}, float[4,4,1,1] w = {{
 0.5, -0.25, 0.125, 0.0, 0.25, 0.5, -0.5, 0.125, -0.125, 0.0, 0.75, 0.25, 0.0, 0.5, 0.25, -0.5}}>
{{
    q0 = QuantizeLinear(x, s, z)
    d0 = DequantizeLinear(q0, s, z)
    c = Conv(d0, w)
    q1 = QuantizeLinear(c, s1, z)
    d1 = DequantizeLinear(q1, s1, z)
    a = Add(d1, three)
    qa = QuantizeLinear(a, s2, z)
    da = DequantizeLinear(qa, s2, z)
    r = Clip(da, zero, six)
    qr = QuantizeLinear(r, s2, z)
    dr = DequantizeLinear(qr, s2, z)
    h = Div(dr, six)
    qh = QuantizeLinear(h, s3, z)
    dh = DequantizeLinear(qh, s3, z)
    m = Mul(d1, dh)
    q2 = QuantizeLinear(m, s1, z)
    d2 = DequantizeLinear(q2, s1, z)
    y = Conv(d2, w)
}}"""


@pytest.mark.parametrize("act", ["u8", "s8"])
def test_hardswish_chain_is_one_exact_table(act):
    before = parse(_hardswish(act))
    # the PassManager checks the result against onnxruntime (lower-int8 is exact)
    got = to_onnx(PassManager.parse("lower-int8").run(graphopt.load(before)).graph)
    ops = [n.op_type for n in got.graph.node]
    assert ops.count("Gather") == 1 and "Add" not in ops and "Clip" not in ops and "Div" not in ops
    assert ops.count("QuantizeLinear") == 2          # the input's and the conv's; the chain's five are gone
    # exact on every 8-bit value the conv can produce: inputs spread over the whole range
    x = np.random.default_rng(0).uniform(-9, 9, (64, 1, 4, 6, 6)).astype(np.float32)
    for xi in x[:16]:
        a, b = ort.run(before, {"x": xi})["y"], ort.run(got, {"x": xi})["y"]
        np.testing.assert_array_equal(a, b)


def test_tables_are_idempotent():
    once = run_pipeline(_hardswish("u8"), "lower-int8")
    twice = PassManager.parse("lower-int8").run(graphopt.load(once))
    assert not twice.records[0]["modified"]
    assert_same_graph(to_onnx(twice.graph), once)


TWO_SOURCES = """
g (float[1,2,3,3] x, float[1,2,3,3] v) => (float[1,2,3,3] y)
<float s = {0.05}, uint8 z = {128}>
{
    q = QuantizeLinear(x, s, z)
    d = DequantizeLinear(q, s, z)
    p = QuantizeLinear(v, s, z)
    e = DequantizeLinear(p, s, z)
    a = Add(d, e)
    q2 = QuantizeLinear(a, s, z)
    y = DequantizeLinear(q2, s, z)
}"""

PER_CHANNEL = """
g (float[1,2,3,3] x) => (float[1,2,3,3] y)
<float s = {0.05}, uint8 z = {128}, float[1,2,1,1] c = {1.5, 2.0}>
{
    q = QuantizeLinear(x, s, z)
    d = DequantizeLinear(q, s, z)
    m = Mul(d, c)
    q2 = QuantizeLinear(m, s, z)
    y = DequantizeLinear(q2, s, z)
}"""

LEAKS = """
g (float[1,2,3,3] x) => (float[1,2,3,3] y, float[1,2,3,3] t)
<float s = {0.05}, uint8 z = {128}, float c = {1.5}>
{
    q = QuantizeLinear(x, s, z)
    d = DequantizeLinear(q, s, z)
    t = Mul(d, c)
    a = Sigmoid(t)
    q2 = QuantizeLinear(a, s, z)
    y = DequantizeLinear(q2, s, z)
}"""

BROADCASTS = """
g (float[2,3] x) => (float[1,2,3] y)
<float s = {0.05}, uint8 z = {128}, float[1,1,1] c = {1.5}>
{
    q = QuantizeLinear(x, s, z)
    d = DequantizeLinear(q, s, z)
    m = Mul(d, c)
    q2 = QuantizeLinear(m, s, z)
    y = DequantizeLinear(q2, s, z)
}"""


@pytest.mark.parametrize("text", [TWO_SOURCES, PER_CHANNEL, LEAKS, BROADCASTS],
                         ids=["two-activations", "per-channel-constant", "intermediate-read-elsewhere",
                              "broadcast-grows-rank"])
def test_what_is_not_a_chain_stays(text):
    assert_same_graph(run_pipeline(text, "lower-int8"), text)
