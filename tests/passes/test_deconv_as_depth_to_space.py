"""deconv-as-depth-to-space: a ConvTranspose whose square kernel equals its stride becomes a 1x1 Conv and a
DepthToSpace, exactly (the pass manager compares each result with onnxruntime on the input graph; here also by
hand), idempotently, and only where that holds; quantize{scheme=int8} applies it, so the cpu target's integer convs
take a U-Net's upsampling."""
import numpy as np
import pytest
from onnx import helper

import graphopt
import onnx_builders as ob
from graphopt import PassContext, PassManager, api, ort
from graphopt.errors import BadInput

pytestmark = pytest.mark.fast


def deconv_model(k=2, stride=None, bias=True, cin=5, cout=3, hw=(4, 6), **attrs):
    """x [1, cin, *hw] -> ConvTranspose (kernel k x k, strides `stride` (default k), attrs) [+ bias] -> y."""
    s = stride or k
    kernel = attrs.pop("kernel", (k, k))
    w = ob.rnd(cin, cout // attrs.get("group", 1), *kernel)
    ins = ["x", "w"] + (["b"] if bias else [])
    node = helper.make_node("ConvTranspose", ins, ["y"], name="up", strides=[s, s], **attrs)
    inits = [("w", w)] + ([("b", ob.rnd(cout, seed=1))] if bias else [])
    return ob.model([node], [ob.vi("x", [1, cin, *hw])], [ob.vi("y", None)], inits)


def _run(model, pipeline="deconv-as-depth-to-space"):
    return PassManager.parse(pipeline).run(graphopt.load(model))


@pytest.mark.parametrize("k,bias,cout", [(2, True, 3), (2, False, 3), (3, True, 4), (4, True, 1)])
def test_rewrite_is_exact_and_idempotent(k, bias, cout):
    model = deconv_model(k=k, bias=bias, cout=cout)
    res = _run(model)
    assert res.records[-1]["info"]["rewritten"] == 1
    assert [n.op for n in res.graph.nodes] == ["Conv", "DepthToSpace"]
    conv, d2s = res.graph.nodes
    assert conv.inputs[1].values.shape == (k * k * cout, 5, 1, 1) and d2s.attrs == {"blocksize": k, "mode": "DCR"}
    x = np.random.default_rng(1).standard_normal((1, 5, 4, 6)).astype(np.float32)
    got = ort.run(graphopt.to_onnx(res.graph, check=True), {"x": x})["y"]
    np.testing.assert_allclose(got, ort.run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)
    assert not _run(graphopt.to_onnx(res.graph)).modified


@pytest.mark.parametrize("kwargs", [
    dict(k=3, stride=2),                                    # overlapping blocks
    dict(k=2, kernel=(2, 3), stride=2),                     # not square
    dict(k=2, pads=[1, 1, 0, 0]), dict(k=2, output_padding=[1, 1]), dict(k=2, dilations=[2, 2]),
    dict(k=2, group=3, cin=6, cout=6), dict(k=1)])         # grouped; 1x1 stride 1 is a Conv already
def test_other_transposed_convs_are_left_alone(kwargs):
    res = _run(deconv_model(**kwargs))
    assert res.records[-1]["info"]["rewritten"] == 0 and [n.op for n in res.graph.nodes] == ["ConvTranspose"]


def test_zoo_unet_is_exact(zoo_onnx):
    res = _run(str(zoo_onnx("unet")), "cleanup,deconv-as-depth-to-space")      # the manager checks exactness
    assert res.records[-1]["info"]["rewritten"] == 2 and not any(n.op == "ConvTranspose" for n in res.graph.nodes)


def test_bad_option_is_one_clear_error():
    with pytest.raises(BadInput, match="no option 'blocksize'"):
        PassManager.parse("deconv-as-depth-to-space{blocksize=2}")


def _calib(n=8):
    return {"calib": {"x": np.random.default_rng(5).standard_normal((n, 3, 32, 32)).astype(np.float32)}}


def test_quantize_turns_unet_upsampling_into_int8_convs(zoo_onnx, tmp_path):
    """quantize rewrites the U-Net's two ConvTransposes before calibrating: the QDQ graph has none, their 1x1
    Convs read quantized weights, and the cpu target compiles them as integer kernels that pass the int8 check;
    exclude_ops=[ConvTranspose] keeps them transposed (and fp32)."""
    g = graphopt.load(str(zoo_onnx("unet")))
    res = PassManager.parse("cleanup,quantize{calib_samples=8}").run(g, PassContext(data=_calib()))
    info = res.records[-1]["info"]
    assert info["deconvs_as_conv"] == 2 and not any(n.op == "ConvTranspose" for n in res.graph.nodes)
    assert sum(1 for q in info["quantized"] if q.endswith("_as_conv")) == 2
    art = api.compile(res.graph, "cpu", out=tmp_path / "a", measure=False)
    assert art.report["check"]["ok"]
    kept = PassManager.parse("cleanup,quantize{calib_samples=8,exclude_ops=[ConvTranspose]}").run(
        graphopt.load(str(zoo_onnx("unet"))), PassContext(data=_calib()))
    assert kept.records[-1]["info"]["deconvs_as_conv"] == 0
    assert sum(n.op == "ConvTranspose" for n in kept.graph.nodes) == 2
