"""The trainable view: TrainableGraph equals onnxruntime on every zoo model at batch 1 and 4, trains, writes back."""
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

import graphopt  # noqa: E402
from graphopt import ort  # noqa: E402
from graphopt.errors import BadInput, UnsupportedModel  # noqa: E402
from graphopt.graph import to_onnx  # noqa: E402
from graphopt.passmanager import PassContext, PassManager  # noqa: E402
from graphopt.trainable import SUPPORTED_OPS, TrainableGraph, parameter_names  # noqa: E402

ATOL = 1e-5
PIPELINE = "cleanup,decompose-rnn,cleanup"


def _prepare(graph):
    return PassManager.parse(PIPELINE).run(graph, PassContext(verify="none")).graph


@pytest.fixture(scope="module")
def zoo_graphs(tmp_path_factory):
    """name -> (graph exported at batch 1, graph exported with a dynamic batch bound to 4), both cleaned up."""
    d = tmp_path_factory.mktemp("zoo_trainable")
    cache = {}

    def get(name):
        if name not in cache:
            static, dynamic = d / f"{name}.onnx", d / f"{name}_dyn.onnx"
            zoo.export_onnx(name, static)
            names = zoo.export_onnx(name, dynamic, dynamic_batch=True)
            shapes = {n: (4,) + tuple(s[1:]) for n, s in zip(names, zoo.INPUT_SHAPES[name])}
            cache[name] = (_prepare(graphopt.load(static)), _prepare(graphopt.load(dynamic, input_shapes=shapes)))
        return cache[name]
    return get


def _max_err(ref: dict, outs) -> float:
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert len(ref) == len(outs)
    errs = []
    for r, o in zip(ref.values(), outs):
        assert tuple(r.shape) == tuple(o.shape)
        errs.append(float(np.max(np.abs(r.astype(np.float64) - o.detach().numpy().astype(np.float64)))))
    return max(errs)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_equals_onnxruntime_batch1_and_4(name, zoo_graphs):
    g1, g4 = zoo_graphs(name)
    tg = TrainableGraph(g1)
    assert tg.batch0 == 1
    for batch, ref_graph in ((1, g1), (4, g4)):
        xs = [x.numpy() for x in zoo.make_inputs(name, batch, seed=7)]
        feeds = dict(zip([t.name for t in ref_graph.inputs], xs))
        ref = ort.run(to_onnx(ref_graph), feeds)
        with torch.no_grad():
            got = tg(*xs)
        err = _max_err(ref, got)
        assert err <= ATOL, f"{name} batch {batch}: max abs error {err:.3g}"


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_before_cleanup(name, tmp_path):
    """Straight from graphopt.load (BatchNormalization unfolded, Constant/Identity nodes kept), batch 1 and 3."""
    zoo.export_onnx(name, tmp_path / "m.onnx")
    g = graphopt.load(tmp_path / "m.onnx")
    if name in ("lstm", "gru"):
        with pytest.raises(UnsupportedModel, match="decompose-rnn"):
            TrainableGraph(g)
        return
    tg = TrainableGraph(g)
    x = zoo.make_inputs(name, 1, seed=3)
    ref = ort.run(to_onnx(g), {t.name: v.numpy() for t, v in zip(g.inputs, x)})
    model, _ = zoo.build(name)
    x3 = zoo.make_inputs(name, 3, seed=4)
    with torch.no_grad():
        assert _max_err(ref, tg(*x)) <= ATOL
        out, ref3 = tg(*x3), model(*x3)
    out, ref3 = (out, ref3) if isinstance(out, tuple) else ((out,), (ref3,))
    assert max(float((a - b).abs().max()) for a, b in zip(out, ref3)) <= ATOL


@pytest.mark.parametrize("name", ["shufflenet", "vit", "lstm"])
def test_odd_batches_match_torch_module(name, zoo_graphs):
    """Batch sizes other than the exported one (including 3 and 5) equal the original torch module."""
    g1, _ = zoo_graphs(name)
    tg = TrainableGraph(g1)
    model, _ = zoo.build(name)
    for batch in (3, 5):
        xs = zoo.make_inputs(name, batch, seed=batch)
        with torch.no_grad():
            assert float((tg(*xs) - model(*xs)).abs().max()) <= ATOL


def test_exported_batch_two_is_grouped_and_padded(tmp_path):
    """A graph exported at batch 2 bakes 2 into its Reshapes; batches 2, 3 and 6 still work (groups of 2)."""
    model, _ = zoo.build("shufflenet")
    path = tmp_path / "shuffle_b2.onnx"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), str(path), input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False)
    g = graphopt.load(path)
    assert any(n.op == "Reshape" and isinstance(n.inputs[1], gs.Constant) and n.inputs[1].values[0] == 2
               for n in g.nodes)
    tg = TrainableGraph(g)
    assert tg.batch0 == 2
    for batch in (2, 3, 6):
        x = zoo.make_inputs("shufflenet", batch, seed=batch)[0]
        with torch.no_grad():
            got = tg(x)
            assert got.shape == (batch, 10)
            assert float((got - model(x)).abs().max()) <= ATOL


def test_features_are_batch_first_and_equal_onnxruntime(zoo_graphs):
    g1, g4 = zoo_graphs("resnet")
    names = [n.outputs[0].name for n in g1.nodes if n.op in ("Relu", "Add", "GlobalAveragePool")][:6]
    tg = TrainableGraph(g1)
    xs = zoo.make_inputs("resnet", 4, seed=1)
    with torch.no_grad():
        out, feats = tg(*xs, features=names)
    # reference: the batch-4 graph with the same tensors as extra outputs (names agree across both exports)
    g = g4.copy()
    tensors = g.tensors()
    g.outputs = g.outputs + [tensors[n] for n in names]
    ref = ort.run(to_onnx(g), {"x": xs[0].numpy()})
    for n in names:
        assert feats[n].shape[0] == 4
        assert np.max(np.abs(ref[n] - feats[n].numpy())) <= ATOL
    with pytest.raises(BadInput, match="not a tensor"):
        tg(*xs, features=["no_such_tensor"])


def test_features_without_leading_batch_axis(zoo_graphs):
    """Unrolled LSTM states are (seq, 1, batch, hidden) in the graph: returned per sample, batch first."""
    g1, _ = zoo_graphs("lstm")
    concat = next(n for n in g1.nodes if n.op == "Concat").outputs[0]
    assert concat.shape[0] == 12
    tg = TrainableGraph(g1)
    x = zoo.make_inputs("lstm", 3, seed=0)[0]
    with torch.no_grad():
        _, f3 = tg(x, features=[concat.name])
        _, f1 = tg(x[1:2], features=[concat.name])
    assert tuple(f3[concat.name].shape) == (3,) + tuple(concat.shape)
    assert torch.allclose(f3[concat.name][1], f1[concat.name][0], atol=ATOL)


@pytest.mark.fast
def test_parameters_and_buffers(zoo_graphs):
    vit, _ = zoo_graphs("vit")
    tg = TrainableGraph(vit)
    params = tg.graph_parameters()
    # position embedding (1, 17, 32) and class token (1, 1, 32) are parameters, and so are LayerNorm scales
    shapes = {tuple(p.shape) for p in params.values()}
    assert (1, 17, 32) in shapes and (1, 1, 32) in shapes
    ln = next(n for n in vit.nodes if n.op == "LayerNormalization")
    assert ln.inputs[1].name in params and ln.inputs[2].name in params
    # shape tensors and scalar constants stay buffers
    reshape = next(n for n in vit.nodes if n.op == "Reshape")
    assert reshape.inputs[1].name not in params
    assert all(b.dtype != torch.float32 or b.numel() <= 1 for b in tg.buffers())
    convnext, _ = zoo_graphs("convnext")
    gammas = [n for n in convnext.nodes if n.op == "Mul" and any(isinstance(t, gs.Constant) and t.values.shape == (32,)
                                                                  for t in n.inputs)]
    assert gammas and all(any(t.name in TrainableGraph(convnext).graph_parameters() for t in n.inputs) for n in gammas)
    assert set(parameter_names(vit)) == set(params)


def test_unrolled_rnn_weights_stay_tied(zoo_graphs):
    """decompose-rnn reads one recurrent-weight initializer from every time step: it is one parameter, trained once
    (with the gradients of all the steps) and written back once."""
    g1, _ = zoo_graphs("lstm")
    tg = TrainableGraph(g1)
    params = tg.graph_parameters()
    recurrent = [n for n, p in params.items() if tuple(p.shape) == (16, 64)]
    assert len(recurrent) == 1
    readers = [n for n in g1.nodes if any(getattr(t, "name", None) == recurrent[0] for t in n.inputs)]
    assert len(readers) >= 11                         # every step but the first (h0 @ R folded away: h0 is zero)
    before = next(t for n, t in g1.tensors().items() if n == recurrent[0]).values.copy()
    _train_steps(tg, zoo.make_inputs("lstm", 8, seed=0), steps=3)
    g = tg.to_graph()
    assert not np.array_equal(next(t for n, t in g.tensors().items() if n == recurrent[0]).values, before)
    assert sum(1 for t in g.tensors().values() if getattr(t, "shape", None) is not None
               and tuple(t.shape) == (16, 64) and hasattr(t, "values")) == 1


def _train_steps(tg, xs, steps=10, lr=1e-2):
    """Fit random labels (cross-entropy over axis 1 of the first output) with Adam; returns the losses."""
    torch.manual_seed(0)
    with torch.no_grad():
        out = tg(*xs)
    out = out[0] if isinstance(out, tuple) else out
    labels = torch.randint(0, out.shape[1], (out.shape[0],) + tuple(out.shape[2:]))
    opt = torch.optim.Adam(tg.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = tg(*xs)
        out = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.cross_entropy(out, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["vit", "mobilenet_v3", "gru"])
def test_training_lowers_the_loss(name, zoo_graphs):
    g1, _ = zoo_graphs(name)
    tg = TrainableGraph(g1)
    losses = _train_steps(tg, zoo.make_inputs(name, 8, seed=0), steps=15)
    assert losses[-1] < 0.75 * losses[0], losses
    assert all(p.grad is not None for p in tg.parameters())


@pytest.mark.parametrize("name", ["vit", "mobilenet_v3", "lstm"])
def test_gradients_match_finite_differences(name, zoo_graphs):
    """Autograd through the interpreter (and vmap, batch 3) equals a central finite difference, in float64."""
    g1, _ = zoo_graphs(name)
    tg = TrainableGraph(g1).double()
    xs = [x.double() for x in zoo.make_inputs(name, 3, seed=2)]
    gen = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in tg.parameters()]

    def loss():
        out = tg(*xs)
        return (out * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum()
    loss().backward()
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(tg.parameters(), direction))
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(tg.parameters(), direction):
            p.add_(eps * d)
        up = float(loss())
        for p, d in zip(tg.parameters(), direction):
            p.sub_(2 * eps * d)
        down = float(loss())
    numeric = (up - down) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-5 * max(1.0, abs(numeric)), (analytic, numeric)


@pytest.mark.parametrize("name", ["vit", "yolo", "densenet"])
def test_write_back_round_trip(name, zoo_graphs):
    g1, _ = zoo_graphs(name)
    tg = TrainableGraph(g1)
    _train_steps(tg, zoo.make_inputs(name, 4, seed=0), steps=3)
    trained = tg.to_graph()
    # same structure, only parameter values changed
    from graphopt.passes.insert_adapters import structure_differences
    assert structure_differences(g1, trained) == []
    before = {n: t.values for n, t in g1.tensors().items() if isinstance(t, gs.Constant)}
    after = {n: t.values for n, t in trained.tensors().items() if isinstance(t, gs.Constant)}
    params = tg.graph_parameters()
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed and changed <= set(params)
    # onnxruntime on the written-back graph equals the TrainableGraph
    x = zoo.make_inputs(name, 1, seed=5)
    ref = ort.run(to_onnx(trained), {t.name: v.numpy() for t, v in zip(trained.inputs, x)})
    with torch.no_grad():
        assert _max_err(ref, tg(*x)) <= ATOL
    onnx.checker.check_model(to_onnx(trained), full_check=True)
    # write_back into another copy, and the caller's graph was never touched
    other = g1.copy()
    tg.write_back(other)
    assert all(np.array_equal(t.values, after[n]) for n, t in other.tensors().items() if isinstance(t, gs.Constant))
    assert all(np.array_equal(t.values, before[n]) for n, t in g1.tensors().items() if isinstance(t, gs.Constant))


def test_unsupported_op_names_node_and_op():
    x = gs.Variable("x", dtype=np.float32, shape=(1, 4))
    y = gs.Variable("y", dtype=np.float32, shape=(1, 4))
    z = gs.Variable("z", dtype=np.float32, shape=(1, 2))
    k = gs.Constant("k", np.array([2], dtype=np.int64))
    idx = gs.Variable("i", dtype=np.int64, shape=(1, 2))
    nodes = [gs.Node("Relu", "r", inputs=[x], outputs=[y]),
             gs.Node("TopK", "my_topk", inputs=[y, k], outputs=[z, idx])]
    g = gs.Graph(nodes=nodes, inputs=[x], outputs=[z], opset=17)
    with pytest.raises(UnsupportedModel, match=r"node 'my_topk' \(TopK\)"):
        TrainableGraph(g)
    assert "Conv" in SUPPORTED_OPS and "TopK" not in SUPPORTED_OPS


@pytest.mark.fast
def test_asymmetric_pads_resize_and_slices_match_onnxruntime():
    """Op details the zoo does not reach: asymmetric Conv/pool pads, SAME_UPPER, ConvTranspose output_padding,
    Resize (linear half_pixel, nearest round_prefer_floor), negative-step Slice, Gather with negative indices."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    wt = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(wt, "wt"),
             onnx.numpy_helper.from_array(np.array([], np.float32), "roi"),
             onnx.numpy_helper.from_array(np.array([1, 1, 1.5, 2.0], np.float32), "scales"),
             onnx.numpy_helper.from_array(np.array([1, 1, 7, 5], np.int64), "sizes"),
             onnx.numpy_helper.from_array(np.array([-1], np.int64), "st"),
             onnx.numpy_helper.from_array(np.array([-100], np.int64), "en"),
             onnx.numpy_helper.from_array(np.array([3], np.int64), "ax"),
             onnx.numpy_helper.from_array(np.array([-2], np.int64), "step"),
             onnx.numpy_helper.from_array(np.array([[0, -1], [2, -3]], np.int64), "gi")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], pads=[0, 1, 2, 1], strides=[2, 1]),
        helper.make_node("Conv", ["x", "w"], ["c2"], auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("MaxPool", ["c1"], ["p1"], kernel_shape=[3, 2], pads=[1, 0, 0, 1], strides=[1, 2]),
        helper.make_node("AveragePool", ["c1"], ["p2"], kernel_shape=[2, 3], pads=[0, 1, 1, 2]),
        helper.make_node("ConvTranspose", ["c2", "wt"], ["t1"], strides=[2, 2], pads=[1, 0, 0, 1],
                         output_padding=[1, 1], group=2),
        helper.make_node("Resize", ["x", "roi", "scales"], ["r1"], mode="linear"),
        helper.make_node("Resize", ["x", "roi", "", "sizes"], ["r2"], mode="nearest",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Slice", ["x", "st", "en", "ax", "step"], ["s1"]),
        helper.make_node("Gather", ["x", "gi"], ["g1"], axis=2),
    ]
    outs = ["p1", "p2", "t1", "r1", "r2", "s1", "g1"]
    graph = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 8])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    from graphopt.graph import from_onnx
    g = from_onnx(model)
    x = rng.standard_normal((1, 3, 9, 8)).astype(np.float32)
    ref = ort.run(to_onnx(g), {"x": x})
    with torch.no_grad():
        got = TrainableGraph(g)(x)
    for name, r, o in zip(outs, ref.values(), got):
        assert tuple(r.shape) == tuple(o.shape), name
        assert np.max(np.abs(r - o.numpy())) <= ATOL, name


@pytest.mark.fast
@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_one_hot_matches_onnxruntime(axis):
    """OneHot (jax2tf/keras exports embed token ids with it): negative and out-of-range indices, off/on values,
    any axis; its depth and values stay constants, not parameters."""
    from onnx import TensorProto, helper
    inits = [onnx.numpy_helper.from_array(np.array([5], np.int64), "depth"),
             onnx.numpy_helper.from_array(np.array([-0.5, 2.0], np.float32), "vals")]
    node = helper.make_node("OneHot", ["ids", "depth", "vals"], ["y"], axis=axis)
    graph = helper.make_graph([node], "oh", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    from graphopt.graph import from_onnx
    g = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    ids = np.array([[0, 4, -1, 7], [-5, 2, 2, -9]], np.int64)
    ref = next(iter(ort.run(to_onnx(g), {"ids": ids}).values()))
    tg = TrainableGraph(g)
    assert not list(tg.parameters())
    with torch.no_grad():
        got = tg(ids).numpy()
    np.testing.assert_array_equal(got, ref)


_CHAIN_RUN = """
import resource, sys
import numpy as np, torch
from onnx import TensorProto, helper
from graphopt.graph import from_onnx
from graphopt.trainable import TrainableGraph
n, size = 40, 4 * 2 ** 20                      # 40 nodes, each output 16 MB
nodes = [helper.make_node("Neg", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, size])],
                          [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [1, size])])
tg = TrainableGraph(from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])))
x = np.ones((1, size), np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    out, feats = tg(x, features=["t20"])
assert float(out[0, 0]) == 1.0 and float(feats["t20"][0, 0]) == 1.0
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_a_run_holds_only_live_tensors():
    """The view drops each intermediate tensor after its last reader (graph outputs and requested features stay):
    a 40-node chain of 16 MB tensors peaks near a few tensors, not 640 MB (this OOM-killed QAT evaluation of the
    PP-OCR recognizer on 100 text lines)."""
    import subprocess
    r = subprocess.run([sys.executable, "-c", _CHAIN_RUN], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) < 200 * 2 ** 20


def test_float64_view_of_a_graph_without_parameters_runs_in_float64():
    """(verify.fp64_outputs, the float64 arbiter) a graph with no float weights used to cast its inputs to float32:
    the 'float64' check silently ran in float32."""
    import onnx_builders as ob
    from onnx import helper

    from graphopt.verify import fp64_outputs
    model = ob.model([helper.make_node("Mul", ["x", "x"], ["y"], name="sq")], [ob.vi("x", [1, 4])], [ob.vi("y", [1, 4])])
    g = graphopt.load(model)
    x = np.array([[1 + 2 ** -30, 3.0, 1e-20, 7.0]], np.float64)
    out = fp64_outputs(g, {"x": x})["y"]
    assert out.dtype == np.float64 and out[0, 0] == (1 + 2 ** -30) ** 2 and out[0, 2] == 1e-40


def _hardswish_chain_model(reuse_inner=False):
    """Conv -> Div(Mul(h, Clip(Add(h, 3), 0, 6)), 6) -> Clip(·, -1, 2.5) -> Conv: Paddle's spelled-out HardSwish
    (with reuse_inner, the Clip's output is also a graph output, so the chain must not be fused)."""
    from onnx import helper

    from onnx_builders import model, rnd, vi
    c = lambda name, v: (name, np.array(v, np.float32))            # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["h", "three"], ["a"]),
             helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
             helper.make_node("Mul", ["r", "h"], ["m"]),             # x second: both orders are matched
             helper.make_node("Div", ["m", "six"], ["hs"]),
             helper.make_node("Clip", ["hs", "lo", "hi"], ["k"]),
             helper.make_node("Conv", ["k", "w2"], ["y"])]
    outs = [vi("y", None)] + ([vi("r", None)] if reuse_inner else [])
    return model(nodes, [vi("x", [1, 3, 8, 8])], outs,
                 [("w1", rnd(8, 3, 3, 3)), ("b1", rnd(8)), ("w2", rnd(4, 8, 1, 1, seed=1)), c("three", 3.0),
                  c("zero", 0.0), c("six", 6.0), c("lo", -1.0), c("hi", 2.5)])


@pytest.mark.parametrize("reuse_inner", [False, True])
def test_spelled_out_hardswish_runs_fused_with_the_same_values_and_gradients(reuse_inner, tmp_path):
    m = _hardswish_chain_model(reuse_inner)
    path = tmp_path / "hs.onnx"
    onnx.save(m, str(path))
    g = graphopt.load(str(path))
    tg = TrainableGraph(g)
    fused, dead = tg._plans[True]
    assert [op.op for op in fused].count("HardSwish") == (0 if reuse_inner else 1)
    assert len(fused) == len(tg._plans[False][0]) - (0 if reuse_inner else 3)
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32) * 3
    ref = ort.session(m.SerializeToString()).run(None, {"x": x[:1]})[0]
    y = tg(x)
    y = y[0] if isinstance(y, tuple) else y
    assert float(np.abs(y[:1].detach().numpy() - ref).max()) < 1e-5
    # the node-by-node plan (asked for a tensor the fusion removed) gives the same values and gradients
    y.square().sum().backward()
    grads = {k: p.grad.clone() for k, p in tg.named_parameters()}
    tg.zero_grad()
    y2, feats = tg(x, features=["a"])
    y2 = y2[0] if isinstance(y2, tuple) else y2
    assert torch.equal(y, y2) and feats["a"].shape == (5, 8, 8, 8)
    y2.square().sum().backward()
    for k, p in tg.named_parameters():
        assert torch.allclose(p.grad, grads[k], rtol=1e-4, atol=1e-4), (k, float((p.grad - grads[k]).abs().max()))


def test_constant_clip_bounds_clamp_and_pass_gradients_inside():
    from graphopt.trainable import OPS, _Op
    node = gs.Node("Clip", inputs=[gs.Variable("x"), gs.Constant("lo", np.array(-1.0, np.float32)),
                                   gs.Constant("hi", np.array(2.0, np.float32))], outputs=[gs.Variable("y")])
    op = _Op(node, OPS["Clip"], 17)
    x = torch.tensor([-3.0, -1.0, 0.5, 2.0, 5.0], requires_grad=True)
    (y,) = op.fn(op, [x, torch.tensor(-1.0), torch.tensor(2.0)])
    assert y.tolist() == [-1.0, -1.0, 0.5, 2.0, 2.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    w = torch.tensor(1.5, requires_grad=True)                       # a trained bound keeps its gradient
    (y,) = op.fn(op, [x.detach(), torch.tensor(-1.0), w])
    y.sum().backward()
    assert float(w.grad) == 2.0                                      # 2.0 and 5.0 are above 1.5


def test_image_inputs_run_channels_last_with_the_same_results(zoo_graphs):
    g1, _ = zoo_graphs("mobilenet_v3")
    tg = TrainableGraph(g1)
    assert tg._image_convs
    x = torch.randn((3,) + tuple(g1.inputs[0].shape[1:]))
    y_cl = tg(x)
    tg._image_convs = False
    y = tg(x)
    y, y_cl = (y[0], y_cl[0]) if isinstance(y, tuple) else (y, y_cl)
    assert torch.allclose(y, y_cl, rtol=1e-4, atol=1e-4)
