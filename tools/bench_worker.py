"""One benchmark engine in a process of its own (tools/bench.py times every engine this way), both sides.

Worker side, `python tools/bench_worker.py FD SPEC_JSON` (FD: this process's end of a socket pair): load the engine
SPEC names (load_engine: an onnxruntime session, an OpenVINO compiled model or a graphopt artifact's runner, with
SPEC's thread count, on feeds every engine builds alike), call it twice (warm-up), answer ("loaded", facts), then
answer each ("run", per_round_s, min_iters) with ("block", latencies, CPU seconds, wall seconds) of run_block, until
("quit",) or the driver's end closes. A failure is answered ("error", one line).

Driver side: Worker starts one with the thread count in OMP_NUM_THREADS / TVM_NUM_THREADS / ... (set before any
engine is imported) in a session of its own (Ctrl-C reaches only the driver, which closes its workers); a worker
that fails, dies or stops answering raises WorkerError, whose text is the error cell.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREAD_VARS = ("OMP_NUM_THREADS", "TVM_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
LOAD_S = 900.0      # longest wait for a worker to import, load and warm up its engine
BLOCK_S = 300.0     # longest wait for one round's block beyond per_round_s
#: idle time before each block, so the previous engine's pool threads have stopped spinning: after its last call
#: TVM's workers spin about 0.15 s, onnxruntime's 0.04 s, OpenVINO's not at all (process CPU time while idle, 2
#: threads, AMD EPYC); without it graphopt bf16's MobileNetV2 on 2 threads timed 3.56 ms right after graphopt fp32's
#: block, 2.15 ms alone
SETTLE_S = 0.3


class WorkerError(Exception):
    """An engine's worker failed, died or stopped answering; the text is its one-line error cell."""


def one_line(e: BaseException) -> str:
    """The error cell of an exception: its type and last non-empty line (a WorkerError: its text), 160 chars."""
    if isinstance(e, WorkerError):
        return str(e)[:160]
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (f"{type(e).__name__}: {lines[-1] if lines else ''}")[:160]


def input_specs(path: Path) -> list[tuple]:
    """(name, shape, numpy dtype) of the graph inputs of an ONNX file (weights listed as inputs left out)."""
    import onnx
    g = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in g.initializer}
    return [(vi.name, tuple(d.dim_value for d in vi.type.tensor_type.shape.dim),
             onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)) for vi in g.input
            if vi.name not in weights]


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_block(fn, per_round_s: float, min_iters: int) -> tuple[list[float], float, float]:
    """SETTLE_S idle, one untimed call, then fn timed for about per_round_s (at least min_iters calls): (latencies
    in seconds, process CPU seconds, wall seconds) of the timed calls."""
    time.sleep(SETTLE_S)
    fn()
    c0, t_start = cpu_seconds(), time.perf_counter()
    samples = []
    while len(samples) < min_iters or time.perf_counter() - t_start < per_round_s:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples, cpu_seconds() - c0, time.perf_counter() - t_start


def load_engine(spec: dict):
    """(zero-argument call, facts) of spec's engine: "onnxruntime" (all graph optimizations) or "openvino" (hint:
    INFERENCE_PRECISION_HINT or its default; facts: bench_int8.openvino_precision) on the ONNX file spec["model"],
    or "graphopt" on the artifact folder spec["model"]; spec["threads"] threads, on graphopt.ort.random_inputs of
    spec["feeds_from"]'s inputs with spec["seed"] (the same feeds for every engine)."""
    from graphopt import ort
    threads = int(spec["threads"])
    feeds = ort.random_inputs(input_specs(Path(spec["feeds_from"])), spec["seed"])
    if spec["engine"] == "onnxruntime":
        sess = ort.session(Path(spec["model"]).read_bytes(), optimize=True, threads=threads)
        return (lambda: sess.run(None, feeds)), {}
    if spec["engine"] == "openvino":
        from bench_int8 import openvino_session
        run, facts = openvino_session(spec["model"], threads, spec.get("hint"))
        return (lambda: run(feeds)), facts
    if spec["engine"] == "graphopt":
        from graphopt import Artifact
        art = Artifact(spec["model"])
        runner, arrays = art.runner(threads), art.check_inputs(feeds)
        return (lambda: runner(arrays)), {}
    raise ValueError(f"unknown engine {spec['engine']!r}")


def serve(conn: Connection, spec: dict) -> None:
    """The worker's loop (module docstring)."""
    try:
        fn, facts = load_engine(spec)
        fn()
        fn()
    except Exception as e:  # noqa: BLE001 - an engine failing on a model is a result, sent as its error cell
        conn.send(("error", one_line(e)))
        return
    conn.send(("loaded", facts))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):     # the driver is gone
            return
        if msg[0] != "run":
            return
        try:
            reply = ("block", *run_block(fn, msg[1], msg[2]))
        except Exception as e:  # noqa: BLE001
            reply = ("error", one_line(e))
        try:
            conn.send(reply)
        except OSError:     # the driver is gone
            return


class Worker:
    """The driver's handle on one engine's worker process (module docstring)."""

    def __init__(self, spec: dict):
        ours, theirs = socket.socketpair()
        env = dict(os.environ, **{v: str(int(spec["threads"])) for v in THREAD_VARS})
        try:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(theirs.fileno()),
                                          json.dumps(spec)], pass_fds=(theirs.fileno(),), env=env,
                                         start_new_session=True, stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())

    def loaded(self) -> dict:
        """Wait for the engine to load and warm up: its facts (OpenVINO: the precision it runs in)."""
        return self._answer(LOAD_S)[1]

    def block(self, per_round_s: float, min_iters: int) -> tuple[list[float], float, float]:
        """One round's block of run_block in the worker: (latencies, worker CPU seconds, wall seconds)."""
        try:
            self.conn.send(("run", per_round_s, min_iters))
        except OSError:
            raise WorkerError(self._exit_text()) from None
        return self._answer(BLOCK_S + per_round_s)[1:]

    def _answer(self, timeout: float) -> tuple:
        if not self.conn.poll(timeout):
            self.close()
            raise WorkerError(f"worker gave no answer in {timeout:.0f} s (killed)")
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            raise WorkerError(self._exit_text()) from None
        if reply[0] == "error":
            raise WorkerError(reply[1])
        return reply

    def _exit_text(self) -> str:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.close()
            return "worker closed its pipe but did not exit (killed)"
        if rc < 0:
            return f"worker killed by {signal.Signals(-rc).name}"
        return f"worker exited with code {rc}"

    def close(self) -> None:
        """Ask the worker to quit; kill it if it has not exited within 5 s. Safe to call more than once."""
        if self.proc.poll() is None:
            try:
                self.conn.send(("quit",))
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.conn.close()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    serve(Connection(int(sys.argv[1])), json.loads(sys.argv[2]))
