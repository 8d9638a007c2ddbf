"""Loading: opsets, shape binding and folding, Constant weights, external data, torch export."""
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import graphopt
import onnx_builders as ob
import zoo
from graphopt import ort
from graphopt.errors import BadInput, UnsupportedModel

pytestmark = pytest.mark.fast


def _conv_model(opset):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
             helper.make_node("Softmax", ["f"], ["y"], name="softmax", axis=1)]
    return ob.model(nodes, [ob.vi("x", [1, 2, 4, 4])], [ob.vi("y", [1, 48])],
                    [("w", ob.rnd(3, 2, 3, 3)), ("shape", np.array([1, -1], np.int64))], opset=opset)


@pytest.mark.parametrize("opset", list(range(11, 22)))
def test_opsets_11_to_21_load_and_match(opset):
    m = _conv_model(opset)
    g = graphopt.load(m)
    assert g.opset == opset
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(ort.run(graphopt.to_onnx(g), {"x": x})["y"], ort.run(m, {"x": x})["y"], atol=1e-6)


def test_old_opset_is_upgraded():
    g = graphopt.load(ob.old_opset_model())
    assert g.opset >= 11


def test_dynamic_dims_must_be_bound_with_clear_message():
    with pytest.raises(BadInput, match=r"input 'x' has dynamic shape \[batch,2,3\]; bind it with --input-shape x=N,2,3"):
        graphopt.load(ob.dynamic_reshape())


def test_binding_folds_shape_subgraphs_to_a_static_graph():
    g = graphopt.load(ob.dynamic_reshape(), input_shapes={"x": (5, 2, 3)})
    assert [n.op for n in g.nodes] == ["Reshape", "MatMul"]
    assert g.outputs[0].shape == [5, 4]


@pytest.mark.parametrize("shapes,needle", [({"nope": (1, 2, 3)}, "'nope', which is not a graph input; inputs are: x"),
                                           ({"x": (1, 2)}, "rank 2 but the input has rank 3"),
                                           ({"x": (1, 5, 3)}, "dimension 1 is fixed to 2")])
def test_bad_bindings(shapes, needle):
    with pytest.raises(BadInput, match=needle.replace("(", r"\(")):
        graphopt.load(ob.dynamic_reshape(), input_shapes=shapes)


@pytest.mark.parametrize("name", ["resnet", "vit", "yolo", "shufflenet", "lstm"])
def test_dynamic_batch_zoo_binds_and_matches(zoo_onnx, name):
    path = zoo_onnx(name, dynamic_batch=True)
    g = graphopt.load(path, input_shapes={"x": (3,) + tuple(zoo.INPUT_SHAPES[name][0][1:])})
    assert not any(n.op == "Shape" for n in g.nodes), "shape subgraphs must be folded after binding"
    feeds = graphopt.verify.seeded_inputs(g)
    ref = ort.run(onnx.load(str(path)), feeds)
    got = ort.run(graphopt.to_onnx(g), feeds)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5)


def test_constant_node_weights_become_initializers():
    nodes = [helper.make_node("Constant", [], ["w"], name="wconst", value=numpy_helper.from_array(ob.rnd(4, 3), "w")),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    g = graphopt.load(ob.model(nodes, [ob.vi("x", [2, 4])], [ob.vi("y", [2, 3])]))
    assert [n.op for n in g.nodes] == ["MatMul"]
    assert isinstance(g.nodes[0].inputs[1], graphopt.graph.gs.Constant)


def _external(tmp_path, location):
    m = _conv_model(17)
    onnx.external_data_helper.convert_model_to_external_data(m, all_tensors_to_one_file=True, location="w.bin",
                                                             size_threshold=0)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    onnx.save_model(m, str(model_dir / "m.onnx"))   # writes model_dir/w.bin
    if location != "w.bin":
        mm = onnx.load(str(model_dir / "m.onnx"), load_external_data=False)
        for t in mm.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save_model(mm, str(model_dir / "m.onnx"))
    return model_dir / "m.onnx"


def test_external_data_inside_folder_loads(tmp_path):
    g = graphopt.load(_external(tmp_path, "w.bin"))
    assert any(isinstance(t, graphopt.graph.gs.Constant) for t in g.tensors().values())


@pytest.mark.parametrize("location,needle", [("../w.bin", "outside the model's folder"),
                                             ("/etc/passwd", "outside the model's folder"),
                                             ("missing.bin", "which does not exist")])
def test_external_data_outside_folder_is_refused(tmp_path, location, needle):
    (tmp_path / "w.bin").write_bytes(b"\0" * 1024)
    with pytest.raises(BadInput, match=needle):
        graphopt.load(_external(tmp_path, location))


def test_unknown_domain_is_refused_with_node_names():
    with pytest.raises(UnsupportedModel, match=r"'fancy' \(FancyOp, domain 'com.acme'\)"):
        graphopt.load(ob.custom_domain())


@pytest.mark.parametrize("content,needle", [(None, "no such file"), (b"", "file is empty"),
                                            (b"this is not onnx at all\n" * 10, "not"),
                                            ("truncate", "truncated")])
def test_unreadable_files(tmp_path, zoo_onnx, content, needle):
    p = tmp_path / "m.onnx"
    if content == "truncate":
        data = open(zoo_onnx("resnet"), "rb").read()
        p.write_bytes(data[: len(data) // 2])
    elif content is not None:
        p.write_bytes(content)
    with pytest.raises(BadInput, match=needle):
        graphopt.load(p)


def test_from_torch_matches_torch():
    module, inputs = zoo.build("resnet")
    g = graphopt.from_torch(module, inputs)
    feeds = {g.inputs[0].name: inputs[0].numpy()}
    got = ort.run(graphopt.to_onnx(g), feeds)
    want = module(*inputs).detach().numpy()
    np.testing.assert_allclose(next(iter(got.values())), want, atol=1e-5)


def test_from_torch_compiles(tmp_path):
    module, inputs = zoo.build("cnn_digits")
    art = graphopt.compile(graphopt.from_torch(module, inputs), out=tmp_path / "a", measure=False)
    out = art.run({art.inputs[0]["name"]: inputs[0].numpy()})
    np.testing.assert_allclose(next(iter(out.values())), module(*inputs).detach().numpy(), atol=1e-5)


def test_from_torch_failure_is_one_clear_error():
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)
    with pytest.raises(UnsupportedModel, match="torch export of Bad failed"):
        graphopt.from_torch(Bad(), (torch.randn(2, 3),))   # wrong example input width


def test_load_does_not_touch_the_file(zoo_onnx):
    p = zoo_onnx("mlp_digits")
    before = os.stat(p).st_mtime_ns
    graphopt.load(p)
    assert os.stat(p).st_mtime_ns == before


def test_shape_start_end_folds_to_the_slice():
    """onnx-graphsurgeon folds Shape(start, end) to the whole shape; ours honours the slice (found by conformance)."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape", start=1, end=-1),
             helper.make_node("Cast", ["s"], ["sf"], name="cast", to=onnx.TensorProto.FLOAT),
             helper.make_node("Mul", ["sf", "k"], ["y"], name="mul")]
    m = ob.model(nodes, [ob.vi("x", [2, 3, 4, 5])], [ob.vi("y", [2])], [("k", np.array([1.0, 1.0], np.float32))])
    g = graphopt.load(m)
    x = np.zeros((2, 3, 4, 5), np.float32)
    np.testing.assert_array_equal(ort.run(graphopt.to_onnx(g), {"x": x})["y"], [3.0, 4.0])


def test_zero_size_dimension_is_static():
    m = ob.model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [ob.vi("x", [0, 3])], [ob.vi("y", [0, 3])])
    g = graphopt.load(m)
    assert g.inputs[0].shape == [0, 3]


def test_load_checkpoint_weights_only_and_clear_errors(tmp_path):
    """PyTorch checkpoints: state_dicts (also under "state_dict"/"model") load; pickled objects, truncated files and
    mismatched keys or shapes are one-line BadInput errors."""
    import torch

    from graphopt.loading import load_checkpoint
    torch.manual_seed(0)
    src, dst = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    torch.save({"model": src.state_dict(), "step": 3}, tmp_path / "ok.pt")
    load_checkpoint(dst, tmp_path / "ok.pt")
    assert torch.equal(dst.weight, src.weight)
    torch.save(src, tmp_path / "pickled.pt")
    with pytest.raises(BadInput, match=r"weights_only=True: save model.state_dict\(\)"):
        load_checkpoint(dst, tmp_path / "pickled.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match="not a readable PyTorch checkpoint"):
        load_checkpoint(dst, tmp_path / "cut.pt")
    torch.save(torch.nn.Linear(5, 3).state_dict(), tmp_path / "shape.pt")
    with pytest.raises(BadInput, match=r"shape of weight is \[3, 5\], the module has \[3, 4\]"):
        load_checkpoint(dst, tmp_path / "shape.pt")
    torch.save({"w": src.weight.detach()}, tmp_path / "keys.pt")
    with pytest.raises(BadInput, match="does not fit Linear: missing weight, bias"):
        load_checkpoint(dst, tmp_path / "keys.pt")
    with pytest.raises(BadInput, match="no such checkpoint"):
        load_checkpoint(dst, tmp_path / "none.pt")


def _two_unnamed_convs():
    """Two 16->16 3x3 Convs on 8x8, both without a name: 2 x 16*16*9*64 = 294,912 MACs."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2"], ["y"], pads=[1, 1, 1, 1])]
    return ob.model(nodes, [ob.vi("x", [1, 16, 8, 8])], [ob.vi("y", [1, 16, 8, 8])],
                    [("w1", ob.rnd(16, 16, 3, 3)), ("w2", ob.rnd(16, 16, 3, 3, seed=1))])


def test_load_names_every_node_uniquely_and_deterministically():
    m = _two_unnamed_convs()
    dup = helper.make_node("Relu", ["y"], ["r"], name="act")
    m.graph.node.extend([dup, helper.make_node("Relu", ["r"], ["z"], name="act"),
                         helper.make_node("Relu", ["z"], ["q"], name="Conv_1")])
    m.graph.output[0].CopyFrom(ob.vi("q", [1, 16, 8, 8]))
    names = [n.name for n in graphopt.load(m).nodes]
    assert names == [n.name for n in graphopt.load(m).nodes]
    assert names == ["Conv_0", "Conv_1_1", "act", "act_1", "Conv_1"]   # user names are kept where unique


def test_unnamed_nodes_all_count_in_inspect_and_report(tmp_path):
    import onnx_graphsurgeon as gs
    from graphopt.analyses import flops
    from graphopt.inspect_model import inspect_model
    m = _two_unnamed_convs()
    info = inspect_model(m)
    assert info["macs"] == 294_912 and [l["macs"] for l in info["layers"]] == [147_456, 147_456]
    assert flops(gs.import_onnx(m), None)["macs"] == 294_912     # a graph that did not go through load
    report = graphopt.compile(m, "cpu", tmp_path / "a", pipeline="cleanup", measure=False).report
    assert report["macs_before"] == report["macs_after"] == 294_912


def _sparse_weight_model(indices, dims=(4, 4)):
    m = ob.model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [ob.vi("x", [2, 4])], [ob.vi("y", [2, 4])])
    values = numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32), "w")
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(
        values, numpy_helper.from_array(np.array(indices, np.int64), "w_indices"), list(dims)))
    return m


@pytest.mark.parametrize("indices", [[0, 5, 15], [[0, 0], [1, 1], [3, 3]]])
def test_sparse_initializer_becomes_a_dense_weight_and_compiles(tmp_path, indices):
    """Sparse initializers used to stay sparse through onnx-graphsurgeon, where the passes' shape inference sees a
    rank-0 weight (compile blamed decompose-rnn); they are made dense at load."""
    art = graphopt.compile(_sparse_weight_model(indices), out=tmp_path / "a", measure=False)
    w = np.zeros((4, 4), np.float32)
    w[[0, 1, 3], [0, 1, 3]] = [1.0, 2.0, 3.0]
    x = ob.rnd(2, 4)
    np.testing.assert_allclose(art.run({"x": x})["y"], x @ w, rtol=1e-6)


@pytest.mark.parametrize("indices,dims,env,needle", [
    ([0, 5, 16], (4, 4), None, "sparse initializer 'w' is malformed"),
    ([0, 1, 2], (4, 4), "32", "sparse initializer 'w' would be [4, 4] (64 bytes) once dense"),
    ([0, 1, 2], (1 << 40, 1 << 20), None, "once dense")])
def test_bad_sparse_initializer_is_refused(monkeypatch, indices, dims, env, needle):
    if env:
        monkeypatch.setenv("GRAPHOPT_MAX_TENSOR_BYTES", env)
    with pytest.raises(BadInput) as e:
        graphopt.load(_sparse_weight_model(indices, dims))
    assert needle in str(e.value)


@pytest.mark.parametrize("key,value,needle", [("location", "w\0.bin", "invalid external data location 'w\\x00.bin'"),
                                              ("offset", "-64", "external data offset '-64'"),
                                              ("offset", "abc", "external data offset 'abc'"),
                                              ("length", "1e3", "external data length '1e3'")])
def test_malformed_external_data_entries_are_refused(tmp_path, key, value, needle):
    path = _external(tmp_path, "w.bin")
    m = onnx.load(str(path), load_external_data=False)
    entries = m.graph.initializer[0].external_data
    if not any(e.key == key for e in entries):
        entries.add(key=key)
    next(e for e in entries if e.key == key).value = value
    path.write_bytes(m.SerializeToString())
    with pytest.raises(BadInput) as e:
        graphopt.load(path)
    assert needle in str(e.value)


def test_model_file_over_protobufs_limit_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.onnx"
    with open(path, "wb") as f:           # a sparse file: nothing is written to disk
        f.truncate(9 * 10 ** 9)
    with pytest.raises(BadInput, match="is 9.0 GB, more than an ONNX file can hold"):
        graphopt.load(path)


@pytest.mark.parametrize("build,shapes,needle", [
    (lambda: ob.model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [ob.vi("x", ["N", 4])],
                      [ob.vi("y", ["N", 4])]), {"x": (10 ** 12, 4)}, "input 'x' would be [1000000000000, 4] float32"),
    (lambda: ob.model([helper.make_node("Expand", ["x", "s"], ["y"], name="expand")], [ob.vi("x", [1, 4])],
                      [ob.vi("y", None)], [("s", np.array([10 ** 10, 4], np.int64))]), None,
     "output 'y' of node 'expand' (Expand) would be [10000000000, 4] float32 (160.0 GB)")])
def test_tensors_over_the_memory_limit_are_refused_before_anything_runs(build, shapes, needle):
    with pytest.raises(BadInput) as e:
        graphopt.load(build(), input_shapes=shapes)
    assert needle in str(e.value) and "GRAPHOPT_MAX_TENSOR_BYTES" in str(e.value)


def test_cycle_and_missing_initializer_name_the_node():
    cycle = ob.model([helper.make_node("Add", ["x", "b"], ["a"], name="add"),
                      helper.make_node("Relu", ["a"], ["b"], name="relu"),
                      helper.make_node("Identity", ["a"], ["y"], name="out")], [ob.vi("x", [1, 4])], [ob.vi("y", [1, 4])])
    with pytest.raises(BadInput, match=r"node 'add' \(Add\) reads 'b', which only the later node 'relu' \(Relu\)"):
        graphopt.load(cycle)
    missing = ob.model([helper.make_node("MatMul", ["x", "w"], ["y"])], [ob.vi("x", [1, 4])], [ob.vi("y", [1, 4])])
    with pytest.raises(BadInput, match=r"node #0 \(MatMul\) reads 'w', which no graph input, initializer or node"):
        graphopt.load(missing)


@pytest.mark.parametrize("io", ["input", "output"])
def test_bfloat16_inputs_and_outputs_are_refused(io):
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    node = helper.make_node("Cast", ["x"], ["y"], name="cast", to=f32 if io == "input" else bf16)
    m = ob.model([node], [ob.vi("x", [1, 4], bf16 if io == "input" else f32)],
                 [ob.vi("y", [1, 4], f32 if io == "input" else bf16)])
    with pytest.raises(UnsupportedModel, match=f"{io} '{'x' if io == 'input' else 'y'}' is BFLOAT16"):
        graphopt.load(m)


def test_names_that_are_not_utf8_are_refused(tmp_path):
    """Protobuf hands back non-UTF-8 strings as bytes (found by the loader fuzzer on a node name); one clear line."""
    from onnx import TensorProto, helper
    node = helper.make_node("Relu", ["x"], ["y"], name="okname")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    raw = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    p = tmp_path / "bad.onnx"
    p.write_bytes(raw.replace(b"okname", b"ok\xc2ame"))
    with pytest.raises(BadInput, match="name of node #0 is not UTF-8"):
        graphopt.load(p)
