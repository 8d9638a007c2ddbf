"""graphopt compress on several processes (torch.distributed, gloo on loopback): DDP with the global batch split
by rank takes the same steps as one process on the whole batch, so the compressed graphs agree up to float error."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from graphopt.distill import DistillConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
needs_hooks = pytest.mark.skipif(not hasattr(DistillConfig, "shard"),
                                 reason="graphopt.distill lacks the shard/wrap_model hooks (distill.py patch)")

PIPELINE = "cleanup,prune-channels{flops=0.6}"
N_TRAIN = 512            # a multiple of batch * processes: every global batch splits evenly
BATCH = 64
EPOCHS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    import digits
    x_tr, y_tr, x_te, y_te = digits.load_digits_split()
    return {"x": x_tr[:N_TRAIN], "labels": y_tr[:N_TRAIN]}, {"x": x_te[:200], "labels": y_te[:200]}


def _compress(distributed: bool):
    import digits

    import graphopt
    from graphopt.compress import compress
    torch.set_num_threads(1)
    train, ev = _data()
    g = graphopt.load(digits.teacher_path())
    return compress(g, train, PIPELINE, eval_data=ev, epochs=EPOCHS, batch_size=BATCH, seed=0,
                    distributed=distributed)


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import onnx

    from graphopt.distributed import setup, teardown
    from graphopt.graph import to_onnx
    info = setup("gloo")
    try:
        graph, meta = _compress(True)
        assert meta["distributed"]["world_size"] == world
        onnx.save(to_onnx(graph), os.path.join(out_dir, f"rank{rank}.onnx"))
    finally:
        teardown(info)


def _logits(graph, x):
    from graphopt.distill import predict
    return predict(graph, {"x": x})[0]


@needs_hooks
def test_two_processes_match_one(tmp_path):
    import graphopt
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    one, info = _compress(False)
    g0 = graphopt.load(tmp_path / "rank0.onnx")
    g1 = graphopt.load(tmp_path / "rank1.onnx")
    _, ev = _data()
    a, b, c = _logits(one, ev["x"]), _logits(g0, ev["x"]), _logits(g1, ev["x"])
    assert a.shape == b.shape
    np.testing.assert_array_equal(b, c)                       # the ranks hold the same model
    scale = float(np.abs(a).max())
    assert float(np.abs(a - b).max()) <= 5e-4 * scale, "2 processes drifted from 1 process"
    assert float(np.mean(a.argmax(1) == b.argmax(1))) >= 0.99
    # same structure as the single process
    from graphopt.evaluate import channels_per_layer
    assert channels_per_layer(g0) == channels_per_layer(one)


def test_setup_outside_torchrun_is_a_clear_error(monkeypatch):
    from graphopt.distributed import setup
    from graphopt.errors import BadInput
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(BadInput, match="torchrun"):
        setup()


@needs_hooks
def test_torchrun_command_line(tmp_path):
    """The launcher end to end: torchrun, 2 processes, rank 0 writes the output."""
    import digits
    train, ev = _data()
    np.savez(tmp_path / "train.npz", **train)
    np.savez(tmp_path / "eval.npz", **ev)
    out = tmp_path / "out.onnx"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "graphopt.distributed", "compress", str(digits.teacher_path()), "--train", str(tmp_path / "train.npz"),
           "--eval", str(tmp_path / "eval.npz"), "--pipeline", PIPELINE, "--epochs", "2", "-o", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.is_file()
    assert "2 (gloo)" in r.stdout
