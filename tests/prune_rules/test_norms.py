"""Before/Expected: the normalization and axis-mixing rules (graphopt/prune_rules/norms.py).

x -> conv1 (4 channels) -> NORM -> Relu -> conv2 -> y. Dead channels (zero weights, bias and shift) go with
`criterion=dead`; where a norm forgets a channel's value, tiny weights make the l1 choice known instead."""
import pytest

from graph_compare import assert_same_graph, run_pipeline

pytestmark = pytest.mark.fast

DEAD = "prune-channels{criterion=dead}"
L1_HALF = "prune-channels{ratio=0.5,criterion=l1,round_to=1}"
#: channels 1 and 3 dead
CONV1 = "float[4,2,1,1] w1 = {1, 2, 0, 0, 3, 4, 0, 0}, float[4] b1 = {0.5, 0, -0.5, 0}"
#: channels 1 and 3 tiny (l1 removes them)
CONV1_SMALL = "float[4,2,1,1] w1 = {1, 2, 0.01, 0.02, 3, 4, 0.03, 0.04}, float[4] b1 = {0.5, 0, -0.5, 0}"
CONV2 = "float[3,4,1,1] w2 = {1, 0.02, 3, 0.04, 5, 0.06, 7, 0.08, 9, 0.1, 11, 0.12}"
CONV1_PRUNED = "float[2,2,1,1] w1 = {1, 2, 3, 4}, float[2] b1 = {0.5, -0.5}"
CONV2_PRUNED = "float[3,2,1,1] w2 = {1, 3, 5, 7, 9, 11}"


def _model(body: str, consts: str, opset: int = 17) -> str:
    return f"""<ir_version: {8 if opset < 21 else 10}, opset_import: ["" : {opset}]>
    g (float[1,2,4,4] x) => (float[1,3,4,4] y)
    <{consts}>
    {{
        c = Conv(x, w1, b1)
        {body}
        r = Relu(n)
        y = Conv(r, w2)
    }}"""


def test_batchnorm_parameters_are_sliced():
    body = "n = BatchNormalization(c, s, t, m, v)"
    bn = ", float[4] s = {1, 2, 3, 4}, float[4] t = {0.1, 0, 0.3, 0}, float[4] m = {1, 0, 2, 0}, " \
         "float[4] v = {1, 1, 2, 2}"
    got = run_pipeline(_model(body, f"{CONV1}, {CONV2}{bn}"), DEAD)
    bn_pruned = ", float[2] s = {1, 3}, float[2] t = {0.1, 0.3}, float[2] m = {1, 2}, float[2] v = {1, 2}"
    assert_same_graph(got, _model(body, f"{CONV1_PRUNED}, {CONV2_PRUNED}{bn_pruned}"))


def test_instance_norm_of_a_dead_channel_is_its_shift():
    body = "n = InstanceNormalization(c, s, t)"
    got = run_pipeline(_model(body, f"{CONV1}, {CONV2}, float[4] s = {{1, 2, 3, 4}}, float[4] t = {{1, 0, 3, 0}}"),
                       DEAD)
    assert_same_graph(got, _model(body, f"{CONV1_PRUNED}, {CONV2_PRUNED}, float[2] s = {{1, 3}}, "
                                        f"float[2] t = {{1, 3}}"))


def test_group_norm_removes_whole_groups_and_shrinks_num_groups():
    body = "n = GroupNormalization <num_groups = 2> (c, s, t)"
    w1 = "float[4,2,1,1] w1 = {1, 2, 3, 4, 0.01, 0.02, 0.03, 0.04}, float[4] b1 = {0.5, -0.5, 0, 0}"
    w2 = "float[3,4,1,1] w2 = {1, 2, 0.03, 0.04, 5, 6, 0.07, 0.08, 9, 10, 0.11, 0.12}"
    norm = ", float[4] s = {1, 2, 3, 4}, float[4] t = {1, 2, 3, 4}"       # opset 21: per channel
    got = run_pipeline(_model(body, f"{w1}, {w2}{norm}", opset=21), L1_HALF)
    expected = _model(body.replace("num_groups = 2", "num_groups = 1"),
                      "float[2,2,1,1] w1 = {1, 2, 3, 4}, float[2] b1 = {0.5, -0.5}, "
                      "float[3,2,1,1] w2 = {1, 2, 5, 6, 9, 10}, float[2] s = {1, 2}, float[2] t = {1, 2}", opset=21)
    assert_same_graph(got, expected)


def test_layer_norm_over_the_last_axis_passes_channels_through():
    body = "n = LayerNormalization <axis = -1> (c, s, t)"
    norm = ", float[4] s = {1, 2, 3, 4}, float[4] t = {1, 2, 3, 4}"
    got = run_pipeline(_model(body, f"{CONV1_SMALL}, {CONV2}{norm}"), L1_HALF)
    assert_same_graph(got, _model(body, f"{CONV1_PRUNED}, {CONV2_PRUNED}{norm}"))


def test_softmax_over_the_last_axis_passes_channels_through():
    body = "n = Softmax <axis = -1> (c)"
    got = run_pipeline(_model(body, f"{CONV1_SMALL}, {CONV2}"), L1_HALF)
    assert_same_graph(got, _model(body, f"{CONV1_PRUNED}, {CONV2_PRUNED}"))


def test_softmax_over_the_channel_axis_freezes():
    body = "n = Softmax <axis = 1> (c)"
    before = _model(body, f"{CONV1_SMALL}, {CONV2}")
    assert_same_graph(run_pipeline(before, L1_HALF), before)
