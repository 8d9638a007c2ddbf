"""Before/Expected: the layout rules (graphopt/prune_rules/layout.py).

conv1 has four output channels, 1 and 3 dead (zero weights and bias, then Relu): `criterion=dead` removes them,
and the shape constants, sizes and bounds that name channel positions follow."""
import pytest

from graph_compare import assert_same_graph, run_pipeline

pytestmark = pytest.mark.fast

DEAD = "prune-channels{criterion=dead}"
CONV1 = "float[4,2,1,1] w1 = {1, 2, 0, 0, 3, 4, 0, 0}, float[4] b1 = {0.5, 0, -0.5, 0}"
CONV1_PRUNED = "float[2,2,1,1] w1 = {1, 2, 3, 4}, float[2] b1 = {0.5, -0.5}"


def _model(out: str, consts: str, body: str) -> str:
    return f"""
    g (float[1,2,2,2] x) => ({out})
    <{consts}>
    {{
        c = Conv(x, w1, b1)
        r = Relu(c)
        {body}
    }}"""


def _range(n: int, skip=()) -> str:
    return ", ".join(str(i) for i in range(n) if i not in skip)


def test_reshape_merging_channels_into_features_shrinks_its_target():
    """[1, 4, 2, 2] -> [1, 16]: channel c is features 4c..4c+3 of the Gemm."""
    body = "f = Reshape(r, shape)\n        y = Gemm(f, wg)"
    before = _model("float[1,3] y", f"{CONV1}, int64[2] shape = {{1, 16}}, float[16,3] wg = {{{_range(48)}}}", body)
    kept = [row for row in range(16) if row // 4 in (0, 2)]
    wg = ", ".join(str(3 * row + j) for row in kept for j in range(3))
    expected = _model("float[1,3] y", f"{CONV1_PRUNED}, int64[2] shape = {{1, 8}}, float[8,3] wg = {{{wg}}}", body)
    assert_same_graph(run_pipeline(before, DEAD), expected)


def test_concat_of_one_tensor_twice_removes_both_copies():
    body = "k = Concat <axis = 1> (r, r)\n        y = Conv(k, w2)"
    before = _model("float[1,1,2,2] y", f"{CONV1}, float[1,8,1,1] w2 = {{{_range(8)}}}", body)
    expected = _model("float[1,1,2,2] y", f"{CONV1_PRUNED}, float[1,4,1,1] w2 = {{0, 2, 4, 6}}", body)
    assert_same_graph(run_pipeline(before, DEAD), expected)


def test_split_sizes_follow_and_a_graph_output_keeps_its_part():
    """The first part reaches a graph output, so its dead channel 1 stays; dead channel 3 goes from the second."""
    body = "s1, s2 = Split <axis = 1> (r, sizes)\n        y = Conv(s2, w2)"
    out = "float[1,2,2,2] s1, float[1,3,2,2] y"
    before = _model(out, f"{CONV1}, int64[2] sizes = {{2, 2}}, float[3,2,1,1] w2 = {{{_range(6)}}}", body)
    expected = _model(out, "float[3,2,1,1] w1 = {1, 2, 0, 0, 3, 4}, float[3] b1 = {0.5, 0, -0.5}, "
                           "int64[2] sizes = {2, 1}, float[3,1,1,1] w2 = {0, 2, 4}", body)
    assert_same_graph(run_pipeline(before, DEAD), expected)


def test_slice_bounds_move_with_the_removed_channels():
    """Slice keeps channels 1..3 of four; with 1 and 3 gone it keeps the one channel left of them (2)."""
    body = "s = Slice(r, starts, ends, axes)\n        y = Conv(s, w2)"
    before = _model("float[1,1,2,2] y", f"{CONV1}, int64[1] starts = {{1}}, int64[1] ends = {{4}}, "
                                        f"int64[1] axes = {{1}}, float[1,3,1,1] w2 = {{1, 2, 3}}", body)
    got = run_pipeline(before, DEAD)
    expected = _model("float[1,1,2,2] y", f"{CONV1_PRUNED}, int64[1] starts = {{1}}, int64[1] ends = {{2}}, "
                                          f"int64[1] axes = {{1}}, float[1,1,1,1] w2 = {{2}}", body)
    assert_same_graph(got, expected)


def test_transpose_to_channels_last_follows_the_axis():
    body = "t = Transpose <perm = [0, 2, 3, 1]> (r)\n        y = MatMul(t, wm)"
    before = _model("float[1,2,2,3] y", f"{CONV1}, float[4,3] wm = {{{_range(12)}}}", body)
    expected = _model("float[1,2,2,3] y", f"{CONV1_PRUNED}, float[2,3] wm = {{0, 1, 2, 6, 7, 8}}", body)
    assert_same_graph(run_pipeline(before, DEAD), expected)
