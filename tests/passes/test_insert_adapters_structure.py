"""Before/Expected: insert-adapters leaves the student's nodes and outputs as they are and adds, for each
(student tensor s, teacher tensor t) pair, an adapter writing a new graph output "<s>__adapted": an Identity when
the channel counts match, a 1x1 Conv (with bias) for channels-first maps, MatMul + Add for vectors. The adapter
weights are drawn at random (init=random) or fitted to data, so they are compared by dtype and shape only."""
import pytest

import graphopt
from graph_compare import assert_same_graph, parse, run_pipeline
from graphopt import PassContext, metadata
from graphopt.graph import from_onnx

pytestmark = pytest.mark.fast

STUDENT_MAP = """
    g (float[1,2,2,2] x) => (float[1,{c},2,2] y{extra_out})
    <float[{c},2,1,1] w = {{{w}}}{extra_consts}>
    {{
        h = Conv(x, w)
        y = Relu(h){extra_nodes}
    }}"""
TEACHER_MAP = """
    g (float[1,2,2,2] x) => (float[1,4,2,2] z)
    <float[4,2,1,1] k = {1, 2, 3, 4, 5, 6, 7, 8}>
    {
        t = Conv(x, k)
        z = Relu(t)
    }"""


def _ctx(teacher: str) -> PassContext:
    return PassContext(data={"teacher": graphopt.load(parse(teacher))})


def _student(c: int, w: str, adapter: str = "", out: str = "", consts: str = "") -> str:
    return STUDENT_MAP.format(c=c, w=w, extra_out=out, extra_consts=consts, extra_nodes=adapter)


def test_equal_channels_get_an_identity_adapter():
    before = _student(4, "1, 0, 0, 1, 1, 1, 1, -1")
    expected = _student(4, "1, 0, 0, 1, 1, 1, 1, -1", "\n        h__adapted = Identity(h)",
                        ", float[1,4,2,2] h__adapted")
    got = run_pipeline(before, "insert-adapters{pairs=[h:t]}", _ctx(TEACHER_MAP))
    assert_same_graph(got, expected)
    tags = metadata.adapter_tags(from_onnx(got))
    assert [(t.student, t.teacher, t.part) for t in tags.values()] == [("h", "t", "identity")]


def test_fewer_student_channels_get_a_1x1_conv_adapter():
    before = _student(2, "1, 0, 0, 1")
    adapter = ("\n        h__adapted = Conv <kernel_shape = [1, 1], strides = [1, 1], pads = [0, 0, 0, 0], "
               "dilations = [1, 1], group = 1> (h, aw, ab)")
    expected = _student(2, "1, 0, 0, 1", adapter, ", float[1,4,2,2] h__adapted",
                        ", float[4,2,1,1] aw = {0, 0, 0, 0, 0, 0, 0, 0}, float[4] ab = {0, 0, 0, 0}")
    got = run_pipeline(before, "insert-adapters{pairs=[h:t],init=random}", _ctx(TEACHER_MAP))
    assert_same_graph(got, expected, values=False)


def test_vectors_get_a_matmul_and_add_adapter():
    before = """
    g (float[1,3] x) => (float[1,2] y)
    <float[3,2] w = {1, 2, 3, 4, 5, 6}>
    {
        h = MatMul(x, w)
        y = Relu(h)
    }"""
    teacher = """
    g (float[1,3] x) => (float[1,5] z)
    <float[3,5] k = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}>
    {
        t = MatMul(x, k)
        z = Relu(t)
    }"""
    expected = """
    g (float[1,3] x) => (float[1,2] y, float[1,5] h__adapted)
    <float[3,2] w = {1, 2, 3, 4, 5, 6}, float[2,5] aw = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, float[5] ab = {0, 0, 0, 0, 0}>
    {
        h = MatMul(x, w)
        y = Relu(h)
        m = MatMul(h, aw)
        h__adapted = Add(m, ab)
    }"""
    got = run_pipeline(before, "insert-adapters{pairs=[h:t]}", _ctx(teacher))
    assert_same_graph(got, expected, values=False)
