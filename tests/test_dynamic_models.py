"""Dynamic-shape exports (OCR-style CRNN, detector with Resize-to-size, Range grid and reshape(b, -1, k)):
bound with input_shapes, folded to static graphs, compiled and compared with onnxruntime on the original file."""
import numpy as np
import onnx
import pytest
import torch

import dynamic_models as dm
import graphopt
from graphopt import ort


@pytest.mark.parametrize("kind,shape", [("crnn", (2, 1, 16, 40)), ("crnn", (1, 1, 16, 24)),
                                        ("detector", (1, 3, 64, 96)), ("detector", (2, 3, 32, 32))])
def test_dynamic_export_binds_folds_compiles_and_matches(tmp_path, kind, shape):
    torch.manual_seed(0)
    if kind == "crnn":
        model, axes = dm.CRNN(), {"x": {0: "batch", 3: "width"}, "y": {0: "steps", 1: "batch"}}
        example = torch.randn(1, 1, 16, 32)
    else:
        model, axes = dm.Detector(), {"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch", 1: "anchors"}}
        example = torch.randn(1, 3, 64, 64)
    path = dm.export(model, tmp_path / f"{kind}.onnx", example, axes)
    raw = onnx.load(str(path))
    assert any(d.dim_param for d in raw.graph.input[0].type.tensor_type.shape.dim)
    assert any(n.op_type == "Shape" for n in raw.graph.node), "the export should compute shapes at run time"

    g = graphopt.load(path, input_shapes={"x": shape})
    assert not any(n.op in ("Shape", "Range", "ConstantOfShape") for n in g.nodes), [n.op for n in g.nodes]
    art = graphopt.compile(g, out=tmp_path / "art", measure=False)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    want = ort.run(raw, {"x": x})["y"]
    got = art.run({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max())))
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)
