"""Before/Expected: the cleanup passes (fold-batchnorm, fold-constants, remove-identity, eliminate-dead-code and
cleanup, their fixed point). Expected graphs are written by hand; the values are worked out in the comments.

The BatchNormalization used throughout has epsilon 0, gamma {2, 3}, var {4, 0.25} (scale = gamma / sqrt(var) =
{1, 6}), beta {1, -1}, mean {0, 1} (shift = beta - mean * scale = {1, -7})."""
import pytest

from graph_compare import assert_same_graph, run_pipeline

pytestmark = pytest.mark.fast

BN = "float[2] gamma = {2, 3}, float[2] beta = {1, -1}, float[2] mean = {0, 1}, float[2] var = {4, 0.25}"
BN_NODE = "BatchNormalization <epsilon = 0.0> ({x}, gamma, beta, mean, var)"


# ---------------------------------------------------------------------------------------------------------------
# fold-batchnorm
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv,bias,folded_w,folded_b", [
    # Conv: w * scale per output channel; bias b * scale + shift = {0 + 1, 6 - 7}
    ("Conv", "float[2] b = {0, 1}", "float[2,1,1,1] w = {1, 12}", "float[2] b = {1, -1}"),
    # no bias: the shift becomes one
    ("Conv", None, "float[2,1,1,1] w = {1, 12}", "float[2] b = {1, -7}"),
    # ConvTranspose: the weight is [Cin, Cout, ...], scaled along axis 1
    ("ConvTranspose", None, "float[1,2,1,1] w = {1, 12}", "float[2] b = {1, -7}"),
])
def test_fold_batchnorm_into_conv(conv, bias, folded_w, folded_b):
    w = "float[2,1,1,1] w = {1, 2}" if conv == "Conv" else "float[1,2,1,1] w = {1, 2}"
    before = f"""
    g (float[1,1,2,2] x) => (float[1,2,2,2] y)
    <{w}, {BN}{', ' + bias if bias else ''}>
    {{
        c = {conv}(x, w{', b' if bias else ''})
        y = {BN_NODE.format(x='c')}
    }}"""
    expected = f"""
    g (float[1,1,2,2] x) => (float[1,2,2,2] y)
    <{folded_w}, {folded_b}>
    {{
        y = {conv}(x, w, b)
    }}"""
    assert_same_graph(run_pipeline(before, "fold-batchnorm"), expected)


def test_fold_batchnorm_into_gemm_keeps_alpha_and_sets_beta_to_one():
    """y = BN(2 x B^T + 0.5 C): B's rows scaled {1, 2, 3*6, 4*6}, C' = 0.5 * C * scale + shift = {1 + 1, 6 - 7}."""
    before = f"""
    g (float[1,2] x) => (float[1,2] y)
    <float[2,2] bw = {{1, 2, 3, 4}}, float[2] c = {{2, 2}}, {BN}>
    {{
        t = Gemm <alpha = 2.0, beta = 0.5, transB = 1> (x, bw, c)
        y = {BN_NODE.format(x='t')}
    }}"""
    expected = """
    g (float[1,2] x) => (float[1,2] y)
    <float[2,2] bw = {1, 2, 18, 24}, float[2] c = {2, -1}>
    {
        y = Gemm <alpha = 2.0, beta = 1.0, transB = 1> (x, bw, c)
    }"""
    assert_same_graph(run_pipeline(before, "fold-batchnorm"), expected)


def test_fold_batchnorm_into_matmul_adds_the_shift():
    """MatMul has no bias input: its weight's columns are scaled and the shift is an Add."""
    before = f"""
    g (float[1,2] x) => (float[1,2] y)
    <float[2,2] w = {{1, 2, 3, 4}}, {BN}>
    {{
        t = MatMul(x, w)
        y = {BN_NODE.format(x='t')}
    }}"""
    expected = """
    g (float[1,2] x) => (float[1,2] y)
    <float[2,2] w = {1, 12, 3, 24}, float[2] shift = {1, -7}>
    {
        t = MatMul(x, w)
        y = Add(t, shift)
    }"""
    assert_same_graph(run_pipeline(before, "fold-batchnorm"), expected)


def test_fold_batchnorm_leaves_a_batchnorm_after_an_activation():
    before = f"""
    g (float[1,1,2,2] x) => (float[1,2,2,2] y)
    <float[2,1,1,1] w = {{1, 2}}, {BN}>
    {{
        c = Conv(x, w)
        r = Relu(c)
        y = {BN_NODE.format(x='r')}
    }}"""
    assert_same_graph(run_pipeline(before, "fold-batchnorm"), before)


# ---------------------------------------------------------------------------------------------------------------
# fold-constants
# ---------------------------------------------------------------------------------------------------------------

def test_fold_constants_evaluates_constant_and_shape_subgraphs():
    """c1 * c2 becomes one constant; Shape(x) of a static input becomes its value (the Reshape stays: removing
    it is remove-identity's job); the Relu of the input stays."""
    before = """
    g (float[1,2] x) => (float[1,2] y)
    <float[2] c1 = {1, 2}, float[2] c2 = {3, 4}>
    {
        m = Mul(c1, c2)
        a = Add(x, m)
        s = Shape(x)
        r = Reshape(a, s)
        y = Relu(r)
    }"""
    expected = """
    g (float[1,2] x) => (float[1,2] y)
    <float[2] m = {3, 8}, int64[2] s = {1, 2}>
    {
        a = Add(x, m)
        r = Reshape(a, s)
        y = Relu(r)
    }"""
    assert_same_graph(run_pipeline(before, "fold-constants", fold_constants=False), expected)


# ---------------------------------------------------------------------------------------------------------------
# remove-identity
# ---------------------------------------------------------------------------------------------------------------

def test_remove_identity_removes_every_kind_of_no_op():
    before = """
    g (float[1,2,2] x) => (float[1,2,2] y)
    <float[1] zero = {0}, float[1] one = {1}, int64[3] shape = {1, 2, 2}>
    {
        a = Identity(x)
        b = Relu(a)
        c = Add(b, zero)
        d = Mul(c, one)
        e = Dropout(d)
        f = Cast <to = 1> (e)
        t = Transpose <perm = [0, 1, 2]> (f)
        h = Reshape(t, shape)
        y = Sigmoid(h)
    }"""
    expected = """
    g (float[1,2,2] x) => (float[1,2,2] y)
    {
        b = Relu(x)
        y = Sigmoid(b)
    }"""
    assert_same_graph(run_pipeline(before, "remove-identity"), expected)


def test_remove_identity_keeps_ops_that_change_something():
    """x + 0 that broadcasts to a larger shape, x * 2, a Cast to another type, a real Transpose, and an Identity
    from a graph input to a graph output (the output's name must stay): all kept."""
    before = """
    g (float[2] x) => (float[2,2] y, int32[2,2] z, float[2] w)
    <float[2,2] zero = {0, 0, 0, 0}, float[1] two = {2}>
    {
        a = Add(x, zero)
        b = Mul(a, two)
        y = Transpose <perm = [1, 0]> (b)
        z = Cast <to = 6> (b)
        w = Identity(x)
    }"""
    assert_same_graph(run_pipeline(before, "remove-identity"), before)


def test_remove_identity_before_a_graph_output_renames_the_producer_output():
    """An Identity writing a graph output: its producer writes the output instead."""
    before = """
    g (float[2] x) => (float[2] y)
    {
        r = Relu(x)
        y = Identity(r)
    }"""
    expected = """
    g (float[2] x) => (float[2] y)
    {
        y = Relu(x)
    }"""
    assert_same_graph(run_pipeline(before, "remove-identity"), expected)


# ---------------------------------------------------------------------------------------------------------------
# eliminate-dead-code
# ---------------------------------------------------------------------------------------------------------------

def test_eliminate_dead_code_drops_unused_nodes_but_keeps_inputs_and_node_outputs():
    """The Sigmoid -> Mul chain feeds nothing: gone, with its constant. The Split's unused second output stays
    (the node is live), and so does the unused graph input u (inputs are the interface)."""
    before = """
    g (float[1,4] x, float[1] u) => (float[1,2] y)
    <float[1] k = {3}>
    {
        s = Sigmoid(x)
        m = Mul(s, k)
        a, b = Split <axis = 1> (x)
        y = Relu(a)
    }"""
    expected = """
    g (float[1,4] x, float[1] u) => (float[1,2] y)
    {
        a, b = Split <axis = 1> (x)
        y = Relu(a)
    }"""
    got = run_pipeline(before, "eliminate-dead-code", fold_constants=False)
    assert_same_graph(got, expected)
    assert [i.name for i in got.graph.input] == ["x", "u"]
    assert not got.graph.initializer


# ---------------------------------------------------------------------------------------------------------------
# cleanup: the passes together, to a fixed point
# ---------------------------------------------------------------------------------------------------------------

def test_cleanup_folds_removes_and_eliminates_together():
    """The Conv weight is a constant product ({0.5, 1} * 2 = {1, 2}): folded first, so the BatchNormalization
    behind the Identity can fold into the Conv ({1, 12}, bias = shift {1, -7}); x + 0 and the dead Sigmoid go."""
    before = f"""
    g (float[1,1,2,2] x) => (float[1,2,2,2] y)
    <float[2,1,1,1] w0 = {{0.5, 1}}, float[1] two = {{2}}, float[1] zero = {{0}}, {BN}>
    {{
        w = Mul(w0, two)
        c = Conv(x, w)
        i = Identity(c)
        n = {BN_NODE.format(x='i')}
        y = Add(n, zero)
        dead = Sigmoid(x)
    }}"""
    expected = """
    g (float[1,1,2,2] x) => (float[1,2,2,2] y)
    <float[2,1,1,1] w = {1, 12}, float[2] b = {1, -7}>
    {
        y = Conv(x, w, b)
    }"""
    assert_same_graph(run_pipeline(before, "cleanup", fold_constants=False), expected)
