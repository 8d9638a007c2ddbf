"""decompose-rnn: unrolled LSTM/GRU/RNN equal onnxruntime's own recurrent kernels."""
import numpy as np
import pytest

import graphopt
import onnx_builders as ob
from graphopt import PassContext, PassManager, ort
from graphopt.errors import UnsupportedModel

CASES = [("LSTM", {}), ("LSTM", {"direction": "reverse"}), ("LSTM", {"direction": "bidirectional", "peepholes": True}),
         ("LSTM", {"layout": 1}), ("LSTM", {"with_init_state": False}),
         ("GRU", {}), ("GRU", {"lbr": 1}), ("GRU", {"direction": "bidirectional", "lbr": 1, "layout": 1}),
         ("RNN", {}), ("RNN", {"direction": "bidirectional"})]


@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items())}" for k, kw in CASES])
def test_unrolled_matches_onnxruntime(kind, kw):
    if kw.get("layout") == 1:
        return _check_layout1(kind, kw)
    g = graphopt.load(ob.rnn(kind, **kw))
    res = PassManager.parse("decompose-rnn,cleanup").run(g)   # exactness verified by the manager
    assert not any(n.op == kind for n in res.graph.nodes)
    assert res.records[0]["unrolled"] == 1 and res.records[0]["max_error"] < 1e-5


def test_idempotent(zoo_onnx):
    g = graphopt.load(zoo_onnx("lstm"))
    first = PassManager.parse("decompose-rnn").run(g)
    assert first.modified
    assert not PassManager.parse("decompose-rnn").run(first.graph).modified


def test_refuses_custom_activation():
    m = ob.rnn("LSTM")
    m.graph.node[0].attribute.extend([__import__("onnx").helper.make_attribute("activations", ["Relu", "Tanh", "Tanh"])])
    g = graphopt.load(m)
    with pytest.raises(UnsupportedModel, match="node 'rnn' \\(LSTM\\).*activations"):
        PassManager.parse("decompose-rnn").run(g)


def _check_layout1(kind, kw):
    """onnxruntime has no batch-major (layout=1) RNN kernels: compare with the layout-0 model on transposed data."""
    g = graphopt.load(ob.rnn(kind, **kw))
    res = PassManager.parse("decompose-rnn,cleanup").run(g, PassContext(verify="structural"))
    x = np.random.default_rng(0).standard_normal(g.inputs[0].shape).astype(np.float32)
    got = ort.run(graphopt.to_onnx(res.graph), {"x": x})
    ref = ort.run(ob.rnn(kind, **dict(kw, layout=0)), {"x": np.ascontiguousarray(x.transpose(1, 0, 2))})
    np.testing.assert_allclose(got["Y"], ref["Y"].transpose(2, 0, 1, 3), atol=1e-5)
    np.testing.assert_allclose(got["Y_h"], ref["Y_h"].transpose(1, 0, 2), atol=1e-5)
