"""No silent garbage (issue 13, item 3): NaN/Inf in training, evaluation or calibration data is refused up front
naming the array and the first bad row; labels outside the model's classes are refused; a loss that becomes NaN
stops compress with exit 1 naming the step, and nothing is written; non-finite weights are never trained on nor
written."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest

torch = pytest.importorskip("torch")

import graphopt  # noqa: E402
from graphopt.cli import main  # noqa: E402
from graphopt.compress import compress  # noqa: E402
from graphopt.data_checks import check_labels, first_nonfinite_row, nonfinite_weights  # noqa: E402
from graphopt.errors import BadInput, CheckFailed  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402

pytestmark = pytest.mark.fast

PIPELINE = "cleanup,prune-channels{flops=0.6}"


@pytest.fixture(scope="module")
def data():
    x_tr, y_tr, x_te, y_te = digits.load_digits_split()
    return {"x": x_tr[:256].copy(), "labels": y_tr[:256].copy()}, {"x": x_te[:64].copy(), "labels": y_te[:64].copy()}


def _err_line(capsys) -> str:
    """The one error line (progress lines may come before it)."""
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("graphopt: training step")]
    assert len(err) == 1, err
    return err[0]


def test_first_nonfinite_row():
    a = np.zeros((10000, 3, 2), np.float32)
    assert first_nonfinite_row(a) is None
    a[7000, 1, 0] = np.inf
    a[9000, 0, 1] = np.nan
    assert first_nonfinite_row(a) == (7000, 2)
    assert first_nonfinite_row(np.arange(5)) is None            # integers are always finite


@pytest.mark.parametrize("labels,why", [([0, 1, 10], "range from 0 to 10"), ([0, -1], "range from -1"),
                                        ([0.5, 1.0], "whole class indices"), ([np.nan], "whole class indices"),
                                        (["a"], "class indices")])
def test_bad_labels(labels, why):
    with pytest.raises(BadInput, match=why):
        check_labels(np.array(labels), 10, "training data")


@pytest.mark.parametrize("what,value", [("x", np.nan), ("x", np.inf), ("labels", 10), ("labels", -3)])
def test_compress_refuses_bad_training_data_before_training(tmp_path, capsys, data, what, value):
    train, _ = data
    train = {k: v.copy() for k, v in train.items()}
    if what == "x":
        train["x"][37, 0, 3, 3] = value
    else:
        train["labels"] = train["labels"].astype(np.int64)
        train["labels"][12] = value
    np.savez(tmp_path / "train.npz", **train)
    out = tmp_path / "out.onnx"
    rc = main(["compress", str(digits.teacher_path()), "--train", str(tmp_path / "train.npz"), "--pipeline", PIPELINE,
               "--epochs", "1", "-o", str(out)])
    line = _err_line(capsys)
    assert rc == 2 and line.startswith("graphopt: error:")
    assert ("row 37" in line and "'x'" in line) if what == "x" else "labels range" in line
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_compress_refuses_nan_in_eval_data(data):
    train, ev = data
    ev = {k: v.copy() for k, v in ev.items()}
    ev["x"][5] = np.nan
    with pytest.raises(BadInput, match="evaluation data: array 'x' holds NaN or Inf in row 5"):
        compress(graphopt.load(digits.teacher_path()), train, PIPELINE, eval_data=ev, epochs=1)


def test_compile_refuses_inf_in_calibration_data(tmp_path, capsys, data):
    calib = {"x": data[0]["x"][:32].copy()}
    calib["x"][3, 0, 0, 0] = -np.inf
    np.savez(tmp_path / "calib.npz", **calib)
    rc = main(["compile", str(digits.teacher_path()), "--pipeline", "cleanup,quantize{scheme=int8}",
               "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "art"), "--no-bench"])
    line = _err_line(capsys)
    assert rc == 2 and "calibration data: array 'x' holds NaN or Inf in row 3" in line
    assert not (tmp_path / "art").exists()


def test_diverging_loss_stops_compress_naming_the_step(tmp_path, capsys, data):
    train, _ = data
    np.savez(tmp_path / "train.npz", **train)
    out = tmp_path / "out.onnx"
    rc = main(["compress", str(digits.teacher_path()), "--train", str(tmp_path / "train.npz"), "--pipeline", PIPELINE,
               "--epochs", "1", "--lr", "1e30", "-o", str(out)])
    line = _err_line(capsys)
    assert rc == 1, line
    assert "training step 1" in line and "optimizer step" in line and ("nan" in line or "inf" in line)
    assert not out.exists()


def _with_nan_weight(graph: gs.Graph) -> gs.Graph:
    conv = next(n for n in graph.nodes if n.op == "Conv")
    w = conv.inputs[1]
    v = np.array(w.values)
    v.flat[0] = np.nan
    w.values = v
    return graph


def test_nan_weights_are_never_trained_on_or_compiled(tmp_path, data):
    g = _with_nan_weight(graphopt.load(digits.teacher_path()))
    assert nonfinite_weights(g)
    with pytest.raises(BadInput, match="holds NaN or Inf"):
        compress(g, data[0], PIPELINE, epochs=1)
    with pytest.raises(BadInput, match="holds NaN or Inf"):
        graphopt.compile(g, target="cpu", out=tmp_path / "art", measure=False)
    assert not (tmp_path / "art").exists()


def test_compress_of_nan_weights_leaves_nothing_behind(tmp_path, capsys, data):
    """Refused before the checkpoint folder is made: a leftover OUT.ckpt would refuse the next (fixed) run as "a
    checkpoint of an interrupted run"."""
    import onnx
    onnx.save(gs.export_onnx(_with_nan_weight(graphopt.load(digits.teacher_path()))), str(tmp_path / "nan.onnx"))
    np.savez(tmp_path / "train.npz", **data[0])
    rc = main(["compress", str(tmp_path / "nan.onnx"), "--train", str(tmp_path / "train.npz"), "--pipeline", PIPELINE,
               "--epochs", "1", "-o", str(tmp_path / "out.onnx")])
    assert rc == 2 and "holds NaN or Inf" in _err_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.onnx", "train.npz"]


def test_a_pass_that_writes_nan_weights_fails_the_check():
    from graphopt.passmanager import Pass, PassManager, PassResult

    class Poison(Pass):
        name = "test-poison-weights"
        lossy = True

        def run(self, graph, ctx):
            return PassResult(_with_nan_weight(graph), True)

    g = graphopt.load(digits.teacher_path())
    with pytest.raises(CheckFailed, match="test-poison-weights.*NaN or Inf in weight"):
        PassManager([Poison()]).run(g)
