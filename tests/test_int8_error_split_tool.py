"""tools/int8_error_split.py: its variants of a QDQ graph are what they claim (every rounding kept reproduces the QDQ
graph; no rounding with ranges calibrated on the same inputs reproduces the fp32 model, up to the zero points' rounding of the ranges), and the tool runs end to
end on the digits CNN."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import digits
import graphopt
from graphopt import PassContext, PassManager
from graphopt.graph import to_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import int8_error_split as tool  # noqa: E402

pytestmark = pytest.mark.fast


def test_variants_reproduce_the_qdq_graph_and_the_fp32_model():
    x_tr, _, x_te, _ = digits.load_digits_split()
    g = graphopt.load(str(digits.teacher_path()))
    calib = x_te[:64]        # the evaluation inputs themselves: minmax ranges clip nothing on them
    qdq = to_onnx(PassManager.parse("quantize{calibration=minmax}").run(g, PassContext(data={"calib": {"x": calib}}))
                  .graph)
    folded = PassManager.parse("fold-batchnorm").run(g, PassContext()).graph
    weights = {n.name: n.inputs[1].values for n in folded.nodes if n.op in tool.WEIGHTED}
    feeds = [{"x": calib[i:i + 1]} for i in range(len(calib))]
    q = tool.outputs(qdq, feeds)
    np.testing.assert_array_equal(tool.outputs(tool.variant(qdq, weights, ("*",), ("*",)), feeds), q)
    fp = tool.outputs(to_onnx(g), feeds)
    none = tool.outputs(tool.variant(qdq, weights, (), ()), feeds)
    # equal but where a range's ends moved by the rounding of the zero point (at most half a step: the one element
    # at the output's minimum here)
    assert np.mean(np.abs(none - fp) > 1e-4 * np.abs(fp).max()) < 0.01
    assert np.abs(q - fp).mean() > 10 * np.abs(none - fp).mean()    # the rounding is what the variant removed
    acts = tool.activation_pairs(qdq)
    assert "x" in acts and len(acts) >= 5


def test_tool_end_to_end(tmp_path):
    x_tr, _, x_te, _ = digits.load_digits_split()
    np.savez(tmp_path / "c.npz", x=x_tr[:64])
    np.savez(tmp_path / "e.npz", x=x_te[:100])
    out = tmp_path / "split.json"
    assert tool.main([str(digits.teacher_path()), "--calib", str(tmp_path / "c.npz"), "--eval",
                      str(tmp_path / "e.npz"), "--each", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["metric"] == "top1_agreement" and res["samples"] == 100
    assert res["rows"]["fp32 model"] == 1.0 and 0.9 <= res["rows"]["int8 QDQ graph"] <= 1.0
    kinds = {k for k, _, _ in res["each"]}
    assert kinds == {"weight", "activation"} and len(res["each"]) >= 9
