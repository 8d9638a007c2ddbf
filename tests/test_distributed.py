"""graphopt compress on several processes (torch.distributed, gloo on loopback): the processes share each global
batch's micro-batches and sum their gradients in micro-batch order (graphopt.micro_batching), so they take bit for
bit the steps one process takes: one optimizer step and a whole compress run give the same weights."""
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


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

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


def _one_step(distributed: bool, rank: int = 0, world: int = 1):
    """The student's weights after one distillation step (a pruned digits CNN with adapters, so the feature and
    attention losses and their normalizers take part) on a global batch of 64 that is not a multiple of the
    micro-batch (3 micro-batches of 22, 21, 21: one process owns two of them)."""
    import digits

    import graphopt
    from graphopt.distill import DistillConfig, distill
    from graphopt.passmanager import PassContext, PassManager, make_pass
    torch.set_num_threads(1)
    train, _ = _data()
    teacher = graphopt.load(digits.teacher_path())
    g = PassManager.parse("cleanup,prune-channels{flops=0.7}").run(graphopt.load(digits.teacher_path())).graph
    g = PassManager([make_pass("insert-adapters")]).run(
        g, PassContext(verify="structural", data={"calib": {"x": train["x"]}, "teacher": teacher})).graph
    cfg = DistillConfig(steps=1, batch_size=BATCH, micro_batch=22, lr=1e-2, seed=0, keep_adapters=True,
                        shard=(rank, world) if distributed else None)
    out, _ = distill(g, [teacher], {"x": train["x"]}, labels=train["labels"], config=cfg)
    return {t.name: np.array(t.values) for t in out.tensors().values()
            if hasattr(t, "values") and np.asarray(t.values).dtype == np.float32}


def _step_worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from graphopt.distributed import setup, teardown
    info = setup("gloo")
    try:
        np.savez(os.path.join(out_dir, f"step{rank}.npz"), **_one_step(True, rank, world))
    finally:
        teardown(info)


def test_one_step_on_two_processes_equals_one_process(tmp_path):
    torch.multiprocessing.spawn(_step_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    one = _one_step(False)
    for rank in (0, 1):
        with np.load(tmp_path / f"step{rank}.npz") as z:
            two = {k: z[k] for k in z.files}
        assert set(two) == set(one)
        for k, v in one.items():
            scale = max(float(np.abs(v).max()), 1e-30)
            assert float(np.abs(two[k] - v).max()) <= 1e-7 * scale, f"rank {rank}: weight {k} differs after one step"


def _logits(graph, x):
    from graphopt.distill import predict
    return predict(graph, {"x": x})[0]


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
    # same micro-batches, same order of the gradient sums: equal to float rounding (in practice bit for bit). A
    # looser bound would hide the bug this guards: training amplifies any difference in the gradient sums
    # chaotically (1e-6 relative in the starting weights moves the final logits by ~20% of their scale).
    assert float(np.abs(a - b).max()) <= 1e-6 * scale, "2 processes drifted from 1 process"
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
