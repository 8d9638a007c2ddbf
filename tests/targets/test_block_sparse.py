"""Block-sparse kernels without a GPU: graphopt's BSR kernels compiled for llvm (the CUDA kernels' own TE compute and
loop nest, and the hand-written CPU kernels) against numpy and onnxruntime, block-shape detection, and the Relax
rewrite on whole models (an MLP and a transformer encoder)."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_builders as ob
from graphopt import metadata, ort
from graphopt.errors import BadInput
from graphopt.targets import block_sparse as bs

BLOCKS = [(1, 1), (4, 4), (1, 16), (16, 1), (32, 1)]
SPARSITIES = [0.5, 0.75, 0.9]


def plant(w_oi: np.ndarray, block, sparsity: float, seed: int = 0) -> np.ndarray:
    """Zero exactly round(sparsity * #blocks) r x c blocks of w [out, in]."""
    r, c = block
    rows, cols = w_oi.shape[0] // r, w_oi.shape[1] // c
    keep = np.ones(rows * cols, bool)
    keep[np.random.default_rng(seed).permutation(rows * cols)[:round(sparsity * rows * cols)]] = False
    mask = np.repeat(np.repeat(keep.reshape(rows, cols), r, 0), c, 1)
    return (w_oi * mask).astype(np.float32)


def weight(n, k, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, k)) * 0.3).astype(np.float32)


def llvm_target():
    import tvm
    from graphopt.targets.cpu import CpuTarget
    return tvm.target.Target({"kind": "llvm", "mcpu": CpuTarget().mcpu, "num-cores": 2})


def run_kernel(func, args, out_shape):
    import tvm
    lib = tvm.compile(tvm.IRModule({"k": func}), target=llvm_target())
    y = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))
    lib[str(func.attrs["global_symbol"])](*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


def run_vm(ex, feeds: dict, names):
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[n]) for n in names])
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


def assert_close(got, ref):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


# ---------------------------------------------------------------------------------------------------------------
# packing and detection

def test_bsr_roundtrip_with_empty_rows_and_all_zero_weights():
    w = plant(weight(64, 48), (16, 1), 0.75)
    w[:16] = 0                                   # an empty block row
    b = bs.to_bsr(w, (16, 1))
    assert b.data.shape[1:] == (16, 1) and b.indptr.shape == (5,) and b.indptr[1] == 0
    assert b.nnzb == int(bs.block_mask(w, (16, 1)).sum())
    np.testing.assert_array_equal(b.todense(), w)
    z = bs.to_bsr(np.zeros((8, 8), np.float32), (4, 4))
    assert z.indptr.tolist() == [0, 0, 0] and not z.todense().any()
    with pytest.raises(ValueError, match="does not tile"):
        bs.to_bsr(w, (5, 1))


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("block", [(4, 4), (1, 16), (16, 1), (32, 1)])
def test_detects_the_planted_block_shape(block, sparsity):
    w = plant(weight(128, 128), block, sparsity, seed=3)
    assert bs.choose_block(w) == block
    assert bs.block_sparsity(w, block) == pytest.approx(sparsity, abs=1 / 512)


def test_dense_or_weakly_sparse_weights_are_left_dense():
    assert bs.choose_block(weight(64, 64)) is None
    assert bs.choose_block(plant(weight(64, 64), (16, 1), 0.4)) is None
    # unstructured sparsity never picks 1x1 on its own (80% zeros: 4x1 blocks are only ~41% zero)
    w = weight(64, 64) * (np.random.default_rng(0).random((64, 64)) > 0.8)
    assert bs.choose_block(w) is None
    d = bs.decide(w, "matmul", None, 0.5)
    assert not d.sparse and "no candidate block shape" in d.reason


def test_weight_table_carries_the_recorded_block_shapes():
    w = plant(weight(32, 32), (16, 1), 0.75)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc1", transB=1),
             helper.make_node("Gemm", ["h", "w2"], ["y"], name="fc2", transB=1)]
    m = ob.model(nodes, [ob.vi("x", [2, 32])], [ob.vi("y", None)], [("w", w), ("w2", w * 2)])
    metadata.set_sparse_block(m, "fc1", (8, 1))
    table = bs.weight_table(m)
    assert {v["node"]: v["block"] for v in table.values()} == {"fc1": (8, 1), "fc2": None}
    m.graph.doc_string = 'graphopt.sparse_blocks: {"fc1": "16 by 1"}'
    with pytest.raises(BadInput, match="node 'fc1'.*bad block shape '16 by 1'"):
        bs.weight_table(m)


# ---------------------------------------------------------------------------------------------------------------
# kernels against numpy (the TE kernel with the CUDA loop nest, and the CPU kernel)

@pytest.mark.parametrize("impl", ["te", "cpu"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("block", BLOCKS)
def test_linear_kernel_matches_numpy(block, sparsity, impl):
    n, k, m = 64, 96, 13                           # odd M: the CPU kernel's last tile overlaps
    w = plant(weight(n, k, seed=1), block, sparsity, seed=2)
    w[:block[0]] = 0                               # an empty block row must come out 0, not garbage
    b = bs.to_bsr(w, block)
    spec = bs.KernelSpec("linear", m, k, n, 1, block, b.nnzb)
    func, layout = bs.make_kernel(spec, "bsr_test", impl)
    assert int(func.attrs["op_pattern"]) == 8 and func.attrs["global_symbol"] == "bsr_test"
    x = np.random.default_rng(4).standard_normal((m, k)).astype(np.float32)
    got = run_kernel(func, [x, bs.pack_data(b, layout), b.indices, b.indptr], (m, n))
    assert_close(got, x @ w.T)


@pytest.mark.parametrize("m", [16, 150])
@pytest.mark.parametrize("block", [(1, 1), (1, 16), (2, 2), (1, 4)])
def test_cpu_kernel_on_transposed_activations_matches_numpy(block, m):
    """One- and two-row blocks with M >= 16 run vectorized over M on Xt [K, M], writing Yt [N, M]."""
    n, k = 64, 96
    w = plant(weight(n, k, seed=11), block, 0.75, seed=12)
    b = bs.to_bsr(w, block)
    spec = bs.KernelSpec("linear", m, k, n, 1, block, b.nnzb)
    func, layout = bs.make_kernel(spec, "bsr_t_test", "cpu")
    assert layout == "t"
    x = np.random.default_rng(13).standard_normal((m, k)).astype(np.float32)
    got = run_kernel(func, [np.ascontiguousarray(x.T), bs.pack_data(b, layout), b.indices, b.indptr], (n, m))
    assert_close(got.T, x @ w.T)


@pytest.mark.parametrize("impl", ["te", "cpu"])
@pytest.mark.parametrize("block", BLOCKS)
def test_conv1x1_kernel_matches_numpy(block, impl):
    n, k, batch, p = 64, 32, 2, 21
    w = plant(weight(n, k, seed=5), block, 0.75, seed=6)
    b = bs.to_bsr(w, block)
    spec = bs.KernelSpec("conv1x1", batch, k, n, p, block, b.nnzb)
    func, layout = bs.make_kernel(spec, "bsr_conv_test", impl)
    x = np.random.default_rng(7).standard_normal((batch, k, p)).astype(np.float32)
    got = run_kernel(func, [x, bs.pack_data(b, layout), b.indices, b.indptr], (batch, n, p))
    assert_close(got, np.einsum("nk,bkp->bnp", w, x))


def test_cuda_schedule_binds_threads_and_keeps_the_sum_in_a_register():
    w = plant(weight(64, 32), (32, 1), 0.5)
    b = bs.to_bsr(w, (32, 1))
    f = bs.te_kernel(bs.KernelSpec("linear", 8, 32, 64, 1, (32, 1), b.nnzb), "bsr_cuda", device=True)
    text = f.script()
    assert 'T.thread_binding(' in text and '"blockIdx.x"' in text and '"threadIdx.x"' in text
    assert 'scope="local"' in text or "local" in text
    assert bool(f.attrs["tirx.is_scheduled"]) and f.attrs[bs.KERNEL_ATTR] == "bsr-te-cuda"


# ---------------------------------------------------------------------------------------------------------------
# whole graphs against onnxruntime

def single_layer(op: str, w_oi: np.ndarray, batch: int = 3):
    n, k = w_oi.shape
    bias = (np.arange(n, dtype=np.float32) / n).astype(np.float32)
    if op == "MatMul":     # 3 x 7 = 21 rows: one- and two-row blocks take the transposed CPU kernel
        nodes = [helper.make_node("MatMul", ["x", "w"], ["t"], name="mm"), helper.make_node("Add", ["t", "b"], ["y"])]
        return ob.model(nodes, [ob.vi("x", [batch, 7, k])], [ob.vi("y", None)], [("w", w_oi.T.copy()), ("b", bias)])
    if op == "Gemm":
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1)]
        return ob.model(nodes, [ob.vi("x", [batch, k])], [ob.vi("y", None)], [("w", w_oi), ("b", bias)])
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")]
    return ob.model(nodes, [ob.vi("x", [batch, k, 3, 5])], [ob.vi("y", None)],
                    [("w", w_oi[:, :, None, None].copy()), ("b", bias)])


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("block,op", [((1, 1), "Gemm"), ((4, 4), "MatMul"), ((1, 16), "Conv"), ((16, 1), "Gemm"),
                                      ((32, 1), "MatMul"), ((1, 16), "MatMul")])
def test_single_layer_matches_onnxruntime(block, op, sparsity):
    w = plant(weight(64, 64, seed=8), block, sparsity, seed=9)
    m = single_layer(op, w)
    if block == (1, 1):   # 1x1 is used when the sparsify pass records it, never detected on its own
        metadata.set_sparse_block(m, "gemm", (1, 1))
    x = np.random.default_rng(10).standard_normal([d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim])
    feeds = {"x": x.astype(np.float32)}
    ref = ort.run(m.SerializeToString(), feeds)["y"]
    for impl in ("cpu", "te"):
        ex, res = bs.build_llvm(m, impl)
        (d,) = res.decisions
        assert d.sparse and d.block == block and d.block_sparsity == pytest.approx(sparsity, abs=1 / 256)
        assert d.source == ("recorded" if block == (1, 1) else "detected")
        assert_close(run_vm(ex, feeds, ["x"])[0], ref)


def mlp(batch=4):
    """Gemm 96->128 (16x1) -> Relu -> MatMul 128->64 (4x4) -> Relu -> Gemm 64->32 (1x16) -> Relu -> Gemm 32->10."""
    w1 = plant(weight(128, 96, 1), (16, 1), 0.9, 1)
    w2 = plant(weight(64, 128, 2), (4, 4), 0.75, 2)
    w3 = plant(weight(32, 64, 3), (1, 16), 0.5, 3)
    w4 = weight(10, 32, 4)                                 # dense: stays a dlight / CPU-rule matmul
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
             helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("Gemm", ["a2", "w3", "b3"], ["h3"], name="fc3", transB=1),
             helper.make_node("Relu", ["h3"], ["a3"]),
             helper.make_node("Gemm", ["a3", "w4"], ["y"], name="fc4", transB=1)]
    inits = [("w1", w1), ("b1", weight(1, 128, 5)[0]), ("w2", w2.T.copy()), ("w3", w3), ("b3", weight(1, 32, 6)[0]),
             ("w4", w4)]
    return ob.model(nodes, [ob.vi("x", [batch, 96])], [ob.vi("y", None)], inits)


@pytest.mark.parametrize("impl", ["cpu", "te"])
def test_mlp_matches_onnxruntime(impl):
    m = mlp()
    feeds = {"x": np.random.default_rng(11).standard_normal((4, 96)).astype(np.float32)}
    ex, res = bs.build_llvm(m, impl)
    got = {d.node: (d.sparse, d.block) for d in res.decisions}
    assert got == {"fc1": (True, (16, 1)), "fc2": (True, (4, 4)), "fc3": (True, (1, 16)), "fc4": (False, None)}
    assert len(res.kernels) == 3
    assert_close(run_vm(ex, feeds, ["x"])[0], ort.run(m.SerializeToString(), feeds)["y"])


def sparsify_linears(model: onnx.ModelProto, block, sparsity) -> tuple[onnx.ModelProto, int]:
    """Zero blocks in every MatMul / Gemm weight [in, out] or [out, in] the block tiles (a stand-in for the
    sparsify pass)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    done = 0
    for node in m.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        t = inits[node.input[1]]
        w = numpy_helper.to_array(t)
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        w_oi = w if trans_b else w.T
        if w.ndim != 2 or not bs.fits(w_oi.shape, block):
            continue
        w_oi = plant(w_oi, block, sparsity, seed=done)
        t.CopyFrom(numpy_helper.from_array(w_oi if trans_b else w_oi.T.copy(), t.name))
        done += 1
    return m, done


def test_transformer_encoder_matches_onnxruntime(zoo_onnx):
    """The zoo's ViT (patch embedding, two pre-norm encoder layers: q/k/v/proj and a GELU MLP, batched over
    tokens) with 75% of the 16x1 blocks of every linear zeroed."""
    base = onnx.load(str(zoo_onnx("vit")))
    m, n = sparsify_linears(base, (16, 1), 0.75)
    assert n >= 12
    feeds = ort.random_inputs([("x", (1, 3, 32, 32), np.float32)], seed=3)
    ref = ort.run(m.SerializeToString(), feeds)["y"]
    ex, res = bs.build_llvm(m, "cpu")
    sparse = [d for d in res.decisions if d.sparse]
    assert len(sparse) == n and all(d.block == (16, 1) for d in sparse)
    assert_close(run_vm(ex, feeds, ["x"])[0], ref)


def test_weights_below_the_threshold_stay_dense():
    w = plant(weight(64, 64), (16, 1), 0.25)
    m = single_layer("Gemm", w)
    ex, res = bs.build_llvm(m, "cpu")
    (d,) = res.decisions
    assert not d.sparse and not res.kernels
    feeds = {"x": np.ones((3, 64), np.float32)}
    assert_close(run_vm(ex, feeds, ["x"])[0], ort.run(m.SerializeToString(), feeds)["y"])


def test_kernels_stay_opaque_calls_through_fusion():
    import tvm
    from tvm import relax
    from graphopt.targets import tvm_lowering
    m = mlp()
    mod = tvm_lowering.import_onnx(m)
    res = bs.rewrite(mod, "cpu", bs.weight_table(m))
    with llvm_target():
        fused = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                          relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                          relax.transform.FuseTIR()])(res.mod)
    names = {gv.name_hint: f for gv, f in fused.functions.items()}
    for k in res.kernels:
        assert k in names, f"{k} was fused away"
        f = names[k]
        assert int(f.attrs["op_pattern"]) == 8 and f.attrs["global_symbol"] == k
