"""Before/Expected: the weighted-layer rules (graphopt/prune_rules/linear.py) and attention's MatMul of two
activations (graphopt/prune_rules/attention.py).

The first layer has four outputs, 1 and 3 dead (zero weights and bias): `criterion=dead` removes them, from the
producer's weight rows (or columns) and bias and from the consumer's weight."""
import pytest

from graph_compare import assert_same_graph, run_pipeline

pytestmark = pytest.mark.fast

DEAD = "prune-channels{criterion=dead}"
CONV1 = "float[4,2,1,1] w1 = {1, 2, 0, 0, 3, 4, 0, 0}, float[4] b1 = {0.5, 0, -0.5, 0}"
CONV1_PRUNED = "float[2,2,1,1] w1 = {1, 2, 3, 4}, float[2] b1 = {0.5, -0.5}"
CONV2 = "float[3,4,1,1] w2 = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}"
CONV2_PRUNED = "float[3,2,1,1] w2 = {1, 3, 5, 7, 9, 11}"


def test_depthwise_conv_passes_channels_and_shrinks_group():
    text = """
    g (float[1,2,2,2] x) => (float[1,3,2,2] y)
    <{consts}>
    {{
        c = Conv(x, w1, b1)
        r = Relu(c)
        d = Conv <group = {group}> (r, wd)
        y = Conv(d, w2)
    }}"""
    before = text.format(consts=f"{CONV1}, {CONV2}, float[4,1,1,1] wd = {{1, 2, 3, 4}}", group=4)
    expected = text.format(consts=f"{CONV1_PRUNED}, {CONV2_PRUNED}, float[2,1,1,1] wd = {{1, 3}}", group=2)
    assert_same_graph(run_pipeline(before, DEAD), expected)


def test_conv_transpose_prunes_weight_columns():
    text = """
    g (float[1,2,2,2] x) => (float[1,3,2,2] y)
    <{consts}>
    {{
        c = ConvTranspose(x, wt, bt)
        r = Relu(c)
        y = Conv(r, w2)
    }}"""
    before = text.format(consts=f"float[2,4,1,1] wt = {{1, 0, 2, 0, 3, 0, 4, 0}}, float[4] bt = {{1, 0, 2, 0}}, "
                                f"{CONV2}")
    expected = text.format(consts=f"float[2,2,1,1] wt = {{1, 2, 3, 4}}, float[2] bt = {{1, 2}}, {CONV2_PRUNED}")
    assert_same_graph(run_pipeline(before, DEAD), expected)


def test_gemm_with_trans_b_prunes_rows_then_columns():
    text = """
    g (float[1,3] x) => (float[1,2] y)
    <{consts}>
    {{
        h = Gemm <transB = 1> (x, wa, ba)
        r = Relu(h)
        y = Gemm <transB = 1> (r, wb)
    }}"""
    before = text.format(consts="float[4,3] wa = {1, 2, 3, 0, 0, 0, 4, 5, 6, 0, 0, 0}, float[4] ba = {1, 0, 2, 0}, "
                                "float[2,4] wb = {1, 2, 3, 4, 5, 6, 7, 8}")
    expected = text.format(consts="float[2,3] wa = {1, 2, 3, 4, 5, 6}, float[2] ba = {1, 2}, "
                                  "float[2,2] wb = {1, 3, 5, 7}")
    assert_same_graph(run_pipeline(before, DEAD), expected)


def test_attention_scores_couple_query_and_key_features():
    """q = x Wq, k = x Wk, scores = q k^T: feature j of q and of k is one unit (a contraction with no weight);
    it is dead when both are, and goes from both weights."""
    text = """
    g (float[1,4,3] x) => (float[1,4,4] s)
    <{consts}>
    {{
        q = MatMul(x, wq)
        k = MatMul(x, wk)
        kt = Transpose <perm = [0, 2, 1]> (k)
        s = MatMul(q, kt)
    }}"""
    before = text.format(consts="float[3,4] wq = {1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0}, "
                                "float[3,4] wk = {7, 0, 8, 0, 9, 0, 1, 0, 2, 0, 3, 0}")
    expected = text.format(consts="float[3,2] wq = {1, 2, 3, 4, 5, 6}, float[3,2] wk = {7, 8, 9, 1, 2, 3}")
    assert_same_graph(run_pipeline(before, DEAD), expected)
