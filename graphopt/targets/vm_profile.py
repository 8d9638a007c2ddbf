"""Per-kernel time of a compiled library: every call the Relax VM makes, timed through the VM's instrument hook.

TVM 0.27's Relax VM has no built-in profiler (`profile=True` is gone); `VirtualMachine.set_instrument` calls back
before and after each Call instruction, so a call's duration is the time between the two callbacks (the callback's
own cost, about a microsecond, is inside it). Calls to the VM's builtins (allocation, shape checks) are kept and
marked, so per-kernel times add up to nearly the whole run."""
from __future__ import annotations

import time


def _shape(arg) -> list[int] | None:
    shape = getattr(arg, "shape", None)
    try:
        return [int(d) for d in shape] if shape is not None else None
    except TypeError:
        return None


def profile_calls(runner, arrays, repeat: int) -> dict:
    """Run `runner` (a tvm_lowering.VMRunner) `repeat` times with per-call timing after two warm-up runs.

    Returns {"calls": [{"kernel", "builtin", "shapes", "dtypes", "us": [one per run]}] in call order, "runs_us":
    end-to-end time of each instrumented run}. Shapes are those of the tensor arguments (inputs, weights, then the
    output for a PrimFunc)."""
    tvm = runner._tvm
    args = [tvm.runtime.tensor(a) for a in arrays]
    for _ in range(2):
        runner.main(*args)
    calls: list[dict] = []
    state = {"i": 0, "t": 0, "first": True}

    def instrument(func, symbol, before, ret, *call_args):
        if before:
            state["t"] = time.perf_counter_ns()
            return 0
        dt = (time.perf_counter_ns() - state["t"]) / 1e3
        if state["first"]:
            tensors = [a for a in call_args if _shape(a) is not None]
            calls.append({"kernel": str(symbol), "builtin": str(symbol).startswith("vm.builtin."),
                          "shapes": [_shape(a) for a in tensors],
                          "dtypes": [str(getattr(a, "dtype", "")) for a in tensors], "us": [dt]})
        else:
            calls[state["i"]]["us"].append(dt)
        state["i"] += 1
        return 0

    runner.vm.set_instrument(instrument)
    runs = []
    try:
        for r in range(repeat):
            state["i"], state["first"] = 0, r == 0
            t0 = time.perf_counter_ns()
            runner.main(*args)
            runs.append((time.perf_counter_ns() - t0) / 1e3)
            if state["i"] != len(calls):
                raise RuntimeError(f"the VM made {state['i']} calls in run {r + 1}, {len(calls)} in run 1")
    finally:
        runner.vm.set_instrument(None)
    return {"calls": calls, "runs_us": runs}
