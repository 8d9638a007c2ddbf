"""`graphopt inspect` on models with dynamic dimensions and no --input-shape: symbolic shapes (N x 16 x H/2 x W/2),
per-layer params, and MACs as formulas in the symbols, the totals line included; with --input-shape, numbers."""
import json
from fractions import Fraction

import pytest
import torch
from onnx import helper

import dynamic_models as dm
import onnx_builders as ob
from graphopt.cli import main
from graphopt.inspect_model import inspect_model
from graphopt.symbolic_shapes import Poly
from test_third_party_models import SHAPES, model_path


def value(formula, **symbols):
    """A MACs formula as inspect prints it ('89915*N*H*W/16 + 111744*N', 'T^2'), evaluated exactly."""
    if isinstance(formula, int):
        return formula
    env = {k: Fraction(v) for k, v in symbols.items()}
    return eval(formula.replace("^", "**"), {"__builtins__": {}}, env)     # noqa: S307 - our own formula text


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.fast
def test_poly_arithmetic_and_text():
    names = ("N", "H", "W")
    n, h, w = (Poly.var(names, i) for i in range(3))
    p = 108 * n * h * w + Fraction(1, 2) * h - 3
    assert str(p) == "108*N*H*W + H/2 - 3"
    assert str(n * n * Fraction(3, 4)) == "3*N^2/4"
    assert p.at((1, 4, 2)) == 108 * 8 + 2 - 3
    assert (h - h + 5).constant() == 5 and p.constant() is None


def _conv_gemm(tmp_path):
    """x[N, 3, H, W] -> Conv 3x3 stride 2 pad 1 (8 channels) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(8, 4)."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    m = ob.model(nodes, [ob.vi("x", ["N", 3, "H", "W"])], [ob.vi("y", ["N", 4])],
                 [("w", ob.rnd(8, 3, 3, 3)), ("b", ob.rnd(8)), ("fw", ob.rnd(4, 8)), ("fb", ob.rnd(4))])
    return ob.save(m, tmp_path / "conv_gemm.onnx")


@pytest.mark.fast
def test_dynamic_conv_shows_symbolic_shapes_and_mac_formulas(tmp_path):
    info = inspect_model(_conv_gemm(tmp_path))
    layers = {layer["name"]: layer for layer in info["layers"]}
    assert info["inputs"][0]["shape"] == ["N", 3, "H", "W"]
    assert layers["conv"]["output_shape"] == "N x 8 x H/2 x W/2" and layers["conv"]["params"] == 8 * 27 + 8
    assert layers["conv"]["macs"] == "54*N*H*W"           # N * 8 * H/2 * W/2 outputs, 27 MACs each
    assert layers["fc"]["output_shape"] == "N x 4" and layers["fc"]["macs"] == "32*N"
    assert info["macs"] == "54*N*H*W + 32*N" and info["macs_complete"] and info["macs_unknown_nodes"] == 0
    assert [s["name"] for s in info["symbols"]] == ["N", "H", "W"]
    assert "H a multiple of 2" in info["shapes_note"]
    static = inspect_model(_conv_gemm(tmp_path), {"x": (2, 3, 64, 32)})
    assert "symbols" not in static and static["macs"] == value(info["macs"], N=2, H=64, W=32) == 54 * 2 * 64 * 32 + 64


@pytest.mark.fast
def test_attention_macs_are_quadratic_in_the_sequence(tmp_path):
    """x[N, T, 16] @ x^T -> [N, T, T]: 16*N*T^2 MACs."""
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], name="t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "xt"], ["y"], name="scores")]
    path = ob.save(ob.model(nodes, [ob.vi("x", ["batch", "seq", 16])], [ob.vi("y", None)]), tmp_path / "att.onnx")
    info = inspect_model(path)
    assert info["macs"] == "16*batch*seq^2"
    assert {layer["name"]: layer for layer in info["layers"]}["scores"]["output_shape"] == "batch x seq x seq"


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_ppocr_models_without_input_shape(name, capsys):
    """Paddle2ONNX exports with dynamic batch/height/width (unnamed dims, shape subgraphs): before, inspect failed
    with 'bind it with --input-shape'. Now every Conv/MatMul has a MAC formula, and the total formula gives the
    number --input-shape gives at the sizes RapidOCR feeds (for the classifier at a height that its stride-32
    stages divide, where the formulas need no rounding)."""
    code, out, err = run_cli(capsys, "inspect", model_path(name), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["inputs"][0]["shape"] == ["N", 3, "H", "W"]
    assert isinstance(info["macs"], str) and info["macs_complete"], info["macs"]
    convs = [layer for layer in info["layers"] if layer["op"] in ("Conv", "MatMul")]
    assert convs and all(layer["macs"] not in ("?", 0) and "?" not in layer["output_shape"] for layer in convs)
    n, _, h, w = SHAPES[name]
    h = 64 if name.startswith("ch_ppocr_mobile") else h
    code, out, _ = run_cli(capsys, "inspect", model_path(name), "--json", "--input-shape", f"x={n},3,{h},{w}")
    static = json.loads(out)
    assert code == 0 and value(info["macs"], N=n, H=h, W=w) == static["macs"] > 0
    by_name = {layer["name"]: layer["macs"] for layer in static["layers"]}
    assert all(value(layer["macs"], N=n, H=h, W=w) == by_name[layer["name"]] for layer in convs)

    code, out, _ = run_cli(capsys, "inspect", model_path(name))
    lines = out.splitlines()
    assert code == 0 and lines[0] == "inputs: x float32[N, 3, H, W]" and lines[1].startswith("symbols: N = x[0]")
    assert f"MACs = {info['macs']}" in out and "N x " in out and "shapes: formulas fitted" in out


@pytest.mark.fast
@pytest.mark.parametrize("kind", ["crnn", "detector"])
def test_dynamic_exports_without_input_shape(kind, tmp_path, capsys):
    """torch exports whose shapes are computed at run time: before, 0 MACs; now formulas in their dim_params."""
    torch.manual_seed(0)
    if kind == "crnn":
        model, axes, example = dm.CRNN(), {"x": {0: "batch", 3: "width"}, "y": {0: "steps", 1: "batch"}}, (1, 1, 16, 32)
        binding = {"batch": 2, "width": 40}
    else:
        model, axes, example = dm.Detector(), {"x": {0: "batch", 2: "height", 3: "width"},
                                               "y": {0: "batch", 1: "anchors"}}, (1, 3, 64, 64)
        binding = {"batch": 2, "height": 32, "width": 64}
    path = dm.export(model, tmp_path / f"{kind}.onnx", torch.randn(*example), axes)
    code, out, err = run_cli(capsys, "inspect", path, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert isinstance(info["macs"], str) and "batch" in info["macs"] and "width" in info["macs"]
    shape = [binding.get(d, d) if isinstance(d, str) else d for d in info["inputs"][0]["shape"]]
    code, out, _ = run_cli(capsys, "inspect", path, "--json", "--input-shape", "x=" + ",".join(map(str, shape)))
    assert code == 0 and value(info["macs"], **binding) == json.loads(out)["macs"] > 0
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0 and "MACs = " in out and "batch x " in out


@pytest.mark.fast
def test_input_shape_output_stays_numeric(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "inspect", _conv_gemm(tmp_path), "--input-shape", "x=1,3,8,8")
    assert code == 0 and "symbols:" not in out and "shapes:" not in out
    assert "inputs: x float32[1, 3, 8, 8]" in out and "1x8x4x4" in out and f"{54 * 64 + 32:,} MACs" in out


@pytest.mark.fast
def test_macs_of_a_shape_onnx_cannot_infer_are_unknown_not_zero(capsys, tmp_path):
    """Flatten -> Gemm whose weight fits one height only: at the other sizes onnx cannot infer the Gemm's output,
    so its MACs are '?' (counted in the totals line), never a silent 0."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w"], ["y"], name="fc")]
    path = ob.save(ob.model(nodes, [ob.vi("x", ["N", 4, "H"])], [ob.vi("y", ["N", 5])], [("w", ob.rnd(32, 5))]),
                   tmp_path / "flat.onnx")
    info = inspect_model(path)
    layers = {layer["name"]: layer for layer in info["layers"]}
    assert layers["flat"]["output_shape"] == "N x 4*H" and layers["fc"]["macs"] == "?"
    assert not info["macs_complete"] and info["macs_unknown_nodes"] == 1
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0 and "(+ 1 node(s) whose shapes stay unknown)" in out
