"""Before/Expected: where quantize puts QuantizeLinear / DequantizeLinear, and the integers and scales it writes.

Static int8 (onnxruntime's QDQ quantizer behind the pass): the activation entering a quantized op goes through
QuantizeLinear -> DequantizeLinear (u8, asymmetric, range from the calibration data, here [0, 255]: scale 1, zero
point 0), its output likewise (range [0, max]: scale max / 255), the weight is an int8 initializer read through a
per-output-channel DequantizeLinear (symmetric: scale max|w| / 127), the bias an int32 one (scale = input scale *
weight scale). A Relu right after a quantized Conv disappears: a u8 output with zero point 0 already clips at 0.

Weight-only int8: the weight of a MatMul / Gemm becomes int8 per output channel behind a DequantizeLinear; the
activations stay float. The node order of onnxruntime's output is its own: compared in data-flow order."""
import numpy as np
import pytest

from graph_compare import assert_same_graph, run_pipeline
from graphopt import PassContext

pytestmark = pytest.mark.fast


def _calibration(shape) -> PassContext:
    """Four samples of zeros, the first with one 255: every input's range is [0, 255]."""
    x = np.zeros((4,) + shape, np.float32)
    x.reshape(4, -1)[0, 0] = 255
    return PassContext(data={"calib": {"x": x}})


def test_static_int8_conv_relu():
    """Conv 1x1 with weight 127 and bias 255: output range [0, 127 * 255 + 255] = [0, 128 * 255] -> scale 128;
    weight scale 127 / 127 = 1; bias 255 / (1 * 1) = 255."""
    before = """
    g (float[1,1,2,2] x) => (float[1,1,2,2] y)
    <float[1,1,1,1] w = {127}, float[1] b = {255}>
    {
        c = Conv(x, w, b)
        y = Relu(c)
    }"""
    expected = """
    g (float[1,1,2,2] x) => (float[1,1,2,2] y)
    <float one = {1}, uint8 zero = {0}, float out_scale = {128},
     int8[1,1,1,1] wq = {127}, float[1] w_scale = {1}, int8[1] w_zero = {0},
     int32[1] bq = {255}, float[1] b_scale = {1}, int32 b_zero = {0}>
    {
        xq = QuantizeLinear(x, one, zero)
        xd = DequantizeLinear(xq, one, zero)
        wd = DequantizeLinear <axis = 0> (wq, w_scale, w_zero)
        bd = DequantizeLinear(bq, b_scale, b_zero)
        c = Conv(xd, wd, bd)
        cq = QuantizeLinear(c, out_scale, zero)
        y = DequantizeLinear(cq, out_scale, zero)
    }"""
    got = run_pipeline(before, "quantize", _calibration((1, 1, 2, 2)))
    assert_same_graph(got, expected, any_order=True)


def test_static_int8_matmul_scales_weight_columns():
    """MatMul W = [[127, 254], [0, 0]]: per output column scales 1 and 2 (axis 1), q = [[127, 127], [0, 0]];
    output range [0, 254 * 255] -> scale 254."""
    before = """
    g (float[1,2] x) => (float[1,2] y)
    <float[2,2] w = {127, 254, 0, 0}>
    {
        y = MatMul(x, w)
    }"""
    expected = """
    g (float[1,2] x) => (float[1,2] y)
    <float one = {1}, uint8 zero = {0}, float out_scale = {254},
     int8[2,2] wq = {127, 127, 0, 0}, float[2] w_scale = {1, 2}, int8[2] w_zero = {0, 0}>
    {
        xq = QuantizeLinear(x, one, zero)
        xd = DequantizeLinear(xq, one, zero)
        wd = DequantizeLinear <axis = 1> (wq, w_scale, w_zero)
        m = MatMul(xd, wd)
        mq = QuantizeLinear(m, out_scale, zero)
        y = DequantizeLinear(mq, out_scale, zero)
    }"""
    got = run_pipeline(before, "quantize", _calibration((1, 2)))
    assert_same_graph(got, expected, any_order=True)


@pytest.mark.parametrize("op,b,q,axis", [
    # MatMul B[K, N]: one scale per column, {127, 64} -> 1, {-254, 128} -> 2; the DequantizeLinear's axis is 1
    ("MatMul(x, b)", "float[2,2] b = {127, -254, 64, 128}", "int8[2,2] q = {127, -127, 64, 64}", 1),
    # Gemm with transB stores B[N, K]: one scale per row, axis 0
    ("Gemm <transB = 1> (x, b)", "float[2,2] b = {127, 64, -254, 128}", "int8[2,2] q = {127, 64, -127, 64}", 0),
])
def test_weight_int8_puts_the_weight_behind_a_dequantize(op, b, q, axis):
    before = f"""
    g (float[1,2] x) => (float[1,2] y)
    <{b}>
    {{
        y = {op}
    }}"""
    expected = f"""
    g (float[1,2] x) => (float[1,2] y)
    <{q}, float[2] scale = {{1, 2}}, int8[2] zero = {{0, 0}}>
    {{
        b = DequantizeLinear <axis = {axis}> (q, scale, zero)
        y = {op}
    }}"""
    assert_same_graph(run_pipeline(before, "quantize{scheme=weight_int8}"), expected)


def test_weight_int8_leaves_a_product_of_two_activations_alone():
    before = """
    g (float[1,2] x, float[2,2] v) => (float[1,2] y)
    {
        y = MatMul(x, v)
    }"""
    assert_same_graph(run_pipeline(before, "quantize{scheme=weight_int8}"), before)
