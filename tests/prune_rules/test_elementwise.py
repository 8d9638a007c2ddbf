"""Before/Expected: the unary and elementwise rules (graphopt/prune_rules/elementwise.py).

conv1 has four output channels, 1 and 3 dead (zero weights and bias): `criterion=dead` removes them where the ops
after conv1 keep them zero, and constant operands shrink with them."""
import pytest

from graph_compare import assert_same_graph, run_pipeline

pytestmark = pytest.mark.fast

DEAD = "prune-channels{criterion=dead}"
CONV1 = "float[4,2,1,1] w1 = {1, 2, 0, 0, 3, 4, 0, 0}, float[4] b1 = {0.5, 0, -0.5, 0}"
CONV2 = "float[3,4,1,1] w2 = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}"
CONV1_PRUNED = "float[2,2,1,1] w1 = {1, 2, 3, 4}, float[2] b1 = {0.5, -0.5}"
CONV2_PRUNED = "float[3,2,1,1] w2 = {1, 3, 5, 7, 9, 11}"


def _model(body: str, consts: str) -> str:
    return f"""
    g (float[1,2,4,4] x) => (float[1,3,4,4] y)
    <{consts}>
    {{
        c = Conv(x, w1, b1)
        {body}
        y = Conv(n, w2)
    }}"""


@pytest.mark.parametrize("op, dead", [("Tanh", True), ("Relu", True), ("Sigmoid", False), ("Exp", False)])
def test_unary_ops_keep_a_dead_channel_dead_only_when_f0_is_0(op, dead):
    body = f"n = {op}(c)"
    before = _model(body, f"{CONV1}, {CONV2}")
    expected = _model(body, f"{CONV1_PRUNED}, {CONV2_PRUNED}") if dead else before
    assert_same_graph(run_pipeline(before, DEAD), expected)


def test_clip_keeps_zero_inside_its_bounds():
    body = "n = Clip(c, lo, hi)"
    bounds = ", float lo = {0}, float hi = {6}"
    got = run_pipeline(_model(body, f"{CONV1}, {CONV2}{bounds}"), DEAD)
    assert_same_graph(got, _model(body, f"{CONV1_PRUNED}, {CONV2_PRUNED}{bounds}"))


def test_constant_operands_with_the_channel_axis_are_sliced():
    body = "a = Add(c, shift)\n        n = Mul(a, scale)"
    consts = ", float[4,1,1] shift = {1, 0, 2, 0}, float[1,4,1,1] scale = {3, 4, 5, 6}"
    got = run_pipeline(_model(body, f"{CONV1}, {CONV2}{consts}"), DEAD)
    pruned = ", float[2,1,1] shift = {1, 2}, float[1,2,1,1] scale = {3, 5}"
    assert_same_graph(got, _model(body, f"{CONV1_PRUNED}, {CONV2_PRUNED}{pruned}"))


def test_residual_add_couples_its_summands():
    before = f"""
    g (float[1,2,4,4] x) => (float[1,3,4,4] y)
    <{CONV1}, {CONV2}, float[4,4,1,1] wb = {{1, 0, 2, 0, 0, 0, 0, 0, 3, 0, 4, 0, 0, 0, 0, 0}}>
    {{
        c = Conv(x, w1, b1)
        r = Relu(c)
        b = Conv(r, wb)
        n = Add(r, b)
        y = Conv(n, w2)
    }}"""
    expected = f"""
    g (float[1,2,4,4] x) => (float[1,3,4,4] y)
    <{CONV1_PRUNED}, {CONV2_PRUNED}, float[2,2,1,1] wb = {{1, 2, 3, 4}}>
    {{
        c = Conv(x, w1, b1)
        r = Relu(c)
        b = Conv(r, wb)
        n = Add(r, b)
        y = Conv(n, w2)
    }}"""
    assert_same_graph(run_pipeline(before, DEAD), expected)
