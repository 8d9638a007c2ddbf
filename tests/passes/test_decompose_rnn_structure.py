"""Before/Expected: decompose-rnn unrolls a forward RNN of two steps (batch 1, one input feature, hidden size 1,
no bias, no initial state) into the ops its builder emits, in order:

    the input projection for all steps at once (x @ W^T + bias, bias 0 here), reshaped to [steps * batch, hidden];
    per step t: a Slice of rows t .. t+1, h @ R^T (h starts as a zero constant), Add, Tanh;
    Y = Concat of the steps' h reshaped to [1, 1, batch, hidden]; Y_h = the last h reshaped to [1, batch, hidden];
    Identity nodes writing the RNN's output tensors."""
import pytest

from graph_compare import assert_same_graph, run_pipeline

pytestmark = pytest.mark.fast


def test_two_step_rnn_unrolls_into_matmul_add_tanh():
    before = """
    g (float[2,1,1] x) => (float[2,1,1,1] y, float[1,1,1] y_h)
    <float[1,1,1] W = {0.5}, float[1,1,1] R = {2}>
    {
        y, y_h = RNN <hidden_size = 1> (x, W, R)
    }"""
    expected = """
    g (float[2,1,1] x) => (float[2,1,1,1] y, float[1,1,1] y_h)
    <float[1,1] wt = {0.5}, float[1] xb = {0}, int64[2] rows = {2, 1}, float[1,1] h_init = {0}, float[1,1] rt = {2},
     int64[1] zero = {0}, int64[1] one = {1}, int64[1] two = {2}, int64[4] step_shape = {1, 1, 1, 1},
     int64[3] state_shape = {1, 1, 1}>
    {
        xw = MatMul(x, wt)
        xwb = Add(xw, xb)
        xs = Reshape(xwb, rows)
        x0 = Slice(xs, zero, one, zero)
        r0 = MatMul(h_init, rt)
        a0 = Add(x0, r0)
        h0 = Tanh(a0)
        x1 = Slice(xs, one, two, zero)
        r1 = MatMul(h0, rt)
        a1 = Add(x1, r1)
        h1 = Tanh(a1)
        s0 = Reshape(h0, step_shape)
        s1 = Reshape(h1, step_shape)
        ys = Concat <axis = 0> (s0, s1)
        hs = Reshape(h1, state_shape)
        y = Identity(ys)
        y_h = Identity(hs)
    }"""
    assert_same_graph(run_pipeline(before, "decompose-rnn"), expected)


def test_graph_without_recurrent_ops_is_unchanged():
    before = """
    g (float[2,1,1] x) => (float[2,1,1] y)
    {
        y = Tanh(x)
    }"""
    assert_same_graph(run_pipeline(before, "decompose-rnn"), before)
