"""Graph metadata: typed records that survive onnx-graphsurgeon copies, ONNX save/load and graphopt.load."""
import onnx
import pytest
from onnx import helper

import graphopt
import onnx_builders as ob
from graphopt import PassManager, metadata
from graphopt.errors import BadInput
from graphopt.graph import copy, to_onnx

pytestmark = pytest.mark.fast


def _mlp():
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1)]
    return ob.model(nodes, [ob.vi("x", [2, 16])], [ob.vi("y", None)],
                    [("w1", ob.rnd(16, 16)), ("w2", ob.rnd(8, 16, seed=1))])


def test_records_survive_copies_passes_and_save_load(tmp_path):
    g = graphopt.load(_mlp())
    g.doc_string = "exported by a tool"
    metadata.set_sparse_block(g, "fc1", (4, 1))
    metadata.set_sparse_nm(g, "fc2", (2, 4))
    want = ({"fc1": (4, 1)}, {"fc2": (2, 4)})
    g2 = PassManager.parse("cleanup").run(copy(g)).graph
    path = tmp_path / "m.onnx"
    onnx.save(to_onnx(g2), str(path))
    for obj in (g, g2, onnx.load(str(path)), graphopt.load(path)):
        assert (metadata.sparse_blocks(obj), metadata.sparse_nm(obj)) == want
    assert g.doc_string.splitlines()[0] == "exported by a tool"      # other lines are kept


def test_one_pattern_per_node_and_bad_records_name_the_node():
    m = _mlp()
    metadata.set_sparse_nm(m, "fc1", (2, 4))
    metadata.set_sparse_block(m, "fc1", (8, 1))
    assert metadata.sparse_blocks(m) == {"fc1": (8, 1)} and metadata.sparse_nm(m) == {}
    with pytest.raises(ValueError):
        metadata.set_sparse_block(m, "fc1", (0, 1))
    m.graph.doc_string = 'graphopt.sparse_blocks: {"fc\\n1": [4]}'
    with pytest.raises(BadInput, match=r"node 'fc\\n1': bad block shape \[4\]") as e:
        metadata.sparse_blocks(m)
    assert "\n" not in str(e.value)
    m.graph.doc_string = "graphopt.sparse_blocks: {nope"
    with pytest.raises(BadInput, match="is not JSON"):
        metadata.sparse_blocks(m)


def test_quantization_round_trip_and_bad_records(tmp_path):
    m = _mlp()
    assert metadata.quantization(m) is None
    metadata.set_quantization(m, metadata.Quantization("int8", "s8"))
    metadata.set_quantization(m, metadata.Quantization("int8", "u8"))       # replaces, one line per kind
    assert m.graph.doc_string.count("graphopt.quantized:") == 1
    path = tmp_path / "q.onnx"
    onnx.save(m, str(path))
    got = metadata.quantization(onnx.load(str(path)))
    assert got == metadata.Quantization("int8", "u8") and got.label == "int8,u8"
    metadata.set_quantization(m, metadata.Quantization("weight_int4"))
    assert metadata.quantization(copy(graphopt.load(m))).label == "weight_int4"
    for bad in (("int4", None), ("int8", None), ("weight_int8", "u8")):
        with pytest.raises(ValueError):
            metadata.Quantization(*bad)
    m.graph.doc_string = 'graphopt.quantized: {"scheme": "weight_int8", "activations": "u\\n8"}'
    with pytest.raises(BadInput, match=r"quantized: bad record .*u\\n8") as e:
        metadata.quantization(m)
    assert "\n" not in str(e.value)
    m.graph.doc_string = 'graphopt.quantized: "int8,u8"'
    with pytest.raises(BadInput, match="keys scheme and activations"):
        metadata.quantization(m)


def test_adapter_tags_round_trip_and_bad_records(tmp_path):
    g = graphopt.load(_mlp())
    tags = {"h__adapted/conv": metadata.AdapterTag("h", "t1", "conv"),
            "r__adapted/matmul": metadata.AdapterTag("r", "t2", "matmul")}
    metadata.set_adapter_tags(g, tags)
    path = tmp_path / "a.onnx"
    onnx.save(to_onnx(copy(g)), str(path))
    assert metadata.adapter_tags(onnx.load(str(path))) == tags
    metadata.set_adapter_tags(g, {})
    assert metadata.adapter_tags(g) == {} and "graphopt.adapters" not in g.doc_string
    g.doc_string = 'graphopt.adapters: {"a\\tb": {"student": "s", "teacher": "t", "part": "gemm"}}'
    with pytest.raises(BadInput, match=r"node 'a\\tb': bad record") as e:
        metadata.adapter_tags(g)
    assert "\t" not in str(e.value)
    g.doc_string = 'graphopt.adapters: {"n": {"student": "s", "teacher": "t"}}'
    with pytest.raises(BadInput, match="node 'n': bad record"):
        metadata.adapter_tags(g)
    g.doc_string = 'graphopt.adapters: ["n"]'
    with pytest.raises(BadInput, match="must map node names"):
        metadata.adapter_tags(g)
