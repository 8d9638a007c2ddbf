"""graphopt.micro_batching: the micro-batch partition, and training on micro-batches takes the step training on the
whole batch takes (gradients accumulated with each micro-batch weighed by its share of the batch)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from graphopt.errors import BadInput  # noqa: E402
from graphopt.micro_batching import micro_batches, ordered_sum, owned  # noqa: E402

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("n,m", [(64, 32), (64, 22), (65, 32), (1, 32), (31, 32), (100, 7), (5, None)])
def test_micro_batches_partition_the_batch_evenly(n, m):
    chunks = micro_batches(n, m)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a < b for a, b in chunks) and all(chunks[i][1] == chunks[i + 1][0] for i in range(len(chunks) - 1))
    sizes = [b - a for a, b in chunks]
    assert max(sizes) <= (m or n) and max(sizes) - min(sizes) <= 1
    assert len(chunks) == -(-n // (m or n))


def test_every_micro_batch_has_one_owner():
    for world in (1, 2, 3, 5):
        got = sorted(j for r in range(world) for j in owned(7, r, world))
        assert got == list(range(7))


def test_ordered_sum_adds_left_to_right():
    vals = [torch.tensor([1e8], dtype=torch.float32), torch.tensor([1.0]), torch.tensor([-1e8])]
    assert float(ordered_sum(vals)) == float((vals[0] + vals[1]) + vals[2])


def _train_one_step(micro):
    import digits

    import graphopt
    from graphopt.distill import DistillConfig, distill
    torch.set_num_threads(1)
    x, y, _, _ = digits.load_digits_split()
    g = graphopt.load(digits.teacher_path())
    cfg = DistillConfig(steps=1, batch_size=48, micro_batch=micro, lr=1e-2, seed=0)
    out, m = distill(g, [graphopt.load(digits.teacher_path())], {"x": x[:96]}, labels=y[:96], config=cfg)
    return {t.name: np.array(t.values) for t in out.tensors().values()
            if hasattr(t, "values") and np.asarray(t.values).dtype == np.float32}, m["history"]["loss"][0]


def test_micro_batches_take_the_whole_batch_step():
    whole, loss_whole = _train_one_step(None)
    parts, loss_parts = _train_one_step(10)          # 5 micro-batches of 10 or 9
    assert abs(loss_whole - loss_parts) <= 1e-5 * abs(loss_whole)
    for k, v in whole.items():
        assert np.allclose(parts[k], v, rtol=1e-5, atol=1e-6 * float(np.abs(v).max())), k


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_micro_batch_is_refused(bad):
    from graphopt.distill import DistillConfig
    with pytest.raises(BadInput, match="micro_batch"):
        DistillConfig(micro_batch=bad).validate()
