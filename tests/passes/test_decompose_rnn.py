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


@pytest.mark.fast
@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items())}" for k, kw in CASES])
def test_unrolled_matches_onnxruntime(kind, kw):
    if kw.get("layout") == 1:
        return _check_layout1(kind, kw)
    g = graphopt.load(ob.rnn(kind, **kw))
    res = PassManager.parse("decompose-rnn,cleanup").run(g)   # exactness verified by the manager
    assert not any(n.op == kind for n in res.graph.nodes)
    assert res.records[0]["info"]["unrolled"] == 1 and res.records[0]["max_error"] < 1e-5


def test_idempotent(zoo_onnx):
    g = graphopt.load(zoo_onnx("lstm"))
    first = PassManager.parse("decompose-rnn").run(g)
    assert first.modified
    assert not PassManager.parse("decompose-rnn").run(first.graph).modified


@pytest.mark.fast
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


# ------------------------------------------------------------------------------------------------------------
# compact and deep: shared recurrent weights, graphs deeper than Python's recursion limit, states as graph I/O
# ------------------------------------------------------------------------------------------------------------

def _export(module, args, path, inputs, outputs):
    import torch
    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=inputs,
                          output_names=outputs)
    return path


def _matmul_weight_uses(graph):
    """{initializer name: number of MatMul nodes reading it as their weight}."""
    import collections

    import onnx_graphsurgeon as gs
    uses = collections.Counter()
    for n in graph.nodes:
        if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant):
            uses[n.inputs[1].name] += 1
    return uses


def test_recurrent_weights_stay_one_initializer_through_passes_and_compile(tmp_path):
    """Unrolling shares each direction's recurrent matrix across all steps (it used to copy it per step: params
    and model.onnx x4.5 here, 13.5M -> 61.8M params on an OCR model), and the artifact stays the source's size."""
    import os

    import onnx
    import torch

    from graphopt import api
    from graphopt.analyses import flops
    torch.manual_seed(0)
    T = 8
    src = _export(torch.nn.LSTM(256, 256, bidirectional=True), (torch.randn(T, 1, 256),), tmp_path / "lstm.onnx",
                  ["x"], ["y", "h", "c"])
    g = graphopt.load(src)
    params0 = flops(g, None)["params"]
    res = PassManager.parse("decompose-rnn,cleanup,fold-batchnorm,remove-identity").run(g, PassContext(verify="structural"))
    graph = graphopt.graph.copy(res.graph)                       # to_onnx / from_onnx round trip
    uses = _matmul_weight_uses(graph)
    recurrent = {name: k for name, k in uses.items() if "RT" in name}
    assert len(recurrent) == 2 and all(k >= T - 1 for k in recurrent.values()), uses   # one per direction
    assert flops(graph, None)["params"] <= 1.01 * params0
    onnx.save(graphopt.to_onnx(graph), str(tmp_path / "unrolled.onnx"))
    assert os.path.getsize(tmp_path / "unrolled.onnx") <= 1.1 * os.path.getsize(src)
    art = api.compile(src, "cpu", out=tmp_path / "art", measure=False)
    for name in ("model.onnx", "model.so"):
        ratio = os.path.getsize(art.path / name) / os.path.getsize(src)
        assert ratio <= 1.1, f"{name} is {ratio:.2f}x the source"


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_pruning_hidden_units_keeps_recurrent_weights_shared(kind):
    """prune-channels slices a shared recurrent matrix once for all its steps (it made a pruned copy per step)."""
    import torch

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(8, 64)
            self.rnn = getattr(torch.nn, kind)(64, 64)
            self.out = torch.nn.Linear(64, 4)

        def forward(self, x):
            return self.out(self.rnn(torch.relu(self.inp(x)))[0])

    import tempfile
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        path = _export(Model(), (torch.randn(10, 1, 8),), f"{d}/m.onnx", ["x"], ["y"])
        res = PassManager.parse("decompose-rnn,cleanup,prune-channels{ratio=0.5}").run(graphopt.load(path))
    uses = _matmul_weight_uses(res.graph)
    recurrent = {name: k for name, k in uses.items() if "RT" in name or "RzrT" in name or "RhT" in name}
    assert recurrent and all(name.endswith("_pruned") for name in recurrent), uses    # hidden units were pruned
    assert all(k == 9 for k in recurrent.values()), uses       # steps 2..10 share it (step 1 folds: zero state)


def test_bidirectional_gru_over_300_steps_compiles(tmp_path):
    """Unrolled over 300 steps the graph is ~12,000 nodes deep along the recurrence: onnx-graphsurgeon's
    recursive toposort raised RecursionError. Compiled (checked against onnxruntime by compile itself) and
    run here against onnxruntime on another input."""
    import torch

    from graphopt.artifact import Artifact
    from watchdog import compile_bounded
    torch.manual_seed(0)
    src = _export(torch.nn.GRU(16, 16, bidirectional=True), (torch.randn(300, 1, 16),), tmp_path / "gru.onnx",
                  ["x"], ["y", "h"])
    _, path = compile_bounded(src, cpu_bound_s=120, target="cpu", out=str(tmp_path / "art"), measure=False)
    x = np.random.default_rng(1).standard_normal((300, 1, 16)).astype(np.float32)
    got, ref = Artifact(path).run({"x": x}), ort.run(str(src), {"x": x})
    for k in ("y", "h"):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5)


def _streaming(kind):
    """A streaming recurrent model (VAD / ASR style): the state comes in as h0 (and c0) and goes out as hn
    (and cn), so the caller carries it from one chunk to the next."""
    import torch

    class Stream(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(8, 32)
            self.rnn = getattr(torch.nn, kind)(32, 32)
            self.out = torch.nn.Linear(32, 4)

        def forward(self, x, *state):
            y, new = self.rnn(torch.relu(self.inp(x)), state if kind == "LSTM" else state[0])
            return (self.out(y),) + (tuple(new) if kind == "LSTM" else (new,))

    torch.manual_seed(0)
    n = 2 if kind == "LSTM" else 1
    args = (torch.randn(6, 1, 8),) + tuple(torch.randn(1, 1, 32) for _ in range(n))
    names = ["x", "h0", "c0"][:n + 1]
    return Stream(), args, names, ["y", "hn", "cn"][:n + 1]


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("pipeline", [None, "decompose-rnn,cleanup,prune-channels{ratio=0.5}", "quantize{scheme=int8}"])
def test_streaming_rnn_with_state_inputs_and_outputs(kind, pipeline, tmp_path):
    """States as graph inputs and outputs compile, prune and quantize (quantize left the RNN's input without a
    shape, so decompose-rnn refused it), and the library carries the state like onnxruntime does."""
    from graphopt import api
    module, args, names, outputs = _streaming(kind)
    src = _export(module, args, tmp_path / "stream.onnx", names, outputs)
    rng = np.random.default_rng(0)
    calib = {n: rng.standard_normal((8,) + tuple(a.shape)).astype(np.float32) for n, a in zip(names, args)}
    art = api.compile(src, "cpu", pipeline=pipeline, out=tmp_path / "art", measure=False, data={"calib": calib})
    assert art.report["check"]["ok"]
    if pipeline and "prune" in pipeline:
        assert [r for r in art.manifest["passes"] if r["pass"].startswith("prune-channels")][0]["modified"]
    # three chunks in a row, the library's state handed over, each judged against onnxruntime on the artifact's
    # own model.onnx by compile's own criterion (quantized outputs: within quantization steps)
    feeds = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in zip(names, args)}
    for _ in range(3):
        verdict = api.compare_with_onnxruntime(art, feeds=feeds)
        assert verdict["ok"], verdict
        got = art.run(feeds)
        feeds = dict(feeds, x=rng.standard_normal(args[0].shape).astype(np.float32),
                     **{s: got[o] for s, o in zip(names[1:], outputs[1:])})


def test_weight_only_quantization_quantizes_a_shared_recurrent_matrix_once():
    """quantize{scheme=weight_int8} after unrolling: one int8 copy per recurrent matrix, not one per step."""
    import onnx_graphsurgeon as gs
    import torch
    import tempfile
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        path = _export(torch.nn.LSTM(32, 32, bidirectional=True), (torch.randn(8, 1, 32),), f"{d}/m.onnx", ["x"],
                       ["y", "h", "c"])
        res = PassManager.parse("decompose-rnn,cleanup,quantize{scheme=weight_int8}").run(graphopt.load(path))
    dq = [n for n in res.graph.nodes if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant)]
    assert len(dq) == 4                               # input and recurrent matrix of each direction
    assert sum(len(n.outputs[0].outputs) for n in dq) >= 2 + 2 * 7
