"""compress bounds its memory (issue 15, item 4): the peak is estimated from the graph's shapes before training,
a micro-batch that would not fit the budget is replaced by a smaller one (same global batch, gradients
accumulated) with one line saying so, and a budget nothing fits is refused up front."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import graphopt  # noqa: E402
from graphopt.cli import main  # noqa: E402
from graphopt.compress import compress  # noqa: E402
from graphopt.errors import BadInput  # noqa: E402
from graphopt.memory_estimate import FIXED_BYTES, fit_micro_batch, training_bytes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402

pytestmark = pytest.mark.fast


def test_estimate_grows_with_the_micro_batch_and_the_fit_halves_it():
    g = graphopt.load(digits.teacher_path())
    small, big = training_bytes(g, [g], 1), training_bytes(g, [g], 64)
    assert FIXED_BYTES < small < big
    per_example = (big - small) / 63
    budget = (FIXED_BYTES + 20 * per_example + (small - FIXED_BYTES)) / 0.8
    m, need = fit_micro_batch(g, [g], 64, int(budget))
    assert m == 16 and need <= 0.8 * budget             # 64 -> 32 -> 16
    with pytest.raises(BadInput, match="even one example at a time"):
        fit_micro_batch(g, [g], 64, FIXED_BYTES)


def test_compress_takes_a_smaller_micro_batch_and_says_so():
    x, y, _, _ = digits.load_digits_split()
    g = graphopt.load(digits.teacher_path())
    per_example = (training_bytes(g, [g], 2) - training_bytes(g, [g], 1))
    budget = int((training_bytes(g, [g], 1, 128) + 5 * per_example) / 0.8)
    notes = []
    torch.set_num_threads(1)
    out, info = compress(g, {"x": x[:128], "labels": y[:128]}, "cleanup,prune-channels{flops=0.8}", epochs=2,
                         batch_size=32, max_memory=budget, notice=notes.append)
    assert info["memory"]["micro_batch"] == 4 and info["memory"]["budget_bytes"] == budget
    assert len(notes) == 1 and "training 4 examples at a time" in notes[0]
    assert np.isfinite(info["history"][-1]["loss_last"])


def test_cli_max_memory(tmp_path, capsys):
    x, y, _, _ = digits.load_digits_split()
    np.savez(tmp_path / "train.npz", x=x[:64], labels=y[:64])
    base = ["compress", str(digits.teacher_path()), "--train", str(tmp_path / "train.npz"), "--pipeline",
            "cleanup,prune-channels{flops=0.8}", "-o", str(tmp_path / "o.onnx"), "--epochs", "2"]
    assert main(base + ["--max-memory", "lots"]) == 2
    assert "--max-memory=lots is not a number of bytes" in capsys.readouterr().err
    assert main(base + ["--max-memory", "1M"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "even one example at a time" in err[0]
    assert not (tmp_path / "o.onnx").exists()


def test_compress_lets_the_teacher_cache_grow_with_the_budget():
    """compress raises distill's teacher-output cache limit (512 MB) to TEACHER_CACHE_SHARE of the memory budget, so
    that a model with large outputs (PP-OCRv4's recognizer: 1.1 MB per line) is not re-run by the teacher on every
    batch; the cached outputs count in the estimate, and the report says how many examples are cached."""
    from graphopt.compress import TEACHER_CACHE_SHARE, _fit_memory
    from graphopt.distill import DistillConfig
    from graphopt.memory_estimate import output_bytes
    g = graphopt.load(digits.teacher_path())
    n = int(600 * 2 ** 20 / output_bytes(g))                 # 600 MB of teacher outputs: above distill's 512 MB
    train = {"x": np.broadcast_to(np.zeros((1, 1, 8, 8), np.float32), (n, 1, 8, 8))}
    budget = 16 * 2 ** 30
    kept, info = _fit_memory(g, DistillConfig(batch_size=32), train, budget, print)
    # 600 MB in float32 is over 512: distill keeps them in bfloat16, counted as half as many float32 examples
    assert kept.cache_limit_mb == 512.0 and info["teacher_cached"] == (n + 1) // 2
    grown, info = _fit_memory(g, DistillConfig(batch_size=32), train, budget, print, grow_cache=True)
    assert grown.cache_limit_mb == TEACHER_CACHE_SHARE * budget / 2 ** 20 and info["teacher_cached"] == n
    assert info["estimate_bytes"] >= n * output_bytes(g)
    big = {"x": np.broadcast_to(np.zeros((1, 1, 8, 8), np.float32), (2 * n, 1, 8, 8))}    # 1.2 GB: not even half
    assert _fit_memory(g, DistillConfig(batch_size=32), big, budget, print)[1]["teacher_cached"] == 0


@pytest.mark.parametrize("reuse_inner", [False, True])
def test_fused_hardswish_chains_count_only_what_the_view_computes(reuse_inner, tmp_path):
    """The trainable view runs Paddle's spelled-out HardSwish as one op: its Add, Clip and Mul outputs are never
    computed, so the estimate leaves them out (PP-OCRv4's recognizer: 6.2 GB estimated for a 2.3 GB peak before)."""
    import onnx

    from graphopt.memory_estimate import per_example_activation_bytes
    from test_trainable import _hardswish_chain_model
    onnx.save(_hardswish_chain_model(reuse_inner), str(tmp_path / "hs.onnx"))
    g = graphopt.load(str(tmp_path / "hs.onnx"))
    per_tensor = 8 * 8 * 8 * 4                      # h, a, r, m, hs and k: [1, 8, 8, 8] float32; y: [1, 4, 8, 8]
    inner = 0 if not reuse_inner else 3             # a, r, m
    assert per_example_activation_bytes(g) == (3 + inner) * per_tensor + per_tensor // 2


def test_a_micro_batch_above_the_batch_is_estimated_as_the_batch():
    """compress's default micro-batch (32) above a batch of 16 trains 16 at a time: the estimate is for 16, and a
    budget that holds 16 but not 32 says nothing (it said a micro-batch of 32 did not fit and trained 16)."""
    from graphopt.compress import _fit_memory
    from graphopt.distill import DistillConfig
    g = graphopt.load(digits.teacher_path())
    budget = int((training_bytes(g, [g], 16) + training_bytes(g, [g], 32)) / 2 / 0.8)
    notes = []
    cfg, info = _fit_memory(g, DistillConfig(batch_size=16, micro_batch=32, cache_teacher=False), {"x": np.zeros(
        (64, 1, 8, 8), np.float32)}, budget, notes.append)
    assert notes == [] and info["micro_batch"] == 16 and info["estimate_bytes"] == training_bytes(g, [g], 16)
