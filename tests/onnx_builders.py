"""Hand-built ONNX graphs for cases the torch zoo does not produce."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def model(nodes, inputs, outputs, inits=(), opset=17):
    """Outputs given with shape None get their type from onnx shape inference."""
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    if any(not o.type.HasField("tensor_type") for o in m.graph.output):
        inferred = onnx.shape_inference.infer_shapes(m)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for o in m.graph.output:
            if not o.type.HasField("tensor_type") and o.name in known:
                o.CopyFrom(known[o.name])
    return m


def vi(name, shape, dtype=TensorProto.FLOAT):
    if shape is None:
        return helper.make_empty_tensor_value_info(name)
    return helper.make_tensor_value_info(name, dtype, shape)


def rnd(*shape, seed=0, scale=0.5):
    return (np.random.default_rng(seed + sum(shape)).standard_normal(shape) * scale).astype(np.float32)


def bn_params(prefix, c, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"{prefix}_g", rng.uniform(0.5, 1.5, c).astype(np.float32)),
            (f"{prefix}_b", rng.standard_normal(c).astype(np.float32)),
            (f"{prefix}_m", rng.standard_normal(c).astype(np.float32)),
            (f"{prefix}_v", rng.uniform(0.5, 2.0, c).astype(np.float32))]


def bn_node(x, y, prefix):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y],
                            name=f"{prefix}_bn", epsilon=1e-3)


def convtranspose_bn(group=1):
    w = rnd(4, 6 // group, 3, 3)
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], name="deconv", strides=[2, 2], group=group),
             bn_node("t", "y", "bn")]
    return model(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", None)],
                 [("w", w), ("b", rnd(6, seed=1))] + bn_params("bn", 6))


def gemm_bn(trans_b=1, with_c=True):
    w = rnd(8, 6) if trans_b else rnd(6, 8)
    ins = ["x", "w"] + (["c"] if with_c else [])
    nodes = [helper.make_node("Gemm", ins, ["t"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3),
             bn_node("t", "y", "bn")]
    inits = [("w", w)] + ([("c", rnd(8, seed=2))] if with_c else []) + bn_params("bn", 8)
    return model(nodes, [vi("x", [3, 6])], [vi("y", None)], inits)


def matmul_bn():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"], name="mm"), bn_node("t", "y", "bn")]
    return model(nodes, [vi("x", [3, 6])], [vi("y", None)], [("w", rnd(6, 8))] + bn_params("bn", 8))


def identity_chain():
    """x -> Identity -> Relu -> Identity -> y (an output fed by an Identity) and a Cast to the same type."""
    nodes = [helper.make_node("Identity", ["x"], ["a"], name="id0"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Cast", ["b"], ["c"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Identity", ["c"], ["y"], name="id1"),
             helper.make_node("Identity", ["x"], ["z"], name="id_passthrough")]
    return model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3]), vi("z", [2, 3])])


def rnn(kind, direction="forward", layout=0, peepholes=False, lbr=0, with_init_state=True, seq=5, batch=2, inp=3, hid=4):
    ndir = 2 if direction == "bidirectional" else 1
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    inits = [("W", rnd(ndir, gates * hid, inp, seed=1)), ("R", rnd(ndir, gates * hid, hid, seed=2)),
             ("B", rnd(ndir, 2 * gates * hid, seed=3))]
    names = ["x", "W", "R", "B", ""]
    xs = [seq, batch, inp] if layout == 0 else [batch, seq, inp]
    def state(seed):   # the same values for both layouts, so layout 1 can be checked against layout 0
        v = rnd(ndir, batch, hid, seed=seed)
        return v if layout == 0 else np.ascontiguousarray(v.transpose(1, 0, 2))
    inputs = [vi("x", xs)]
    if with_init_state:
        inits.append(("h0", state(4)))
        names.append("h0")
        if kind == "LSTM":
            inits.append(("c0", state(5)))
            names.append("c0")
    else:
        names.append("")
        if kind == "LSTM":
            names.append("")
    if peepholes and kind == "LSTM":
        inits.append(("P", rnd(ndir, 3 * hid, seed=6)))
        names.append("P")
    while names and names[-1] == "":
        names.pop()
    attrs = {"hidden_size": hid, "direction": direction, "layout": layout}
    if kind == "GRU":
        attrs["linear_before_reset"] = lbr
    outs = ["Y", "Y_h"] + (["Y_c"] if kind == "LSTM" else [])
    nodes = [helper.make_node(kind, names, outs, name="rnn", **attrs)]
    return model(nodes, inputs, [vi(o, None) for o in outs], inits, opset=14)


def custom_domain():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("FancyOp", ["a"], ["y"], name="fancy", domain="com.acme")]
    m = model(nodes, [vi("x", [1, 4])], [vi("y", [1, 4])])
    m.opset_import.append(helper.make_opsetid("com.acme", 1))
    return m


def unsupported_op():
    """A standard op TVM's importer lacks (CenterCropPad)."""
    nodes = [helper.make_node("CenterCropPad", ["x", "s"], ["y"], name="crop")]
    return model(nodes, [vi("x", [4, 4])], [vi("y", None)], [("s", np.array([2, 2], np.int64))], opset=18)


def dynamic_reshape():
    """y = reshape(x, [shape(x)[0], -1]) with a dynamic batch: a shape subgraph to fold after binding."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i0"], ["n"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"], name="unsq"),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], name="cat", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")]
    return model(nodes, [vi("x", ["batch", 2, 3])], [vi("y", ["batch", 4])],
                 [("i0", np.array(0, np.int64)), ("ax", np.array([0], np.int64)),
                  ("minus1", np.array([-1], np.int64)), ("w", rnd(6, 4))])


def old_opset_model():
    """Opset 9 (Upsample era) model that must be upgraded by onnx's version converter."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Unsqueeze", ["a"], ["y"], name="unsq", axes=[0])]
    return model(nodes, [vi("x", [2, 3])], [vi("y", [1, 2, 3])], opset=9)


def save(m, path):
    onnx.save_model(m, str(path))
    return path


def growing_constant(op, n):
    """y = x + sum(c), c a constant of n float32 elements that op (ConstantOfShape, Expand or Tile) makes from a
    tiny one: folding c costs 4n bytes."""
    one, shape = ("one", np.ones(1, np.float32)), ("s", np.array([n], np.int64))
    grow = {"ConstantOfShape": (helper.make_node("ConstantOfShape", ["s"], ["c"], name="grow",
                                                 value=numpy_helper.from_array(np.array([1.0], np.float32))), [shape]),
            "Expand": (helper.make_node("Expand", ["one", "s"], ["c"], name="grow"), [one, shape]),
            "Tile": (helper.make_node("Tile", ["one", "s"], ["c"], name="grow"), [one, shape])}[op]
    nodes = [grow[0], helper.make_node("ReduceSum", ["c"], ["r"], name="sum", keepdims=0),
             helper.make_node("Add", ["x", "r"], ["y"], name="add")]
    return model(nodes, [vi("x", [1, 4])], [vi("y", [1, 4])], grow[1])


def shared_weight_chain(steps=4):
    """x[4, 16] -> Gemm(w0) -> Relu, then `steps` steps h = Relu(h @ R + bR) that share R [32, 32] and bR, as Gemm
    and as MatMul + Add in turn (an unrolled recurrence), then Gemm(wo) -> y [4, 10]. Step nodes: step0, step1..."""
    nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["g0"], name="in"),
             helper.make_node("Relu", ["g0"], ["h0"], name="relu0")]
    for t in range(steps):
        if t % 2 == 0:
            nodes.append(helper.make_node("Gemm", [f"h{t}", "R", "bR"], [f"s{t}"], name=f"step{t}"))
        else:
            nodes += [helper.make_node("MatMul", [f"h{t}", "R"], [f"m{t}"], name=f"step{t}"),
                      helper.make_node("Add", [f"m{t}", "bR"], [f"s{t}"], name=f"add{t}")]
        nodes.append(helper.make_node("Relu", [f"s{t}"], [f"h{t + 1}"], name=f"relu{t + 1}"))
    nodes.append(helper.make_node("Gemm", [f"h{steps}", "wo", "bo"], ["y"], name="out"))
    inits = [("w0", rnd(16, 32)), ("b0", rnd(32, seed=1)), ("R", rnd(32, 32, seed=2, scale=0.2)),
             ("bR", rnd(32, seed=3)), ("wo", rnd(32, 10, seed=4)), ("bo", rnd(10, seed=5))]
    return model(nodes, [vi("x", [4, 16])], [vi("y", [4, 10])], inits)


def named_conv(x, w, y, pads=1, bias=True):
    """Conv named after its weight without the 'w' (wp -> node p)."""
    return helper.make_node("Conv", [x, w] + ([w + "_b"] if bias else []), [y], pads=[pads] * 4, name=w[1:])


def two_branches(c=64):
    """x -> p (8->c) -> relu -> q (c->4) -> y1 and x -> r (8->c) -> relu -> s (c->4) -> y2; the branches have the
    same weights, so every criterion ranks their channels alike (r and s have no bias: other kernels)."""
    wp, wq = rnd(c, 8, 3, 3), rnd(4, c, 1, 1, seed=1)
    nodes = [named_conv("x", "wp", "p"), helper.make_node("Relu", ["p"], ["pr"]), named_conv("pr", "wq", "y1", 0),
             named_conv("x", "wr", "r", bias=False), helper.make_node("Relu", ["r"], ["rr"]),
             named_conv("rr", "ws", "y2", 0, bias=False)]
    inits = [("wp", wp), ("wp_b", rnd(c)), ("wq", wq), ("wq_b", rnd(4)), ("wr", wp.copy()), ("ws", wq.copy())]
    return model(nodes, [vi("x", [1, 8, 16, 16])], [vi("y1", None), vi("y2", None)], inits)
