"""sparsify: block patterns, zeros written into the initializers, metadata, drift, idempotence, bad input."""
import numpy as np
import pytest

import graphopt
from node_lookup import node_of
from graphopt import PassContext, PassManager
from graphopt.errors import BadInput
from graphopt.hardware import HardwareInfo, Structure
from graphopt import metadata
from graphopt.passes.sparsify import parse_block, weight_matrix
from graphopt.pipeline_text import format_value

pytestmark = pytest.mark.fast

MODELS = ["mobilenet_v3", "vit", "convnext", "mlp_digits"]


def _weights(g):
    out = {}
    for n in g.nodes:
        v = weight_matrix(n)
        if v is not None:
            out[n.name] = v[1]
    return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("block,sparsity", [("1x1", 0.5), ("1x16", 0.5), ("4x4", 0.75), ("2:4", 0.5)])
def test_patterns_on_the_zoo(zoo_onnx, name, block, sparsity):
    g = graphopt.load(zoo_onnx(name))
    text = f"sparsify{{block={block}}}" if block == "2:4" else f"sparsify{{block={block},sparsity={sparsity}}}"
    res = PassManager.parse(text).run(g)
    rec = res.records[0]
    assert res.modified and rec["info"]["layers"]
    assert "drift" in rec and all("cosine" in d for d in rec["drift"].values())      # lossy: drift reported
    ws = _weights(res.graph)
    kind, r, c = parse_block(block)
    meta = metadata.sparse_nm(res.graph) if kind == "nm" else metadata.sparse_blocks(res.graph)
    for layer, info in rec["info"]["layers"].items():
        W = ws[layer]
        assert meta[layer] == (r, c) and info["block"] == block
        if kind == "nm":
            assert np.all((W.reshape(W.shape[0], -1, c) == 0).sum(axis=2) >= c - r)
            continue
        R, C = -(-W.shape[0] // r), -(-W.shape[1] // c)
        pad = np.zeros((R * r, C * c))
        pad[:W.shape[0], :W.shape[1]] = W
        blocks = pad.reshape(R, r, C, c).transpose(0, 2, 1, 3).reshape(R * C, -1)
        dead = np.all(blocks == 0, axis=1)
        assert abs(dead.mean() - sparsity) <= 1.0 / len(dead) + 1e-9          # the fraction of whole tiles
        assert info["kept_blocks"] == int((~dead).sum())


@pytest.mark.parametrize("block", ["1x1", "4x4", "2:4"])
def test_sparsify_twice_gives_the_same_mask(zoo_onnx, block):
    g = graphopt.load(zoo_onnx("convnext"))
    first = PassManager.parse(f"sparsify{{block={block}}}").run(g)
    w1 = {k: v.copy() for k, v in _weights(first.graph).items()}
    second = PassManager.parse(f"sparsify{{block={block}}}").run(first.graph)
    assert not second.modified
    w2 = _weights(second.graph)
    for k in w1:
        assert np.array_equal(w1[k] == 0, w2[k] == 0) and np.array_equal(w1[k], w2[k])


def test_block_default_from_the_target_and_layer_filters(zoo_onnx):
    g = graphopt.load(zoo_onnx("mobilenet_v3"))
    ctx = PassContext(hw=HardwareInfo(structure=Structure(blocks=(4, 4))))
    classifier = node_of(g, "head.2").name
    res = PassManager.parse(f"sparsify{{ignore={format_value([classifier])},min_params=300}}").run(g, ctx)
    rec = res.records[0]
    assert rec["info"]["block"] == "4x4"
    assert rec["info"]["skipped"][classifier] == "ignored by the user"
    assert any("min_params" in why for why in rec["info"]["skipped"].values())
    assert all(info["shape"][0] * info["shape"][1] >= 300 for info in rec["info"]["layers"].values())
    assert PassManager.parse("sparsify").run(graphopt.load(zoo_onnx("mlp_digits"))).records[0]["info"]["block"] == "1x1"


def test_only_1x1_convs_gemm_and_matmul(zoo_onnx):
    g = graphopt.load(zoo_onnx("resnet"))
    downsample = node_of(g, "layer2.downsample.0").name                     # resnet's only 1x1 conv
    res = PassManager.parse("sparsify").run(g)
    pointwise = {n.name for n in res.graph.nodes if n.op == "Conv" and tuple(n.inputs[1].shape[2:]) == (1, 1)}
    assert pointwise == {downsample}
    assert set(res.records[0]["info"]["layers"]) == {n.name for n in res.graph.nodes if n.op == "Gemm"} | pointwise


@pytest.mark.parametrize("text,needle", [
    ("sparsify{block=3}", "not a block shape"),
    ("sparsify{block=4:2}", "not a block shape"),
    ("sparsify{sparsity=1.5}", "at most"),
    ("sparsify{sparsity=-0.1}", "at least"),
    ("sparsify{block=2:4,sparsity=0.7}", "fixes the sparsity"),
])
def test_bad_options(text, needle):
    with pytest.raises(BadInput) as e:
        PassManager.parse(text)
    assert needle in str(e.value)


def test_bad_target_block_and_missing_ignore(zoo_onnx):
    g = graphopt.load(zoo_onnx("mlp_digits"))
    with pytest.raises(ValueError, match="not a \\(rows, cols\\) pair"):
        HardwareInfo(structure=Structure(blocks="big"))          # a target cannot declare a malformed block
    with pytest.raises(TypeError, match="HardwareInfo"):
        PassContext(hw={"sparse_block": (4, 4)})                 # the untyped dict of before is refused
    with pytest.raises(BadInput, match="ignore names node 'nope'"):
        PassManager.parse("sparsify{ignore=[nope]}").run(g)


def test_the_cuda_targets_block_hint_is_used_and_recorded(zoo_onnx):
    from graphopt.targets.cuda import CudaTarget
    g = graphopt.load(zoo_onnx("mlp_digits"))
    res = PassManager.parse("cleanup,sparsify{sparsity=0.75}").run(g, PassContext(hw=CudaTarget().hw()))
    rec = res.records[-1]
    assert rec["info"]["block"] == "32x1" and rec["info"]["layers"]
    assert metadata.sparse_blocks(res.graph) == {name: (32, 1) for name in rec["info"]["layers"]}
