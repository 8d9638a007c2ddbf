"""Run onnx's backend node test suite through graphopt's CPU target and count what passes.

    .venv/bin/python tools/conformance.py [--filter REGEX] [--limit N] [--json OUT.json] [--jobs N]
                                          [--timeout S] [--data DIR] [--check] [--quiet]

Each node test (onnx/backend/test/data/node/<test>/model.onnx with test_data_set_*/input_*.pb and output_*.pb;
onnx wheels that no longer ship that folder get it generated once from onnx's own test-case definitions into a
cache folder, see --data) is loaded with graphopt.load, taken through graphopt.api.prepare (pipeline, the CPU
target's legalization and its support check), lowered with target.lower and run with target.load's runner on the
test's own inputs -- not graphopt.compile, whose self-check uses random inputs some ops reject. Outputs are
compared like onnx's backend runner: same shape and dtype, rtol=1e-3 / atol=1e-7 for floats, exact equality for
integers and bools.

Tests run in worker subprocesses (--jobs of them) that are restarted when one dies (TVM can segfault) or runs
past --timeout, so one test can never take the run down. Every test gets one class:

    pass              outputs match
    fail              wrong numbers, shapes or dtypes
    skip-unsupported  graphopt refused it up front with UnsupportedModel (loader or the target's support check)
    error-graphopt    another GraphoptError, or a crash in graphopt's code (loader, folding, passes, target glue)
    error-tvm         TVM's importer, build or runtime raised (or the worker died / hung while TVM worked)
    ignored           the test has sequence / optional / map inputs or outputs (not tensors): not run

A fail, or an error-tvm raised by TVM's build or runtime (not its importer), also gets a "blame", found by
elimination (onnxruntime on the original and on the prepared graph, TVM without graphopt's CPU schedules):
reference, graphopt-prepare, graphopt-schedule or tvm; see blame().

--check exits 1 when any test fails or errors (skips and ignored tests do not count).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

CLASSES = ["pass", "fail", "skip-unsupported", "error-graphopt", "error-tvm", "ignored"]
BAD = ("fail", "error-graphopt", "error-tvm")
RTOL, ATOL = 1e-3, 1e-7
DEFAULT_TIMEOUT = 180.0
# Phases a test goes through in the worker; a crash or hang in the first two is graphopt's, later TVM's.
GRAPHOPT_PHASES = ("read", "load", "prepare")


# --------------------------------------------------------------------------------------------- test data

def _onnx_node_dir() -> Path:
    import onnx
    return Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "node"


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphopt"


def _has_tests(d: Path) -> bool:
    return d.is_dir() and any((p / "model.onnx").is_file() for p in d.iterdir() if p.is_dir())


def _generate(dest: Path, log) -> None:
    """Write onnx's node test cases (built in memory from onnx.backend.test.case.node) in the on-disk layout
    of onnx/backend/test/data/node, like onnx's own `backend-test-tools generate-data` does."""
    import warnings

    from onnx import TensorProto, numpy_helper
    from onnx.backend.test.loader import load_node_model_tests

    log(f"generating onnx's node tests into {dest} (once) ...")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import numpy as np
        with np.errstate(all="ignore"):
            cases = load_node_model_tests()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for case in cases:
            d = tmp / case.name
            d.mkdir()
            (d / "model.onnx").write_bytes(case.model.SerializeToString())
            for i, (inputs, outputs) in enumerate(case.data_sets):
                ds = d / f"test_data_set_{i}"
                ds.mkdir()
                for kind, values, infos in (("input", inputs, case.model.graph.input),
                                            ("output", outputs, case.model.graph.output)):
                    for j, value in enumerate(values):
                        t, name = infos[j].type, infos[j].name
                        if t.HasField("map_type"):
                            proto = numpy_helper.from_dict(value, name)
                        elif t.HasField("sequence_type"):
                            proto = numpy_helper.from_list(value, name)
                        elif t.HasField("optional_type"):
                            proto = numpy_helper.from_optional(value, name)
                        elif isinstance(value, TensorProto):
                            proto = value
                        else:
                            proto = numpy_helper.from_array(value, name)
                        (ds / f"{kind}_{j}.pb").write_bytes(proto.SerializeToString())
        (tmp / ".complete").write_text(f"{len(cases)}\n")
        try:
            os.rename(tmp, dest)
        except OSError:     # a concurrent run published it first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"generated {len(cases)} node tests in {time.perf_counter() - t0:.1f}s")


def find_data_dir(explicit: str | None, log) -> Path:
    if explicit:
        d = Path(explicit)
        if not _has_tests(d):
            raise SystemExit(f"conformance: {d}: no <test>/model.onnx folders there")
        return d
    shipped = _onnx_node_dir()
    if _has_tests(shipped):
        return shipped
    import onnx
    candidates = [_cache_root(), Path(tempfile.gettempdir()) / f"graphopt-{os.getuid()}"]
    for root in candidates:
        d = root / f"onnx-node-tests-{onnx.__version__}"
        if (d / ".complete").is_file():
            return d
    for root in candidates:
        d = root / f"onnx-node-tests-{onnx.__version__}"
        try:
            _generate(d, log)
        except OSError as e:
            log(f"cannot write {d} ({e}); trying the next place")
            continue
        if (d / ".complete").is_file():
            return d
    raise SystemExit("conformance: could not find or generate onnx's node tests; pass --data DIR")


def list_tests(data: Path, pattern: str | None, limit: int | None) -> list[str]:
    rx = re.compile(pattern) if pattern else None
    names = sorted(p.name for p in data.iterdir() if p.is_dir() and (p / "model.onnx").is_file())
    if rx is not None:
        names = [n for n in names if rx.search(n)]
    return names[:limit] if limit else names


# ------------------------------------------------------------------------------------------------ worker

def _first_meaningful_line(text: str) -> str:
    """First line of an error message that is not traceback noise (TVM puts C++ frames in its messages)."""
    lines = [ln.strip() for ln in str(text).splitlines()]
    skip = re.compile(r"^(Traceback|File \"|\d+: |During handling|The above exception|\^+$|~+$|-+$)")
    good = [ln for ln in lines if ln and not skip.match(ln)]
    return good[0] if good else ""


def _frames(exc: BaseException):
    return traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []


def _origin(path: str) -> str:
    p = path.replace("\\", "/")
    if p.endswith((".cc", ".h", ".cpp", ".pxi", ".pyx")) or "tvm::" in p:
        return "tvm"    # native frames tvm_ffi appends to Python tracebacks
    if "/graphopt/" in p and "/site-packages/" not in p or p.endswith("tools/conformance.py"):
        return "graphopt"
    for key, name in (("/tvm_ffi/", "tvm"), ("/tvm/", "tvm"), ("/onnx_graphsurgeon/", "onnx-graphsurgeon"),
                      ("/onnxruntime/", "onnxruntime"), ("/onnx/", "onnx"), ("/numpy/", "numpy")):
        if key in p:
            return name
    return "other"


def _short(path: str) -> str:
    p = path.replace("\\", "/")
    for key in ("/graphopt/", "/site-packages/"):
        if key in p:
            return p.rsplit(key, 1)[1] if key == "/site-packages/" else "graphopt/" + p.rsplit(key, 1)[1]
    return os.path.basename(p)


def _chain(exc: BaseException):
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or (exc.__context__ if not exc.__suppress_context__ else None)
    return seen


def describe_exception(exc: BaseException) -> dict:
    """Type, message line, where it was raised (innermost frame), the innermost graphopt frame, and whether
    the exception (or its cause) was raised inside TVM."""
    frames = _frames(exc)
    raised = frames[-1] if frames else None
    ours = [f for f in frames if _origin(f.filename) == "graphopt" and not f.filename.endswith("conformance.py")]
    from_tvm = False
    for e in _chain(exc):
        fr = _frames(e)
        if fr and _origin(fr[-1].filename) == "tvm":
            from_tvm = True
        if type(e).__module__.startswith(("tvm", "tvm_ffi")):
            from_tvm = True
    msg = _first_meaningful_line(str(exc)) or type(exc).__name__
    return {
        "type": type(exc).__name__,
        "message": msg[:400],
        "raised_in": (f"{_short(raised.filename)}:{raised.lineno} {raised.name}" if raised else None),
        "raised_origin": _origin(raised.filename) if raised else None,
        "graphopt_frame": (f"{_short(ours[-1].filename)}:{ours[-1].lineno} {ours[-1].name}" if ours else None),
        "from_tvm": from_tvm,
    }


def _np_from_pb(path: Path):
    import onnx
    from onnx import numpy_helper
    t = onnx.TensorProto()
    t.ParseFromString(path.read_bytes())
    return t.name, numpy_helper.to_array(t)


def _non_tensor(model) -> list[str]:
    bad = []
    for vi in list(model.graph.input) + list(model.graph.output):
        kind = vi.type.WhichOneof("value")
        if kind != "tensor_type":
            bad.append(f"{vi.name}: {kind}")
    return bad


def compare_outputs(names, expected, got) -> str | None:
    """None when every output matches (onnx backend-test rules), else a one-line reason."""
    import numpy as np
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for name, ref, out in zip(names, expected, got):
        ref, out = np.asarray(ref), np.asarray(out)
        if out.shape != ref.shape:
            return f"output '{name}': shape {list(out.shape)}, expected {list(ref.shape)}"
        if ref.dtype == object or ref.dtype.kind in "US":
            if not np.array_equal(out, ref):
                return f"output '{name}': strings differ"
            continue
        if out.dtype != ref.dtype:
            return f"output '{name}': dtype {out.dtype}, expected {ref.dtype}"
        if ref.size == 0:
            continue
        if ref.dtype.kind in "biu":
            bad = out != ref
            if bad.any():
                i = np.unravel_index(np.argmax(bad), ref.shape)
                return (f"output '{name}': {int(bad.sum())}/{ref.size} elements differ "
                        f"(first at {list(map(int, i))}: got {out[i]!r}, expected {ref[i]!r})")
            continue
        rtol = RTOL
        if ref.dtype.kind not in "fc":             # bfloat16 / float8 (ml_dtypes): compare in float32
            rtol = max(RTOL, 2 ** -6) if "bfloat16" in ref.dtype.name else RTOL
            ref, out = ref.astype(np.float32), out.astype(np.float32)
        ok = np.isclose(out, ref, rtol=rtol, atol=ATOL, equal_nan=True)
        if not ok.all():
            with np.errstate(all="ignore"):
                diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
            diff = np.where(ok, 0, np.nan_to_num(diff, nan=np.inf))
            i = np.unravel_index(np.argmax(diff), ref.shape)
            return (f"output '{name}': {int((~ok).sum())}/{ref.size} elements off, max abs error "
                    f"{float(diff[i]):.3g} (at {list(map(int, i))}: got {out[i]!r}, expected {ref[i]!r})")
    return None


def _c_order(a):
    import numpy as np
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


class _Phase:
    def __init__(self, send):
        self.send, self.name = send, "read"

    def __call__(self, name):
        self.name = name
        self.send({"phase": name})


def run_test(test_dir: Path, send) -> dict:
    """Run one node test; returns {"status", "reason", "phase", ...}. Never raises."""
    phase = _Phase(send)
    res = {"ops": []}
    where_model = str(test_dir / "model.onnx")

    def finish(status, reason, **extra):
        res.update(status=status, reason=reason.replace(where_model, "<model>"), phase=phase.name, **extra)
        return res

    try:
        import numpy as np
        import onnx
        model = onnx.load_model(where_model, load_external_data=False)
        res["ops"] = sorted({n.op_type for n in model.graph.node})
        send({"ops": res["ops"]})
        res["opset"] = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        bad = _non_tensor(model)
        if bad:
            return finish("ignored", "non-tensor input/output: " + ", ".join(bad))
        sets = sorted(p for p in test_dir.iterdir() if p.is_dir() and p.name.startswith("test_data_set_"))
        if not sets:
            return finish("ignored", "no test_data_set_* folder")
        inits = {i.name for i in model.graph.initializer}
        in_names = [i.name for i in model.graph.input if i.name not in inits]
        out_names = [o.name for o in model.graph.output]
        datasets = []
        for ds in sets:
            ins = [_np_from_pb(p)[1] for p in sorted(ds.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))]
            outs = [_np_from_pb(p)[1] for p in sorted(ds.glob("output_*.pb"), key=lambda p: int(p.stem.split("_")[1]))]
            datasets.append((dict(zip(in_names, ins)), outs))
    except Exception as e:  # noqa: BLE001 - unreadable test data is reported, not fatal
        d = describe_exception(e)
        return finish("error-graphopt", f"reading the test: {d['type']}: {d['message']}", detail=d)

    try:
        phase("load")
        import graphopt
        from graphopt.api import prepare
        from graphopt.errors import GraphoptError, UnsupportedModel
        graph = graphopt.load(where_model)
        phase("prepare")
        prep = prepare(graph, "cpu", target_options={"cores": 1})
    except Exception as e:  # noqa: BLE001
        d = describe_exception(e)
        errors = sys.modules.get("graphopt.errors")     # None when graphopt itself does not import
        if errors is not None and isinstance(e, errors.UnsupportedModel):
            return finish("skip-unsupported", d["message"], detail=d)
        if errors is not None and isinstance(e, errors.GraphoptError):
            return finish("error-graphopt", f"{d['type']}: {d['message']}", detail=d)
        return finish("error-graphopt", f"{d['type']}: {d['message']} [{d['raised_in']}]", detail=d)

    target, mp = prep.target, prep.model_proto
    lowered_in = [i.name for i in mp.graph.input if i.name not in {t.name for t in mp.graph.initializer}]
    lowered_out = [o.name for o in mp.graph.output]
    missing_in = [n for n in lowered_in if n not in datasets[0][0]]
    if missing_in or lowered_out != out_names:
        return finish("error-graphopt", f"prepared graph's I/O differs from the model's: inputs {lowered_in} "
                      f"(model: {in_names}), outputs {lowered_out} (model: {out_names})")
    with tempfile.TemporaryDirectory(prefix="graphopt-conf-") as tmp:
        try:
            phase("lower")
            target.lower(mp, Path(tmp))
            phase("run")
            runner = target.load(Path(tmp), {}, threads=1)
            for i, (feeds, expected) in enumerate(datasets):
                # not np.ascontiguousarray: it turns 0-d (scalar) inputs into 1-d arrays
                arrays = [_c_order(feeds[n]) for n in lowered_in]
                got = runner(arrays)
                problem = compare_outputs(out_names, expected, got)
                if problem:
                    res = finish("fail", problem + (f" (data set {i})" if len(datasets) > 1 else ""))
                    send({"pending": res})      # what to record if the blame run below kills the worker
                    phase("blame")
                    res["blame"] = blame(model, mp, target, feeds, expected, out_names, lowered_in)
                    return res
        except Exception as e:  # noqa: BLE001
            d = describe_exception(e)
            if d["from_tvm"]:
                failed_in = phase.name
                res = finish("error-tvm", f"{d['type']}: {d['message']}", detail=d)
                if not (isinstance(e, UnsupportedModel) and "importer failed" in str(e)):
                    send({"pending": res})
                    phase("blame")       # TVM's build or runtime raised: would it without graphopt's schedules?
                    feeds, expected = datasets[0]
                    res["blame"] = blame(model, mp, target, feeds, expected, out_names, lowered_in, crashed=True)
                    phase.name = res["phase"] = failed_in
                return res
            if isinstance(e, GraphoptError):
                return finish("error-graphopt", f"{d['type']}: {d['message']}", detail=d)
            return finish("error-graphopt", f"{d['type']}: {d['message']} [{d['raised_in']}]", detail=d)
    return finish("pass", "")


def blame(model, mp, target, feeds, expected, out_names, lowered_in, crashed: bool = False) -> str:
    """Whose fault a wrong result (or, with crashed, a TVM build / runtime error) is, by elimination:
    graphopt-prepare  onnxruntime is right on the original model and wrong on graphopt's prepared graph
                      (loader: shape binding, folding; pipeline; legalization)
    graphopt-schedule TVM without graphopt's CPU schedules gets it right (for crashed: builds and runs at all)
    reference         onnxruntime disagrees with onnx's expected outputs too (a test quirk, undefined behaviour)
    tvm               none of the above: onnxruntime runs the prepared graph right, plain TVM does not"""
    from graphopt import ort as gort
    from graphopt.targets import tvm_lowering

    def check(run, exact=True):
        try:
            got = run()
        except Exception:  # noqa: BLE001
            return None
        return compare_outputs(out_names, expected, got) is None if exact else True

    def ort_on(m):
        names = {i.name for i in m.graph.input}
        res = gort.run(m, {k: v for k, v in feeds.items() if k in names})
        return [res[n] for n in out_names]

    orig_ok = check(lambda: ort_on(model))
    if orig_ok and check(lambda: ort_on(mp)) is False:
        return "graphopt-prepare"

    def plain_tvm():
        import onnx
        m = onnx.ModelProto.FromString(mp.SerializeToString())
        ex = tvm_lowering.build(tvm_lowering.import_onnx(m), target.tvm_target(), schedule=None)
        with tempfile.TemporaryDirectory(prefix="graphopt-conf-plain-") as d:
            tvm_lowering.export(ex, Path(d) / "plain.so")
            return tvm_lowering.VMRunner(Path(d) / "plain.so", threads=1)([_c_order(feeds[n]) for n in lowered_in])

    if check(plain_tvm, exact=not crashed):
        return "graphopt-schedule"
    return "reference" if orig_ok is False else "tvm"


def worker_main() -> int:
    """Read {"dir": ...} lines on stdin, answer progress and result lines on the original stdout. Anything else
    written to stdout (TVM, LLVM, onnxruntime) is moved to stderr so it cannot break the protocol."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import warnings
    warnings.simplefilter("ignore")

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:    # import up front, so per-test time (and --timeout) covers the test, not TVM's import
        import graphopt.api  # noqa: F401
        from graphopt.targets import cpu_schedules, tvm_lowering  # noqa: F401
        tvm_lowering.supported_onnx_ops()
    except Exception as e:  # noqa: BLE001 - each test will report the failure
        print(f"conformance worker: import failed: {e}", file=sys.stderr, flush=True)
    send({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        print(f"=== conformance: {Path(job['dir']).name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        res = run_test(Path(job["dir"]), send)
        res["seconds"] = round(time.perf_counter() - t0, 3)
        send({"result": res})
    return 0


# ------------------------------------------------------------------------------------------------ parent

class Worker:
    def __init__(self, logdir: Path, index: int, env: dict):
        self.log = logdir / f"worker-{index}.log"
        self.errf = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.errf, env=env, start_new_session=True)
        self.buf = b""
        self.test = None
        self.started = 0.0
        self.phase = None
        self.ops: list[str] = []
        self.pending: dict | None = None
        self.log_offset = 0
        self.ready = False

    def send(self, name: str, d: Path):
        self.test, self.started, self.phase, self.ops, self.pending = name, time.monotonic(), "start", [], None
        self.errf.flush()
        self.log_offset = self.log.stat().st_size
        self.proc.stdin.write((json.dumps({"dir": str(d)}) + "\n").encode())
        self.proc.stdin.flush()

    def read_messages(self) -> tuple[list[dict], bool]:
        """Messages available now, and whether the worker's stdout closed."""
        try:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
        except OSError:
            chunk = b""
        if not chunk:
            return [], True
        self.buf += chunk
        msgs = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                msgs.append(json.loads(line))
            except ValueError:
                pass
        return msgs, False

    def stderr_tail(self) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("=== conformance")]
        frames = [ln for ln in lines if ln.startswith('File "')]
        if any("Segfault encountered" in ln for ln in lines) and frames:
            # TVM's handler prints native frames, innermost first: name the first one past the signal machinery
            funcs = [ln.rsplit(" in ", 1)[-1] for ln in frames if " in " in ln]
            funcs = [f for f in funcs if not re.search(r"sigaction|^0x|^kill$|^raise$|^abort$", f)]
            if funcs:
                return f"segfault in {funcs[0]}"[:300]
        lines = [ln for ln in lines if not ln.startswith('File "')]
        # the last line a dying TVM / LLVM / glibc writes is usually the one that says why
        keep = [ln for ln in lines if re.search(r"error|check failed|assert|fatal|abort|segmentation|terminate",
                                                ln, re.I)]
        return (keep or lines or [""])[-1][:300]

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.errf.close()

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001
            pass
        self.kill()


def _died_result(w: Worker, why: str) -> dict:
    phase = w.phase or "start"
    if phase == "blame" and w.pending:     # the test's own result stands; only the attribution run died
        return {**w.pending, "blame": f"unknown (the blame run {why})",
                "seconds": round(time.monotonic() - w.started, 3)}
    status = "error-graphopt" if phase in GRAPHOPT_PHASES or phase == "start" else "error-tvm"
    tail = w.stderr_tail()
    return {"status": status, "phase": phase, "reason": f"worker {why} during {phase}" + (f": {tail}" if tail else ""),
            "seconds": round(time.monotonic() - w.started, 3), "ops": list(w.ops)}


def run_all(data: Path, tests: list[str], jobs: int, timeout: float, log, recycle: int = 300) -> dict[str, dict]:
    env = dict(os.environ)
    env.setdefault("TVM_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    results: dict[str, dict] = {}
    queue = collections.deque(tests)
    total = len(tests)
    sel = selectors.DefaultSelector()
    logdir = Path(tempfile.mkdtemp(prefix="graphopt-conformance-"))
    workers: list[Worker] = []
    served: dict[Worker, int] = {}
    index = 0

    def start():
        nonlocal index
        w = Worker(logdir, index, env)
        index += 1
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        workers.append(w)
        served[w] = 0
        return w

    def retire(w: Worker, kill: bool):
        sel.unregister(w.proc.stdout)
        w.kill() if kill else w.close()
        workers.remove(w)
        served.pop(w, None)

    def record(name, res):
        results[name] = res
        s = res["status"]
        line = f"[{len(results)}/{total}] {name}: {s} ({res.get('seconds', 0):.1f}s)"
        if s != "pass" and res.get("reason"):
            line += f"  {res['reason'][:200]}"
        log(line)

    def feed(w: Worker):
        if queue and w.ready:
            name = queue.popleft()
            w.send(name, data / name)

    try:
        for _ in range(max(1, min(jobs, len(tests)))):
            start()
        while len(results) < total:
            events = sel.select(timeout=1.0)
            for key, _ in events:
                w: Worker = key.data
                if w not in workers:
                    continue
                msgs, closed = w.read_messages()
                for m in msgs:
                    if m.get("ready"):
                        w.ready = True
                        w.phase = None
                    elif "phase" in m:
                        w.phase = m["phase"]
                    elif "ops" in m:
                        w.ops = m["ops"]
                    elif "pending" in m:
                        w.pending = m["pending"]
                    elif "result" in m and w.test is not None:
                        record(w.test, m["result"])
                        w.test = None
                        served[w] += 1
                if closed:
                    if w.test is not None:
                        rc = w.proc.poll()
                        if rc is None:
                            try:
                                rc = w.proc.wait(timeout=5)
                            except subprocess.TimeoutExpired:
                                rc = None
                        why = (f"died ({signal.Signals(-rc).name})" if rc is not None and rc < 0
                               else f"exited with code {rc}")
                        record(w.test, _died_result(w, why))
                    elif not w.ready:
                        log(f"a worker exited before it was ready; see {w.log}")
                        # a worker that cannot even start would loop forever: give up on the rest
                        tail = Worker.stderr_tail(w)
                        for name in list(queue):
                            record(name, {"status": "error-graphopt", "phase": "start", "ops": [],
                                          "reason": f"worker could not start: {tail}"})
                        queue.clear()
                    retire(w, kill=True)
                    if queue:
                        start()
                elif w.test is None:
                    if served[w] >= recycle and queue:       # TVM grows: start fresh now and then
                        retire(w, kill=False)
                        start()
                    else:
                        feed(w)
            now = time.monotonic()
            for w in list(workers):
                if w.test is not None and now - w.started > timeout:
                    record(w.test, _died_result(w, f"timed out after {timeout:.0f}s"))
                    retire(w, kill=True)
                    if queue:
                        start()
            if not workers and len(results) < total:
                start()
    finally:
        for w in list(workers):
            retire(w, kill=True)
        shutil.rmtree(logdir, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------------------------- summary

def primary_op(name: str, res: dict, results: dict[str, dict]) -> str:
    """The op a test is about: its single op type, or for an *_expanded test the op of its base test."""
    m = re.match(r"(.*?)_expanded(_ver\d+)?$", name)
    if m:
        base = results.get(m.group(1))
        if base and len(base.get("ops", [])) == 1:
            return base["ops"][0] + " (expanded)"
        return "? (expanded)"
    ops = res.get("ops") or []
    if len(ops) == 1:
        return ops[0]
    return "+".join(ops) if ops else "?"


def reason_key(reason: str) -> str:
    r = reason
    r = re.sub(r"\(at \[[^\]]*\]: got .*\)$", "", r)             # fail: where and which values
    r = re.sub(r"nodes '.*$", "nodes ...", r)                    # unsupported: node list
    r = re.sub(r"(node|output|input|tensor) '[^']*'", r"\1 '…'", r)
    r = re.sub(r"\b\d+(\.\d+)?(e[-+]?\d+)?\b", "N", r)
    return r.strip()[:220]


def summarize(results: dict[str, dict], top: int = 15) -> str:
    out = []
    counts = collections.Counter(r["status"] for r in results.values())
    n = len(results)
    ran = n - counts.get("ignored", 0)
    out.append(f"\n{n} node tests ({ran} run, {counts.get('ignored', 0)} ignored: non-tensor types)\n")
    out.append(f"  {'class':<18}{'tests':>7}{'% of run':>10}")
    for c in CLASSES:
        pct = f"{100.0 * counts.get(c, 0) / ran:.1f}" if ran and c != "ignored" else ""
        out.append(f"  {c:<18}{counts.get(c, 0):>7}{pct:>10}")
    for cls in BAD + ("skip-unsupported",):
        groups = collections.defaultdict(list)
        for name, r in results.items():
            if r["status"] == cls:
                groups[reason_key(r.get("reason", ""))].append(name)
        if not groups:
            continue
        out.append(f"\ntop {cls} reasons ({len(groups)} distinct):")
        for key, names in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]:
            more = f", +{len(names) - 2} more" if len(names) > 2 else ""
            out.append(f"  {len(names):>5}  {key}\n         e.g. {', '.join(names[:2])}{more}")
    blamed = collections.Counter((r["status"], r["blame"]) for r in results.values() if r.get("blame"))
    if blamed:
        out.append("\nblame for fail / error-tvm at build or run, by elimination (see blame() in this file):")
        for (status, who), k in sorted(blamed.items(), key=lambda kv: (-kv[1], kv[0])):
            names = [n for n, r in results.items() if r["status"] == status and r.get("blame") == who]
            more = f", +{len(names) - 3} more" if len(names) > 3 else ""
            out.append(f"  {k:>5}  {status:<10} {who:<18} e.g. {', '.join(names[:3])}{more}")
    per_op = collections.defaultdict(collections.Counter)
    for name, r in results.items():
        per_op[primary_op(name, r, results)][r["status"]] += 1
    worst = sorted(((sum(c[s] for s in BAD), op, c) for op, c in per_op.items() if sum(c[s] for s in BAD)),
                   key=lambda t: (-t[0], t[1]))[:top * 2]
    if worst:
        out.append("\nop types with most failures (fail + error-*):")
        out.append(f"  {'op':<34}{'bad':>5}{'fail':>6}{'err-go':>8}{'err-tvm':>9}{'pass':>6}{'skip':>6}")
        for bad, op, c in worst:
            out.append(f"  {op:<34}{bad:>5}{c['fail']:>6}{c['error-graphopt']:>8}{c['error-tvm']:>9}"
                       f"{c['pass']:>6}{c['skip-unsupported']:>6}")
    return "\n".join(out)


def _versions() -> dict:
    v = {}
    for mod in ("onnx", "onnxruntime", "graphopt"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            v[mod] = None
    try:
        from importlib.metadata import version
        v["tvm"] = version("apache-tvm")
    except Exception:  # noqa: BLE001
        v["tvm"] = None
    return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--filter", help="only tests whose name matches this regular expression (re.search)")
    p.add_argument("--limit", type=int, help="at most N tests (after --filter, in name order)")
    p.add_argument("--json", help="write per-test status and reason to this file")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per test (default %(default)s)")
    p.add_argument("--data", help="folder of node tests (default: onnx's own, generated once when not shipped)")
    p.add_argument("--check", action="store_true", help="exit 1 when any test fails or errors")
    p.add_argument("--quiet", action="store_true", help="no per-test progress lines")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker_main()
    if a.jobs < 1 or (a.limit is not None and a.limit < 1) or a.timeout <= 0:
        p.error("--jobs, --limit and --timeout must be positive")
    try:
        re.compile(a.filter or "")
    except re.error as e:
        p.error(f"--filter: {e}")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    data = find_data_dir(a.data, log)
    tests = list_tests(data, a.filter, a.limit)
    if not tests:
        log(f"conformance: no test in {data} matches --filter {a.filter!r}")
        return 2
    log(f"running {len(tests)} node tests from {data} with {a.jobs} worker(s), {a.timeout:.0f}s per test")
    t0 = time.perf_counter()
    results = run_all(data, tests, a.jobs, a.timeout, (lambda m: None) if a.quiet else log)
    wall = time.perf_counter() - t0
    print(summarize(results))
    print(f"\nwall time {wall:.0f}s")
    if a.json:
        counts = collections.Counter(r["status"] for r in results.values())
        doc = {"data": str(data), "versions": _versions(), "filter": a.filter, "wall_seconds": round(wall, 1),
               "tolerance": {"rtol": RTOL, "atol": ATOL},
               "counts": {c: counts.get(c, 0) for c in CLASSES},
               "tests": {name: {**r, "op": primary_op(name, r, results)} for name, r in sorted(results.items())}}
        Path(a.json).write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
        log(f"wrote {a.json}")
    if a.check and any(r["status"] in BAD for r in results.values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
