"""Distillation: schedules, losses, CKA, and distilling students from a digits teacher."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402

import graphopt  # noqa: E402
from graphopt.distill import (DistillConfig, attention_loss, distill, evaluate, feature_loss,  # noqa: E402
                              hard_weight_at, kd_loss, linear_cka, lr_at, predict, teacher_targets,
                              temperature_at)
from graphopt.errors import BadInput  # noqa: E402
from graphopt.graph import copy  # noqa: E402
from graphopt.passes.insert_adapters import adapter_pairs, structure_differences  # noqa: E402
from graphopt.passmanager import PassContext, PassManager  # noqa: E402
from graphopt.trainable import TrainableGraph  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------------

def test_default_temperature_schedule():
    # 10 -> 5 over the first 30%, 5 -> 3 until 70%, 2 -> 1 after
    assert temperature_at(0.1) == pytest.approx(10 - 5 * (0.1 / 0.3))      # 8.33
    assert temperature_at(0.5) == pytest.approx(5 - 2 * (0.2 / 0.4))       # 4.0
    assert temperature_at(0.9) == pytest.approx(2 - 1 * (0.2 / 0.3))       # 1.33
    assert temperature_at(0.0) == 10 and temperature_at(0.3) == pytest.approx(5)
    assert temperature_at(0.7) == pytest.approx(3) and temperature_at(1.0) == pytest.approx(1)
    assert 5 <= temperature_at(0.2) <= 10 and 3 <= temperature_at(0.6) <= 5 and 1 <= temperature_at(0.8) <= 2
    assert temperature_at(0.4, 4.0) == 4.0
    assert DistillConfig().temperature == ((0.3, 10.0, 5.0), (0.7, 5.0, 3.0), (1.0, 2.0, 1.0))


def test_hard_weight_and_learning_rate_schedules():
    assert [hard_weight_at(f) for f in (0.1, 0.5, 0.9)] == pytest.approx([0.46, 0.3, 0.14])
    assert hard_weight_at(0.5, 0.2) == 0.2
    cfg = DistillConfig(lr=1e-2, warmup=0.1, min_lr=0.0)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)          # linear warmup, 10 steps
    assert lrs[10] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                          # cosine decay
    assert lrs[10 + 45] == pytest.approx(0.5e-2, rel=0.05)


def test_config_validation():
    for bad in (dict(optimizer="lion"), dict(temperature=((0.5, 4, 2),)), dict(temperature=-1.0),
                dict(teacher_label_smoothing=1.0), dict(decay="step")):
        with pytest.raises(BadInput):
            DistillConfig(**bad).validate()


# ---------------------------------------------------------------------------------------------------------------
# losses and CKA
# ---------------------------------------------------------------------------------------------------------------

def test_kd_loss_is_t_squared_scaled_kl():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=gen), 3 * torch.randn(6, 10, generator=gen)
    for T in (1.0, 4.0):
        p = teacher_targets([t], T, smoothing=0.0)
        ref = F.kl_div(torch.log_softmax(s / T, 1), p, reduction="batchmean") * T * T
        assert float(kd_loss(s, p, T)) == pytest.approx(float(ref), rel=1e-5)
        # gradient w.r.t. the student's logits is T * (q - p) / N: the T^2 factor keeps it O(1) in T
        x = s.clone().requires_grad_(True)
        kd_loss(x, p, T).backward()
        q = torch.softmax(s / T, 1)
        assert torch.allclose(x.grad, T * (q - p) / 6, atol=1e-6)
    assert float(kd_loss(t, teacher_targets([t], 2.0, smoothing=0.0), 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_teacher_targets_smoothing_and_ensembles():
    t1, t2 = torch.tensor([[4.0, 0.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0, 0.0]])
    p = teacher_targets([t1, t2], 1.0, smoothing=0.1)
    p1, p2 = torch.softmax(t1, 1), torch.softmax(t2, 1)
    assert torch.allclose(p, 0.9 * (p1 + p2) / 2 + 0.1 / 4)
    assert float(p.sum()) == pytest.approx(1.0) and float(p.min()) >= 0.1 / 4
    pw = teacher_targets([t1, t2], 1.0, smoothing=0.0, weights=[3, 1])
    assert torch.allclose(pw, 0.75 * p1 + 0.25 * p2)
    pl = teacher_targets([t1, t2], 1.0, smoothing=0.0, ensemble="logits")
    assert torch.allclose(pl, torch.softmax((t1 + t2) / 2, 1))
    with pytest.raises(BadInput):
        teacher_targets([t1, t2], 1.0, weights=[1.0])


def test_feature_and_attention_losses():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 8, 5, 5, generator=gen), torch.randn(4, 8, 5, 5, generator=gen)
    assert float(feature_loss(2 * s, 2 * t)) == pytest.approx(float(feature_loss(s, t)), rel=1e-5)
    assert float(feature_loss(t, t)) == 0.0
    assert float(feature_loss(s.reshape(4, 200, 1, 1), t.reshape(4, 200))) == pytest.approx(float(feature_loss(s, t)))
    assert float(attention_loss(s, 3 * s)) == pytest.approx(0.0, abs=1e-7)
    assert 0 < float(attention_loss(s, t)) <= 2.0
    # channel counts may differ: attention maps only need the same positions
    assert float(attention_loss(torch.randn(4, 3, 5, 5, generator=gen), t)) > 0
    cl = attention_loss(s.permute(0, 2, 3, 1), t.permute(0, 2, 3, 1), channel_axis=-1)
    assert float(cl) == pytest.approx(float(attention_loss(s, t)), rel=1e-5)


def test_linear_cka():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 20))
    Q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    assert linear_cka(X, X) == pytest.approx(1.0)
    assert linear_cka(X, 3.0 * X @ Q + 1.0) == pytest.approx(1.0)        # rotation, scale, shift invariant
    assert linear_cka(X, rng.standard_normal((50, 20))) < 0.5
    wide = rng.standard_normal((50, 300))                                 # the Gram path (features > examples)
    assert linear_cka(wide, wide @ np.linalg.qr(rng.standard_normal((300, 300)))[0]) == pytest.approx(1.0)
    a, b = rng.standard_normal((40, 6)), rng.standard_normal((40, 9))
    K, L = a - a.mean(0), b - b.mean(0)
    gram = np.sum((K @ K.T) * (L @ L.T)) / (np.linalg.norm(K @ K.T) * np.linalg.norm(L @ L.T))
    assert linear_cka(a, b) == pytest.approx(gram)
    assert linear_cka(torch.from_numpy(a), b) == pytest.approx(gram)


# ---------------------------------------------------------------------------------------------------------------
# distilling on scikit-learn digits
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data():
    return digits.load_digits_split()


@pytest.fixture(scope="module")
def teacher():
    return PassManager.parse("cleanup").run(graphopt.load(digits.teacher_path()), PassContext(verify="none")).graph


def test_teacher_fixture_is_accurate(teacher, data):
    x_tr, y_tr, x_te, y_te = data
    assert x_tr.shape == (1347, 1, 8, 8) and x_te.shape == (450, 1, 8, 8) and x_tr.dtype == np.float32
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    res = evaluate(teacher, {"x": x_te}, y_te, teacher)
    assert res["top1"] >= 0.97
    assert res["agreement"] == 1.0 and res["cka"] == pytest.approx(1.0)


def test_distill_reinitialized_teacher_graph(teacher, data):
    """Student: the teacher's own graph with fresh weights. KD + hard labels recover the teacher."""
    x_tr, y_tr, x_te, y_te = data
    student = TrainableGraph(teacher).reinitialize(seed=1).to_graph()
    start = evaluate(student, {"x": x_te}, y_te, teacher)
    assert start["agreement"] < 0.3
    cfg = DistillConfig(epochs=8, lr=1e-2)
    trained, metrics = distill(student, [teacher], {"x": x_tr}, y_tr, cfg)
    assert metrics["steps"] == 8 * math.ceil(1347 / 64)
    assert metrics["loss_last"] < 0.3 * metrics["loss_first"]
    # the schedule the loop actually used
    T = metrics["history"]["T"]
    n = metrics["steps"]
    for frac in (0.1, 0.5, 0.9):
        step = int(frac * n)
        assert T[step] == pytest.approx(temperature_at(step / n))
    assert max(metrics["history"]["lr"]) == pytest.approx(1e-2)
    res = evaluate(trained, {"x": x_te}, y_te, teacher)
    print("reinitialized student:", res)
    assert res["agreement"] >= 0.95 and res["top1"] >= 0.95
    assert structure_differences(student, trained) == []


def test_distill_narrow_student_with_adapters(teacher, data, tmp_path):
    """Student: a hand-built CNN half as wide. insert-adapters pairs its stages with the teacher's (1x1 convs,
    16 -> 32 channels); feature + attention + KD + hard labels train it; the adapters are gone afterwards."""
    x_tr, y_tr, x_te, y_te = data
    digits.export_narrow_student(tmp_path / "narrow.onnx")
    student = TrainableGraph(graphopt.load(tmp_path / "narrow.onnx")).reinitialize(seed=1).to_graph()
    ctx = PassContext(data={"teacher": teacher, "train": {"x": x_tr}})
    with_adapters = PassManager.parse("insert-adapters").run(copy(student), ctx).graph
    pairs = adapter_pairs(with_adapters)
    assert len(pairs) >= 2 and {p["kind"] for p in pairs} == {"conv1x1"}
    cfg = DistillConfig(epochs=10, lr=1e-2)
    trained, metrics = distill(with_adapters, [teacher], {"x": x_tr}, y_tr, cfg, eval_data={"x": x_te},
                               eval_labels=y_te)
    h = metrics["history"]
    assert np.mean(h["feature"][:10]) > 0 and np.mean(h["attention"][:10]) > 0
    # the paired student layers ended up closer to the teacher's (linear CKA on the test images)
    s_names, t_names = [p["student"] for p in pairs], [p["teacher"] for p in pairs]
    _, tf = predict(teacher, {"x": x_te}, features=t_names)
    _, before = predict(student, {"x": x_te}, features=s_names)
    _, after = predict(trained, {"x": x_te}, features=s_names)
    for s, t in zip(s_names, t_names):
        assert linear_cka(after[s], tf[t]) > linear_cka(before[s], tf[t])
    assert len(metrics["feature_pairs"]) == len(pairs)
    assert adapter_pairs(trained) == [] and structure_differences(student, trained) == []
    res = metrics["eval"]
    print("narrow student:", res)
    assert res["agreement"] >= 0.9 and res["top1"] >= 0.9


def test_several_teachers_dataloader_and_no_labels(teacher, data):
    x_tr, y_tr, _, _ = data
    second = TrainableGraph(teacher)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(1.1)
    second = second.to_graph()
    student = TrainableGraph(teacher).reinitialize(seed=2).to_graph()
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x_tr[:256]), torch.from_numpy(y_tr[:256]))
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = []
    cfg = DistillConfig(steps=20, lr=1e-2, teacher_weights=(2.0, 1.0), progress=lambda s, n, r: seen.append(s))
    trained, metrics = distill(student, [teacher, second], loader, config=cfg)
    assert metrics["steps"] == 20 and seen == list(range(1, 21))
    assert metrics["history"]["hard"][0] > 0 and metrics["history"]["hard_weight"][0] == 0.5
    assert metrics["loss_last"] < metrics["loss_first"]
    # without labels: no hard-label term
    _, m2 = distill(student, teacher, {"x": x_tr[:128]}, None, DistillConfig(steps=4, cache_teacher=False))
    assert m2["history"]["hard"] == [0.0] * 4 and m2["train"]["top1"] is None
    with pytest.raises(BadInput, match="teacher_weights"):
        distill(student, [teacher], loader, config=DistillConfig(steps=2, teacher_weights=(1.0, 1.0)))


def test_teacher_cache_keeps_bfloat16_where_float32_does_not_fit(teacher, data):
    """Above cache_limit_mb in float32 but within it in bfloat16, the teacher's outputs are cached as bfloat16
    tensors and read back as float32; training follows the float32 cache's run to bfloat16's precision."""
    from graphopt.distill import _teacher_cache, cached_rows
    from graphopt.memory_estimate import output_bytes
    x = data[0][:128]
    t_tg = TrainableGraph(teacher, trainable=[])

    def run_teachers(xs):
        with torch.no_grad():
            return [_as_tuple(t_tg(*xs))], {}
    f32 = output_bytes(teacher) * len(x)                     # bytes of the float32 cache
    cfg = lambda mb: DistillConfig(steps=6, lr=1e-2, cache_limit_mb=mb)          # noqa: E731
    full = _teacher_cache({"x": x}, ["x"], run_teachers, cfg(2 * f32 / 2 ** 20))
    half = _teacher_cache({"x": x}, ["x"], run_teachers, cfg(0.75 * f32 / 2 ** 20))
    assert isinstance(full["outputs"][0][0], np.ndarray) and half["outputs"][0][0].dtype == torch.bfloat16
    assert _teacher_cache({"x": x}, ["x"], run_teachers, cfg(0.4 * f32 / 2 ** 20)) is None
    rows = [5, 0, 77]
    a, b = cached_rows(full["outputs"][0][0], rows), cached_rows(half["outputs"][0][0], rows)
    assert b.dtype == torch.float32 and torch.allclose(a, b, rtol=1 / 128, atol=1e-30)
    student = TrainableGraph(teacher).reinitialize(seed=2).to_graph()
    runs = [distill(student, teacher, {"x": x}, None, cfg(mb))[1]["history"]["loss"]
            for mb in (2 * f32 / 2 ** 20, 0.75 * f32 / 2 ** 20)]
    assert np.allclose(runs[0], runs[1], rtol=0.02)


def _as_tuple(y):
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _sequence_model(w: np.ndarray, softmax: bool):
    """x [1, 4, 8] -> MatMul W [8, 6] -> (Softmax over the last axis): a CTC-like [N, T, C] output."""
    from onnx import TensorProto, helper, numpy_helper
    from graphopt.graph import from_onnx
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z" if softmax else "y"])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["y"], axis=-1))
    g = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6])],
                          [numpy_helper.from_array(w, "w")])
    return from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_probability_outputs_distill_like_their_logits():
    """A model ending in Softmax (PP-OCR's recognizer: [N, T, C] probabilities) distills through the logs of its
    outputs: with outputs="probs" the losses equal those of the same model without the Softmax, step for step
    (taken as logits, the probabilities gave a KD loss near 0 and nothing to learn from); compress picks the class
    axis and the output form from the model's outputs."""
    from graphopt.compress import _output_form
    rng = np.random.default_rng(0)
    ws, wt = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal((8, 6)).astype(np.float32)
    x = {"x": rng.standard_normal((32, 4, 8)).astype(np.float32)}
    cfg = DistillConfig(steps=3, batch_size=16, class_axis=2, temperature=2.0, micro_batch=None)
    _, m_logits = distill(_sequence_model(ws, False), _sequence_model(wt, False), x, config=cfg)
    _, m_probs = distill(_sequence_model(ws, True), _sequence_model(wt, True), x,
                         config=DistillConfig(**{**cfg.__dict__, "outputs": "probs"}))
    assert m_logits["loss_first"] > 0.1
    assert m_probs["loss_first"] == pytest.approx(m_logits["loss_first"], rel=1e-4)
    assert m_probs["loss_last"] == pytest.approx(m_logits["loss_last"], rel=1e-3)
    assert _output_form(_sequence_model(ws, True), x) == {"class_axis": 2, "outputs": "probs"}
    assert _output_form(_sequence_model(ws, False), x) == {"class_axis": 2, "outputs": "logits"}
    assert _output_form(graphopt.load(str(digits.teacher_path())), {"x": digits.load_digits_split()[0][:4]}) == \
        {"class_axis": 1, "outputs": "logits"}
    with pytest.raises(BadInput, match="outputs must be 'logits' or 'probs'"):
        DistillConfig(outputs="softmax").validate()


def test_binary_kd_for_one_channel_probability_maps():
    """A detector's [N, 1, H, W] sigmoid map: softmax over a class axis of size one is constant (no gradient), so
    distill uses the per-element binary KL: zero when the student equals the teacher, positive otherwise, with a
    gradient pulling the student's map toward the teacher's (the PP-OCRv4 detector's student collapsed to zero)."""
    from graphopt.distill import binary_kd_loss
    torch.manual_seed(0)
    teacher = torch.sigmoid(torch.randn(2, 1, 8, 8) * 3)
    assert float(binary_kd_loss(teacher, [teacher], 2.0, probs=True)) == pytest.approx(0.0, abs=1e-5)
    student = torch.full_like(teacher, 1e-4, requires_grad=True)       # the collapsed map
    loss = binary_kd_loss(student, [teacher], 1.0, probs=True)
    loss.backward()
    assert float(loss) > 0.1
    assert float((student.grad * (student - teacher)).sum()) > 0        # a step against it moves toward the teacher
    logits = torch.randn(2, 1, 8, 8)
    assert float(binary_kd_loss(logits, [logits], 4.0, probs=False)) == pytest.approx(0.0, abs=1e-5)


def test_useful_temperature_keeps_the_top_class_visible():
    """Many classes: a high temperature flattens the targets to uniform, so the cap is low; few confident
    classes: no cap below the schedule's 8; probabilities are read through their logs."""
    from graphopt.distill import capped_temperature, useful_temperature
    rng = np.random.default_rng(0)
    many = rng.normal(0, 1, (64, 6625))
    many[np.arange(64), rng.integers(0, 6625, 64)] += 25.0              # confident, 6625 classes
    few = rng.normal(0, 1, (64, 10))
    few[np.arange(64), rng.integers(0, 10, 64)] += 25.0
    cap_many, cap_few = useful_temperature(many, 1, False), useful_temperature(few, 1, False)
    assert 1.0 <= cap_many < 4.0 < 8.0 < cap_few
    z = many / 4.0
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert useful_temperature(p, 1, True) == pytest.approx(useful_temperature(z, 1, False), rel=1e-3)
    assert useful_temperature(np.zeros((4, 100)), 1, False) == 1.0    # uniform already: T=1
    top = 1.0 / np.exp((many - many.max(1, keepdims=True)) / cap_many).sum(1)
    assert np.mean(top) == pytest.approx(0.2, abs=1e-3)
    assert capped_temperature(8.0, 2.5) == 2.5
    assert capped_temperature(((0.5, 4.0, 2.0), (1.0, 2.0, 1.0)), 2.5) == ((0.5, 2.5, 2.0), (1.0, 2.0, 1.0))


def test_binary_kd_weighs_the_few_positives_as_much_as_the_background():
    """A page where text covers 2% of the map: with a plain mean, the empty map (everything background) costs
    little; balanced (the default) gives positives and negatives half the loss each, so the empty map costs as much
    as mislabelling half the elements, and more than a map that keeps the text and misses some background."""
    from graphopt.distill import binary_kd_loss
    z = torch.full((1, 1, 50, 50), -8.0)
    z[0, 0, :5, :10] = 8.0                                  # 50 of 2500 positives
    empty = torch.full_like(z, -8.0)
    noisy = z.clone()
    noisy[0, 0, 20:30, :10] = 8.0                           # 100 false positives, every text element kept
    plain_empty = float(binary_kd_loss(empty, [z], 1.0, probs=False, balance="none"))
    bal_empty = float(binary_kd_loss(empty, [z], 1.0, probs=False))
    bal_noisy = float(binary_kd_loss(noisy, [z], 1.0, probs=False))
    assert bal_empty > 20 * plain_empty
    assert bal_empty > 10 * bal_noisy
    assert float(binary_kd_loss(z, [z], 1.0, probs=False)) == pytest.approx(0.0, abs=1e-3)
    # DB's balance: positives and the 150 hardest negatives; a map one element larger all round (the border of
    # the text is where the hardest negatives are) costs more than under half-and-half, emptying still the most
    grown = torch.full_like(z, -8.0)
    grown[0, 0, :6, :11] = 8.0                              # 16 border elements
    hard = lambda s: float(binary_kd_loss(s, [z], 1.0, probs=False, balance="hard"))   # noqa: E731
    half = lambda s: float(binary_kd_loss(s, [z], 1.0, probs=False))                    # noqa: E731
    assert hard(grown) / hard(empty) > 3 * half(grown) / half(empty)
    assert hard(empty) > 2 * hard(grown) and hard(z) == pytest.approx(0.0, abs=1e-3)
    only_bg = torch.full_like(z, -8.0)                      # no positive at all: the plain mean
    assert float(binary_kd_loss(only_bg, [only_bg], 1.0, probs=False)) == pytest.approx(0.0, abs=1e-3)


def test_ctc_frames_balance_blank_and_symbol_frames():
    """frame_balance="half": a recognizer's frames the teacher decodes as blank and those it decodes as a symbol
    weigh half the KD each. 2 symbol frames of 10: a student that drops both (blank there) costs little under the
    plain mean, against as much as a student wrong on every blank frame when balanced."""
    from graphopt.distill import kd_loss
    t = torch.full((1, 10, 4), -6.0)
    t[0, :, 0] = 6.0                                        # blank everywhere ...
    t[0, 3, :] = torch.tensor([-6.0, 6.0, -6.0, -6.0])      # ... but a symbol at frames 3 and 7
    t[0, 7, :] = torch.tensor([-6.0, -6.0, 6.0, -6.0])
    target = torch.softmax(t, dim=2)
    dropped = torch.full_like(t, -6.0)
    dropped[0, :, 0] = 6.0                                  # the symbols read as blank
    inserted = t.clone()
    inserted[0, [0, 1, 2, 4, 5, 6, 8, 9], :] = torch.tensor([-6.0, -6.0, -6.0, 6.0])   # every blank misread
    plain = lambda s: float(kd_loss(s, target, 1.0, axis=2))                           # noqa: E731
    half = lambda s: float(kd_loss(s, target, 1.0, axis=2, balance_blank=0))           # noqa: E731
    assert plain(dropped) < 0.3 * plain(inserted)
    assert half(dropped) == pytest.approx(half(inserted), rel=1e-3)
    assert half(t) == pytest.approx(0.0, abs=1e-3)
    only_blank = torch.softmax(dropped, dim=2)               # no symbol frame: the plain mean
    assert float(kd_loss(dropped, only_blank, 1.0, axis=2, balance_blank=0)) == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(BadInput, match="frame_balance"):
        DistillConfig(frame_balance="all").validate()


def test_one_channel_sigmoid_output_is_distilled_as_probabilities():
    from graphopt.compress import _output_form
    from onnx import helper, TensorProto
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Sigmoid", ["c"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [0.5, -1.0, 2.0])])
    graph = graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    x = {"x": np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)}
    assert _output_form(graph, x) == {"class_axis": 1, "outputs": "probs"}


def test_saturated_sigmoid_map_recovers_through_its_logits(monkeypatch):
    """A prune step can leave a detector's map at exactly 0.0 (its Sigmoid saturated): the probabilities carry no
    gradient there, so distillation of a one-channel Sigmoid output runs on the Sigmoid's input."""
    import graphopt.distill as distill_module
    from graphopt.distill import predict
    from onnx import helper, TensorProto

    def net(bias):
        g = helper.make_graph(
            [helper.make_node("Conv", ["x", "w", "b"], ["z"]), helper.make_node("Sigmoid", ["z"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])],
            [helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [2.0, -1.0, 1.5]),
             helper.make_tensor("b", TensorProto.FLOAT, [1], [bias])])
        return graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))

    teacher, student = net(0.0), net(-30.0)          # sigmoid(-30) ~ 1e-13: below any clamp of the probabilities
    x = {"x": np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32)}
    cfg = DistillConfig(outputs="probs", epochs=40, batch_size=16, lr=0.2, feature_weight=0.0, attention_weight=0.0,
                        temperature=1.0, teacher_label_smoothing=0.0)
    out, info = distill(student, teacher, x, config=cfg)
    kd = info["history"]["kd"]
    assert predict(out, x)[0].max() > 0.5 and kd[-1] < 0.5 * kd[0]      # the map came back
    monkeypatch.setattr(distill_module, "_sigmoid_logit_taps", lambda *a: {})
    stuck, _ = distill(student, teacher, x, config=cfg)   # through the probabilities: no gradient, still empty
    assert predict(stuck, x)[0].max() < 1e-6


def test_map_threshold_moves_the_split_between_positives_and_negatives():
    """map_threshold: a teacher's element at p = 0.4 is a negative at the default 0.5 and a positive at DB's 0.3, in
    the balance's split (the hard balance then always counts it) and in the decisions' targets; out of (0, 1) is
    refused."""
    from graphopt.compress import Schedule
    from graphopt.distill import binary_kd_loss, teacher_hard_loss
    z = torch.full((1, 1, 20, 20), -6.0)
    z[0, 0, :4, :5] = 6.0                                   # 20 clear positives
    z[0, 0, 10:12, :5] = math.log(0.4 / 0.6)                # 10 elements the teacher puts at p = 0.4
    s = z.clone()
    s[0, 0, 10:12, :5] = -6.0                               # the student calls them background
    at = lambda th, b: float(binary_kd_loss(s, [z], 1.0, probs=False, balance=b, threshold=th))  # noqa: E731
    assert at(0.3, "half") > 5 * at(0.5, "half") > 0        # 10 of 30 positives wrong instead of 10 of 380 negatives
    # hard: the 10 are among 20 positives + 60 hardest negatives at 0.5, among 30 + 90 at 0.3
    assert at(0.3, "hard") / at(0.5, "hard") == pytest.approx(80 / 120, rel=1e-4)
    assert float(binary_kd_loss(z, [z], 1.0, probs=False, balance="hard", threshold=0.3)) == pytest.approx(0, abs=1e-3)
    p = torch.sigmoid(z)
    for th in (0.5, 0.3):
        want = F.binary_cross_entropy(p, (p > th).float())
        got = teacher_hard_loss([p], [p], DistillConfig(outputs="probs", map_threshold=th))
        assert float(got) == pytest.approx(float(want), rel=1e-5)
        got = teacher_hard_loss([z], [z], DistillConfig(map_threshold=th))              # logits
        assert float(got) == pytest.approx(float(F.binary_cross_entropy(p, (p > th).float())), rel=1e-4)
    with pytest.raises(BadInput, match="map_threshold"):
        DistillConfig(map_threshold=1.0).validate()
    with pytest.raises(BadInput, match="map_threshold"):
        Schedule(map_threshold=0.0).validate()


def test_teacher_hard_loss_is_cross_entropy_against_the_teachers_decisions():
    """teacher_hard_weight: cross-entropy of the student against the teacher's arg-max at every position (CTC
    frames [N, T, C] with class_axis 2, probabilities through their logs); for a one-channel map the teacher's map
    thresholded at 0.5 as binary targets. It trains the decisions without labels: distilling with it alone moves
    the student's frame decisions to the teacher's."""
    from graphopt.distill import teacher_hard_loss
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    cfg = DistillConfig(class_axis=2)
    want = F.cross_entropy(s.reshape(-1, 7), t.argmax(2).reshape(-1))
    assert float(teacher_hard_loss([s], [t], cfg)) == pytest.approx(float(want), rel=1e-6)
    probs = DistillConfig(class_axis=2, outputs="probs")
    assert float(teacher_hard_loss([s.softmax(2)], [t.softmax(2)], probs)) == pytest.approx(float(want), rel=1e-5)
    m_s, m_t = torch.sigmoid(torch.randn(2, 1, 4, 4)), torch.sigmoid(torch.randn(2, 1, 4, 4))
    want = F.binary_cross_entropy(m_s, (m_t > 0.5).float())
    assert float(teacher_hard_loss([m_s], [m_t], DistillConfig(outputs="probs"))) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(BadInput, match="teacher_hard_weight"):
        DistillConfig(teacher_hard_weight=-1.0).validate()
    rng = np.random.default_rng(0)
    ws, wt = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal((8, 6)).astype(np.float32)
    x = {"x": rng.standard_normal((64, 4, 8)).astype(np.float32)}
    cfg = DistillConfig(steps=40, batch_size=16, class_axis=2, outputs="probs", kd_weight=0.0, teacher_hard_weight=1.0,
                        lr=3e-2, micro_batch=None, hard_weight=0.0)
    teacher = _sequence_model(wt, True)
    student, m = distill(_sequence_model(ws, True), teacher, x, config=cfg)
    before = float(np.mean(predict(_sequence_model(ws, True), x)[0].argmax(2) == predict(teacher, x)[0].argmax(2)))
    after = float(np.mean(predict(student, x)[0].argmax(2) == predict(teacher, x)[0].argmax(2)))
    assert m["history"]["teacher_hard"][-1] < m["history"]["teacher_hard"][0] and after > before + 0.2, (before, after)
