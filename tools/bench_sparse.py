"""Block-sparse vs dense for one linear layer: y = x . W^T (ONNX Gemm, transB=1), x [M, K], W [N, K], at 50, 75 and
90% block sparsity for several block shapes (r x c over [out features, in features]).

  llvm (always): dense = the layer as graphopt's cpu target builds it (its matmul schedule); sparse = the same
        layer with the zeroed weight through graphopt.targets.block_sparse (the hand-written CPU kernel, or with
        --impl te the CUDA kernel's loop nest). Both run in the Relax VM on the same threads.
  cuda (when an NVIDIA GPU and its driver are present): dense = dlight's GPU matmul; sparse = graphopt's BSR kernel.

Each sparse result is checked against numpy before it is timed. Dense and sparse runs alternate (--repeat pairs after
warm-up) so both see the same machine load; the table gives the medians and the best (minimum) times, and the speedup
of the best times, the steadier figure on a shared machine.

    .venv/bin/python tools/bench_sparse.py [--m 128] [--k 768] [--n 768] [--blocks 16x1,32x1,1x16,4x4]
                                           [--sparsities 0.5,0.75,0.9] [--repeat 30] [--threads N] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def layer(w: np.ndarray, m: int):
    n, k = w.shape
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)], "layer",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def plant(w: np.ndarray, block, sparsity: float, seed: int = 0) -> np.ndarray:
    r, c = block
    rows, cols = w.shape[0] // r, w.shape[1] // c
    keep = np.ones(rows * cols, bool)
    keep[np.random.default_rng(seed).permutation(rows * cols)[:round(sparsity * rows * cols)]] = False
    return (w * np.repeat(np.repeat(keep.reshape(rows, cols), r, 0), c, 1)).astype(np.float32)


def paired_ms(dense, sparse, repeat: int, sync=None) -> dict:
    """Alternate dense and sparse runs; medians and minima in ms."""
    def once(fn):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        return time.perf_counter() - t0

    for _ in range(3):
        once(dense)
        once(sparse)
    td, ts = [], []
    for _ in range(repeat):
        td.append(once(dense))
        ts.append(once(sparse))
    return {"dense_ms": round(statistics.median(td) * 1e3, 4), "sparse_ms": round(statistics.median(ts) * 1e3, 4),
            "dense_best_ms": round(min(td) * 1e3, 4), "sparse_best_ms": round(min(ts) * 1e3, 4),
            "speedup": round(min(td) / min(ts), 2)}


HEADER = (f"  {'block':>6} {'sparsity':>8} {'dense ms':>9} {'sparse ms':>10} {'best dense':>11} {'best sparse':>12}"
          f" {'speedup':>8}")


def show(blk, sp, t):
    print(f"  {blk[0]:>3}x{blk[1]:<2} {sp:>8.0%} {t['dense_ms']:>9.3f} {t['sparse_ms']:>10.3f}"
          f" {t['dense_best_ms']:>11.3f} {t['sparse_best_ms']:>12.3f} {t['speedup']:>7.2f}x", flush=True)


def bench_llvm(args, blocks, sparsities, w0, x):
    import tvm
    from tvm import relax

    from graphopt import metadata
    from graphopt.targets import block_sparse as bs
    from graphopt.targets import tvm_lowering
    from graphopt.targets.cpu import CpuTarget
    from graphopt.targets.cpu_schedules import schedule_module

    cpu = CpuTarget(cores=args.threads)
    target = cpu.tvm_target()
    dev = tvm.cpu()
    xt = tvm.runtime.tensor(x)
    dense_ex = tvm_lowering.build(tvm_lowering.import_onnx(layer(w0, args.m)), target, schedule=schedule_module)
    dense_vm = relax.VirtualMachine(dense_ex, dev)
    rows = []
    threads = f"{args.threads} thread{'s' if args.threads != 1 else ''}"
    print(f"llvm ({cpu.mcpu}, {threads})  M={args.m} K={args.k} N={args.n}", flush=True)
    print(HEADER)
    for blk in blocks:
        for sp in sparsities:
            w = plant(w0, blk, sp)
            model = layer(w, args.m)
            metadata.set_sparse_block(model, "fc", blk)
            ex, res = bs.build_llvm(model, args.impl, min_sparsity=0.01, target=target)
            (d,) = res.decisions
            assert d.sparse and d.block == blk, d
            vm = relax.VirtualMachine(ex, dev)
            got = vm["main"](xt).numpy()
            ref = x @ w.T
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
            t = paired_ms(lambda: dense_vm["main"](xt), lambda: vm["main"](xt), args.repeat)
            rows.append({"device": "llvm", "block": f"{blk[0]}x{blk[1]}", "sparsity": sp, **t})
            show(blk, sp, t)
    return rows


def bench_cuda(args, blocks, sparsities, w0, x):
    import tvm
    from tvm import relax

    from graphopt import metadata
    from graphopt.targets import block_sparse as bs
    from graphopt.targets import cuda, tvm_lowering

    tgt = cuda.CudaTarget()
    target = tgt.tvm_target()
    dev = tvm.cuda(0)
    xt = tvm.runtime.tensor(x, device=dev)

    def build(model, sparse):
        mod = tvm_lowering.import_onnx(model)
        if sparse:
            mod = bs.rewrite(mod, "cuda", bs.weight_table(model), min_sparsity=0.01).mod
        with cuda.nvcc_compile_hook(tgt.archs):
            return relax.VirtualMachine(tvm_lowering.build(mod, target, schedule=cuda.schedule_gpu), dev)

    dense_vm = build(layer(w0, args.m), False)
    print(f"cuda ({dev.device_name})  M={args.m} K={args.k} N={args.n}", flush=True)
    print(HEADER)
    rows = []
    for blk in blocks:
        for sp in sparsities:
            w = plant(w0, blk, sp)
            model = layer(w, args.m)
            metadata.set_sparse_block(model, "fc", blk)
            vm = build(model, True)
            got = vm["main"](xt).numpy()
            np.testing.assert_allclose(got, x @ w.T, rtol=1e-4, atol=1e-3)
            t = paired_ms(lambda: dense_vm["main"](xt), lambda: vm["main"](xt), args.repeat, dev.sync)
            rows.append({"device": "cuda", "block": f"{blk[0]}x{blk[1]}", "sparsity": sp, **t})
            show(blk, sp, t)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=128, help="rows of x (batch x tokens)")
    ap.add_argument("--k", type=int, default=768, help="input features")
    ap.add_argument("--n", type=int, default=768, help="output features")
    ap.add_argument("--blocks", default="16x1,32x1,1x16,4x4")
    ap.add_argument("--sparsities", default="0.5,0.75,0.9")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--impl", choices=["cpu", "te"], default="cpu", help="llvm kernel: hand-written (cpu) or the "
                    "CUDA kernel's loop nest (te)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)

    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from graphopt.targets import block_sparse as bs
    from graphopt.targets import cuda

    blocks = [bs.parse_block(b) for b in args.blocks.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((args.n, args.k)) * 0.05).astype(np.float32)
    x = rng.standard_normal((args.m, args.k)).astype(np.float32)

    rows = bench_llvm(args, blocks, sparsities, w0, x)
    if cuda.gpu_available():
        rows += bench_cuda(args, blocks, sparsities, w0, x)
    else:
        print("cuda: skipped: no NVIDIA GPU with a driver on this machine (the cuda numbers need one)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
