"""Quantization-aware training: the fake-quantized form of a QDQ graph, its export back to the same QDQ structure,
and quantize{qat=true} inside compress (digits), compiled to int8 kernels that match onnxruntime."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

import digits
import graphopt
from graphopt import PassContext, PassManager, ort
from graphopt.compress import compress
from graphopt.errors import BadInput
from graphopt.graph import to_onnx
from graphopt.qat import BIAS_LIMIT, FLOAT_SUFFIX, activation_scales, export_qdq, fake_quant
from graphopt.quant_check import check_criterion, within_quant_steps
from graphopt.trainable import TrainableGraph


@pytest.fixture(scope="module")
def split():
    return digits.load_digits_split()


def _ptq(split, pipeline="quantize"):
    x_tr = split[0]
    return PassManager.parse(pipeline).run(graphopt.load(str(digits.teacher_path())),
                                           PassContext(data={"calib": {"x": x_tr[:64]}})).graph


def _structure(graph):
    """(nodes as (name, op, inputs, outputs, attributes), {initializer: dtype and shape}) of a graph."""
    m = to_onnx(graph)
    nodes = sorted((n.name, n.op_type, tuple(n.input), tuple(n.output), str(n.attribute)) for n in m.graph.node)
    inits = {i.name: (onnx.numpy_helper.to_array(i).dtype.str, tuple(i.dims)) for i in m.graph.initializer}
    return nodes, inits


def _values(graph):
    return {i.name: onnx.numpy_helper.to_array(i) for i in to_onnx(graph).graph.initializer}


def _ort_outputs(graph, x):
    sess = ort.session(to_onnx(graph))
    return np.concatenate([sess.run(None, {"x": xi[None]})[0] for xi in x])


@pytest.mark.parametrize("pipeline", ["quantize", "quantize{per_channel=false,activations=s8}",
                                      "quantize{ops=compute}"])
def test_untrained_export_is_the_ptq_graph(split, pipeline):
    """fake_quant then export_qdq gives back the PTQ graph exactly: same nodes, names, attributes, initializer names,
    dtypes and values; the fake-quantized graph's weights and biases are float and trainable."""
    q = _ptq(split, pipeline)
    fake, info = fake_quant(q)
    assert not any(n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant) for n in fake.nodes)
    assert len(info["weights"]) == 4 and len(info["biases"]) == 4 and info["kept"] == []
    params = set(TrainableGraph(fake).graph_parameters())
    assert {w + FLOAT_SUFFIX for w in info["weights"]} | set(info["biases"]) <= params
    back = export_qdq(fake)
    assert _structure(back) == _structure(q)
    a, b = _values(q), _values(back)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert "qat_biases" not in (back.doc_string or "")


def test_fake_quant_computes_the_ptq_graph(split):
    """Before training, the trainable view of the fake-quantized graph equals onnxruntime on the PTQ graph."""
    x = split[2][:64]
    q = _ptq(split)
    fake, _ = fake_quant(q)
    with torch.no_grad():
        got = TrainableGraph(fake)(x).numpy()
    np.testing.assert_array_equal(got, _ort_outputs(q, x))


def test_export_after_training_requantizes_the_trained_weights(split):
    """Weights moved by training are quantized again with the kept scales: the exported graph keeps the PTQ
    structure (only integer values change) and onnxruntime on it computes what the trained fake-quantized graph
    computes in the trainable view (equal but for a few one-step flips of the output quantization)."""
    x = split[2][:64]
    q = _ptq(split)
    fake, info = fake_quant(q)
    tg = TrainableGraph(fake)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tg.graph_parameters().items():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
        trained_out = tg(x).numpy()
    back = export_qdq(tg.to_graph())
    assert _structure(back) == _structure(q)
    a, b = _values(q), _values(back)
    changed = [k for k in a if not np.array_equal(a[k], b[k])]
    assert set(changed) == set(info["weights"]) | {n[:-len(FLOAT_SUFFIX)] for n in info["biases"]}
    _assert_computes(back, x, trained_out)


def _assert_computes(back, x, trained_out):
    """onnxruntime on the exported QDQ graph gives the trained fake-quantized graph's outputs, but for a few one-step
    flips of the output quantization (the int32 bias rounding: half a step of input scale x weight scale)."""
    step = check_criterion(to_onnx(back))["steps"]
    out_name = to_onnx(back).graph.output[0].name
    got = _ort_outputs(back, x)
    assert np.max(np.abs(got - trained_out)) <= step[out_name] * 1.001
    assert np.mean(got == trained_out) >= 0.9


def _bias_dq(graph):
    """The DequantizeLinear nodes of the int32 biases of a QDQ graph."""
    return [n for n in graph.nodes if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant)
            and np.asarray(n.inputs[0].values).dtype == np.int32]


def test_trained_biases_leave_int32_headroom(split):
    """A trained bias is exported within +-BIAS_LIMIT (the int8 kernels fold -zero point x column sum into it in
    int32), and a bias onnxruntime already saturated at the int32 edge (a weight scale near 0) stays as it was."""
    q = _ptq(split)
    edge = _bias_dq(q)[0].inputs[0]
    values = np.asarray(edge.values).copy()
    values[0] = 2 ** 31 - 200_000                     # as onnxruntime writes the bias of a dead channel
    edge.values = values
    fake, info = fake_quant(q)
    assert [name for name, _ in info["kept"]] == [edge.name] and len(info["biases"]) == 3
    tg = TrainableGraph(fake)
    with torch.no_grad():
        for name in info["biases"]:
            tg.graph_parameters()[name].fill_(1e6)   # far beyond what int32 holds at the bias scale
    back = export_qdq(tg.to_graph())
    assert _structure(back) == _structure(q)
    biases = {n.inputs[0].name: np.asarray(n.inputs[0].values) for n in _bias_dq(back)}
    assert np.array_equal(biases.pop(edge.name), values)
    assert all(np.abs(v.astype(np.int64)).max() == BIAS_LIMIT for v in biases.values())


def test_activation_scales_are_the_activation_quantizers_scales(split):
    """activation_scales names each per-tensor scale of a QuantizeLinear on an activation once (the graph input's and
    every layer's), never a weight's fake-quantization scale; as parameters they get gradients (the LSQ step-size
    gradient of the trainable view's rounding)."""
    fake, info = fake_quant(_ptq(split))
    names = activation_scales(fake)
    acts = {n.inputs[1].name for n in fake.nodes if n.op == "QuantizeLinear" and not isinstance(n.inputs[0], gs.Constant)}
    assert names and set(names) == acts and len(names) == len(set(names))
    weight_scales = {n.inputs[1].name for n in fake.nodes if n.op == "QuantizeLinear"
                     and isinstance(n.inputs[0], gs.Constant)}
    assert not set(names) & weight_scales
    tg = TrainableGraph(fake, trainable=list(TrainableGraph(fake).graph_parameters()) + names)
    tg(split[2][:16]).square().sum().backward()
    grads = [tg.graph_parameters()[n].grad for n in names]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) > 0 for g in grads) >= len(names) - 1


def test_export_with_learned_scales_recomputes_the_bias_scales(split):
    """After the activation scales moved, export_qdq writes them, quantizes each int32 bias with input scale x weight
    scale of the new scales (what the int8 kernels need), and onnxruntime on the export computes what the trained
    fake-quantized graph computes (but for a few one-step flips of the output quantization)."""
    x = split[2][:64]
    q = _ptq(split)
    fake, info = fake_quant(q)
    names = activation_scales(fake)
    tg = TrainableGraph(fake, trainable=list(TrainableGraph(fake).graph_parameters()) + names)
    with torch.no_grad():
        for i, n in enumerate(names):
            tg.graph_parameters()[n].mul_(0.8 + 0.1 * (i % 4))
        trained_out = tg(x).numpy()
    back = export_qdq(tg.to_graph())
    assert _structure(back) == _structure(q)
    tensors = back.tensors()
    for dq in _bias_dq(back):
        conv = dq.outputs[0].outputs[0]
        sx, sw = (np.asarray(conv.inputs[i].inputs[0].inputs[1].values) for i in (0, 1))
        np.testing.assert_array_equal(np.asarray(dq.inputs[1].values), (sx * sw).astype(np.float32))
    assert {n: float(np.asarray(tensors[n].values)) for n in names} != \
        {n: float(np.asarray(q.tensors()[n].values)) for n in names}
    _assert_computes(back, x, trained_out)


def test_qat_scales_needs_qat(split):
    with pytest.raises(BadInput, match=r"^pass 'quantize': option qat_scales applies with qat=true only$"):
        PassManager.parse("quantize{qat_scales=learned}")


def test_qat_alone_is_refused_in_one_line(split):
    with pytest.raises(BadInput, match=r"^pass 'quantize\{qat=true\}' trains the model: .*graphopt compress") as e:
        PassManager.parse("quantize{qat=true}").run(graphopt.load(str(digits.teacher_path())),
                                                    PassContext(data={"calib": {"x": split[0][:8]}}))
    assert "\n" not in str(e.value)
    with pytest.raises(BadInput, match="option qat applies to scheme=int8 only"):
        PassManager.parse("quantize{scheme=weight_int8,qat=true}")


def test_qat_in_compress_keeps_accuracy_and_compiles(split, tmp_path):
    """prune-channels + distillation, then quantize{qat=true}: the QAT graph's held-out top-1 is at least the PTQ
    graph's (measured by compress on the same split), its structure is the PTQ graph's, and the compiled int8
    library runs it on integer kernels matching onnxruntime on its own model.onnx."""
    x_tr, y_tr, x_te, y_te = split
    graph, info = compress(graphopt.load(str(digits.teacher_path())), {"x": x_tr, "labels": y_tr},
                           "cleanup,prune-channels{flops=0.5},quantize{qat=true}", eval_data={"x": x_te, "labels": y_te},
                           epochs=6, threads=1)
    qi = info["quantization"]
    assert qi["qat"] and qi["epochs"] >= 1 and [h["phase"] for h in info["history"]][-1] == "qat"
    assert info["final"]["top1"] >= qi["ptq"]["top1"] and info["final"]["agreement"] >= qi["ptq"]["agreement"]
    assert info["final"]["top1_drop"] <= 0.02
    assert any(n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant) and
               n.inputs[0].values.dtype == np.int8 for n in graph.nodes)
    assert not any(n.op == "QuantizeLinear" and isinstance(n.inputs[0], gs.Constant) for n in graph.nodes)
    art = graphopt.compile(graph, target="cpu", out=tmp_path / "qat.cpu", measure=False)
    assert art.report["int8_kernels"] >= 3 and art.report["check"]["ok"]
    model = onnx.load(str(art.path / "model.onnx"))
    crit = check_criterion(model)
    for i in range(0, 450, 90):
        feeds = {"x": x_te[i:i + 1]}
        chk = within_quant_steps(ort.run(model, feeds), art.run(feeds), crit)
        assert chk["ok"], chk


def test_qat_with_learned_scales_in_compress(split, tmp_path):
    """quantize{qat=true,qat_scales=learned}: the activation scales train with the weights (the report says how many),
    the result keeps the PTQ structure and the fp32 accuracy budget, and compiles to int8 kernels."""
    x_tr, y_tr, x_te, y_te = split
    ptq = _ptq(split)
    graph, info = compress(graphopt.load(str(digits.teacher_path())), {"x": x_tr, "labels": y_tr},
                           "quantize{qat=true,qat_scales=learned}", eval_data={"x": x_te, "labels": y_te},
                           epochs=2, threads=1)
    qi = info["quantization"]
    assert qi["scales"].endswith("activation scales learned") and int(qi["scales"].split()[0]) >= 4
    assert info["final"]["top1_drop"] <= 0.01
    fake, _ = fake_quant(ptq)
    names = activation_scales(fake)
    before = {n: float(np.asarray(ptq.tensors()[n].values)) for n in names}
    after = {n: float(np.asarray(graph.tensors()[n].values)) for n in names}
    assert sum(before[n] != after[n] for n in names) >= len(names) // 2
    assert all(v > 0 for v in after.values())
    art = graphopt.compile(graph, target="cpu", out=tmp_path / "qat.cpu", measure=False)
    assert art.report["int8_kernels"] >= 3 and art.report["check"]["ok"]


def test_qat_with_max_drop_in_compress_chooses_its_fallback_on_training_data(split, monkeypatch):
    """quantize{qat=true,max_drop=0}: the accuracy-aware fallback runs inside compress on the first calib_samples
    training examples (with their labels), never on the held-out data, and QAT trains the mixed-precision graph."""
    from graphopt.passes import quantize as qp
    x_tr, y_tr, x_te, y_te = split
    seen, logs = [], []
    real = qp.Quantize._accuracy_aware

    def spy(self, *args):
        ctx = args[-1]
        seen.append({k: np.asarray(v).copy() for k, v in ctx.data["eval"].items()})
        return real(self, *args)
    monkeypatch.setattr(qp.Quantize, "_accuracy_aware", spy)
    graph, info = compress(graphopt.load(str(digits.teacher_path())), {"x": x_tr, "labels": y_tr},
                           "quantize{qat=true,max_drop=0.0}", eval_data={"x": x_te, "labels": y_te},
                           epochs=1, threads=1, log=logs.append)
    assert len(seen) == 1 and np.array_equal(seen[0]["x"], x_tr[:512]) and np.array_equal(seen[0]["labels"], y_tr[:512])
    assert any("max_drop" in m and "training examples" in m for m in logs)
    assert info["quantization"]["qat"] and "max_drop=0.0" in info["passes"][0]["pass"]
