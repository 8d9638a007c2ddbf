"""Before/Expected: the pooling, reduction and resampling rules (graphopt/prune_rules/pooling.py).

conv1 has four output channels; channels 1 and 3 have zero weights and bias, so `criterion=dead` must remove
exactly them wherever the pooling op keeps a zero channel zero."""
import numpy as np
import pytest

from graph_compare import assert_same_graph, parse, run_pipeline
from graphopt.channel_groups import ChannelGroups
from graphopt.graph import from_onnx
from graphopt.op_traits import traits
from graphopt.shapes import infer

pytestmark = pytest.mark.fast

DEAD = "prune-channels{criterion=dead}"
CONV1 = "float[4,2,1,1] w1 = {1, 2, 0, 0, 3, 4, 0, 0}, float[4] b1 = {0.5, 0, -0.5, 0}"
CONV2 = "float[3,4,1,1] w2 = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}"
CONV1_PRUNED = "float[2,2,1,1] w1 = {1, 2, 3, 4}, float[2] b1 = {0.5, -0.5}"
CONV2_PRUNED = "float[3,2,1,1] w2 = {1, 3, 5, 7, 9, 11}"


def _model(body: str, consts: str, out_shape: str, extra: str = "") -> str:
    return f"""
    g (float[1,2,4,4] x) => (float[{out_shape}] y)
    <{consts}{extra}>
    {{
        c = Conv(x, w1, b1)
        r = Relu(c)
        {body}
        y = Conv(p, w2)
    }}"""


def test_maxpool_passes_channels_through():
    body = "p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)"
    got = run_pipeline(_model(body, f"{CONV1}, {CONV2}", "1,3,2,2"), DEAD)
    assert_same_graph(got, _model(body, f"{CONV1_PRUNED}, {CONV2_PRUNED}", "1,3,2,2"))


def test_global_average_pool_passes_channels_through():
    body = "p = GlobalAveragePool(r)"
    got = run_pipeline(_model(body, f"{CONV1}, {CONV2}", "1,3,1,1"), DEAD)
    assert_same_graph(got, _model(body, f"{CONV1_PRUNED}, {CONV2_PRUNED}", "1,3,1,1"))


def test_reduce_sum_over_space_keeps_zero_channels_zero():
    body = "p = ReduceSum(r, axes)"
    axes = ", int64[2] axes = {2, 3}"
    got = run_pipeline(_model(body, f"{CONV1}, {CONV2}", "1,3,1,1", axes), DEAD)
    assert_same_graph(got, _model(body, f"{CONV1_PRUNED}, {CONV2_PRUNED}", "1,3,1,1", axes))


@pytest.mark.parametrize("op", ["ReduceLogSumExp", "ReduceLogSum"])
def test_log_reductions_of_zero_channels_are_not_zero(op):
    """log-sum-exp of 16 zeros is log 16, log-sum of zeros is -inf: a zero channel is not dead after them (the
    analysis took it for zero, and criterion=dead removed a channel that changes the output)."""
    assert not traits(op).zero_preserving
    body = f"p = {op} <axes = [2, 3]> (r)"              # opset 17: axes of the log reductions are an attribute
    before = _model(body, f"{CONV1}, {CONV2}", "1,3,1,1")
    g = infer(from_onnx(parse(before)), "test")
    groups = ChannelGroups(g, {})
    assert np.isnan(groups.chan["p"].cval).all()
    if op == "ReduceLogSumExp":            # (log-sum of zeros would make the output -inf: not a model to run)
        assert_same_graph(run_pipeline(before, DEAD), before)


def test_resize_sizes_lose_the_removed_channels():
    body = "p = Resize <mode = \"nearest\"> (r, , , sizes)"
    got = run_pipeline(_model(body, f"{CONV1}, {CONV2}", "1,3,8,8", ", int64[4] sizes = {1, 4, 8, 8}"), DEAD)
    assert_same_graph(got, _model(body, f"{CONV1_PRUNED}, {CONV2_PRUNED}", "1,3,8,8",
                                  ", int64[4] sizes = {1, 2, 8, 8}"))


def test_resize_with_scales_is_left_alone():
    body = "p = Resize <mode = \"linear\"> (r, , scales)"
    scales = ", float[4] scales = {1, 1, 2, 2}"
    got = run_pipeline(_model(body, f"{CONV1}, {CONV2}", "1,3,8,8", scales), DEAD)
    assert_same_graph(got, _model(body, f"{CONV1_PRUNED}, {CONV2_PRUNED}", "1,3,8,8", scales))
