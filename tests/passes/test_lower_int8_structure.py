"""Before/Expected: lower-int8 runs the data-movement ops between a DequantizeLinear and a QuantizeLinear with the
same scale and zero point on the integer tensor (MaxPool, Reshape, ... as they are; Relu as Max(q, zero point))."""
import pytest

from graph_compare import assert_same_graph, run_pipeline

pytestmark = pytest.mark.fast

CONSTS = ("float s = {0.5}, uint8 z = {128}, float s2 = {0.25}, int64[3] shape = {1, 1, 16}, "
          "float[4] scales = {1.0, 1.0, 2.0, 2.0}, float[0] roi = {}")
NEAREST = 'Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric", nearest_mode = "floor"> ({x}, roi, scales)'
LINEAR = 'Resize <mode = "linear"> ({x}, roi, scales)'
MAXPOOL = "MaxPool <kernel_shape = [2, 2], strides = [2, 2]> ({x})"


def _graph(out: str, body: str) -> str:
    return f"""
    g (float[1,1,4,4] x) => (float[1,1,{out}] y)
    <{CONSTS}>
    {{
        {body}
    }}"""


def _wrapped(op: str, out: str, scale2: str = "s") -> str:
    """x -> Q -> DQ -> op -> Q(scale2) -> DQ -> y."""
    return _graph(out, f"""q = QuantizeLinear(x, s, z)
        d = DequantizeLinear(q, s, z)
        o = {op.format(x="d")}
        q2 = QuantizeLinear(o, {scale2}, z)
        y = DequantizeLinear(q2, {scale2}, z)""")


@pytest.mark.parametrize("op,out", [(MAXPOOL, "2,2"), ("Reshape({x}, shape)", "16"),
                                    ("Transpose <perm = [0, 1, 3, 2]> ({x})", "4,4"), (NEAREST, "8,8"),
                                    ('Resize ({x}, roi, scales)', "8,8")])      # mode's default: nearest
def test_data_movement_op_runs_on_the_quantized_tensor(op, out):
    expected = _graph(out, f"""q = QuantizeLinear(x, s, z)
        o = {op.format(x="q")}
        y = DequantizeLinear(o, s, z)""")
    assert_same_graph(run_pipeline(_wrapped(op, out), "lower-int8"), expected)


def test_relu_becomes_max_with_the_zero_point():
    expected = _graph("4,4", """q = QuantizeLinear(x, s, z)
        o = Max(q, z)
        y = DequantizeLinear(o, s, z)""")
    assert_same_graph(run_pipeline(_wrapped("Relu({x})", "4,4"), "lower-int8"), expected)


def test_linear_resize_stays_in_float():
    """Interpolation computes new values: not a copy of the integers."""
    before = _wrapped(LINEAR, "8,8")
    assert_same_graph(run_pipeline(before, "lower-int8"), before)


def test_maxpool_between_different_scales_stays_in_float():
    """Not the identity on the integers, and no elementwise chain (those become tables: lower_int8_tables.py)."""
    before = _wrapped(MAXPOOL, "2,2", scale2="s2")
    assert_same_graph(run_pipeline(before, "lower-int8"), before)
