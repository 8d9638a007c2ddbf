"""ONNX entry points of the int8 lowering: what the cpu and arm-sve targets (and tests, tools) call."""
from __future__ import annotations

import numpy as np

from .rewrite import int8_rewrite_pass


def prepare_onnx(model):
    """Fold DequantizeLinear nodes TVM cannot import (INT4 / UINT4 inputs, blocked scales: weight-only int4
    from quantize{scheme=weight_int4}) into fp32 initializers. Returns a new ModelProto (the input is kept)."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    todo = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        t = inits[n.input[0]]
        block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or block:
            if all(i in inits for i in n.input[1:] if i):
                todo.append(n)
    if not todo:
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    names = {n.name for n in todo}
    for n in list(model.graph.node):
        if n.op_type != "DequantizeLinear" or n.name not in names:
            continue
        q = numpy_helper.to_array(inits[n.input[0]]).astype(np.float64)
        s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        z = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64) if len(n.input) > 2 and n.input[2] \
            else np.zeros_like(s)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % max(q.ndim, 1)
        block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
        if s.size == 1:
            val = (q - z.reshape(())) * s.reshape(())
        elif block:
            sl = tuple(slice(0, d) for d in q.shape)
            val = (q - np.repeat(z, block, axis=axis)[sl]) * np.repeat(s, block, axis=axis)[sl]
        else:
            shape = [1] * q.ndim
            shape[axis] = -1
            val = (q - z.reshape(shape)) * s.reshape(shape)
        model.graph.initializer.append(numpy_helper.from_array(val.astype(np.float32), n.output[0]))
        model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used or i.name in {o.name for o in model.graph.output}]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def import_qdq(model, where: str = "model"):
    """What the cpu and arm-sve targets' lower() import with: fold what TVM cannot import, then
    tvm_lowering.import_onnx. The quantized chains are lowered later, by int8_rewrite_pass in build's pipeline."""
    from .. import tvm_lowering
    return tvm_lowering.import_onnx(prepare_onnx(model), where)


def import_int8(model, target, where: str = "model"):
    """import_qdq, then the int8 rewrite pass run on its own (tests look at the rewritten module). Returns
    (IRModule, facts); facts are what goes into report.json (int8 kernel counts, the dot product used, fp32
    leftovers)."""
    rewrite = int8_rewrite_pass(target)
    mod = rewrite(import_qdq(model, where))
    return mod, rewrite.facts


def build_library(model, path, target, schedule=None, tuning_db: str | None = None) -> dict:
    """import_qdq + tvm_lowering.build with int8_rewrite_pass + export into `path`: what the cpu target's lower()
    does (tests and tools/bench_int8.py use it directly). target: a TVM target (this machine's:
    graphopt.targets.cpu.CpuTarget().tvm_target()). schedule: None (TVM's naive loops for the fp32 ops
    that remain) or a callable like cpu_schedules.schedule_module. Returns the facts."""
    import time
    from pathlib import Path
    from .. import tvm_lowering
    t0 = time.perf_counter()
    rewrite = int8_rewrite_pass(target)
    ex = tvm_lowering.build(import_qdq(model), target, schedule=schedule, tuning_db=tuning_db, passes=[rewrite])
    tvm_lowering.export(ex, Path(path))
    return {**rewrite.facts, "compile_seconds": round(time.perf_counter() - t0, 3)}
