"""tools/bench.py and tools/bench_int8.py: an engine that fails gets an error cell while the others are timed;
OpenVINO (the `bench` extra) takes the thread count and precision hint asked for and reports what it ran; the
fp32 / bf16 / int8 peak that "% of peak" uses is measured (tools/peak_flops.py); tools/profile_openvino.py sets
graphopt's kernels beside OpenVINO's profiled nodes."""
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_builders as ob

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench  # noqa: E402
import bench_int8  # noqa: E402
import peak_flops  # noqa: E402


def _conv_model(path):
    m = ob.model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c"], ["y"], name="relu")],
                 [ob.vi("x", [1, 3, 16, 16])], [ob.vi("y", [1, 8, 16, 16])], [("w", ob.rnd(8, 3, 3, 3))])
    onnx.save(m, str(path))
    return path


def test_failing_engine_gets_an_error_cell_and_the_others_are_timed(tmp_path):
    def broken():
        raise RuntimeError("no kernel for this op\nsecond line")

    samples, busy, cpu_ms, errors = bench.time_engines({"ok": lambda: sum(range(100)), "broken": broken},
                                                       rounds=2, per_round_s=0.01)
    assert set(samples) == {"ok"} and len(samples["ok"]) >= 6 and busy["ok"] > 0 and cpu_ms["ok"] >= 0
    assert errors == {"broken": "RuntimeError: second line"}

    rows = [{"model": "m", "threads": 1, "engine": "onnxruntime", "ms": 1.0, "min_ms": 0.9, "cpu_ms": 1.0,
             "ratio": 1.0, "vs_best_fp32": 1.0, "gflops": 1.0, "peak": 0.1, "compile_s": None, "n": 6, "busy": 1.0,
             "precision": None},
            {"model": "m", "threads": 1, "engine": "graphopt default", "error": errors["broken"]}]
    args = SimpleNamespace(models=["m"], rounds=2, round_seconds=0.01)
    peaks = {1: {"fp32": 280.0, "bf16": 560.0, "bf16_isa": "avx512", "isa": "avx512", "sgemm": 125.0}}
    bench.write_markdown(tmp_path / "b.md", rows, peaks, [], args, {"onnxruntime": "x"}, ((0.0,), (0.0,)))
    text = (tmp_path / "b.md").read_text()
    assert "| m | 1.00 | - | - | error: RuntimeError: second line | - | - | - |" in text
    assert "avx512f" in text and "amx_tile" in text and "Load average" in text
    assert "1 thread(s) avx512 fp32 280.0, bf16 (avx512) 560.0 GFLOP/s" in text
    assert "numpy sgemm 2048^3 (reference): 1 thread(s) 125.0 GFLOP/s" in text


def test_peak_is_measured_per_precision_and_not_below_numpy_sgemm():
    """The register-only loops reach at least half of what numpy's BLAS sgemm reaches (in practice about twice);
    bf16 rows are measured against the bf16 peak where the CPU has one."""
    peak = bench.peak_gflops(1, seconds=0.05, reps=2)
    assert math.isfinite(peak["fp32"]) and peak["fp32"] > 0 and peak["isa"] in ("avx512", "avx2")
    assert peak["fp32"] >= 0.5 * bench.sgemm_gflops(1, reps=3)
    has_bf16 = {"avx512f", "avx512_bf16"} <= peak_flops.cpu_flags()
    assert (peak["bf16"] is not None) == has_bf16
    if has_bf16:
        assert math.isfinite(peak["bf16"]) and peak["bf16"] > 0
    # where the CPU has AMX the bf16 peak is its tiles' (several times the vector units': 3.7 TFLOP/s against 240
    # fp32 on 1 thread of an Intel Xeon), which graphopt's and OpenVINO's bf16 convs run on there
    amx = {"amx_tile", "amx_bf16"} <= peak_flops.cpu_flags()
    assert peak["bf16_isa"] == ("amx" if amx else "avx512" if has_bf16 else None)
    if amx:
        assert peak["bf16"] > 4 * peak["fp32"]
    vnni = {"avx512f", "avx512_vnni"} <= peak_flops.cpu_flags()
    assert (peak["int8"] is not None) == (vnni or {"amx_tile", "amx_int8"} <= peak_flops.cpu_flags())
    if vnni and not amx:    # vpdpbusd: 64 multiply-adds per instruction against vfmadd231ps' 16
        assert peak["int8_isa"] == "vnni" and peak["int8"] > 2 * peak["fp32"]
    p = {"fp32": 100.0, "bf16": 200.0, "int8": 400.0}
    assert bench.row_peak(p, "graphopt bf16", None) == bench.row_peak(p, "openvino default", "bf16 20, f32 1") == 200
    assert bench.row_peak(p, "openvino default", "u8", int8=True) == bench.row_peak(p, "graphopt default", None, True) \
        == 400
    assert bench.row_peak(p, "openvino default", "u8 20, f32 1") == bench.row_peak(p, "onnxruntime", None) == 100
    assert bench.row_peak({"fp32": 100.0, "bf16": None}, "graphopt bf16", None) == 100


def test_openvino_takes_threads_and_precision_hint(tmp_path):
    pytest.importorskip("openvino")
    path = _conv_model(tmp_path / "conv.onnx")
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    run, facts = bench_int8.openvino_session(path, threads=1, precision="f32")
    out = next(iter(run(x).values()))
    from graphopt import ort
    np.testing.assert_allclose(out, ort.run(onnx.load(str(path)), x)["y"], rtol=1e-4, atol=1e-4)
    assert facts["threads"] == 1 and facts["hint"] == "f32"
    assert facts["compute_layers"] == {"f32": 1} and bench_int8.precision_text(facts) == "f32"
    _, default = bench_int8.openvino_session(path, threads=1)
    assert sum(default["compute_layers"].values()) == 1 and default["hint"] in ("f32", "bf16", "f16")


def _no_new_children(before):
    import psutil
    return {p.pid for p in psutil.Process().children(recursive=True)} <= before


def _has_openvino():
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def test_every_engine_is_timed_in_its_own_worker_and_none_is_left(tmp_path):
    """The default path: each engine loads in a worker process of its own; rows carry the worker's latency and its
    CPU time (busy > 0 although the driver only waits), OpenVINO its precision, and no worker outlives the run."""
    import psutil
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    _conv_model(tmp_path / "tiny.onnx")
    args = SimpleNamespace(tuned_db=None, precision=["fp32"], pipeline="", variant=[], rounds=1, round_seconds=0.05,
                           in_process=False, threads=[1])
    peaks = {1: {"fp32": 100.0, "bf16": None, "isa": "avx2", "sgemm": 50.0}}
    openvino = _has_openvino()
    rows, _ = bench.bench_model("tiny", args, tmp_path, peaks, openvino)
    assert [r for r in rows if "error" in r] == []
    engines = {r["engine"] for r in rows}
    assert engines == {"onnxruntime", "graphopt default"} | ({"openvino fp32", "openvino default"} if openvino else set())
    for r in rows:
        assert r["threads"] == 1 and r["ms"] > 0 and r["min_ms"] > 0 and r["busy"] > 0 and r["n"] >= 3, r
    if openvino:
        assert next(r for r in rows if r["engine"] == "openvino fp32")["precision"] == "f32"
    assert _no_new_children(before)


def test_worker_that_fails_to_load_or_dies_gets_an_error_cell_and_the_run_goes_on(tmp_path):
    import signal

    import psutil
    import bench_worker
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    model = str(_conv_model(tmp_path / "conv.onnx"))
    base = {"feeds_from": model, "seed": 0, "threads": 1}
    specs = {"onnxruntime": {**base, "engine": "onnxruntime", "model": model},
             "graphopt default": {**base, "engine": "graphopt", "model": str(tmp_path)}}   # not an artifact
    samples, busy, _, facts, errors = bench.time_in_workers(specs, rounds=2, per_round_s=0.02)
    assert set(samples) == {"onnxruntime"} and len(samples["onnxruntime"]) >= 6 and busy["onnxruntime"] > 0
    assert set(errors) == {"graphopt default"} and errors["graphopt default"].startswith("BadInput: ")
    assert "not a graphopt artifact" in errors["graphopt default"] and "\n" not in errors["graphopt default"]

    w = bench_worker.Worker(specs["onnxruntime"])
    try:
        assert w.loaded() == {}
        assert len(w.block(0.0, 2)[0]) == 2
        w.proc.send_signal(signal.SIGKILL)
        with pytest.raises(bench_worker.WorkerError, match="worker killed by SIGKILL"):
            w.block(0.0, 2)
    finally:
        w.close()
    assert _no_new_children(before)


def test_target_variant_builds_with_its_target_options(tmp_path):
    """--target-variant LABEL=KEY=VALUE builds the model with those cpu target options (compile_model's options)."""
    art, _ = bench.compile_model(_conv_model(tmp_path / "m.onnx"), tmp_path / "a", None, None, "fp32",
                                 {"winograd": "off"})
    assert art.manifest["target"]["winograd"] == "off"


def test_profile_openvino_sets_graphopt_kernels_beside_openvino_nodes(tmp_path, capsys):
    """tools/profile_openvino.py: per ONNX node, graphopt's kernel time and OpenVINO's PERF_COUNT time of the node
    it fused (the '/WithoutBiases' suffix stripped), on the artifact's model.onnx."""
    pytest.importorskip("openvino")
    import graphopt
    import profile_openvino
    assert profile_openvino.onnx_node_of("/a/conv/Conv/WithoutBiases", {"/a/conv/Conv", "/a"}) == "/a/conv/Conv"
    assert profile_openvino.onnx_node_of("x_QuantizeLinear", {"/a/conv/Conv"}) is None
    graphopt.compile(str(_conv_model(tmp_path / "m.onnx")), target="cpu", out=tmp_path / "art", measure=False)
    c = profile_openvino.compare(str(tmp_path / "art"), threads=1, repeat=3)
    assert [r[0] for r in c["rows"]] == ["conv"] and c["rows"][0][1] > 0 and c["rows"][0][2] > 0
    assert profile_openvino.main([str(tmp_path / "art"), "--repeat", "3"]) == 0
    assert "nodes both name" in capsys.readouterr().out
