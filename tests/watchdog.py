"""Compile-time watchdog for tests: a compile that runs past its bound fails the test instead of hanging CI.

A runaway compile spends its time inside LLVM (C++), where neither signal.alarm nor a timer thread can interrupt
it: the Python handler only runs once the C++ call returns. So compile_bounded runs graphopt.api.compile in a
child process with a CPU-time limit (RLIMIT_CPU: the kernel stops the child wherever it is) and a wall-clock
limit for a child that hangs without computing. CPU time, not wall time, is bounded so that a loaded machine
(other tests on the same two cores) does not fail a compile that is merely waiting for a core."""
from __future__ import annotations

import multiprocessing
import resource
import signal
import time
import traceback

import pytest

#: CPU seconds one compile may take (its self-check against onnxruntime and the child's imports included)
COMPILE_CPU_BOUND_S = 60
#: wall seconds per CPU second allowed before a child that does not finish is taken for hung
WALL_PER_CPU = 6


def _child(conn, model: str, cpu_bound: int, kwargs: dict) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_bound, cpu_bound + 5))
    try:
        from graphopt import api
        t0 = time.process_time()
        art = api.compile(model, **kwargs)
        conn.send(("ok", time.process_time() - t0, str(art.path)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test with it
        conn.send(("error", f"{type(e).__name__}: {e}", "".join(traceback.format_exc(limit=8))))


def compile_bounded(model, cpu_bound_s: int = COMPILE_CPU_BOUND_S, **kwargs) -> tuple[float, str]:
    """graphopt.api.compile(model, **kwargs) (model: a path) in a child process limited to cpu_bound_s CPU
    seconds. Returns (CPU seconds the compile took, artifact path); fails the test when the bound is exceeded
    or the compile raises. Give out= so the artifact outlives the child."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, str(model), int(cpu_bound_s), kwargs), daemon=True)
    proc.start()
    send.close()
    deadline = time.monotonic() + WALL_PER_CPU * cpu_bound_s
    hung = False
    try:
        while not recv.poll(1.0):
            if not proc.is_alive():
                break
            if time.monotonic() > deadline:
                hung = True
                break
        try:
            msg = recv.recv() if recv.poll(0) else None
        except EOFError:          # the child died without a word
            msg = None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
    if msg is None:
        if hung:
            why = f"did not finish within {WALL_PER_CPU * cpu_bound_s} s of wall time (hung)"
        elif proc.exitcode in (-signal.SIGXCPU, -signal.SIGKILL):
            why = f"was stopped at its limit of {cpu_bound_s} CPU seconds"
        else:
            why = f"died with exit code {proc.exitcode}"
        pytest.fail(f"compile of {model} {why}")
    if msg[0] == "error":
        pytest.fail(f"compile of {model} failed: {msg[1]}\n{msg[2]}")
    return msg[1], msg[2]
