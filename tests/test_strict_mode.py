"""Strict mode (GRAPHOPT_STRICT=1, set by conftest.py): a bug caught by a broad `except Exception` is raised again,
an expected failure still takes its fallback."""
import numpy as np
import onnx.parser
import pytest

from graphopt import trainable, verify
from graphopt.errors import reraise_if_strict, strict_mode
from graphopt.graph import from_onnx

pytestmark = pytest.mark.fast

RELU = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y) <float[3] b = {1.0, 2.0, 3.0}> { s = Add(x, b)  y = Relu(s) }""")


def test_the_suite_runs_strict():
    assert strict_mode()


@pytest.mark.parametrize("exc, strict, raised", [(TypeError("bug"), True, True), (KeyError("bug"), True, True),
                                                 (RuntimeError("expected"), True, False),
                                                 (TypeError("bug"), False, False)])
def test_reraise_if_strict(exc, strict, raised):
    if raised:
        with pytest.raises(type(exc)):
            reraise_if_strict(exc, strict)
    else:
        reraise_if_strict(exc, strict)


def _relu_raising(exc):
    def fn(op, xs):
        raise exc
    return fn


def test_float64_check_does_not_switch_off_quietly_on_a_bug(monkeypatch):
    feeds = {"x": np.ones((2, 3), np.float32)}
    assert verify.fp64_outputs(from_onnx(RELU), feeds)["y"].dtype == np.float64
    monkeypatch.setitem(trainable.OPS, "Relu", _relu_raising(TypeError("a bug in the view")))
    with pytest.raises(TypeError, match="a bug in the view"):
        verify.fp64_outputs(from_onnx(RELU), feeds)
    monkeypatch.setenv("GRAPHOPT_STRICT", "0")
    assert verify.fp64_outputs(from_onnx(RELU), feeds) is None


def test_float64_check_still_falls_back_on_an_expected_failure(monkeypatch):
    monkeypatch.setitem(trainable.OPS, "Relu", _relu_raising(RuntimeError("no float64 kernel")))
    assert verify.fp64_outputs(from_onnx(RELU), {"x": np.ones((2, 3), np.float32)}) is None
