"""graphopt compress: progressive prune -> distill -> fine-tune on scikit-learn digits (a fast version of the
acceptance experiment in tools/compress_digits.py: fewer epochs, a looser budget), the schedule, the PCA hint,
DataLoader input, the command line and bad input."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import graphopt  # noqa: E402
from graphopt import metadata  # noqa: E402
from graphopt.compress import Schedule, _prune_steps, compress, pca_hint_teacher  # noqa: E402
from graphopt.errors import BadInput  # noqa: E402
from graphopt.graph import input_specs, output_specs  # noqa: E402
from graphopt.passmanager import make_pass  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402

PIPELINE = "cleanup,prune-channels{flops=0.5}"
EPOCHS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine this is several times faster than two spinning threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    x_tr, y_tr, x_te, y_te = digits.load_digits_split()
    return {"x": x_tr, "labels": y_tr}, {"x": x_te, "labels": y_te}


@pytest.fixture(scope="module")
def teacher():
    return graphopt.load(digits.teacher_path())


@pytest.fixture(scope="module")
def runs(teacher, data):
    train, ev = data
    out = {}
    for name, flag in (("distilled", True), ("plain", False)):
        out[name] = compress(teacher, train, PIPELINE, eval_data=ev, epochs=EPOCHS, seed=0, distill=flag)
    return out


def test_factorize_lowrank_inside_compress_meets_its_acceptance(data):
    """issue 6's acceptance on the trained digits CNN (tests/fixtures/digits_cnn.onnx): factorize-lowrank{flops=0.6}
    inside compress keeps <= 0.6x of the MACs and loses <= 1 point of top-1 (fewer epochs than
    tools/compress_digits.py; the full run gives 0.538x and -0.22 points)."""
    train, ev = data
    cnn = graphopt.load(digits.FIXTURES / "digits_cnn.onnx")
    graph, info = compress(cnn, train, "cleanup,factorize-lowrank{flops=0.6}", eval_data=ev, epochs=15, seed=0)
    assert info["macs_ratio"] <= 0.6
    assert [h["phase"] for h in info["history"]] == ["factorize-lowrank", "fine-tune"]
    f = info["final"]
    assert f["teacher_top1"] >= 0.97 and f["top1_drop"] <= 0.01, f
    convs = lambda g: sum(n.op == "Conv" for n in g.nodes)       # noqa: E731
    assert convs(graph) > convs(cnn)                              # kxk convs became 1x1 -> kxk -> 1x1 (Tucker-2)


def test_budget_met_and_interface_unchanged(teacher, runs):
    graph, info = runs["distilled"]
    assert info["macs_ratio"] <= 0.5 + 1e-9
    assert info["macs"]["after"] < info["macs"]["before"]
    assert [(n, s) for n, s, _ in input_specs(graph)] == [(n, s) for n, s, _ in input_specs(teacher)]
    assert [(n, s) for n, s, _ in output_specs(graph)] == [(n, s) for n, s, _ in output_specs(teacher)]
    assert not metadata.adapter_tags(graph) and not any(t.name.endswith("__adapted") for t in graph.outputs), \
        "adapters leaked into the result"


def test_schedule_light_then_fine_then_fine_tune(runs):
    _, info = runs["distilled"]
    phases = [h["phase"] for h in info["history"]]
    assert phases[0] == "prune-light" and phases[-1] == "fine-tune"
    assert set(phases[1:-1]) == {"prune-fine"}
    assert info["history"][0]["features"] == "none" and info["history"][0]["temperature"] == 8.0
    assert info["temperature_cap"] > 8.0            # 10 confident classes: the schedule's temperatures stand
    assert all(h["features"] != "none" for h in info["history"][1:])
    assert sum(h["epochs"] for h in info["history"]) == EPOCHS
    macs = [h["macs"] for h in info["history"]]
    assert macs == sorted(macs, reverse=True)
    assert info["round_to"] == {"prune-channels{flops=0.5}": "16 where a layer keeps >= 8 widths"}
    prunes = [p for p in info["passes"] if p["pass"].startswith("prune-channels")]
    assert prunes and all("criterion=activation" in p["pass"] for p in prunes)   # compress has data: not l1


def test_accuracy_and_distillation_beats_plain_fine_tuning(runs):
    fd, fp = runs["distilled"][1]["final"], runs["plain"][1]["final"]
    assert fd["teacher_top1"] >= 0.97
    assert fd["top1_drop"] <= 0.03
    assert fd["top1"] >= fp["top1"] - 2 / fd["n"]                   # at least matches (2 examples of slack)
    assert fd["cka_penultimate"] >= 0.85
    assert fd["cka_penultimate"] > fp["cka_penultimate"] + 0.03     # and keeps the teacher's representation
    # 5 examples of slack: with compress's data-driven criterion (activation) plain fine-tuning already recovers
    # most of the pruning damage, and distilled minus plain agreement is within the runs' noise: over seeds 0/1/2
    # it measured -3/+1/-1 examples of 450 on an AMD EPYC, -4 for seed 0 on an Intel Xeon (float sums differ by
    # CPU); with l1, seed 0: +6. Distillation's gain is the representation (the CKA above), not this count
    assert fd["agreement"] >= fp["agreement"] - 5 / fd["n"]
    assert runs["plain"][1]["distill"] is False
    assert all(h["features"] == "none" for h in runs["plain"][1]["history"])


def test_a_diverging_phase_is_trained_again_at_a_lower_lr(teacher, data):
    """lr 1.0 blows the first phase up (loss 3.3 -> 5.4, top-1 10% at the end without the retry): compress trains
    that phase again from the same start at lr 0.1, then 0.01, and keeps 0.01 for the later phases, ending as a run
    given lr 0.01 ends."""
    train, ev = data
    logs = []
    _, info = compress(teacher, {"x": train["x"]}, PIPELINE, eval_data=ev, epochs=4, lr=1.0, seed=0, log=logs.append)
    said = [m for m in logs if "diverged" in m]
    assert len(said) == 2 and "at lr 0.1," in said[0] and "at lr 0.01," in said[1]
    assert [h["lr"] for h in info["history"]] == pytest.approx([0.01] * len(info["history"]))
    _, ref = compress(teacher, {"x": train["x"]}, PIPELINE, eval_data=ev, epochs=4, lr=0.01, seed=0)
    assert info["final"]["top1"] == ref["final"]["top1"] >= 0.95


def test_a_retry_that_ends_no_lower_keeps_the_first_attempt(teacher, data, monkeypatch):
    """A phase judged diverged is trained again at a tenth of the lr; when that ends no lower on the same batches,
    the rise was the batches' noise, not the lr: compress keeps the attempt at the higher lr, and that lr for the
    later phases (PP-OCRv4's recognizer, seed 1, fine-tuned at 1e-6 after a prune step "diverged" at every lr). Here every phase is called diverged: the first phase ends lower at 0.001 than at 0.01 (the retries go
    on) and no lower at 1e-4 (0.001 kept); the second starts at 0.001 and keeps it the same way."""
    import graphopt.compress as compress_mod
    monkeypatch.setattr(compress_mod, "_diverged", lambda m, t, s: True)
    train, ev = data
    logs = []
    _, info = compress(teacher, {"x": train["x"][:512]}, "prune-channels{flops=0.7}", epochs=2, lr=0.01, seed=0,
                       schedule=Schedule(light_fraction=1.0), log=logs.append)
    kept = [m for m in logs if "kept the attempt at the higher lr" in m]
    assert len(kept) == len(info["history"]) == 2
    assert [h["lr"] for h in info["history"]] == pytest.approx([0.001, 0.001])
    from graphopt.compress import _no_lower
    assert _no_lower({"loss_last": 0.75}, {"loss_last": 0.75}) and not _no_lower({"loss_last": 0.7}, {"loss_last": 0.75})
    assert not _no_lower({"loss_last": float("nan")}, {"loss_last": 0.75})


def test_divergence_needs_a_rise_over_the_first_steps_at_one_temperature():
    from graphopt.compress import _diverged
    s = Schedule()
    m = {"steps": 20, "loss_last": 5.0, "history": {"loss": [3.0] + [5.0] * 19}}
    assert _diverged(m, 4.0, s)
    assert not _diverged(m, ((0.5, 4.0, 2.0), (1.0, 2.0, 1.0)), s)   # a falling temperature rescales the loss
    assert not _diverged({**m, "steps": 8}, 4.0, s)                   # too few steps to tell
    assert not _diverged({**m, "loss_last": 3.2}, 4.0, s)
    assert _diverged({**m, "loss_last": float("nan")}, 4.0, s)
    # noisy batches (one epoch over distinct examples): a rise within the batches' spread is not divergence
    rng = np.random.default_rng(0)
    noisy = [0.10] + list(0.14 + 0.06 * rng.standard_normal(95))
    assert not _diverged({"steps": 96, "loss_last": float(np.mean(noisy[-9:])), "history": {"loss": noisy}}, 1.0, s)
    steady = [0.10] + [0.14] * 95
    assert _diverged({"steps": 96, "loss_last": 0.14, "history": {"loss": steady}}, 1.0, s)
    # a short phase (16 steps: loss_last is one step) judges the rise against the spread of its last 8 steps
    calm = [0.05] + [0.09, 0.05, 0.13, 0.07, 0.11, 0.06, 0.12, 0.08, 0.10, 0.05, 0.13, 0.07, 0.11, 0.06, 0.12]
    assert not _diverged({"steps": 16, "loss_last": 0.12, "history": {"loss": calm}}, 1.0, s)
    assert _diverged({"steps": 16, "loss_last": 0.5, "history": {"loss": [0.05] + [0.5] * 15}}, 1.0, s)


def test_prune_steps_fractions():
    p = make_pass("prune-channels", flops=0.25, params=0.18)
    steps = _prune_steps(p)
    assert len(steps) == 5
    assert steps[0]["flops"] == pytest.approx(1 - 0.4 * 0.75)
    assert steps[1]["flops"] == pytest.approx(1 - 0.55 * 0.75)
    assert steps[-1] == {"flops": pytest.approx(0.25), "params": pytest.approx(0.18)}
    geo = _prune_steps(p, Schedule(spacing="geometric"))
    assert geo[0]["flops"] == pytest.approx(0.25 ** 0.4) and geo[-1]["flops"] == pytest.approx(0.25)
    with pytest.raises(BadInput, match="step_features"):
        Schedule(step_features="nope").validate()


def test_latency_budget_is_cut_into_steps_relative_to_the_step_before():
    steps = _prune_steps(make_pass("prune-channels", latency=0.5))
    assert [round(st["latency"], 3) for st in steps] == [0.8, 0.725, 0.65, 0.575, 0.5]


def test_latency_budget_reaches_the_pass_inside_compress(teacher, data):
    """A latency budget alone used to be skipped as "nothing left to prune" (only flops/params/ratio counted): the
    prune step must run the pass with it."""
    train, _ = data
    _, info = compress(teacher, {"x": train["x"][:128]}, "prune-channels{latency=0.7}", epochs=1,
                       schedule=Schedule(light_fraction=1.0))
    runs = [r for r in info["passes"] if r["pass"].startswith("prune-channels")]
    assert len(runs) == 1 and "latency=0.7" in runs[0]["pass"] and "budget_met" in runs[0]["info"]


def test_pca_hint_teacher(teacher, data):
    from graphopt.distill import linear_cka, predict
    from graphopt.evaluate import penultimate_tensor
    train, _ = data
    x = {"x": train["x"][:300]}
    pen = penultimate_tensor(teacher)
    ref_out, feats = predict(teacher, x, features=[pen])
    t = feats[pen]
    g, hint, scale = pca_hint_teacher(teacher, t, 12)
    out, hf = predict(g, x, features=[hint])
    np.testing.assert_allclose(out[0], ref_out[0], rtol=1e-6, atol=1e-6)      # outputs untouched
    h = hf[hint]
    assert h.shape == (300, 12) and h.min() >= -1e-4                          # non-negative on the data
    assert linear_cka(h, t) > 0.99 and scale > 1
    # aligned onto a rotated, scaled copy of the teacher's principal coordinates, it reproduces that copy
    rot = np.linalg.qr(np.random.default_rng(0).standard_normal((12, 12)))[0]
    z = (t - t.mean(0)) @ np.linalg.svd(t - t.mean(0), full_matrices=False)[2][:12].T
    student = 0.5 * z @ rot + 3.0
    g2, hint2, _ = pca_hint_teacher(teacher, t, 12, student)
    h2 = predict(g2, x, features=[hint2])[1][hint2]
    np.testing.assert_allclose(h2, student, atol=2e-3 * np.abs(student).max())


def test_dataloader_training_data(teacher, data):
    from torch.utils.data import DataLoader, TensorDataset
    train, ev = data
    ds = TensorDataset(torch.from_numpy(train["x"]), torch.from_numpy(train["labels"]))
    loader = DataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    eval_loader = DataLoader(TensorDataset(torch.from_numpy(ev["x"]), torch.from_numpy(ev["labels"])),
                             batch_size=100)
    graph, info = compress(teacher, loader, "cleanup,prune-channels{flops=0.6,criterion=taylor}",
                           eval_data=eval_loader, epochs=4, seed=0)
    assert info["macs_ratio"] <= 0.6 + 1e-9
    assert info["final"]["n"] == len(ev["labels"])
    assert info["final"]["top1"] >= info["final"]["teacher_top1"] - 0.05
    assert [h["phase"] for h in info["history"]][-1] == "fine-tune"


def test_labels_are_optional_for_distillation(teacher, data):
    train, ev = data
    graph, info = compress(teacher, {"x": train["x"][:256]}, "prune-channels{flops=0.7}", eval_data=ev,
                           epochs=2, schedule=Schedule(light_fraction=1.0))
    assert info["macs_ratio"] <= 0.7 + 1e-9 and len(info["history"]) == 2
    with pytest.raises(BadInput, match="labels"):
        compress(teacher, {"x": train["x"][:256]}, "prune-channels{flops=0.7}", epochs=1, distill=False)


def test_phase_unit_steps_gives_each_phase_its_share_of_the_optimizer_steps(teacher, data):
    """Whole epochs: 2 epochs and 2 prune steps leave the fine-tuning 1 epoch, not its share of 0.6 (and 4 prune
    steps would take 4). phase_unit="steps" shares out epochs x batches: 2 x 4 = 8 steps, the fine-tuning
    round(8 * 0.6) = 5, the two prune steps 2 and 1."""
    train, _ = data
    x = {"x": train["x"][:256]}
    sch = Schedule(light_fraction=0.5, fine_fraction=0.5, fine_tune_share=0.6)
    _, whole = compress(teacher, x, "prune-channels{flops=0.7}", epochs=2, batch_size=64, schedule=sch)
    assert [h["epochs"] for h in whole["history"]] == [1, 1, 1]
    _, info = compress(teacher, x, "prune-channels{flops=0.7}", epochs=2, batch_size=64,
                       schedule=replace(sch, phase_unit="steps"))
    assert [h["phase"] for h in info["history"]] == ["prune-light", "prune-fine", "fine-tune"]
    assert [h["steps"] for h in info["history"]] == [2, 1, 5]
    assert [h["epochs"] for h in info["history"]] == pytest.approx([0.5, 0.25, 1.25])
    assert info["macs_ratio"] <= 0.7 + 1e-9
    with pytest.raises(BadInput, match="phase_unit"):
        compress(teacher, x, "prune-channels{flops=0.7}", epochs=1, schedule=Schedule(phase_unit="batches"))


def test_phases_evaluate_the_held_out_data_only(teacher, data, monkeypatch):
    """After each training phase distill evaluates student and teacher on the held-out data; compress does not
    use distill's figures on the training data, which ran both models over up to 2048 training examples per phase
    (most of each phase on PP-OCRv4's recognizer)."""
    from graphopt import distill as distill_mod
    train, ev = data
    seen = []
    real = distill_mod.evaluate
    monkeypatch.setattr(distill_mod, "evaluate", lambda g, d, *a, **k: seen.append(len(d["x"])) or real(g, d, *a, **k))
    compress(teacher, {"x": train["x"][:200]}, "prune-channels{flops=0.7}", eval_data={"x": ev["x"][:50]},
             epochs=2, schedule=Schedule(light_fraction=1.0))
    assert seen and set(seen) == {50}


def test_bad_input(teacher, data):
    train, ev = data
    with pytest.raises(BadInput, match="lacks input.*x"):
        compress(teacher, {"images": train["x"], "labels": train["labels"]}, PIPELINE, epochs=1)
    with pytest.raises(BadInput, match="evaluation data lacks input"):
        compress(teacher, train, PIPELINE, eval_data={"labels": ev["labels"]}, epochs=1)
    with pytest.raises(BadInput, match="labels for"):
        compress(teacher, {"x": train["x"], "labels": train["labels"][:10]}, PIPELINE, epochs=1)
    with pytest.raises(BadInput, match="epochs"):
        compress(teacher, train, PIPELINE, epochs=0)
    with pytest.raises(BadInput, match="unknown pass"):
        compress(teacher, train, "prune-chanels{flops=0.5}", epochs=1)
    with pytest.raises(BadInput, match="DataLoader"):
        compress(teacher, ((train["x"][i:i + 8],) for i in range(0, 64, 8)), PIPELINE, epochs=1)  # one-shot


def test_command_line(tmp_path, data, capsys):
    from graphopt import cli
    train, ev = data
    np.savez(tmp_path / "train.npz", x=train["x"][:400], labels=train["labels"][:400])
    np.savez(tmp_path / "eval.npz", x=ev["x"], labels=ev["labels"])
    np.savez(tmp_path / "bad.npz", images=train["x"][:10], labels=train["labels"][:10])
    out = tmp_path / "student.onnx"
    model = str(digits.teacher_path())
    rc = cli.main(["compress", model, "--train", str(tmp_path / "train.npz"), "--eval", str(tmp_path / "eval.npz"),
                   "--pipeline", "cleanup,prune-channels{flops=0.6}", "--epochs", "3", "--lr", "1e-2",
                   "-o", str(out), "--json"])
    assert rc == 0 and out.is_file()
    captured = capsys.readouterr()
    res = json.loads(captured.out)                  # stdout stays pure JSON; progress goes to stderr
    assert "graphopt: training step 1 (" in captured.err and "(100%) loss " in captured.err
    assert res["macs_ratio"] <= 0.6 + 1e-9
    assert res["final"]["cka_penultimate"] is not None
    g = graphopt.load(out)
    assert [t.name for t in g.inputs] == ["x"]
    rc = cli.main(["compress", model, "--train", str(tmp_path / "bad.npz"), "--pipeline", PIPELINE,
                   "-o", str(tmp_path / "never.onnx")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "lacks input(s) x" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never.onnx").exists()


def test_pass_summaries_keep_the_budget_outcome_under_the_pass():
    from graphopt.compress import _pass_summary
    rec = {"pass": "prune-channels{flops=0.5}", "position": 1, "exact": False, "modified": True, "seconds": 1.5,
           "nodes_before": 9, "nodes_after": 9, "drift": {}, "info": {"budget_met": True, "notes": [], "layers": {}}}
    assert _pass_summary(rec) == {"pass": "prune-channels{flops=0.5}", "position": 1, "modified": True,
                                  "seconds": 1.5, "info": {"budget_met": True, "notes": []}}
    assert "info" not in _pass_summary({**rec, "pass": "cleanup", "info": {"rounds": 2}})


def test_schedule_from_options_types_and_refusals():
    s = Schedule.from_options({"light_fraction": "0.2", "fine_fraction": 0.2, "divergence_steps": "8",
                               "hint_align": "false", "step_features": "adapters"})
    assert (s.light_fraction, s.fine_fraction, s.divergence_steps, s.hint_align, s.step_features) == \
        (0.2, 0.2, 8, False, "adapters")
    for options, why in [({"nope": 1}, "unknown key 'nope'"), ({"light_fraction": "x"}, "must be a number"),
                         ({"divergence_steps": "2.5"}, "must be an integer"), ({"hint_align": "maybe"}, "true or false"),
                         ({"light_fraction": 0.0}, "light_fraction and fine_fraction in"),
                         ({"light_fraction": "nan"}, "finite"), ({"final_temperature": "1"}, "unknown key")]:
        with pytest.raises(BadInput, match=why):
            Schedule.from_options(options)


def test_cli_schedule_reaches_compress(tmp_path, capsys, data):
    """`--schedule light_fraction=1.0`: one prune step straight to the budget, then fine-tuning; a malformed or
    unknown setting is one error line, exit 2, nothing written."""
    import json
    from graphopt.cli import main
    train, _ = data
    np.savez(tmp_path / "train.npz", x=train["x"][:128])
    out = tmp_path / "s.onnx"
    args = ["compress", str(digits.teacher_path()), "--train", str(tmp_path / "train.npz"), "--pipeline",
            "cleanup,prune-channels{flops=0.6}", "--epochs", "2", "--batch-size", "32", "--threads", "1", "-o", str(out)]
    for bad, why in [("light_fraction", "malformed"), ("nope=1", "unknown key 'nope'")]:
        assert main(args + ["--schedule", bad]) == 2
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("graphopt: error")]
        assert len(err) == 1 and why in err[0] and "--schedule" in err[0]
        assert not out.exists()
    assert main(args + ["--schedule", "light_fraction=1.0", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["schedule"] == {"light_fraction": 1.0}
    assert [h["phase"] for h in info["history"]] == ["prune-light", "fine-tune"]


def _ctc_model():
    """A tiny [1, 6, 12] softmax-frames model (a CTC recognizer's output form) and 64 inputs."""
    from onnx import TensorProto, helper, numpy_helper
    from graphopt.graph import from_onnx
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 32)).astype(np.float32), rng.standard_normal((32, 12)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["z"]), helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "ctc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 12])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    return model, {"x": rng.standard_normal((64, 6, 8)).astype(np.float32)}


def test_frame_balance_reaches_the_recognizers_kd(monkeypatch):
    """Schedule(frame_balance="half") balances a CTC output's blank and symbol frames (kd_loss's balance_blank=0)
    in every phase; the default weighs every frame alike; a bad value is refused."""
    import graphopt.distill as distill_mod
    seen = []
    real = distill_mod.kd_loss
    monkeypatch.setattr(distill_mod, "kd_loss", lambda *a, **k: seen.append(k.get("balance_blank")) or real(*a, **k))
    model, x = _ctc_model()
    for balance, want in (("half", {0}), ("none", {None})):
        seen.clear()
        compress(model, x, "prune-channels{ratio=0.25,round_to=1}", epochs=2, batch_size=32,
                 schedule=Schedule(frame_balance=balance, light_fraction=1.0))
        assert seen and set(seen) == want
    with pytest.raises(BadInput, match="frame_balance"):
        Schedule.from_options({"frame_balance": "all"})


def test_ctc_recognizer_distills_at_temperature_one_with_its_frame_decisions():
    """Schedule(decisions=True), [N, T, C] softmax frames (a CTC recognizer): every phase at T <=
    Schedule.decision_temperature (1), no label
    smoothing, and the original's arg-max frames as targets (decision_teacher_hard_weight); a classifier keeps the
    schedule's temperatures (test_schedule_light_then_fine_then_fine_tune)."""
    model, x = _ctc_model()
    logs = []
    _, info = compress(model, x, "prune-channels{ratio=0.25,round_to=1}", epochs=2, batch_size=16, lr=1e-3,
                       log=logs.append, schedule=Schedule(decisions=True))
    assert info["temperature_cap"] == 1.0
    assert all(h["temperature"] in (1.0, "falling to 1") for h in info["history"])
    assert any("CTC recognizer" in m and "weight 1" in m for m in logs)


def test_probability_map_distills_at_temperature_one_with_its_thresholded_decisions():
    """A one-channel sigmoid map (a text detector's): the same decision rule as a CTC recognizer's frames."""
    from onnx import TensorProto, helper, numpy_helper
    from graphopt.graph import from_onnx
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((16, 1, 3, 3)).astype(np.float32), rng.standard_normal((1, 16, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["z"]), helper.make_node("Sigmoid", ["z"], ["y"])]
    g = helper.make_graph(nodes, "map", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    logs = []
    _, info = compress(model, {"x": rng.standard_normal((64, 1, 8, 8)).astype(np.float32)},
                       "prune-channels{ratio=0.25,round_to=1}", epochs=2, batch_size=16, lr=1e-3, log=logs.append,
                       schedule=Schedule(decisions=True))
    assert info["temperature_cap"] == 1.0
    assert any("probability map" in m and "weight 1" in m for m in logs)
    logs.clear()
    _, info = compress(model, {"x": rng.standard_normal((64, 1, 8, 8)).astype(np.float32)},
                       "prune-channels{ratio=0.25,round_to=1}", epochs=1, batch_size=16, lr=1e-3, log=logs.append)
    assert info["temperature_cap"] is None and not any("probability map" in m for m in logs)   # opt-in


def _mlp(widths=(16, 40, 40, 10), seed=3):
    """[1, 6, 16] -> MatMul 40 -> Relu -> MatMul 40 -> Relu -> MatMul 10 -> Softmax: two prunable 40-wide layers."""
    from onnx import TensorProto, helper, numpy_helper
    from graphopt.graph import from_onnx
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        inits.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"z{i}"], name=f"mm{i}"))
        x = f"z{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    nodes.append(helper.make_node("Softmax", [x], ["y"], axis=-1, name="softmax"))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, widths[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, widths[-1]])], inits)
    return from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_progressive_prune_steps_keep_max_layer_ratio_of_the_original_widths():
    """compress cuts a budget into prune steps and trains (exports the trainable view) between them; each step
    used to cap a layer's removal at max_layer_ratio of its width *then*, so the OCR example's five steps took
    32- and 128-channel layers of PP-OCRv4's recognizer down to ONE channel. The widths before the first step
    travel with the graph through every step's training (graphopt.metadata pruned_widths): with a budget no
    capped allocation can reach, every layer ends exactly at the cap counted from its original width."""
    from graphopt.passmanager import PassContext
    model = _mlp()
    groups = PassContext().analyses.get("channel-groups", model)
    layers0 = {lay.name: len(lay.units) for lay in groups.layers if not groups.units[lay.units[0]].frozen}
    assert layers0 == {"mm0": 40, "mm1": 40}
    x = {"x": np.random.default_rng(0).standard_normal((64, 6, 16)).astype(np.float32)}
    graph, info = compress(model, x, "prune-channels{flops=0.1,max_layer_ratio=0.5,round_to=1}", epochs=6,
                           batch_size=16, lr=1e-3)
    steps = [h for h in info["history"] if h["phase"].startswith("prune")]
    assert len(steps) == 5                                 # 0.4 of the reduction, then 0.15 more per step
    assert {k: metadata.pruned_widths(graph)[k] for k in layers0} == layers0      # the widths before step 1
    assert info["channels"]["mm0"] == 20 and info["channels"]["mm1"] == 20     # at the cap, not below it
    assert info["channels"]["mm2"] == 10
