"""MACs, parameters and channels of quantized graphs: weights read through DequantizeLinear count (at their stored
bytes), scales and zero points do not, and Conv / Gemm / MatMul fed by a DequantizeLinear keep their MACs and
output channels."""
import numpy as np
import pytest

import digits
import graphopt
from graphopt import PassContext, PassManager
from graphopt.evaluate import channels_per_layer, graph_size
from graphopt.graph import from_onnx, to_onnx

pytestmark = pytest.mark.fast


def test_quantized_graph_keeps_macs_and_params():
    x_tr, _, _, _ = digits.load_digits_split()
    fp32 = PassManager.parse("fold-batchnorm").run(graphopt.load(str(digits.teacher_path()))).graph
    q = PassManager.parse("quantize").run(graphopt.load(str(digits.teacher_path())),
                                          PassContext(data={"calib": {"x": x_tr[:32]}})).graph
    q = from_onnx(to_onnx(q))                       # as read back from model.onnx: no shapes on DQ outputs
    before, after = graph_size(fp32, with_bytes=False), graph_size(q, with_bytes=False)
    assert after["macs"] == before["macs"] > 100_000
    assert after["params"] == before["params"]
    assert before["param_bytes"] == 4 * before["params"]
    # int8 weights, int32 biases: about a quarter of the float bytes
    assert before["param_bytes"] / 4.2 < after["param_bytes"] < before["param_bytes"] / 3.5
    w = PassManager.parse("quantize{scheme=weight_int8}").run(fp32).graph
    assert graph_size(from_onnx(to_onnx(w)), with_bytes=False)["macs"] == before["macs"]
    assert np.isclose(graph_size(w, with_bytes=False)["params"], before["params"])


def test_quantized_graph_keeps_channels_per_layer():
    """build's report plots channels before and after: a QDQ graph's layers keep theirs (weights behind
    DequantizeLinear)."""
    x_tr, _, _, _ = digits.load_digits_split()
    fp32 = PassManager.parse("fold-batchnorm").run(graphopt.load(str(digits.teacher_path()))).graph
    q = PassManager.parse("quantize").run(graphopt.load(str(digits.teacher_path())),
                                          PassContext(data={"calib": {"x": x_tr[:32]}})).graph
    before, after = channels_per_layer(fp32), channels_per_layer(from_onnx(to_onnx(q)))
    assert len(before) >= 3 and after == before
