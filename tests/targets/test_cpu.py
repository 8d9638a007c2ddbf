"""CPU target: every zoo model compiles and matches onnxruntime on the artifact's own model.onnx."""
import json
import os

import numpy as np
import pytest

import graphopt
import onnx_builders as ob
from graphopt import ort
from graphopt.artifact import Artifact, sha256
from graphopt.errors import BadInput, UnsupportedModel
from graphopt.targets.x86_isa import pick_mcpu

ZOO = ["resnet", "mobilenet_v3", "densenet", "inception", "resnext", "shufflenet", "vit", "convnext", "yolo", "unet",
       "lstm", "gru", "mlp_digits", "cnn_digits"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_compiles_and_matches_onnxruntime(zoo_onnx, tmp_path, name):
    art = graphopt.compile(zoo_onnx(name), target="cpu", out=tmp_path / name, pipeline="cleanup", measure=False)
    assert art.report["check"]["ok"]
    # independent re-check on fresh inputs, against onnxruntime on the ORIGINAL file
    feeds = ort.random_inputs([(i["name"], tuple(i["shape"]), i["dtype"]) for i in art.inputs], seed=7)
    want = ort.run(open(zoo_onnx(name), "rb").read(), feeds)
    got = art.run(feeds)
    for k, ref in want.items():
        np.testing.assert_allclose(got[k], ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def test_float64_arbiter_rejects_a_wrong_library(zoo_onnx, tmp_path):
    """Outside the fp32 tolerance the check asks float64 who is closer; a really wrong result stays wrong."""
    from graphopt import api
    art = graphopt.compile(zoo_onnx("cnn_digits"), target="cpu", out=tmp_path / "a", measure=False)
    feeds = ort.random_inputs([(i["name"], tuple(i["shape"]), i["dtype"]) for i in art.inputs], seed=0)
    ref = ort.run((art.path / "model.onnx").read_bytes(), feeds)
    got = {k: v + np.float32(0.01) * np.abs(v).max() for k, v in art.run(feeds).items()}
    verdict = api._fp64_arbiter(art, feeds, ref, got, seed=0)
    assert verdict["ok"] is False
    assert verdict["fp64_error_graphopt"] > 100 * verdict["fp64_error_onnxruntime"] > 0


def test_float64_arbiter_reads_softmax_and_sigmoid_outputs_as_logits():
    """A Softmax output taken back to centred log-probabilities recovers the logits' differences (so a near-tie,
    where the output error is largest, no longer decides the check); a Sigmoid's output its logit; the outputs
    that have such a producer are found, a Softmax before opset 13 only over the last axis."""
    from onnx import TensorProto, helper
    from graphopt import api
    from graphopt.graph import from_onnx
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (2, 5, 7))
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    np.testing.assert_allclose(api.logit_space(p, "Softmax", -1), z - z.mean(-1, keepdims=True), atol=1e-9)
    np.testing.assert_allclose(api.logit_space(1 / (1 + np.exp(-z)), "Sigmoid", 0), z, atol=1e-6)
    tied = np.array([[0.0, 0.0, -9.0]])                   # a near-tie: the same logit error, far larger output error
    e = np.array([[1e-4, -1e-4, 0.0]])
    sm = lambda v: np.exp(v) / np.exp(v).sum(-1, keepdims=True)   # noqa: E731
    out_err = np.abs(sm(tied + e) - sm(tied)).max()
    logit_err = np.abs(api.logit_space(sm(tied + e), "Softmax", -1) - api.logit_space(sm(tied), "Softmax", -1)).max()
    assert logit_err == pytest.approx(1e-4, rel=1e-3) and out_err > 0.4 * logit_err

    def graph(op, axis, opset):
        attrs = {"axis": axis} if op == "Softmax" else {}
        g = helper.make_graph([helper.make_node(op, ["x"], ["y"], **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 7])])
        return from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))
    assert api._saturating_outputs(graph("Softmax", 2, 12)) == {"y": ("Softmax", 2)}
    assert api._saturating_outputs(graph("Softmax", 1, 12)) == {}          # flattening semantics: not per row
    assert api._saturating_outputs(graph("Softmax", 1, 13)) == {"y": ("Softmax", 1)}
    assert api._saturating_outputs(graph("Sigmoid", 0, 13)) == {"y": ("Sigmoid", 0)}
    assert api._saturating_outputs(graph("Relu", 0, 13)) == {}


def test_artifact_layout_and_manifest(zoo_onnx, tmp_path):
    art = graphopt.compile(zoo_onnx("cnn_digits"), out=tmp_path / "a", pipeline="cleanup")
    files = sorted(p.name for p in art.path.iterdir())
    assert files == ["manifest.json", "model.onnx", "model.so", "report.json"]
    m = json.loads((art.path / "manifest.json").read_text())
    assert m["pipeline"]["resolved"] == "cleanup{max_iterations=8}"
    assert m["target"]["name"] == "cpu" and m["target"]["llvm_mcpu"]
    assert set(m["versions"]) >= {"graphopt", "tvm", "onnx", "onnxruntime"}
    assert m["inputs"] == [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert all(m["files"][f] == sha256(art.path / f) for f in ("model.onnx", "model.so"))
    assert m["passes"][0]["pass"].startswith("cleanup")
    rep = art.report
    assert rep["macs_before"] == rep["macs_after"] > 0 and rep["params_after"] < rep["params_before"]
    assert rep["latency"]["graphopt_ms"] > 0 and rep["latency"]["onnxruntime_ms"] > 0


def test_artifact_reloads_in_a_fresh_object_and_rejects_tampering(zoo_onnx, tmp_path):
    graphopt.compile(zoo_onnx("mlp_digits"), out=tmp_path / "a", measure=False)
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    y = Artifact(tmp_path / "a").run({"x": x})["y"]
    np.testing.assert_allclose(y, ort.run(open(zoo_onnx("mlp_digits"), "rb").read(), {"x": x})["y"], atol=1e-5)
    with open(tmp_path / "a" / "model.so", "ab") as f:
        f.write(b"junk")
    with pytest.raises(BadInput, match="does not match the manifest's sha256"):
        Artifact(tmp_path / "a")


@pytest.mark.parametrize("mcpu", ["haswell", "skylake-avx512"])
def test_other_isas_compile_and_run_here(zoo_onnx, tmp_path, mcpu):
    """AVX2 machines must work: build for haswell (and plain AVX-512) and run on this superset CPU."""
    art = graphopt.compile(zoo_onnx("resnext"), out=tmp_path / mcpu, target_options={"mcpu": mcpu}, measure=False)
    assert art.manifest["target"]["llvm_mcpu"] == mcpu
    assert art.report["check"]["ok"]


def test_mcpu_choice_from_flags():
    assert pick_mcpu({"sse4_2", "avx2", "fma"}) == "haswell"
    assert pick_mcpu({"sse4_2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"}) == "skylake-avx512"
    assert pick_mcpu({"sse4_2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "avx512_vnni",
                      "avx512vbmi", "avx512_vbmi2"}) == "icelake-server"      # Ice Lake has VBMI too
    assert pick_mcpu({"sse2"}) == "x86-64"


def test_unsupported_op_refused_up_front_with_names(tmp_path):
    with pytest.raises(UnsupportedModel, match=r"CenterCropPad: nodes 'crop' \(CenterCropPad\)"):
        graphopt.compile(ob.unsupported_op(), out=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert not list(tmp_path.iterdir()), "no half-written output"


def test_unknown_target_and_option(zoo_onnx, tmp_path):
    with pytest.raises(BadInput, match="unknown target 'tpu'"):
        graphopt.compile(zoo_onnx("mlp_digits"), target="tpu", out=tmp_path / "a")
    with pytest.raises(BadInput, match="unknown mcpu 'pentium9'"):
        graphopt.compile(zoo_onnx("mlp_digits"), target_options={"mcpu": "pentium9"}, out=tmp_path / "a")
    with pytest.raises(BadInput, match="layout is nhwc .* or nchw"):
        graphopt.compile(zoo_onnx("mlp_digits"), target_options={"layout": "nwhc"}, out=tmp_path / "a")
    assert not list(tmp_path.iterdir())


def test_layout_option_and_the_hint_it_gives(zoo_onnx, tmp_path):
    """layout=nhwc (the default) lowers convolutions channels-last, layout=nchw as ONNX has them; the manifest says
    which layout was built; a missed numeric check on the channels-last build names the NCHW build in its line."""
    from graphopt.targets.cpu import CpuTarget
    assert CpuTarget().layout == "nhwc" and "layout=nchw" in CpuTarget().numeric_hint()
    assert CpuTarget(layout="nchw").numeric_hint() is None
    art = graphopt.compile(zoo_onnx("resnet"), out=tmp_path / "a", target_options={"layout": "nchw"}, measure=False)
    assert art.manifest["target"]["layout"] == "nchw" and art.report["check"]["ok"]


def test_recompiling_into_an_existing_artifact_replaces_it(zoo_onnx, tmp_path):
    graphopt.compile(zoo_onnx("mlp_digits"), out=tmp_path / "a", measure=False)
    art = graphopt.compile(zoo_onnx("cnn_digits"), out=tmp_path / "a", measure=False)
    import onnx
    assert any(n.op_type == "Conv" for n in onnx.load(str(art.path / "model.onnx")).graph.node)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_refuses_to_overwrite_a_foreign_folder(zoo_onnx, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "precious.txt").write_text("keep me")
    with pytest.raises(BadInput, match="not a graphopt artifact"):
        graphopt.compile(zoo_onnx("mlp_digits"), out=tmp_path / "a")
    assert (tmp_path / "a" / "precious.txt").read_text() == "keep me"


def test_scalar_input_compiles_and_runs(tmp_path):
    from onnx import helper
    m = ob.model([helper.make_node("Clip", ["x", "lo"], ["y"], name="clip")],
                 [ob.vi("x", [3, 4]), ob.vi("lo", [])], [ob.vi("y", [3, 4])])
    art = graphopt.compile(m, out=tmp_path / "a", measure=False)
    y = art.run({"x": np.arange(12, dtype=np.float32).reshape(3, 4), "lo": np.array(5.0, np.float32)})["y"]
    assert y.min() == 5.0


def test_runner_passes_inputs_without_copies_and_returns_owned_outputs(tmp_path):
    """Inputs go to the VM through DLPack (aligned ones as they are, unaligned ones through an aligned copy);
    outputs are copies: a Reshape's result, which the VM may return as a view of its input, never aliases the
    caller's array."""
    from onnx import helper
    from graphopt.targets.base import TVM_ALIGN, _aligned, to_tvm_cpu
    m = ob.model([helper.make_node("Reshape", ["x", "s"], ["y"], name="r")], [ob.vi("x", [4, 6])],
                 [ob.vi("y", [6, 4])], inits=[("s", np.array([6, 4], np.int64))])
    art = graphopt.compile(m, out=tmp_path / "a", measure=False)
    raw = np.zeros(4 * 6 + 1, np.float32)
    x = raw[1:].reshape(4, 6)                   # 4-byte offset: not 64-byte aligned
    x[...] = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert x.ctypes.data % TVM_ALIGN != 0
    y = art.run({"x": x})["y"]
    np.testing.assert_array_equal(y, np.arange(24, dtype=np.float32).reshape(6, 4))
    x[...] = -1.0
    assert y[0, 0] == 0.0 and not np.shares_memory(y, x)
    import tvm
    aligned = _aligned(x)                       # an aligned copy of the unaligned array ...
    assert aligned.ctypes.data % TVM_ALIGN == 0 and not np.shares_memory(aligned, x)
    (t,) = to_tvm_cpu([aligned], tvm)           # ... is then passed as is (zero copy)
    assert np.shares_memory(np.from_dlpack(t), aligned)


def test_forms_tvm_gets_wrong_are_refused(tmp_path):
    from onnx import helper
    m = ob.model([helper.make_node("IsInf", ["x"], ["y"], name="isinf", detect_negative=0)],
                 [ob.vi("x", [4])], [ob.vi("y", [4], onnx_bool())])
    with pytest.raises(UnsupportedModel, match="node 'isinf' \\(IsInf\\): IsInf with detect_positive"):
        graphopt.compile(m, out=tmp_path / "a")


def onnx_bool():
    import onnx
    return onnx.TensorProto.BOOL


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a Linux process allowed on 2 or more cores")
def test_running_a_library_leaves_the_process_on_all_its_cores(tmp_path):
    """TVM's thread pool pins the calling thread to one core; left so, every thread started later from it
    (onnxruntime's pool in `graphopt bench`, torch's in compress) would share that core."""
    import graphopt
    import digits
    cores = os.sched_getaffinity(0)
    art = graphopt.compile(str(digits.teacher_path()), target="cpu", out=tmp_path / "a", measure=False)
    art.run({"x": np.zeros((1, 1, 8, 8), np.float32)})
    art.runner(1)
    assert os.sched_getaffinity(0) == cores


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a Linux process allowed on 2 or more cores")
def test_a_run_at_the_default_thread_count_leaves_every_core_to_later_runners(tmp_path):
    """TVM sizes its thread pool once, at first use, and never grows it: a first run without a thread count (the
    self-check inside compile) used to size it from TVM's own count of "big" cores (1 on a VM without cpufreq), so
    every later 2-thread runner in the process (bench, `graphopt compile`'s timing) ran on one thread."""
    import subprocess
    import sys
    import digits
    art = graphopt.compile(str(digits.teacher_path()), target="cpu", out=tmp_path / "a", measure=False)
    code = ("import numpy as np, tvm\nfrom graphopt.artifact import Artifact\n"
            f"art = Artifact({str(art.path)!r})\n"
            "art.run({'x': np.zeros((1, 1, 8, 8), np.float32)})\nart.runner(2)\n"
            "print(tvm.get_global_func('runtime.NumThreads')())\n")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "2"


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a Linux process allowed on 2 or more cores")
def test_a_default_runner_after_a_one_thread_runner_runs_on_every_core(tmp_path):
    """TVM's parallel launch reads $TVM_NUM_THREADS on every call and runs serially when it says 1. A 1-thread runner
    writes 1 there, and a runner without a thread count made after it (compile's check on 1 thread, then its latency
    report on all cores) used to keep that 1: the report gave ResNet-18 21.9 ms against onnxruntime's 2-thread 12.2.
    The variable now follows the latest runner; a value the user set is still what a runner without a count uses."""
    import subprocess
    import sys
    import digits
    art = graphopt.compile(str(digits.teacher_path()), target="cpu", out=tmp_path / "a", measure=False)
    code = ("import os\nfrom graphopt.artifact import Artifact\n"
            f"art = Artifact({str(art.path)!r})\n"
            "art.runner(1); print(os.environ['TVM_NUM_THREADS'])\n"
            "art.runner(None); print(os.environ['TVM_NUM_THREADS'])\n"
            "os.environ['TVM_NUM_THREADS'] = '1'; art.runner(2); print(os.environ['TVM_NUM_THREADS'])\n"
            "art.runner(None); print(os.environ['TVM_NUM_THREADS'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", str(len(os.sched_getaffinity(0))), "2", "1"], out.stdout
