"""Control flow: an If whose condition folds to a constant once shapes are bound becomes its branch; If and Loop
that stay dynamic pass through every cleanup pass untouched and are refused by name before lowering (exit 2)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
import onnx_builders as ob
from graphopt import PassManager, api, ort
from graphopt.cli import main

pytestmark = pytest.mark.fast


def _branch(name, nodes, out, inits=()):
    return helper.make_graph(nodes, name, [], [ob.vi(out, None)],
                             [onnx.numpy_helper.from_array(v, k) for k, v in inits])


def if_on_batch():
    """y = x + (batch == 1 ? Unsqueeze(Relu(Squeeze(x, 0)), 0) * 2 : -x) for x [N, 4]: the usual exported
    `if x.shape[0] == 1: squeeze` pattern. The then-branch is invalid for N != 1 (Squeeze of a dim of 3), reads
    x from the outer graph and has an initializer of its own."""
    then_g = _branch("then", [helper.make_node("Squeeze", ["x", "ax0"], ["sq"], name="then_squeeze"),
                              helper.make_node("Relu", ["sq"], ["r"], name="then_relu"),
                              helper.make_node("Unsqueeze", ["r", "ax0"], ["u"], name="then_unsq"),
                              helper.make_node("Mul", ["u", "two"], ["t_out"], name="then_mul")],
                     "t_out", [("two", np.float32(2.0))])
    else_g = _branch("else", [helper.make_node("Neg", ["x"], ["e_out"], name="else_neg")], "e_out")
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i0"], ["n"], name="gather", axis=0),
             helper.make_node("Equal", ["n", "one"], ["c"], name="eq"),
             helper.make_node("If", ["c"], ["y0"], name="if_batch1", then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["y0", "x"], ["y1"], name="add"),
             helper.make_node("Mul", ["y1", "three"], ["y"], name="mul")]
    return ob.model(nodes, [ob.vi("x", ["N", 4])], [ob.vi("y", ["N", 4])],
                    [("i0", np.array(0, np.int64)), ("one", np.array(1, np.int64)), ("ax0", np.array([0], np.int64)),
                     ("three", np.float32(3.0))])


def nested_ifs():
    """Two shape-conditioned Ifs, the second nested in the first's taken branch, both branches naming their
    local tensor 'v' (legal in sibling scopes, a clash once inlined side by side)."""
    inner_then = _branch("inner_then", [helper.make_node("Sigmoid", ["x"], ["v"], name="inner_sig")], "v")
    inner_else = _branch("inner_else", [helper.make_node("Tanh", ["x"], ["v2"], name="inner_tanh")], "v2")
    outer_then = _branch("outer_then", [
        helper.make_node("Greater", ["n", "zero"], ["c2"], name="gt"),
        helper.make_node("If", ["c2"], ["w"], name="inner_if", then_branch=inner_then, else_branch=inner_else),
        helper.make_node("Relu", ["w"], ["o"], name="outer_relu")], "o")
    outer_else = _branch("outer_else", [helper.make_node("Neg", ["x"], ["o2"], name="outer_neg")], "o2")
    other_then = _branch("o_then", [helper.make_node("Abs", ["x"], ["v"], name="abs_v")], "v")
    other_else = _branch("o_else", [helper.make_node("Neg", ["x"], ["v3"], name="neg_v")], "v3")
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i1"], ["n"], name="gather", axis=0),
             helper.make_node("Equal", ["n", "four"], ["c"], name="eq"),
             helper.make_node("If", ["c"], ["a"], name="outer_if", then_branch=outer_then, else_branch=outer_else),
             helper.make_node("If", ["c"], ["b"], name="other_if", then_branch=other_then, else_branch=other_else),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    return ob.model(nodes, [ob.vi("x", [2, "W"])], [ob.vi("y", [2, "W"])],
                    [("i1", np.array(1, np.int64)), ("four", np.array(4, np.int64)), ("zero", np.array(0, np.int64))])


def if_on_data():
    """A data-dependent If (sum(x) > 0) between two convolutions; its then-branch holds a Constant node, a
    Squeeze and an Identity, and reads the first conv's output from the outer graph."""
    then_g = _branch("then", [
        helper.make_node("Constant", [], ["k"], name="then_const",
                         value=onnx.numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Squeeze", ["a", "k"], ["sq"], name="then_squeeze"),
        helper.make_node("Relu", ["sq"], ["r"], name="then_relu"),
        helper.make_node("Unsqueeze", ["r", "k"], ["u"], name="then_unsq"),
        helper.make_node("Identity", ["u"], ["t_out"], name="then_id")], "t_out")
    else_g = _branch("else", [helper.make_node("Neg", ["a"], ["e_out"], name="else_neg")], "e_out")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["b"], name="if_data", then_branch=then_g, else_branch=else_g),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return ob.model(nodes, [ob.vi("x", [1, 3, 8, 8])], [ob.vi("y", [1, 4, 8, 8])],
                    [("zero", np.array(0, np.float32)), ("w1", ob.rnd(8, 3, 3, 3)), ("w2", ob.rnd(4, 8, 3, 3))])


def loop():
    """y = x added three times by a Loop (trip count 3)."""
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
                              helper.make_node("Add", ["acc_in", "x"], ["acc_out"], name="body_add")], "body",
                             [ob.vi("i", [], TensorProto.INT64), ob.vi("cond_in", [], TensorProto.BOOL),
                              ob.vi("acc_in", [2, 4])],
                             [ob.vi("cond_out", [], TensorProto.BOOL), ob.vi("acc_out", [2, 4])])
    nodes = [helper.make_node("Loop", ["M", "T", "zeros"], ["y"], name="loop3", body=body)]
    return ob.model(nodes, [ob.vi("x", [2, 4])], [ob.vi("y", [2, 4])],
                    [("M", np.array(3, np.int64)), ("T", np.array(True)), ("zeros", np.zeros((2, 4), np.float32))])


def loop_of_unknown_length():
    """A decoder-style Loop: it appends to a scan output until its condition turns false, so the length of y is
    not known from shapes."""
    body = helper.make_graph([helper.make_node("Less", ["acc_in", "x"], ["cond_out"], name="body_less"),
                              helper.make_node("Add", ["acc_in", "one"], ["acc_out"], name="body_add"),
                              helper.make_node("Identity", ["acc_in"], ["step"], name="body_step")], "body",
                             [ob.vi("i", [], TensorProto.INT64), ob.vi("cond_in", [], TensorProto.BOOL),
                              ob.vi("acc_in", [1])],
                             [ob.vi("cond_out", [1], TensorProto.BOOL), ob.vi("acc_out", [1]), ob.vi("step", [1])],
                             [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    nodes = [helper.make_node("Loop", ["", "T", "zero"], ["last", "y"], name="decode", body=body)]
    return ob.model(nodes, [ob.vi("x", [1])], [ob.vi("last", [1]), ob.vi("y", ["steps", 1])],
                    [("T", np.array(True)), ("zero", np.zeros(1, np.float32))])


def test_a_loop_whose_result_shapes_are_unknown_is_refused_at_load(tmp_path, capsys):
    """(SLANet's table decoder) the Loop is named in one line at load, not a failed structural check later."""
    with pytest.raises(graphopt.errors.UnsupportedModel, match="node 'decode' \\(Loop\\): the shapes of its results"):
        graphopt.load(loop_of_unknown_length())
    onnx.save(loop_of_unknown_length(), str(tmp_path / "m.onnx"))
    code = main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "art"), "--no-bench"])
    err = capsys.readouterr().err
    assert code == 2 and "(Loop)" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "art").exists()


def _ops(graph):
    return [n.op for n in graph.nodes]


@pytest.mark.parametrize("batch", [1, 3])
def test_if_on_a_bound_shape_becomes_its_branch_and_compiles(batch, tmp_path):
    model = if_on_batch()
    g = graphopt.load(model, input_shapes={"x": (batch, 4)})
    assert "If" not in _ops(g)
    assert ("Squeeze" in _ops(g)) == (batch == 1)
    res = PassManager.parse("cleanup").run(g)                  # exact: compared with onnxruntime by the manager
    assert "Identity" not in _ops(res.graph)
    art = api.compile(model, "cpu", input_shapes={"x": (batch, 4)}, out=tmp_path / "art", measure=False)
    x = np.random.default_rng(1).standard_normal((batch, 4)).astype(np.float32)
    np.testing.assert_allclose(art.run({"x": x})["y"], ort.run(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [4, 5])
def test_nested_ifs_with_clashing_local_names_are_inlined(width):
    model = nested_ifs()
    g = graphopt.load(model, input_shapes={"x": (2, width)})
    assert "If" not in _ops(g)
    names = [t.name for n in g.nodes for t in n.outputs]
    assert len(names) == len(set(names))
    x = np.random.default_rng(2).standard_normal((2, width)).astype(np.float32)
    got = ort.run(graphopt.to_onnx(g, check=True), {"x": x})["y"]
    np.testing.assert_allclose(got, ort.run(model, {"x": x})["y"], rtol=1e-6)


@pytest.mark.parametrize("build", [if_on_data, loop])
@pytest.mark.parametrize("pipeline", ["cleanup", "decompose-rnn,fold-batchnorm", "prune-channels{ratio=0.5}"])
def test_dynamic_control_flow_passes_through_passes_untouched(build, pipeline):
    """Every pass leaves a dynamic If / Loop and its subgraphs alone (the manager checks each result against
    onnxruntime on the pass's input graph)."""
    g = graphopt.load(build())
    res = PassManager.parse(pipeline).run(g)
    op = "If" if build is if_on_data else "Loop"
    node = next(n for n in res.graph.nodes if n.op == op)
    assert all(len(sg.nodes) for sg in node.subgraphs())


@pytest.mark.parametrize("build,needle", [(if_on_data, "node 'if_data' (If): its condition depends on the values of input(s) 'x'"),
                                          (loop, "node 'loop3' (Loop): graphopt does not compile loops")])
def test_compile_refuses_dynamic_control_flow_in_one_line(build, needle, tmp_path, capsys):
    onnx.save(build(), str(tmp_path / "m.onnx"))
    code = main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "art"), "--no-bench"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "art").exists()


def test_silero_vad_with_its_sample_rate_pinned_compiles_and_streams(tmp_path):
    """The real Silero VAD (silero-vad package): 25 If nodes branching on the sample-rate input, LSTMs inside
    the branches, the recurrent state in and out. With sr made a constant every If folds away; the library then
    carries the state over a few chunks like onnxruntime does."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec("silero_vad")
    path = Path(spec.origin).parent / "data" / "silero_vad.onnx" if spec else None
    if path is None or not path.is_file():
        pytest.skip("the silero-vad package is not installed")
    m = onnx.load(str(path))
    art = api.compile(path, "cpu", input_shapes={"input": (1, 576), "state": (2, 1, 128)}, out=tmp_path / "art",
                      measure=False, input_values={"sr": 16000})
    assert "If" not in {n.op_type for n in onnx.load(str(art.path / "model.onnx")).graph.node}
    assert [i["name"] for i in art.inputs] == ["input", "state"]
    out, state_out = [o.name for o in m.graph.output]
    sr = np.array(16000, np.int64)
    rng = np.random.default_rng(0)
    state = ref_state = np.zeros((2, 1, 128), np.float32)
    for _ in range(3):
        x = (0.1 * rng.standard_normal((1, 576))).astype(np.float32)
        got, ref = art.run({"input": x, "state": state}), ort.run(m, {"input": x, "state": ref_state, "sr": sr})
        np.testing.assert_allclose(got[out], ref[out], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[state_out], ref[state_out], rtol=1e-4, atol=1e-5)
        state, ref_state = got[state_out], ref[state_out]


def test_input_value_pins_an_input_from_the_command_line(tmp_path, capsys):
    """--input-value NAME=V turns the input into a constant before folding: the refusal names the option, and with
    it the data-dependent If folds and the model compiles (its input list loses the pinned input)."""
    import json
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    flag = helper.make_tensor_value_info("flag", TensorProto.INT64, [])
    then_g = _branch("then", [helper.make_node("Relu", ["x"], ["t"], name="t_relu")], "t")
    else_g = _branch("else", [helper.make_node("Neg", ["x"], ["e"], name="e_neg")], "e")
    nodes = [helper.make_node("Greater", ["flag", "zero"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "pin", [x, flag], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          [onnx.numpy_helper.from_array(np.array(0, np.int64), "zero")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "a"), "--no-bench"]) == 2
    assert "--input-value flag=VALUE" in capsys.readouterr().err
    assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "a"), "--no-bench", "--input-value",
                 "flag=3", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in rep["manifest"]["inputs"]] == ["x"]
    xv = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(graphopt.Artifact(tmp_path / "a").run({"x": xv})["y"], np.maximum(xv, 0))
    for bad in ("flag", "flag=abc", "nope=1", "flag=1,2"):
        assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "b"), "--input-value", bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
