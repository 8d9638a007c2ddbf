"""arm-sve target: aarch64 + SVE model.so, cross-compiled here and run under qemu-aarch64 at several SVE vector
lengths, compared with onnxruntime on x86.

The tests that build or run need tools/setup_arm.sh (aarch64 toolchain, qemu-user, aarch64 TVM runtime and the
native runner); without it they are skipped with the reason. CI runs tools/setup_arm.sh first."""
import inspect
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import graphopt
from graphopt import api, ort
from graphopt.artifact import Artifact
from graphopt.errors import BadInput, GraphoptError
from graphopt.hardware import Structure
from graphopt.targets import arm_sve, get_target
from graphopt.targets.arm_runner import build as runner_build

VECTOR_BITS = (128, 256, 512)
ZOO = ["cnn_digits", "mobilenet_v3", "vit", "lstm"]
OBJDUMP = "aarch64-linux-gnu-objdump"


def _missing() -> str | None:
    if shutil.which(arm_sve.CXX) is None:
        return f"{arm_sve.CXX} not installed"
    return arm_sve.ArmSveTarget().setup_problem()


MISSING = _missing()
needs_arm = pytest.mark.skipif(MISSING is not None, reason=f"arm-sve toolchain absent ({MISSING}); "
                                                            f"run tools/setup_arm.sh")


def _feeds(art, seed=7):
    return ort.random_inputs([(i["name"], tuple(i["shape"]), i["dtype"]) for i in art.inputs], seed=seed)


def _assert_matches(got: dict, want: dict):
    assert set(got) == set(want)
    for k, ref in want.items():
        np.testing.assert_allclose(got[k], ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def _run_at(art, feeds, bits):
    """Run the artifact under qemu with the given SVE vector length; the runner reports the length it got."""
    runner = arm_sve.ArmSveTarget(vector_bits=bits).load(art.path, art.manifest)
    outs = runner(art.check_inputs(feeds))
    assert runner.last_vector_bits == bits
    return dict(zip([o["name"] for o in art.outputs], outs))


@pytest.fixture(scope="module")
def arm_art(tmp_path_factory, zoo_onnx):
    """arm_art(name) -> the zoo model compiled for arm-sve (once per module and worker)."""
    cache = {}

    def get(name):
        if MISSING:
            pytest.skip(f"arm-sve toolchain absent ({MISSING}); run tools/setup_arm.sh")
        if name not in cache:
            out = tmp_path_factory.mktemp("arm") / name
            cache[name] = graphopt.compile(zoo_onnx(name), target="arm-sve", out=out, pipeline="cleanup",
                                           measure=False)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def cnn_art(arm_art):
    return arm_art("cnn_digits")


# ---- no toolchain needed ----

def test_registered_with_hw_constants():
    t = get_target("arm-sve")
    hw = t.hw()
    assert (hw.vector_bits, hw.fp32_lanes, hw.int8_dot, hw.sve_vector_bits) == (None, 4, "usdot", 256)
    assert hw.structure == Structure(channels=4, unstructured=True)       # unstructured + int8 pays there
    assert get_target("arm-sve", vector_bits=512).hw().sve_vector_bits == 512
    d = t.describe()
    assert d["llvm_mtriple"] == "aarch64-linux-gnu" and d["llvm_mcpu"] == "neoverse-v1" and "+sve" in d["llvm_mattr"]
    assert t.measures_here() is False
    tt = t.tvm_target()
    assert bool(tt.attrs["feature.has_sve"]) and str(tt.attrs["mtriple"]) == "aarch64-linux-gnu"


def test_vector_length_option_and_environment(monkeypatch):
    monkeypatch.delenv(arm_sve.ENV_VECTOR_BITS, raising=False)
    assert arm_sve.ArmSveTarget().run_vector_bits() == 256
    assert arm_sve.ArmSveTarget(vector_bits=512).run_vector_bits() == 512
    monkeypatch.setenv(arm_sve.ENV_VECTOR_BITS, "128")
    assert arm_sve.ArmSveTarget(vector_bits=512).run_vector_bits() == 128
    monkeypatch.setenv(arm_sve.ENV_VECTOR_BITS, "300")
    with pytest.raises(BadInput, match="300"):
        arm_sve.ArmSveTarget().run_vector_bits()
    with pytest.raises(BadInput, match="vector_bits"):
        get_target("arm-sve", vector_bits=96)
    with pytest.raises(BadInput, match="no option 'mcpu'"):
        get_target("arm-sve", mcpu="neoverse-v2")
    # qemu's sve-default-vector-length is in bytes
    r = arm_sve.QemuRunner("runner", "/x/model.so", 512)
    assert "max,sve=on,sve-default-vector-length=64" in r.command("in", "out")


def test_tensor_files_round_trip(tmp_path):
    for a in [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(5, dtype=np.int64),
              np.zeros((2, 0, 3), dtype=np.float16), np.array([True, False])]:
        arm_sve.write_tensor(tmp_path / "t.bin", a)
        b = arm_sve.read_tensor(tmp_path / "t.bin")
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def test_schedule_rule_uses_scalable_vectors():
    """Elementwise and dense PrimFuncs get `4 * vscale` vector loops and a parallel outer loop; a function the
    rule cannot handle (a stride-2 pooling window) is left alone."""
    import tvm
    from tvm import relax, tirx
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((64, 256), "float32"), w: R.Tensor((256, 200), "float32"),
                 p: R.Tensor((1, 8, 16, 16), "float32")):
            with R.dataflow():
                y = R.add(R.nn.relu(x), x)
                z = R.matmul(y, w)
                q = R.nn.max_pool2d(p, pool_size=(2, 2), strides=(2, 2))
                R.output(z, q)
            return (z, q)

    target = arm_sve.ArmSveTarget().tvm_target()
    with target:
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FuseOps(), relax.transform.FuseTIR()])(Mod)
    mod = arm_sve.schedule(mod, target, verify=True)
    funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    ruled = {n for n, f in funcs.items() if f.attrs is not None and arm_sve.RULE_ATTR in f.attrs}
    dense = [n for n in ruled if "matmul" in n]
    assert dense and any("relu" in n or "add" in n for n in ruled), sorted(funcs)
    for n in ruled:
        text = funcs[n].script()
        assert "T.vectorized(T.vscale() * 4)" in text, text
    assert "T.parallel(" in funcs[dense[0]].script()
    pool = [n for n in funcs if "pool" in n]
    assert pool and not set(pool) & ruled


def test_missing_toolchain_is_one_clear_error(monkeypatch, tmp_path, zoo_onnx):
    monkeypatch.setattr(arm_sve.shutil, "which", lambda name: None)
    with pytest.raises(GraphoptError, match=r"aarch64-linux-gnu-g\+\+ is not installed; run tools/setup_arm.sh"):
        graphopt.compile(zoo_onnx("mlp_digits"), target="arm-sve", out=tmp_path / "a", measure=False)
    assert not (tmp_path / "a").exists()
    t = arm_sve.ArmSveTarget()
    assert not t.runs_here()
    with pytest.raises(GraphoptError, match=r"cannot run here: qemu-aarch64 .*not installed; run tools/setup_arm.sh"):
        t.load(tmp_path, {})


def test_missing_runtime_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHOPT_ARM_HOME", str(tmp_path / "empty"))
    problem = runner_build.runtime_problem()
    assert "aarch64 TVM runtime is not installed" in problem
    if shutil.which(arm_sve.QEMU) and (arm_sve.SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists():
        with pytest.raises(GraphoptError, match=r"aarch64 TVM runtime is not installed.*run tools/setup_arm.sh"):
            arm_sve.ArmSveTarget().load(tmp_path, {})


# ---- toolchain and emulator needed ----

@needs_arm
@pytest.mark.parametrize("name", ZOO)
def test_zoo_matches_onnxruntime_at_several_vector_lengths(arm_art, zoo_onnx, name):
    art = arm_art(name)   # graphopt.compile's own check ran it under qemu against onnxruntime on model.onnx
    assert art.report["check"]["ok"] is True, art.report["check"]
    assert runner_build.elf_machine(art.path / "model.so") == 183
    feeds = _feeds(art)
    want = ort.run(open(zoo_onnx(name), "rb").read(), feeds)   # the ORIGINAL model, on x86
    for bits in VECTOR_BITS:
        _assert_matches(_run_at(art, feeds, bits), want)


@needs_arm
def test_model_so_is_aarch64_with_sve_instructions(cnn_art):
    lib = cnn_art.path / "model.so"
    head = lib.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183   # EM_AARCH64
    if shutil.which("file"):
        assert "aarch64" in subprocess.run(["file", "-b", str(lib)], capture_output=True, text=True).stdout
    if shutil.which(OBJDUMP) is None:
        pytest.skip(f"{OBJDUMP} not installed; run tools/setup_arm.sh")
    asm = subprocess.run([OBJDUMP, "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bz\d+\.s\b", asm), "no SVE vector registers"
    assert re.search(r"\bp\d+(/[zm])?\b", asm), "no SVE predicate registers"
    for insn in ("whilelo", "ld1w", "st1w"):
        assert re.search(rf"\t{insn}\s", asm), insn
    assert re.search(r"\t(fmla|fmad)\s+z\d+\.s", asm), "no SVE fused multiply-add"
    # vector-length agnostic: the code reads the vector length at run time
    assert re.search(r"\t(cntw|cntb|cnth|cntd|rdvl|incw|incb)\s", asm)
    assert cnn_art.manifest["target"]["name"] == "arm-sve"
    assert cnn_art.manifest["target"]["vector_bits"] == "scalable"


@needs_arm
def test_cli_run_under_qemu(cnn_art, tmp_path, zoo_onnx):
    x = np.random.default_rng(3).random((1, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    env = dict(os.environ, **{arm_sve.ENV_VECTOR_BITS: "512"})
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "run", str(cnn_art.path), "--inputs",
                        str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "out.npz")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "out.npz") as z:
        got = {k: z[k] for k in z.files}
    _assert_matches(got, ort.run(open(zoo_onnx("cnn_digits"), "rb").read(), {"x": x}))


@needs_arm
def test_vector_length_from_artifact_option(zoo_onnx, tmp_path, monkeypatch):
    """target_options={"vector_bits": 128} is recorded in the manifest and used by `graphopt run`."""
    monkeypatch.delenv(arm_sve.ENV_VECTOR_BITS, raising=False)
    art = graphopt.compile(zoo_onnx("mlp_digits"), target="arm-sve", out=tmp_path / "a", measure=False,
                           target_options={"vector_bits": 128})
    assert art.report["check"]["ok"] is True
    art = Artifact(tmp_path / "a")
    feeds = _feeds(art)
    got = art.run(feeds)
    assert art.runner().last_vector_bits == 128
    _assert_matches(got, ort.run((art.path / "model.onnx").read_bytes(), feeds))


@needs_arm
def test_builds_without_qemu_and_skips_the_check(zoo_onnx, tmp_path, monkeypatch):
    """With only the cross compiler (no qemu / runtime) compile still produces the artifact, unchecked."""
    monkeypatch.setattr(arm_sve.ArmSveTarget, "setup_problem", lambda self: "qemu-aarch64 not installed")
    art = graphopt.compile(zoo_onnx("mlp_digits"), target="arm-sve", out=tmp_path / "a", measure=False)
    assert art.report["check"]["ok"] is None and "cannot run" in art.report["check"]["skipped"]
    with pytest.raises(GraphoptError, match="setup_arm.sh"):
        art.run(_feeds(art))


@needs_arm
@pytest.mark.skipif("measures_here" not in inspect.getsource(api.compile),
                    reason="api.compile does not consult Target.measures_here() yet")
def test_compile_report_has_no_latency_under_emulation(zoo_onnx, tmp_path):
    art = graphopt.compile(zoo_onnx("mlp_digits"), target="arm-sve", out=tmp_path / "a", measure=True)
    assert art.report["check"]["ok"] is True
    assert "latency" not in art.report
