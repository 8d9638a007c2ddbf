"""The flops analysis: recurrent layers count their MACs (W and R products at every step), so a report does not
show a 30000x growth when decompose-rnn turns an LSTM into MatMuls."""
import pytest

import graphopt
from graphopt import PassManager
from graphopt.evaluate import graph_size

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_recurrent_layers_count_the_macs_of_their_decomposition(zoo_onnx, name):
    g = graphopt.load(str(zoo_onnx(name)))
    assert any(n.op in ("LSTM", "GRU") for n in g.nodes)
    before = graph_size(g, with_bytes=False)["macs"]
    after = graph_size(PassManager.parse("decompose-rnn").run(g).graph, with_bytes=False)["macs"]
    assert before > 0 and after == pytest.approx(before, rel=1e-9), (before, after)
