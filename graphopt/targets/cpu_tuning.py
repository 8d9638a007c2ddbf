"""MetaSchedule tuning for the CPU target, into a persistent JSON database.

tune() tunes exactly the module tvm_lowering.build() schedules: it runs build() itself with a schedule hook
that captures the fused module and stops before compiling, so the structural hashes the records are keyed by
always match what `graphopt compile --tuning-db` looks up (the fusion pipeline lives in one place only).

Per task it first measures graphopt's default schedule (cpu_schedules) with the same builder and runner and
commits it as a tuning record, so the database's best record for a function is never worse than what compiling
without a database would give; MetaSchedule's evolutionary search then adds its own candidates. Only functions
with a reduction (convolutions, matmuls, pooling, normalisations) are tuned: elementwise functions gain nothing.

The database lives in db_dir as database_workload.json + database_tuning_record.json; running tune again adds
records to it (and MetaSchedule starts its search from the best ones already there).

With rpc="HOST:PORT" and key, candidates are measured on a device through a TVM RPC tracker instead of here:
tune first checks (within seconds, one-line BadInput otherwise) that the tracker answers, that a server is
registered under key and that a session on it can be had within rpc_wait seconds; candidates are then linked
here into shared libraries (the device needs no compiler) and every measurement is bounded
in time. The target must describe the device (target options mcpu, cores), not this machine.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
import time

from graphopt.errors import BadInput, GraphoptError

log = logging.getLogger("graphopt.cpu_tuning")


class _Captured(BaseException):
    """Raised by the schedule hook to stop build() once it has the fused module (a BaseException, so build's
    own error handling does not swallow it)."""

    def __init__(self, mod):
        super().__init__("captured")
        self.mod = mod


def pre_tuning_module(model, target_obj):
    """The fused IRModule that compiling `model` for target_obj hands to its schedule hook (before any schedule,
    without a tuning database): target_obj.lower() itself runs (same import, same int8 rewrite, same fusion
    pipeline) with tvm_lowering.build wrapped so that its schedule hook captures the module and stops."""
    import tempfile

    from . import tvm_lowering

    real_build = tvm_lowering.build

    def capture(m, _target):
        raise _Captured(m)

    def capturing_build(mod, target, schedule=None, tuning_db=None, **kw):
        return real_build(mod, target, schedule=capture, tuning_db=None, **kw)

    tvm_lowering.build = capturing_build
    try:
        with tempfile.TemporaryDirectory(prefix="graphopt-tune-") as tmp:
            target_obj.lower(model, tmp)
    except _Captured as c:
        return c.mod
    finally:
        tvm_lowering.build = real_build
    raise RuntimeError(f"{type(target_obj).__name__}.lower did not reach tvm_lowering.build's schedule hook")


def make_builder(max_workers: int | None = None, timeout_sec: float = 60.0, in_process: bool = False,
                 export: str = "tar"):
    """LocalBuilder whose workers register graphopt's build function (no tensor_intrin import), or, for small
    budgets, a builder running in this process. export: "tar" (object files, linked by the local runner) or
    "so" (shared libraries linked here, for RPC devices)."""
    from tvm.s_tir import meta_schedule as ms

    from . import cpu_tuning_worker as w
    if in_process:
        return w.in_process_builder(export)
    return ms.builder.LocalBuilder(max_workers=max_workers or max(1, os.cpu_count() or 1), timeout_sec=timeout_sec,
                                   f_build=w.BUILD_FUNC, f_export=w.EXPORT_SO_FUNC if export == "so" else w.EXPORT_FUNC,
                                   initializer=w.initialize)


RPC_WAIT_DEFAULT = 60.0     # seconds to wait for a free server under the key (GRAPHOPT_RPC_WAIT overrides)
RPC_CONNECT_TIMEOUT = 10.0  # seconds to open a connection to the tracker or a server


def parse_rpc(rpc: str) -> tuple[str, int]:
    """"HOST:PORT" -> (host, port), BadInput when malformed."""
    host, sep, port = str(rpc).strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"--rpc '{rpc}' is malformed; write HOST:PORT of the RPC tracker, e.g. 127.0.0.1:9190")
    return host, int(port)


def _rpc_wait(rpc_wait: float | None) -> float:
    if rpc_wait is not None:
        return float(rpc_wait)
    env = os.environ.get("GRAPHOPT_RPC_WAIT")
    try:
        return float(env) if env else RPC_WAIT_DEFAULT
    except ValueError:
        raise BadInput(f"GRAPHOPT_RPC_WAIT='{env}' is not a number of seconds") from None


def check_tracker(rpc: str, key: str, wait: float | None = None,
                  connect_timeout: float = RPC_CONNECT_TIMEOUT) -> dict:
    """Fail fast, with one line, when tuning through the tracker at rpc under key cannot work: the tracker does
    not answer, no server is registered under key, none is free within `wait` seconds, or the server it hands
    out cannot be reached. Opens (and closes) one session on the device. Returns {"servers", "free"}."""
    from . import cpu_tuning_worker as w

    host, port = parse_rpc(rpc)
    wait = _rpc_wait(wait)
    servers = []
    try:
        summary = w.tracker_summary(host, port, timeout=min(connect_timeout, 5.0))
        servers = [s for s in summary.get("server_info", []) if str(s.get("key", "")).partition(":")[2] == key]
        if not servers:
            keys = sorted({str(s.get("key", "")).partition(":")[2] for s in summary.get("server_info", [])})
            raise w.RPCUnavailable(
                f"no RPC server is registered under key '{key}' at the tracker {host}:{port} (keys there: "
                f"{', '.join(keys) or 'none'}); on the device run `python -m tvm.exec.rpc_server "
                f"--tracker {host}:{port} --key {key}`")
        free = int(summary.get("queue_info", {}).get(key, {}).get("free", 0))
        sess = w.request_session(host, port, key, session_timeout=max(10.0, connect_timeout), wait=wait,
                                 connect_timeout=connect_timeout)
    except w.RPCUnavailable as e:
        msg = str(e)
        if "no free RPC server" in msg:
            msg += f" ({len(servers)} registered, all busy; raise GRAPHOPT_RPC_WAIT to wait longer)"
        raise BadInput(msg) from None
    try:
        if not sess.cpu(0).exist:
            raise BadInput(f"the RPC server for key '{key}' at the tracker {host}:{port} has no CPU device")
    finally:
        del sess
    return {"servers": len(servers), "free": free}


def make_runner(rpc: str | None = None, key: str | None = None, timeout_sec: float = 30.0, repeat: int = 1,
                wait: float | None = None, connect_timeout: float = RPC_CONNECT_TIMEOUT):
    """LocalRunner, or with rpc ("HOST:PORT" of a tracker) and key an RPCRunner measuring on the device. Each
    RPC measurement is bounded: at most `wait` s for a free server, connect_timeout s per connection,
    timeout_sec s for the session on the device (the server kills it after that)."""
    from tvm.s_tir import meta_schedule as ms

    from . import cpu_tuning_worker as w
    config = ms.runner.EvaluatorConfig(number=3, repeat=repeat, min_repeat_ms=40, enable_cpu_cache_flush=False)
    if rpc:
        host, port = parse_rpc(rpc)
        wait = _rpc_wait(wait)
        rpc_config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                         session_timeout_sec=timeout_sec, session_priority=1)
        runner = ms.runner.RPCRunner(
            rpc_config=rpc_config, evaluator_config=config,
            f_create_session=functools.partial(w.create_session, wait=wait, connect_timeout=connect_timeout))
        # MetaSchedule gives the RPC runner's worker pool no time limit, so a device that stops answering in
        # the middle of a session would block tuning for ever: bound each measurement (the pool then reports a
        # timeout for that candidate and restarts its worker)
        pool = getattr(runner, "pool", None)
        if pool is not None and hasattr(pool, "_timeout"):
            pool._timeout = wait + 2 * connect_timeout + timeout_sec + 30
        return runner
    return ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=config)


def _set_repeat(runner, repeat: int) -> None:
    """Change the repeat count of a runner made by make_runner (both kinds read evaluator_config per batch),
    without starting another worker pool."""
    c = runner.evaluator_config
    runner.evaluator_config = type(c)(number=c.number, repeat=repeat, min_repeat_ms=c.min_repeat_ms,
                                      enable_cpu_cache_flush=c.enable_cpu_cache_flush)


def _has_reduction(func) -> bool:
    from tvm.s_tir import Schedule

    from .cpu_sched_common import iter_kinds
    try:
        sch = Schedule(func)
        todo = list(sch.get_child_blocks(sch.get_sblock("root")))
        while todo:
            b = todo.pop()
            if "R" in iter_kinds(sch, b):
                return True
            todo.extend(sch.get_child_blocks(b))
    except Exception:  # noqa: BLE001
        return False
    return False


def _flops(func) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops
    try:
        import tvm
        return float(estimate_tir_flops(tvm.IRModule({"main": func})))
    except Exception:  # noqa: BLE001
        return 0.0


def select_tasks(tasks, min_share: float = 0.002):
    """Tasks worth tuning: functions with a reduction, heaviest first, dropping those below min_share of the
    total estimated FLOPs. Kernels graphopt's Relax rewrites made already scheduled (int8, bf16, Winograd) are not
    tuned: their schedules are built with them."""
    cands = []
    for t in tasks:
        func = t.dispatched[0]["main"]
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs or not _has_reduction(func):
            continue
        cands.append((t, _flops(func) * t.weight))
    total = sum(f for _, f in cands) or 1.0
    cands.sort(key=lambda tf: -tf[1])
    return [t for t, f in cands if f >= min_share * total or len(cands) <= 4]


def _commit_default_schedules(tasks, target, consts, database, builder, runner, errors=None,
                              unmeasured=None) -> dict:
    """Measure graphopt's default schedule for every task (several repeats, keeping the fastest) and commit it
    as a tuning record. Keeping the fastest biases the database towards the default schedule: on a busy machine
    a single unlucky measurement must not let a slower MetaSchedule candidate win. The names of tasks that have a
    default schedule which did not build or run are appended to `unmeasured`."""
    from tvm.s_tir import meta_schedule as ms

    from .cpu_schedules import default_schedule
    done = {}
    errors = [] if errors is None else errors
    inputs, records = [], []
    for t in tasks:
        mod = t.dispatched[0]
        sch, rule, _ = default_schedule(mod, target, consts.get(t.task_name, set()))
        if sch is None:
            continue
        inputs.append(ms.builder.BuilderInput(sch.mod, target))
        records.append((t, mod, sch, rule))
    if not inputs:
        return done
    from .cpu_tuning_worker import remove_artifact
    built = builder.build(inputs)
    run_inputs, keep = [], []
    for (t, mod, sch, rule), b in zip(records, built):
        if b.error_msg:
            log.warning("default schedule of %s did not build: %s", t.task_name, b.error_msg.splitlines()[-1:])
            if unmeasured is not None:
                unmeasured.append(t.task_name)
            continue
        run_inputs.append(ms.runner.RunnerInput(b.artifact_path, "cpu",
                                                ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)))
        keep.append((t, mod, sch, rule, b))
    futures = runner.run(run_inputs)
    for (t, mod, sch, rule, b), fut in zip(keep, futures):
        res = fut.result()
        remove_artifact(b.artifact_path)
        if res.error_msg or not res.run_secs:
            log.warning("default schedule of %s did not run: %s", t.task_name, (res.error_msg or "").splitlines()[-1:])
            errors.append(res.error_msg or "no run time")
            if unmeasured is not None:
                unmeasured.append(t.task_name)
            continue
        best = min(float(s) for s in res.run_secs)
        workload = database.commit_workload(mod)
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, [best], target, ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        done[t.task_name] = (rule, best)
    return done


def _first_error_line(msg: str | None) -> str:
    """The line of a MetaSchedule runner error that says what went wrong (its messages start with a generic
    "RPCRunner: An exception occurred" and may carry a traceback)."""
    lines = [ln.strip() for ln in (msg or "").splitlines() if ln.strip()]
    generic = ("RPCRunner: An exception occurred", "LocalRunner: An exception occurred", "Traceback", "File ")
    useful = [ln for ln in lines if not ln.startswith(generic)]
    line = useful[-1] if useful else lines[-1] if lines else "unknown error"
    line = re.sub(r"^(?:[A-Za-z_]\w*\.)+(\w+: )", r"\1", line)  # pkg.module.Error: ... -> Error: ...
    return line.removeprefix("RPCUnavailable: ")[:300]


def _measure_counter():
    """Measure callback counting candidates that ran (and keeping the first error), and removing each
    candidate's artifact folder (MetaSchedule's RemoveBuildArtifact removes the file only)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    from .cpu_tuning_worker import remove_artifact

    @derived_object
    class _Count(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.ok = 0
            self.failed = 0
            self.first_error = None

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            for b, r in zip(builder_results, runner_results):
                remove_artifact(b.artifact_path)
                if r.error_msg or not r.run_secs:
                    self.failed += 1
                    self.first_error = self.first_error or r.error_msg or b.error_msg
                else:
                    self.ok += 1

    return _Count()


def _progress_callback(progress, total: int):
    from tvm.s_tir import meta_schedule as ms

    from tvm.ir.utils import derived_object

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.done = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.done += len(measure_candidates)
            progress(min(self.done, total), total)

    return _Progress()


class _LightTensorIntrin:
    """MetaSchedule's TuneContext imports tvm.s_tir.tensor_intrin, whose CUDA half parses hundreds of TVMScript
    functions (30-130 s, slower the more modules the process has loaded). CPU tuning needs only the x86
    intrinsics: while tuning, the package is a stub holding just those; afterwards the stub is removed again so
    a later `import tvm.s_tir.tensor_intrin` in this process loads the real package."""

    NAME = "tvm.s_tir.tensor_intrin"

    def __enter__(self):
        import importlib
        import importlib.util
        import types
        self.installed = False
        if self.NAME in sys.modules:
            return self
        spec = importlib.util.find_spec(self.NAME)
        if spec is None or not spec.submodule_search_locations:
            return self
        stub = types.ModuleType(self.NAME, "graphopt stub: x86 intrinsics only")
        stub.__path__ = list(spec.submodule_search_locations)
        stub.__package__ = self.NAME
        sys.modules[self.NAME] = stub
        self.installed = True
        try:
            importlib.import_module(self.NAME + ".x86")
        except Exception as e:  # noqa: BLE001 - tuning still works without tensorization candidates
            log.debug("x86 tensor intrinsics unavailable: %s", e)
        return self

    def __exit__(self, *exc):
        if self.installed and isinstance(sys.modules.get(self.NAME), type(sys)) and \
                getattr(sys.modules[self.NAME], "__doc__", "") == "graphopt stub: x86 intrinsics only":
            del sys.modules[self.NAME]
            import tvm.s_tir as s_tir
            if getattr(getattr(s_tir, "tensor_intrin", None), "__doc__", "") == "graphopt stub: x86 intrinsics only":
                delattr(s_tir, "tensor_intrin")
        return False


def _quiet_metaschedule() -> None:
    """MetaSchedule logs every round at INFO on the console; keep that in its per-task log files only.
    Its logger set-up (re-run by every tuning call) lists the logger's current handlers by name and fails on
    unnamed ones, so start each call from a logger without handlers."""
    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    for h in list(lg.handlers):
        lg.removeHandler(h)
    if lg.level == logging.NOTSET or lg.level < logging.WARNING:
        lg.setLevel(logging.WARNING)


def tune(model, target_obj, db_dir: str, trials: int, progress=None, rpc: str | None = None,
         key: str | None = None, in_process_builder: bool | None = None, rpc_wait: float | None = None) -> dict:
    """Tune the fused functions of model for target_obj (a CpuTarget) with MetaSchedule, adding records to the
    JSON database in db_dir. progress: None, a callable(done_trials, total_trials), a graphopt.progress.Progress,
    or True (a bar on a terminal, plain lines otherwise, on stderr). in_process_builder: build candidates in this process (default: when measurement batches are
    small, below 16 candidates, where starting worker processes per batch would dominate). rpc ("HOST:PORT" of a
    TVM RPC tracker) and key: measure on the device registered under key (see the module docstring); rpc_wait:
    seconds to wait for a free server (default GRAPHOPT_RPC_WAIT or 60). Returns a summary (tasks, trials,
    seconds, per-function best times; with rpc, "rpc": tracker, key and the number of measurements done there)."""
    t0 = time.perf_counter()
    if (rpc is None) != (key is None) or (rpc is not None and not str(key).strip()):
        raise BadInput("--rpc and --key go together: give both (a non-empty key) or neither")
    rpc_info = None
    if rpc is not None:
        rpc_wait = _rpc_wait(rpc_wait)
        rpc_info = {"tracker": rpc, "key": key, **check_tracker(rpc, key, wait=rpc_wait)}
        log.info("RPC tracker %s: %d server(s) under key %s (%.1f s)", rpc, rpc_info["servers"], key,
                 time.perf_counter() - t0)
    _quiet_metaschedule()
    from graphopt.progress import Progress
    if progress is True:
        progress = Progress.for_stream(sys.stderr)
    reporter = progress if isinstance(progress, Progress) else Progress("off")
    os.makedirs(db_dir, exist_ok=True)
    with _LightTensorIntrin(), reporter.task("tuning trials", trials) as update:
        callback = (lambda done, total: update(done, new_total=total)) if isinstance(progress, Progress) else \
            (progress or None)
        return _tune(model, target_obj, db_dir, trials, callback, rpc, key, in_process_builder, t0, rpc_wait,
                     rpc_info)


def _tune(model, target_obj, db_dir, trials, progress, rpc, key, in_process_builder, t0, rpc_wait=None,
          rpc_info=None) -> dict:
    from tvm.s_tir import meta_schedule as ms

    from .cpu_schedules import constant_params, register_fast_math

    register_fast_math()
    target = target_obj.tvm_target()
    fused = pre_tuning_module(model, target_obj)
    consts = constant_params(fused)
    with target:
        all_tasks = ms.relax_integration.extract_tasks(fused, target)
    tasks = select_tasks(all_tasks)
    log.info("%d of %d functions to tune (%.1f s)", len(tasks), len(all_tasks), time.perf_counter() - t0)
    database = ms.database.JSONDatabase(work_dir=db_dir, module_equality="structural")
    if in_process_builder is None:
        # small batches: starting builder worker processes per batch would dominate
        in_process_builder = trials // max(1, 2 * len(tasks)) < 16
    builder = make_builder(in_process=in_process_builder, export="so" if rpc else "tar")
    log.info("builder ready (%.1f s)", time.perf_counter() - t0)
    summary = {"db": str(db_dir), "tasks": len(tasks), "tasks_total": len(all_tasks), "trials": 0}
    if rpc_info is not None:
        summary["rpc"] = dict(rpc_info, measured=0)
    if not tasks:
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        return summary
    # defaults: 5 repeats each (the search keeps 1 per candidate)
    runner = make_runner(rpc, key, repeat=5, wait=rpc_wait)
    errors, skipped = [], []
    defaults = _commit_default_schedules(tasks, target, consts, database, builder, runner, errors, skipped)
    _set_repeat(runner, 1)
    log.info("default schedules measured after %.1f s", time.perf_counter() - t0)
    if rpc and errors and not defaults:
        raise GraphoptError(f"tuning through the RPC tracker {rpc} (key '{key}'): no measurement ran on the device: "
                            f"{_first_error_line(errors[0])}")
    # a task whose default schedule could not be measured here (MobileNetV2's padded classifier matmul does not
    # build in MetaSchedule's builder) is not tuned: nothing would keep a slower candidate from winning in the
    # database, while compiling without a record gives it the default schedule
    if skipped:
        log.warning("not tuned (default schedule not measurable here): %s", ", ".join(skipped))
        tasks = [t for t in tasks if t.task_name not in skipped]
        summary["not_tuned"] = skipped
    if not tasks:
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        return summary
    per_iter = max(4, min(64, trials // max(1, 2 * len(tasks))))
    # the evolutionary population is per task; small measurement batches need only a small population, or
    # generating candidates costs more than measuring them
    population = max(32, min(512, 8 * per_iter))
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population // 2),
        genetic_num_iters=4 if per_iter >= 32 else 2)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, work_dir=db_dir, strategy=strategy, num_threads=max(1, os.cpu_count() or 1))
    counter = _measure_counter()
    callbacks = list(ms.measure_callback.MeasureCallback.create("default")) + [counter]
    if progress is not None:
        callbacks = list(callbacks) + [_progress_callback(progress, trials)]
    ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=db_dir, max_trials_global=trials,
                       num_trials_per_iter=per_iter, builder=builder, runner=runner, database=database,
                       measure_callbacks=callbacks, task_scheduler="gradient", module_equality="structural")
    if rpc and counter.ok == 0 and counter.failed:
        raise GraphoptError(f"tuning through the RPC tracker {rpc} (key '{key}'): none of {counter.failed} candidates "
                            f"ran on the device: {_first_error_line(counter.first_error)}")
    best = {}
    for t in tasks:
        mod = t.dispatched[0]
        if not database.has_workload(mod):
            continue
        top = database.get_top_k(database.commit_workload(mod), 1)
        if top:
            secs = [float(s) for s in top[0].run_secs]
            best[t.task_name] = {"best_us": round(1e6 * sum(secs) / len(secs), 2),
                                 "default_us": round(1e6 * defaults[t.task_name][1], 2)
                                 if t.task_name in defaults else None}
    summary.update(trials=trials, seconds=round(time.perf_counter() - t0, 1), functions=best)
    if rpc_info is not None:
        summary["rpc"]["measured"] = len(defaults) + counter.ok
    if progress is not None:
        progress(trials, trials)
    return summary
