"""`graphopt tune --rpc HOST:PORT --key KEY` against a real TVM RPC tracker and RPC server on loopback (both
started here as subprocesses, in their own process groups, killed at the end): candidates are measured on the
server, the database they fill compiles a model that matches onnxruntime, and a tracker that cannot serve the
request fails with one line within seconds instead of hanging."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")
pytest.importorskip("tornado")  # the RPC tracker needs it (the tuning client does not)

from graphopt.errors import BadInput, GraphoptError  # noqa: E402
from graphopt.targets import cpu_tuning  # noqa: E402
from graphopt.targets.cpu import CpuTarget  # noqa: E402

from .test_cpu_tuning import tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GRAPHOPT = [sys.executable, "-m", "graphopt.cli"]
KEY = "graphopt-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(cond, timeout: float, what: str, logs=()):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {p}:\n{Path(p).read_text()[-2000:]}" for p in logs if Path(p).exists())
    raise AssertionError(f"{what} not within {timeout} s\n{tails}")


def _servers(port: int, key: str) -> dict | None:
    from tvm import rpc
    try:
        summary = rpc.connect_tracker("127.0.0.1", port).summary()
    except Exception:  # noqa: BLE001 - not up yet
        return None
    n = sum(1 for s in summary["server_info"] if s["key"] == f"server:{key}")
    return {"registered": n, **summary["queue_info"].get(key, {"free": 0, "pending": 0})}


def _tracker_up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def rpc_env(tmp_path_factory):
    """A tracker and one server registered under KEY, on 127.0.0.1 with free ports."""
    d = tmp_path_factory.mktemp("rpc")
    procs = []

    def start(args, log):
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT,
                                          cwd=str(d), start_new_session=True))  # own group: killpg takes workers too

    try:
        tp, sp = _free_port(), _free_port()
        tracker_log, server_log = d / "tracker.log", d / "server.log"
        start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tp), "--port-end", str(tp + 1)],
              tracker_log)
        _wait_for(lambda: _tracker_up(tp), 30, "RPC tracker listening", [tracker_log])
        start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sp), "--port-end", str(sp + 1),
               "--tracker", f"127.0.0.1:{tp}", "--key", KEY], server_log)
        _wait_for(lambda: (_servers(tp, KEY) or {}).get("free") == 1, 30, "RPC server registered at the tracker",
                  [tracker_log, server_log])
        yield {"rpc": f"127.0.0.1:{tp}", "port": tp, "server_log": server_log, "dir": d}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


@pytest.fixture(scope="module")
def tuned_rpc(rpc_env):
    d = rpc_env["dir"]
    path = d / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    db = d / "db"
    t0 = time.monotonic()
    out = subprocess.run([*GRAPHOPT, "tune", str(path), "--db", str(db), "--trials", "4",
                          "--rpc", rpc_env["rpc"], "--key", KEY, "--json"],
                         cwd=str(ROOT), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    # progress: plain lines on stderr when it is not a terminal (stdout stays the JSON summary)
    assert "graphopt: tuning trials 4/4 (100%)" in out.stderr, out.stderr[-3000:]
    return path, db, json.loads(out.stdout), time.monotonic() - t0


def test_candidates_are_measured_on_the_rpc_server(rpc_env, tuned_rpc):
    path, db, summary, secs = tuned_rpc
    assert summary["tasks"] == 1 and summary["trials"] == 4
    assert summary["rpc"]["key"] == KEY and summary["rpc"]["tracker"] == rpc_env["rpc"]
    # graphopt's default schedule + the 4 search candidates, all run on the server
    assert summary["rpc"]["measured"] == 5, summary
    records = [json.loads(line) for line in (db / "database_tuning_record.json").read_text().splitlines()]
    run_secs = [float(s) for _, (_trace, secs_, *_rest) in records for s in (secs_ or [])]
    measured = [s for s in run_secs if math.isfinite(s) and 0 < s < 1.0]
    assert len(measured) >= 2, run_secs
    (fn, res), = summary["functions"].items()
    assert "conv2d" in fn and res["best_us"] <= res["default_us"] + 1e-6
    # the server loaded every candidate as a shared library (linked here, no compiler needed there)
    log = rpc_env["server_log"].read_text()
    assert log.count("load_module") >= 5 and log.count(".so") >= 5, log[-3000:]
    assert ".tar" not in log
    # the server is back at the tracker, free, once tuning is done
    _wait_for(lambda: (_servers(rpc_env["port"], KEY) or {}).get("free") == 1, 15, "server free again")


def test_rpc_tuned_database_compiles_and_matches_onnxruntime(tuned_rpc, tmp_path, monkeypatch):
    import onnxruntime as ort

    import graphopt
    from graphopt.targets import cpu_schedules
    path, db, _, _ = tuned_rpc
    from .scheduled_hook import recording_hook
    applied = []
    monkeypatch.setattr(cpu_schedules, "schedule_module", recording_hook(applied))
    art = graphopt.compile(str(path), out=str(tmp_path / "art"), tuning_db=str(db), measure=False)
    assert any("conv2d" in n for n in applied), applied
    assert art.report["check"]["ok"], art.report["check"]
    rng = np.random.default_rng(7)
    feeds = {"x": rng.standard_normal((1, 8, 16, 16)).astype(np.float32),
             "x2": rng.standard_normal((1, 16, 16, 16)).astype(np.float32)}
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = art.run(feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _cli_error(args, timeout=60):
    t0 = time.monotonic()
    out = subprocess.run([*GRAPHOPT, *args], cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - t0


def test_unreachable_tracker_is_one_line_quickly(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    port = _free_port()  # nothing listens there
    out, secs = _cli_error(["tune", str(path), "--db", str(tmp_path / "db"), "--trials", "4",
                            "--rpc", f"127.0.0.1:{port}", "--key", KEY])
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the RPC tracker at 127.0.0.1:{port}" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert secs < 30, secs
    assert not (tmp_path / "db" / "database_tuning_record.json").exists()


def test_key_without_server_is_one_line(rpc_env, tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    out, secs = _cli_error(["tune", str(path), "--db", str(tmp_path / "db"), "--trials", "4",
                            "--rpc", rpc_env["rpc"], "--key", "no-such-board"])
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no RPC server is registered under key 'no-such-board'" in lines[0], out.stderr
    assert KEY in lines[0]  # names the keys that are there
    assert secs < 30, secs


def test_malformed_rpc_address():
    with pytest.raises(BadInput, match="malformed"):
        cpu_tuning.parse_rpc("127.0.0.1")
    with pytest.raises(BadInput, match="go together"):
        cpu_tuning.tune(tiny_model(), CpuTarget(), "unused-db", 4, rpc="127.0.0.1:9190", key=None)


def test_busy_key_times_out_with_one_line(rpc_env):
    """Every server under the key is held by another client: the check gives up after its wait."""
    from tvm import rpc
    held = rpc.connect_tracker("127.0.0.1", rpc_env["port"]).request(KEY, session_timeout=60)
    try:
        t0 = time.monotonic()
        with pytest.raises(BadInput, match=f"no free RPC server for key '{KEY}'.*1 registered, all busy"):
            cpu_tuning.check_tracker(rpc_env["rpc"], KEY, wait=1.0)
        assert time.monotonic() - t0 < 15
    finally:
        del held
    _wait_for(lambda: (_servers(rpc_env["port"], KEY) or {}).get("free") == 1, 15, "server free again")


def test_measurements_that_cannot_get_a_device_fail_clearly(rpc_env, tmp_path, monkeypatch):
    """The device goes away after the up-front check: every measurement gives up after the wait and tune stops
    with one GraphoptError instead of blocking (MetaSchedule's own session request waits for ever)."""
    monkeypatch.setattr(cpu_tuning, "check_tracker", lambda rpc, key, wait=None: {"servers": 1, "free": 1})
    t0 = time.monotonic()
    with pytest.raises(GraphoptError, match="no measurement ran on the device: no free RPC server for key 'gone'"):
        cpu_tuning.tune(tiny_model(), CpuTarget(), str(tmp_path / "db"), 4, rpc=rpc_env["rpc"], key="gone",
                        rpc_wait=1.0)
    assert time.monotonic() - t0 < 60
