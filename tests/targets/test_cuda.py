"""CUDA target without a GPU: artifacts carry nvcc-built device code for sm_80 and sm_90 (plus PTX), every kernel
is a device kernel (nothing computes on the host), block-sparse weights become graphopt's BSR kernels, TVM's own CUDA
loader accepts the artifact, and running one here says that a GPU is needed. With a GPU, the artifact is also run
against onnxruntime."""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
import onnx_builders as ob
from graphopt import metadata, ort
from graphopt.errors import BadInput, GraphoptError
from graphopt.targets import block_sparse as bs
from graphopt.targets import cuda

pytestmark = pytest.mark.skipif(cuda.find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed")

EM_CUDA = 190


def plant(w_oi, block, sparsity, seed=0):
    """Zero exactly round(sparsity * #blocks) r x c blocks of w [out, in]."""
    r, c = block
    rows, cols = w_oi.shape[0] // r, w_oi.shape[1] // c
    keep = np.ones(rows * cols, bool)
    keep[np.random.default_rng(seed).permutation(rows * cols)[:round(sparsity * rows * cols)]] = False
    return (w_oi * np.repeat(np.repeat(keep.reshape(rows, cols), r, 0), c, 1)).astype(np.float32)


def weight(n, k, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, k)) * 0.3).astype(np.float32)


def sparse_model():
    """MatMul (16x1 blocks, 75%) -> Add -> Relu -> Gemm (4x4, 90%) -> LayerNorm -> Conv 1x1 (32x1, 50%) -> Softmax,
    plus a dense Gemm: dense operators go through dlight, the sparse ones through graphopt's kernels."""
    w1 = plant(weight(64, 32, 1), (16, 1), 0.75, 1)          # [out, in]
    w2 = plant(weight(64, 64, 2), (4, 4), 0.9, 2)
    w3 = plant(weight(64, 16, 3), (32, 1), 0.5, 3)
    w4 = weight(16, 64, 4)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm"),
             helper.make_node("Add", ["a", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["a2"]),
             helper.make_node("Reshape", ["a2", "s1"], ["a3"]),
             helper.make_node("Gemm", ["a3", "w2", "b2"], ["g"], name="gemm", transB=1),
             helper.make_node("LayerNormalization", ["g", "ln_s", "ln_b"], ["n"], axis=-1),
             helper.make_node("Gemm", ["n", "w4"], ["d"], name="dense", transB=1),
             helper.make_node("Reshape", ["d", "s2"], ["d1"]),
             helper.make_node("Conv", ["d1", "w3", "b3"], ["c"], name="conv"),
             helper.make_node("Softmax", ["c"], ["y"], axis=1)]
    inits = [("w1", w1.T.copy()), ("b1", weight(1, 64, 5)[0]), ("s1", np.array([8, 64])), ("w2", w2),
             ("b2", weight(1, 64, 6)[0]), ("ln_s", np.ones(64, np.float32)), ("ln_b", np.zeros(64, np.float32)),
             ("w4", w4), ("s2", np.array([1, 16, 2, 4])), ("w3", w3[:, :, None, None].copy()),
             ("b3", weight(1, 64, 7)[0])]
    return ob.model(nodes, [ob.vi("x", [2, 4, 32])], [ob.vi("y", None)], inits)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda") / "art"
    ob.save(sparse_model(), path.parent / "m.onnx")
    return graphopt.compile(path.parent / "m.onnx", target="cuda", out=path)


@pytest.fixture(scope="module")
def packed(art):
    """(kernel names in the CUDA module, its fmt, its code) read back from model.so."""
    _, mods = cuda.parse_packed(cuda.packed_blob(art.path / "model.so"))
    (payload,) = [p for k, p in mods if k == "cuda"]
    fmt, _, names, code = cuda.parse_cuda_payload(payload)
    return names, fmt, code


def test_artifact_manifest_and_report(art):
    assert sorted(p.name for p in art.path.iterdir()) == ["manifest.json", "model.onnx", "model.so", "report.json"]
    m = json.loads((art.path / "manifest.json").read_text())
    assert m["target"]["name"] == "cuda" and m["target"]["sass"] == ["sm_80", "sm_90"]
    assert m["target"]["ptx"] == "compute_90" and m["target"]["sparse_block"] == [32, 1]
    rep = art.report
    if not cuda.gpu_available():
        assert rep["check"] == {"ok": None, "skipped": "target cuda cannot run on this machine"}
        assert "latency" not in rep
    assert rep["device_code"] == {"sass": ["sm_80", "sm_90"], "ptx": ["compute_90"]}
    got = {d["node"]: (d["sparse"], d["block"]) for d in rep["block_sparse"]}
    assert got == {"mm": (True, "16x1"), "gemm": (True, "4x4"), "conv": (True, "32x1"), "dense": (False, None)}


def test_library_holds_sass_for_sm80_and_sm90_and_ptx(art, tmp_path):
    blob = (art.path / "model.so").read_bytes()
    offsets = [m.start() for m in re.finditer(re.escape(struct.pack("<I", cuda.FATBIN_MAGIC)), blob)]
    assert offsets, "no fatbin in model.so"
    entries = [e for off in offsets for e in cuda.fatbin_entries(blob, off)]
    sass = {}
    for e in entries:
        if e["kind"] != "sass":
            continue
        elf = blob[e["offset"]:e["offset"] + e["size"]]
        assert elf[:4] == b"\x7fELF"
        e_machine = struct.unpack_from("<H", elf, 18)[0]
        e_flags = struct.unpack_from("<I", elf, 48)[0]
        assert e_machine == EM_CUDA
        sass[e["arch"]] = elf
        assert e["arch"] in ((e_flags >> 8) & 0xFF, e_flags & 0xFF)
    assert {80, 90} <= set(sass)
    assert any(e["kind"] == "ptx" and e["arch"] == 90 for e in entries)
    # the toolkit's own reader agrees, where it is installed
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump:
        fb = tmp_path / "k.fatbin"
        off = offsets[0]
        fb.write_bytes(blob[off:off + 16 + struct.unpack_from("<Q", blob, off + 8)[0]])
        listing = subprocess.run([cuobjdump, "--list-elf", str(fb)], capture_output=True, text=True).stdout
        assert "sm_80" in listing and "sm_90" in listing


def test_no_cuda_source_is_shipped(art, packed):
    names, fmt, code = packed
    assert fmt == "fatbin" and code[:4] == struct.pack("<I", cuda.FATBIN_MAGIC)
    assert b"__global__" not in (art.path / "model.so").read_bytes()


def test_every_block_sparse_kernel_is_compiled_for_every_arch(art, packed):
    names, _, code = packed
    kernels = [d["kernel"] for d in art.report["block_sparse"] if d["sparse"]]
    assert len(kernels) == 3
    sass = [code[e["offset"]:e["offset"] + e["size"]] for e in cuda.fatbin_entries(code) if e["kind"] == "sass"]
    assert len(sass) == 2
    for k in kernels:
        assert f"{k}_kernel" in names
        for elf in sass:
            assert f"{k}_kernel".encode() in elf
    assert art.report["device_kernels"] == len(names) >= 6


def _lower_like_the_target(model):
    """What CudaTarget.lower builds, kept in memory: (module as TVM compiles it, executable)."""
    import tvm
    from tvm import relax
    from graphopt.targets import tvm_lowering
    tgt = cuda.CudaTarget()
    target = tgt.tvm_target()
    mod = bs.rewrite(tvm_lowering.import_onnx(model), "cuda", bs.weight_table(model)).mod
    with target:
        seq = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
               relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
               relax.transform.FuseOps(), relax.transform.FuseTIR()]
        scheduled = cuda.schedule_gpu(tvm.transform.Sequential(seq)(mod), target)
        final = relax.get_default_pipeline(target)(scheduled)
        ex = tvm.compile(scheduled, target=target)
    return final, ex


def test_no_compute_is_left_on_the_host():
    from tvm import tirx
    final, ex = _lower_like_the_target(sparse_model())
    assert cuda.host_float_ops(ex) == []
    (dev,) = [m for m in ex.mod.imports[0].imports if m.kind == "cuda"]
    source = dev.inspect_source("cuda") or ""
    if not source:       # a GPU host: TVM kept the compiled module, whose fmap names the kernels
        pytest.skip("device module holds compiled code")
    kernels = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", source))
    compute = [gv.name_hint for gv, f in final.functions.items()
               if isinstance(f, tirx.PrimFunc) and cuda._is_compute(f.script())]
    assert len(compute) >= 6
    for name in compute:
        assert f"{name}_kernel" in kernels, f"{name} is not a device kernel"
    assert {k for k in kernels if k.startswith("graphopt_bsr_")} == \
        {"graphopt_bsr_linear_0_kernel", "graphopt_bsr_linear_1_kernel", "graphopt_bsr_conv1x1_2_kernel"}


def test_an_unscheduled_kernel_is_refused_not_compiled_as_host_code():
    import tvm
    from tvm import relax
    w = plant(weight(64, 32), (16, 1), 0.5)
    b = bs.to_bsr(w, (16, 1))
    spec = bs.KernelSpec("linear", 4, 32, 64, 1, (16, 1), b.nnzb)
    raw = bs.te_compute(spec).with_attr("global_symbol", "raw_bsr").with_attr("op_pattern", 8)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 32), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.add_func(raw, "raw_bsr")
            y = bb.emit(relax.call_tir(gv, [x, relax.const(b.data), relax.const(b.indices), relax.const(b.indptr)],
                                       relax.TensorType((4, 64), "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    target = cuda.CudaTarget().tvm_target()
    with pytest.raises(cuda.CudaBuildError, match="no GPU schedule for raw_bsr.*host code"):
        cuda.schedule_gpu(mod, target)
    # what would happen without the check: dlight's fallback leaves it alone and TVM builds it for the CPU
    with target:
        ex = tvm.compile(mod, target=target)
    assert cuda.host_float_ops(ex)


STUB = textwrap.dedent("""
    /* libcuda.so.1 stand-in with no device: lets TVM's CUDA runtime library load, so its loader reads the artifact */
    typedef int CUresult;
    static const char *msg = "no CUDA device (graphopt test stub)";
    CUresult cuGetErrorName(CUresult e, const char **s) { *s = msg; return 0; }
    CUresult cuGetErrorString(CUresult e, const char **s) { *s = msg; return 0; }
    CUresult cuDeviceGetName(char *n, int len, int d) { return 100; }
    CUresult cuFuncSetAttribute(void *f, int a, int v) { return 100; }
    CUresult cuLaunchKernelEx(const void *c, void *f, void **p, void **e) { return 100; }
    CUresult cuLaunchKernel() { return 100; }
    CUresult cuModuleGetFunction(void **f, void *m, const char *n) { return 100; }
    CUresult cuModuleGetGlobal() { return 100; }
    CUresult cuModuleLoadData(void **m, const void *img) { return 100; }
    CUresult cuModuleUnload(void *m) { return 100; }
    CUresult cuTensorMapEncodeTiled() { return 100; }
    CUresult cuLaunchCooperativeKernel() { return 100; }
""")


@pytest.fixture(scope="module")
def stub_env(tmp_path_factory):
    """Environment for a subprocess in which TVM's CUDA runtime library (libtvm_runtime_cuda) loads, as it does on a
    GPU host, against a no-device libcuda stand-in."""
    if cuda.gpu_available():
        pytest.skip("a real driver is present")
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build a libcuda stand-in")
    d = tmp_path_factory.mktemp("libcuda")
    (d / "stub.c").write_text(STUB)
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(d / "libcuda.so.1"),
                    str(d / "stub.c")], check=True)
    return dict(os.environ, LD_LIBRARY_PATH=f"{d}:{os.environ.get('LD_LIBRARY_PATH', '')}")


def run_with_stub(env, code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tvm_cuda_runtime_loads_the_artifact(art, stub_env):
    """TVM's own CUDA module loader deserializes the AOT device module: the format we write is the one it reads."""
    kernels = [d["kernel"] + "_kernel" for d in art.report["block_sparse"] if d["sparse"]]
    res = run_with_stub(stub_env, f"""
        import json, tvm
        assert tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None
        lib = tvm.runtime.load_module({str(art.path / "model.so")!r})
        def walk(m):
            yield m
            for i in m.imports:
                yield from walk(i)
        (dev,) = [m for m in walk(lib) if m.kind == "cuda"]
        print(json.dumps({{"found": [dev.implements_function(k) for k in {kernels!r}],
                          "absent": dev.implements_function("no_such_kernel"),
                          "source": dev.inspect_source("cuda"), "exist": tvm.cuda(0).exist}}))
    """)
    assert res == {"found": [True] * 3, "absent": False, "source": "", "exist": False}


def test_compiling_where_the_cuda_runtime_is_loaded_uses_the_nvcc_hook(stub_env, tmp_path):
    """On a GPU host TVM's CUDA module factory compiles during the build, through tvm_callback_cuda_compile: ours
    gives the same multi-arch fatbin."""
    ob.save(sparse_model(), tmp_path / "m.onnx")
    res = run_with_stub(stub_env, f"""
        import json, tvm, graphopt
        from graphopt.targets import cuda
        assert tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None
        art = graphopt.compile({str(tmp_path / "m.onnx")!r}, target="cuda", out={str(tmp_path / "a")!r}, measure=False)
        _, mods = cuda.parse_packed(cuda.packed_blob(art.path / "model.so"))
        (payload,) = [p for k, p in mods if k == "cuda"]
        fmt, _, names, code = cuda.parse_cuda_payload(payload)
        print(json.dumps({{"fmt": fmt, "code": cuda.device_code_summary(code), "n": len(names),
                          "report": art.report["device_code"]}}))
    """)
    assert res["fmt"] == "cubin"          # the runtime's tag for compiled code; cuModuleLoadData takes the fatbin
    assert res["code"] == {"sass": ["sm_80", "sm_90"], "ptx": ["compute_90"], "fatbins": 1}
    assert res["report"] == {"sass": ["sm_80", "sm_90"], "ptx": ["compute_90"]} and res["n"] >= 6


def test_running_without_a_gpu_says_so_in_one_line(art):
    if cuda.gpu_available():
        pytest.skip("this machine has a GPU")
    assert not cuda.CudaTarget().runs_here()
    with pytest.raises(GraphoptError) as e:
        art.run({"x": np.zeros((2, 4, 32), np.float32)})
    msg = str(e.value)
    assert "\n" not in msg and "NVIDIA GPU" in msg and str(art.path) in msg and "sm_80, sm_90 or newer" in msg


def test_cli_run_without_a_gpu_exits_with_one_line(art, tmp_path):
    if cuda.gpu_available():
        pytest.skip("this machine has a GPU")
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 4, 32), np.float32))
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "run", str(art.path), "--inputs",
                           str(tmp_path / "in.npz")], capture_output=True, text=True)
    assert proc.returncode != 0
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "NVIDIA GPU" in err[0]


def test_matches_onnxruntime_on_the_gpu(art):
    if not cuda.gpu_available():
        pytest.skip("no NVIDIA GPU on this machine")
    assert art.report["check"]["ok"]
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 4, 32)).astype(np.float32)}
    ref = ort.run((art.path / "model.onnx").read_bytes(), feeds)["y"]
    np.testing.assert_allclose(art.run(feeds)["y"], ref, rtol=1e-4, atol=1e-5)


def test_options():
    assert cuda.CudaTarget().archs == ("sm_80", "sm_90")
    assert cuda.CudaTarget(archs="90, sm_80,sm_86").archs == ("sm_80", "sm_86", "sm_90")
    assert cuda.gencode_flags(("sm_80", "sm_90"))[-1] == "arch=compute_90,code=compute_90"
    with pytest.raises(BadInput, match="bad arch 'sm_50'"):
        cuda.CudaTarget(archs="sm_50")
    # which GPUs the default artifact runs on: sm_8x from sm_80 SASS, sm_90 from its SASS, newer ones from PTX
    sass, ptx = ["sm_80", "sm_90"], ["compute_90"]
    assert [cuda.runs_on(cc, sass, ptx) for cc in [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]] == \
        [False, True, True, True, True, True, True]
    assert not cuda.runs_on((8, 6), ["sm_90"], ["compute_90"])
    with pytest.raises(BadInput, match="target cuda has no option 'mcpu'"):
        cuda.CudaTarget(mcpu="x")
    with pytest.raises(BadInput, match="sparse must be auto or off"):
        cuda.CudaTarget(sparse="maybe")
    with pytest.raises(BadInput, match="min_sparsity must be in"):
        cuda.CudaTarget(min_sparsity=1.5)
    with pytest.raises(BadInput, match="tuning is not supported"):
        cuda.CudaTarget().tune(None, "db", 1)


def test_sparse_off_and_missing_nvcc(tmp_path, monkeypatch):
    m = sparse_model()
    art = graphopt.compile(m, target="cuda", out=tmp_path / "dense", target_options={"sparse": "off"}, measure=False)
    assert "block_sparse" not in art.report and art.report["device_code"]["sass"] == ["sm_80", "sm_90"]
    assert art.manifest["target"]["options"] == {"sparse": "off"}
    monkeypatch.setattr(cuda, "find_nvcc", lambda: None)
    with pytest.raises(cuda.CudaBuildError, match="nvcc not found"):
        graphopt.compile(m, target="cuda", out=tmp_path / "none", measure=False)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("name", ["cnn_digits", "vit"])
def test_zoo_models_compile_with_every_kernel_on_the_device(zoo_onnx, tmp_path, name):
    art = graphopt.compile(zoo_onnx(name), target="cuda", out=tmp_path / name, pipeline="cleanup", measure=False)
    assert art.report["device_code"]["sass"] == ["sm_80", "sm_90"] and art.report["device_kernels"] > 2


def test_sparsify_for_cuda_records_the_block_the_target_packs(tmp_path):
    """sparsify without block= takes the cuda target's (rows, cols) hint, records it in the graph metadata, and the
    target reads that record back: every Gemm it packs uses the recorded 32x1 block."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1)]
    m = ob.model(nodes, [ob.vi("x", [4, 64])], [ob.vi("y", None)],
                 [("w1", weight(64, 64, 1)), ("b1", weight(1, 64, 2)[0]), ("w2", weight(32, 64, 3))])
    art = graphopt.compile(m, target="cuda", out=tmp_path / "a", pipeline="cleanup,sparsify{sparsity=0.75}",
                           measure=False)
    rec = next(r for r in art.manifest["passes"] if r["pass"].startswith("sparsify"))
    assert rec["info"]["block"] == "32x1" and set(rec["info"]["layers"]) == {"fc1", "fc2"}
    assert metadata.sparse_blocks(onnx.load(str(art.path / "model.onnx"))) == {"fc1": (32, 1), "fc2": (32, 1)}
    got = {d["node"]: (d["sparse"], d["block"], d["source"]) for d in art.report["block_sparse"]}
    assert got == {"fc1": (True, "32x1", "recorded"), "fc2": (True, "32x1", "recorded")}
