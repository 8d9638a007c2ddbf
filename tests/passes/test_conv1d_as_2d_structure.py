"""Before/Expected: conv1d-as-2d turns a 1-D Conv, or a 2-D Conv down a width-1 column, into Reshape -> 2-D Conv
along a row of height 1 -> Reshape, with the kernel, strides and pads moved onto the width axis."""
import pytest

from graph_compare import assert_same_graph, run_pipeline

pytestmark = pytest.mark.fast

W_VALUES = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18"


def expected(x_shape: str, y_dims: list[int]) -> str:
    """x reshaped to a row [1, 2, 1, 8]; the weight [3, 2, 3] or [3, 2, 3, 1] becomes [3, 2, 1, 3] (same values);
    stride and pads move to the width; the row output is reshaped back to y's shape."""
    return f"""
    g (float{x_shape} x) => (float[{','.join(map(str, y_dims))}] y)
    <float[3,2,1,3] w = {{{W_VALUES}}}, float[3] b = {{1, 2, 3}},
     int64[4] row_in = {{1, 2, 1, 8}}, int64[{len(y_dims)}] row_out = {{{str(y_dims)[1:-1]}}}>
    {{
        xr = Reshape(x, row_in)
        c = Conv <pads = [0, 1, 0, 1], strides = [1, 2]> (xr, w, b)
        y = Reshape(c, row_out)
    }}"""


def test_1d_conv_becomes_a_row_conv():
    """x [1, 2, 8], 3 taps, stride 2, pads 1/1 -> y [1, 3, 4]."""
    before = f"""
    g (float[1,2,8] x) => (float[1,3,4] y)
    <float[3,2,3] w = {{{W_VALUES}}}, float[3] b = {{1, 2, 3}}>
    {{
        y = Conv <pads = [1, 1], strides = [2]> (x, w, b)
    }}"""
    assert_same_graph(run_pipeline(before, "conv1d-as-2d"), expected("[1,2,8]", [1, 3, 4]))


def test_column_conv_becomes_a_row_conv():
    """x [1, 2, 8, 1] with a [3, 1] kernel down the column (stride 2, pads 1/1 on the height) -> y [1, 3, 4, 1]."""
    before = f"""
    g (float[1,2,8,1] x) => (float[1,3,4,1] y)
    <float[3,2,3,1] w = {{{W_VALUES}}}, float[3] b = {{1, 2, 3}}>
    {{
        y = Conv <pads = [1, 0, 1, 0], strides = [2, 1]> (x, w, b)
    }}"""
    assert_same_graph(run_pipeline(before, "conv1d-as-2d"), expected("[1,2,8,1]", [1, 3, 4, 1]))


def test_2d_conv_and_padded_column_are_left_alone():
    """A real 2-D Conv, and a column conv that pads the width (not a conv down the column), stay as they are."""
    before = """
    g (float[1,1,3,3] x, float[1,1,4,1] z) => (float[1,1,3,3] y, float[1,1,4,3] v)
    <float[1,1,3,3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9}, float[1,1,1,1] k = {2}>
    {
        y = Conv <pads = [1, 1, 1, 1]> (x, w)
        v = Conv <pads = [0, 1, 0, 1]> (z, k)
    }"""
    assert_same_graph(run_pipeline(before, "conv1d-as-2d"), before)
