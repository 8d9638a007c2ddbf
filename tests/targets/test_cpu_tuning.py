"""MetaSchedule tuning for the CPU target (graphopt/targets/cpu_tuning.py): a few trials on a tiny model into a
JSON database, then a fresh process compiles with the database and must apply its records."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_builders import model, rnd, vi

pytest.importorskip("tvm")

from graphopt.targets.cpu import CpuTarget  # noqa: E402
from graphopt.targets import cpu_tuning  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def tiny_model():
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Add", ["r", "x2"], ["y"])]
    return model(nodes, [vi("x", [1, 8, 16, 16]), vi("x2", [1, 16, 16, 16])], [vi("y", None)],
                 [("w", rnd(16, 8, 3, 3)), ("b", rnd(16, seed=1))])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    path = d / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    db = d / "db"
    seen = []
    summary = cpu_tuning.tune(onnx.load(str(path)), CpuTarget(), str(db), trials=4,
                              progress=lambda done, total: seen.append((done, total)))
    return path, db, summary, seen


def test_tune_writes_json_database(tuned):
    path, db, summary, seen = tuned
    assert (db / "database_workload.json").is_file()
    records = (db / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 2  # graphopt's default schedule + MetaSchedule's candidates
    assert summary["tasks"] == 1 and summary["trials"] == 4
    (fn, res), = summary["functions"].items()
    assert "conv2d" in fn and res["best_us"] <= res["default_us"] + 1e-6
    assert seen and seen[-1] == (4, 4)


def test_retuning_adds_records(tuned, tmp_path):
    path, db, _, _ = tuned
    before = len((db / "database_tuning_record.json").read_text().splitlines())
    cpu_tuning.tune(onnx.load(str(path)), CpuTarget(), str(db), trials=4)
    after = len((db / "database_tuning_record.json").read_text().splitlines())
    assert after > before


def test_pre_tuning_module_matches_compile(monkeypatch, tmp_path):
    """The module tune() extracts tasks from is the one compiling hands to the schedule hook (same structural
    hash, so the records apply)."""
    import tvm

    from graphopt.targets import cpu_schedules
    m = tiny_model()
    a = cpu_tuning.pre_tuning_module(m, CpuTarget())
    seen = {}
    real = cpu_schedules.schedule_module

    def hook(mod, target):
        seen["mod"] = mod
        return real(mod, target)
    monkeypatch.setattr(cpu_schedules, "schedule_module", hook)
    CpuTarget().lower(m, tmp_path)
    tvm.ir.assert_structural_equal(a, seen["mod"])


def test_fresh_process_applies_records(tuned, tmp_path):
    path, db, _, _ = tuned
    script = textwrap.dedent(f"""
        import json, sys
        import onnx
        import graphopt
        from graphopt.targets import cpu_schedules
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from scheduled_hook import recording_hook
        applied = []
        cpu_schedules.schedule_module = recording_hook(applied)
        art = graphopt.compile({str(path)!r}, out={str(tmp_path / "art")!r}, tuning_db={str(db)!r}, measure=False)
        print(json.dumps({{"applied": applied, "check": art.report["check"]}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert any("conv2d" in n for n in res["applied"]), res
    assert res["check"]["ok"], res
    np.testing.assert_array_less(res["check"]["max_abs_error"], 1e-3)


def test_a_task_whose_default_schedule_does_not_build_here_is_not_tuned(tmp_path):
    """A Gemm whose output width is padded to the register tile (MobileNetV2's 1280 -> 1000 classifier; here
    64 -> 100) has a default schedule MetaSchedule's builder cannot build ("Check failed: (load)"). Tuning it would
    let a slower candidate win with nothing to compare against, so tune leaves it out (summary "not_tuned"), writes
    no record for it, and compiling with the database gives it the default schedule."""
    import graphopt
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)]
    m = model(nodes, [vi("x", [1, 64])], [vi("y", None)], [("w", rnd(100, 64)), ("b", rnd(100, seed=1))])
    db = tmp_path / "db"
    summary = cpu_tuning.tune(m, CpuTarget(), str(db), trials=4)
    assert summary["trials"] == 0 and len(summary["not_tuned"]) == 1 and "matmul" in summary["not_tuned"][0]
    assert not (db / "database_tuning_record.json").exists() or \
        (db / "database_tuning_record.json").read_text().strip() == ""
    onnx.save(m, str(tmp_path / "m.onnx"))
    art = graphopt.compile(str(tmp_path / "m.onnx"), out=tmp_path / "a", tuning_db=str(db), measure=False)
    assert art.report["check"]["ok"]
