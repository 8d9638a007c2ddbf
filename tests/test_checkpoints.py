"""compress --resume (issue 15, item 5): a run interrupted at a phase boundary or inside a phase, resumed from its
checkpoints, ends with the weights of the uninterrupted run, bit for bit; checkpoints are verified, not trusted."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import graphopt  # noqa: E402
from graphopt.cli import main  # noqa: E402
from graphopt.compress import compress  # noqa: E402
from graphopt.errors import BadInput  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402

PIPELINE = "cleanup,prune-channels{flops=0.6}"
EPOCHS = 7              # 5 pruning steps of 1 epoch, then 2 epochs of fine-tuning


class Interrupt:
    """A progress sink that interrupts training after `after` optimizer steps in all (like Ctrl-C)."""

    def __init__(self, after: int):
        self.after, self.steps = after, 0

    @contextlib.contextmanager
    def task(self, label, total):
        last = [0]

        def update(done, detail="", new_total=None):
            self.steps += done - last[0]
            last[0] = done
            if self.steps >= self.after:
                raise KeyboardInterrupt
        yield update


@pytest.fixture(scope="module")
def data():
    x_tr, y_tr, _, _ = digits.load_digits_split()
    return {"x": x_tr[:320], "labels": y_tr[:320]}


def _weights(graph):
    return {t.name: np.array(t.values) for t in graph.tensors().values() if hasattr(t, "values")}


def _run(data, **kw):
    torch.set_num_threads(1)
    g, info = compress(graphopt.load(digits.teacher_path()), data, PIPELINE, epochs=EPOCHS, batch_size=64,
                       seed=0, **kw)
    return _weights(g), info


@pytest.fixture(scope="module")
def uninterrupted(data):
    return _run(data)[0]


@pytest.mark.parametrize("after", [10, 13])      # 5 steps per epoch: 10 ends phase 2, 13 is inside phase 3
def test_resumed_run_equals_uninterrupted(tmp_path, data, uninterrupted, after):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        _run(data, checkpoint_dir=ckpt, checkpoint_every_s=0.0, progress=Interrupt(after))
    saved = sorted(p.name for p in ckpt.iterdir())
    assert "run.json" in saved and "phase-1.onnx" in saved
    assert ("partial-3.pt" in saved) == (after == 13)
    got, info = _run(data, checkpoint_dir=ckpt, resume=True)
    assert not ckpt.exists()                     # removed once the run completed
    assert set(got) == set(uninterrupted)
    for k, v in uninterrupted.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert [h["phase"] for h in info["history"]][:2] == ["prune-light", "prune-fine"]


def test_checkpoints_are_verified(tmp_path, data):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        _run(data, checkpoint_dir=ckpt, progress=Interrupt(6))
    with pytest.raises(BadInput, match="add --resume"):                 # never overwritten by accident
        _run(data, checkpoint_dir=ckpt)
    with pytest.raises(BadInput, match="another run"):
        compress(graphopt.load(digits.teacher_path()), data, PIPELINE, epochs=EPOCHS, batch_size=64, seed=1,
                 checkpoint_dir=ckpt, resume=True)
    f = ckpt / "phase-1.onnx"
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(BadInput, match="modified"):
        _run(data, checkpoint_dir=ckpt, resume=True)


def test_cli_resume_without_checkpoint(tmp_path, capsys, data):
    np.savez(tmp_path / "train.npz", **data)
    rc = main(["compress", str(digits.teacher_path()), "--train", str(tmp_path / "train.npz"), "--pipeline",
               PIPELINE, "-o", str(tmp_path / "out.onnx"), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no checkpoint to resume from" in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_next(tmp_path, data):
    """(compress --lr 1e30: the loss became NaN at step 2, the folder held only its index) the advised rerun with
    a lower learning rate starts over instead of being refused as an interrupted run; a foreign file still blocks."""
    from graphopt.checkpoints import Checkpoints
    ckpt = tmp_path / "ckpt"
    Checkpoints(ckpt, "key-a")                                  # what a failed run leaves: the index, no files
    assert [p.name for p in ckpt.iterdir()] == ["run.json"]
    Checkpoints(ckpt, "key-b")                                  # a new run may start over
    (ckpt / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="add --resume"):
        Checkpoints(ckpt, "key-c")


def test_a_diverging_run_leaves_no_checkpoint_folder(tmp_path, data):
    """(compress --lr 1e30) the loss becomes NaN before the first checkpoint: exit with the error, and no
    OUT.ckpt folder is left to block the advised rerun."""
    from graphopt.errors import CheckFailed
    ckpt = tmp_path / "ckpt"
    with pytest.raises(CheckFailed, match="loss became"):
        compress(graphopt.load(digits.teacher_path()), data, PIPELINE, epochs=EPOCHS, batch_size=64, lr=1e30,
                 checkpoint_dir=ckpt)
    assert not ckpt.exists()
