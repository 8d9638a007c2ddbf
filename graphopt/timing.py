"""Timing a compiled artifact's library: a call on fixed seeded inputs, the clock it is timed with, interleaved
warm rounds (medians). Shared by the latency model (graphopt.latency) and the report's latency change (api)."""
from __future__ import annotations

import statistics
import time

ROUNDS = 9                  # interleaved timing rounds per layer (the median is kept)
SAMPLE_S = 1e-3             # each timing sample repeats the call for at least this long


def timer(art, threads: int | None):
    """A call running the artifact's library on fixed seeded inputs (inputs converted once, outputs not copied)."""
    from . import ort
    runner = art.runner(threads)
    from .check_inputs import file_input_ranges
    feeds = ort.random_inputs([(i["name"], tuple(i["shape"]), i["dtype"]) for i in art.inputs], 0,
                              file_input_ranges(art.path / "model.onnx"))
    arrays = art.check_inputs(feeds)
    main = getattr(runner, "main", None)
    if main is None:
        return lambda: runner(arrays)
    from .targets.base import to_tvm_cpu
    import tvm
    args = to_tvm_cpu(arrays, tvm)
    return lambda: main(*args)


def clock(threads: int | None):
    """What latency is timed with: the process's CPU time for one thread (what the call takes on a core of its own:
    preemption by other processes on a shared machine does not count), wall-clock time otherwise."""
    return time.process_time if threads == 1 else time.perf_counter


def clock_name(threads: int | None) -> str:
    return "process CPU time (1 thread)" if threads == 1 else "wall clock"


def time_interleaved(calls: list, rounds: int = ROUNDS, sample_s: float = SAMPLE_S, threads: int | None = None) \
        -> list[float]:
    """Median ms per call of each callable, timed in interleaved rounds (so load changes hit all alike) with
    clock(threads); in each round every callable runs once untimed first, so each is timed warm, as it runs back to
    back in deployment."""
    now = clock(threads)
    reps = []
    for fn in calls:
        fn()
        t0 = time.perf_counter()
        fn()
        reps.append(max(1, int(sample_s / max(time.perf_counter() - t0, 1e-7))))
    samples = [[] for _ in calls]
    for _ in range(rounds):
        for i, fn in enumerate(calls):
            fn()
            t0 = now()
            for _ in range(reps[i]):
                fn()
            samples[i].append((now() - t0) / reps[i] * 1e3)
    return [statistics.median(s) for s in samples]


#: how long time_apart runs an engine untimed before its rounds
SETTLE_S = 0.05


def time_engines(calls: list, rounds: int = ROUNDS, sample_s: float = SAMPLE_S, threads: int | None = None) \
        -> list[float]:
    """time_interleaved for calls of different engines (graphopt's library, onnxruntime sessions): on one thread
    interleaved; on more, each engine's rounds apart, after SETTLE_S of untimed calls. Each engine's idle pool
    threads spin for a while after its call (onnxruntime's workers, TVM's), and on cores the other engine needs:
    interleaved on 2 threads, graphopt's four 7x7x512 convs timed 16.0 ms right after onnxruntime calls, 3.4 ms
    apart (onnxruntime 4.2 and 3.1)."""
    if threads == 1 or len(calls) < 2:
        return time_interleaved(calls, rounds, sample_s, threads)
    out = []
    for fn in calls:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < SETTLE_S:
            fn()
        out.extend(time_interleaved([fn], rounds, sample_s, threads))
    return out

