"""Model evaluation for reports and quality gates: size, MACs, latency, top-1, agreement, CKA, robustness."""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import ort
from .analyses import flops, weight_constant
from .errors import BadInput
from .graph import to_onnx


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same n examples (axis 0; other axes
    flattened). 1 for representations equal up to rotation and scale, near 0 for unrelated ones."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    if len(x) != len(y):
        raise BadInput(f"linear_cka: {len(x)} and {len(y)} examples")
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    if x.shape[1] <= x.shape[0] and y.shape[1] <= y.shape[0]:
        hsic = np.sum((y.T @ x) ** 2)
        nx, ny = np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    else:           # wide features: the n x n Gram form is cheaper
        k, l_ = x @ x.T, y @ y.T
        hsic = np.sum(k * l_)
        nx, ny = np.linalg.norm(k), np.linalg.norm(l_)
    if nx == 0 or ny == 0:
        return 0.0
    return float(hsic / (nx * ny))


def batches(data: dict[str, np.ndarray], input_specs: list[tuple[str, tuple]]):
    """Split eval arrays (batch on axis 0) into chunks the model's fixed batch size accepts."""
    names = [n for n, _ in input_specs]
    missing = [n for n in names if n not in data]
    if missing:
        raise BadInput(f"evaluation data lacks input(s) {', '.join(missing)}; it has: {', '.join(sorted(data))}")
    total = len(data[names[0]])
    b = input_specs[0][1][0] if input_specs[0][1] else 1
    for start in range(0, total - total % b if total >= b else 0, b):
        yield start, {n: data[n][start:start + b] for n in names}


def run_onnx(model: onnx.ModelProto, data: dict, input_specs, extra_outputs: list[str] = ()) -> dict[str, np.ndarray]:
    """Run a model over all eval samples with onnxruntime; concatenate outputs along axis 0."""
    if extra_outputs:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        have = {o.name for o in model.graph.output}
        for name in extra_outputs:
            if name not in have:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = ort.session(model, optimize=True)
    outs: dict[str, list] = {}
    names = [o.name for o in sess.get_outputs()]
    for _, feed in batches(data, input_specs):
        for k, v in zip(names, sess.run(names, feed)):
            outs.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def run_artifact(art, data: dict) -> dict[str, np.ndarray]:
    specs = [(i["name"], tuple(i["shape"])) for i in art.inputs]
    outs: dict[str, list] = {}
    for _, feed in batches(data, specs):
        for k, v in art.run({n: np.ascontiguousarray(a.astype(np.dtype(i["dtype"]))) for (n, a), i
                             in zip(feed.items(), art.inputs)}).items():
            outs.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    n = min(len(logits), len(labels))
    return float(np.mean(np.argmax(logits[:n].reshape(n, -1), 1) == labels[:n]))


def graph_size(graph: gs.Graph, with_bytes: bool = True) -> dict:
    """MACs, parameter count and the parameters' bytes (the flops analysis: weights behind DequantizeLinear count
    at their stored type), and the serialized size when with_bytes."""
    f = flops(graph, None)
    out = {"macs": int(f["macs"]), "params": int(f["params"]), "param_bytes": int(f["param_bytes"])}
    if with_bytes:
        out["bytes"] = len(to_onnx(graph).SerializeToString())
    return out


def ort_latency_ms(model: onnx.ModelProto, input_specs, threads: int | None, repeat: int = 20) -> float:
    from .check_inputs import input_ranges
    from .graph import from_onnx
    sess = ort.session(model, optimize=True, threads=threads)
    feeds = ort.random_inputs([(n, s, dt) for n, s, dt in input_specs], 0, input_ranges(from_onnx(model)))
    for _ in range(2):
        sess.run(None, feeds)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def channels_per_layer(graph: gs.Graph) -> dict[str, int]:
    """Output channels of every Conv/ConvTranspose/Gemm/MatMul with constant weights (also behind a
    DequantizeLinear, as in a quantized graph), by node name."""
    out = {}
    for n in graph.nodes:
        c = weight_constant(n.inputs[1]) if len(n.inputs) >= 2 else None
        if c is None:
            continue
        w = c.values
        if n.op == "Conv":
            out[n.name] = int(w.shape[0])
        elif n.op == "ConvTranspose":
            out[n.name] = int(w.shape[1] * n.attrs.get("group", 1))
        elif n.op == "Gemm":
            out[n.name] = int(w.shape[0] if n.attrs.get("transB", 0) else w.shape[1])
        elif n.op == "MatMul" and w.ndim == 2:
            out[n.name] = int(w.shape[1])
    return out


def penultimate_tensor(graph: gs.Graph) -> str | None:
    """The input of the last Gemm/MatMul with constant weights: the usual CKA layer for classifiers."""
    for n in reversed(graph.nodes):
        if n.op in ("Gemm", "MatMul") and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant):
            return n.inputs[0].name
    return None


def gaussian_noise(data: dict, names: list[str], std: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = dict(data)
    for n in names:
        x = data[n]
        if x.dtype.kind == "f":
            scale = std * float(np.std(x)) if np.std(x) > 0 else std
            out[n] = (x + rng.standard_normal(x.shape) * scale).astype(x.dtype)
    return out


def fgsm(graph: gs.Graph, data: dict, labels: np.ndarray, eps: float, input_name: str) -> dict:
    """FGSM inputs against the graph itself (white box), through the trainable torch view."""
    import torch
    from .trainable import TrainableGraph

    module = TrainableGraph(graph)
    module.eval()
    x = torch.tensor(data[input_name], requires_grad=True)
    out = module(x)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    loss = torch.nn.functional.cross_entropy(logits.reshape(len(x), -1), torch.as_tensor(labels[:len(x)]))
    loss.backward()
    scale = eps * float(data[input_name].std() or 1.0)
    adv = (x + scale * x.grad.sign()).detach().numpy().astype(data[input_name].dtype)
    return dict(data, **{input_name: adv})
