"""Before/Expected: sparsify keeps the graph's structure and zeros weights in place, by the pattern asked for;
the pattern is recorded in the graph metadata for the node.

The weight seen as W[out, in] (Gemm with transB stores it so) is
    [[1,   -2,  3, -4],
     [0.5,  6, -7,  8]]."""
import pytest

import graphopt
from graph_compare import assert_same_graph, parse, run_pipeline
from graphopt import metadata
from graphopt.graph import from_onnx

pytestmark = pytest.mark.fast

GEMM = """
    g (float[1,4] x) => (float[1,2] y)
    <float[2,4] b = {{{b}}}, float[2] c = {{1, 2}}>
    {{
        y = Gemm <transB = 1> (x, b, c)
    }}"""
W = "1, -2, 3, -4, 0.5, 6, -7, 8"


@pytest.mark.parametrize("block,zeroed", [
    # unstructured: the 4 smallest |w| of 8 (0.5, 1, 2, 3) go, wherever they are
    ("1x1", "0, 0, 0, -4, 0, 6, -7, 8"),
    # 1x2 tiles: norms sqrt(5), 5 (row 0), 6.02, 10.6 (row 1): the two smallest tiles are row 0's
    ("1x2", "0, 0, 0, 0, 0.5, 6, -7, 8"),
    # 2:4: the two largest |w| of every 4 consecutive inputs of a row stay
    ("2:4", "0, 0, 3, -4, 0, 0, -7, 8"),
])
def test_gemm_weight_is_zeroed_by_pattern(block, zeroed):
    sparsity = "" if block == "2:4" else ",sparsity=0.5"
    got = run_pipeline(GEMM.format(b=W), f"sparsify{{block={block}{sparsity}}}")
    assert_same_graph(got, GEMM.format(b=zeroed))
    kind, shape = ("nm", (2, 4)) if block == "2:4" else ("blocks", tuple(map(int, block.split("x"))))
    recorded = metadata.sparse_nm(from_onnx(got)) if kind == "nm" else metadata.sparse_blocks(from_onnx(got))
    assert list(recorded.values()) == [shape]


def test_matmul_weight_is_zeroed_along_its_input_rows():
    """MatMul's B is W^T (in x out): the same weight transposed, the same unstructured choice."""
    before = """
    g (float[1,4] x) => (float[1,2] y)
    <float[4,2] w = {1, 0.5, -2, 6, 3, -7, -4, 8}>
    {
        y = MatMul(x, w)
    }"""
    expected = """
    g (float[1,4] x) => (float[1,2] y)
    <float[4,2] w = {0, 0, 0, 6, 0, -7, -4, 8}>
    {
        y = MatMul(x, w)
    }"""
    assert_same_graph(run_pipeline(before, "sparsify{block=1x1,sparsity=0.5}"), expected)


def test_ignored_and_non_pointwise_layers_stay_dense():
    """A 3x3 Conv is no matrix product sparsify handles; an ignored Gemm keeps its weight."""
    before = """
    g (float[1,1,3,3] x, float[1,4] v) => (float[1,1,1,1] y, float[1,2] z)
    <float[1,1,3,3] k = {1, 2, 3, 4, 5, 6, 7, 8, 9}, float[2,4] b = {1, -2, 3, -4, 0.5, 6, -7, 8}>
    {
        y = Conv(x, k)
        z = Gemm <transB = 1> (v, b)
    }"""
    gemm = next(n.name for n in graphopt.load(parse(before)).nodes if n.op == "Gemm")
    assert_same_graph(run_pipeline(before, f"sparsify{{sparsity=0.5,ignore=[{gemm}]}}"), before)
