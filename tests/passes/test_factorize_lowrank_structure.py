"""Before/Expected: factorize-lowrank replaces a layer with a constant weight W (K x N, y = x @ W) by two layers
through a rank-r SVD, W ~ P Q, P = U_r sqrt(S_r) (K x r), Q = sqrt(S_r) V_r^T (r x N).

W = diag(4, 1, 0) at rank 1: U_1 = V_1 = e1 and S_1 = 4, so P = [2, 0, 0]^T and Q = [2, 0, 0]. The SVD fixes the
factors' sign only up to flipping both (P Q is the same), so either sign is accepted."""
import pytest

from graph_compare import assert_same_graph, run_pipeline

pytestmark = pytest.mark.fast

RANK1 = "factorize-lowrank{rank=1,round_to=1}"


def _assert_either_sign(got, expected: str) -> None:
    """got equals expected written with factors {sign}2: with +2, or with -2."""
    try:
        assert_same_graph(got, expected.format(sign=""))
    except AssertionError:
        assert_same_graph(got, expected.format(sign="-"))


def test_matmul_becomes_two_matmuls_through_the_rank():
    before = """
    g (float[1,3] x) => (float[1,3] y)
    <float[3,3] w = {4, 0, 0, 0, 1, 0, 0, 0, 0}>
    {
        y = MatMul(x, w)
    }"""
    expected = """
    g (float[1,3] x) => (float[1,3] y)
    <float[3,1] p = {{{sign}2, 0, 0}}, float[1,3] q = {{{sign}2, 0, 0}}>
    {{
        t = MatMul(x, p)
        y = MatMul(t, q)
    }}"""
    _assert_either_sign(run_pipeline(before, RANK1), expected)


def test_gemm_keeps_trans_b_and_gives_the_bias_to_the_second():
    """Gemm with transB = 1 stores B = W^T (N x K): the factors are stored transposed too, P^T (1 x 3) and Q^T
    (3 x 1); the bias C and beta go to the second Gemm."""
    before = """
    g (float[1,3] x) => (float[1,3] y)
    <float[3,3] b = {4, 0, 0, 0, 1, 0, 0, 0, 0}, float[3] c = {1, 2, 3}>
    {
        y = Gemm <transB = 1> (x, b, c)
    }"""
    expected = """
    g (float[1,3] x) => (float[1,3] y)
    <float[1,3] pt = {{{sign}2, 0, 0}}, float[3,1] qt = {{{sign}2, 0, 0}}, float[3] c = {{1, 2, 3}}>
    {{
        t = Gemm <transB = 1> (x, pt)
        y = Gemm <beta = 1.0, transB = 1> (t, qt, c)
    }}"""
    _assert_either_sign(run_pipeline(before, RANK1), expected)


def test_full_rank_changes_nothing():
    """The default selection keeps all the energy: full rank, which saves no MACs, so nothing is factorized."""
    before = """
    g (float[1,3] x) => (float[1,3] y)
    <float[3,3] w = {4, 0, 0, 0, 1, 0, 0, 0, 2}>
    {
        y = MatMul(x, w)
    }"""
    assert_same_graph(run_pipeline(before, "factorize-lowrank{round_to=1}"), before)
