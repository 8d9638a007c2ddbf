"""fold-batchnorm: fold inference BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it, and
a per-channel constant Add or Mul after a Conv or ConvTranspose into that conv's bias or weight: a bias some
exporters write as a node of its own (paddle2onnx's ConvTranspose -> Add -> BatchNormalization in PP-OCR's detector
head; the BN after it then folds too), a BatchNormalization exported as its arithmetic (Conv -> Mul -> Add: a
torch.export CRNN)."""
import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import toposort
from graphopt.passmanager import Pass, PassResult, register
from graphopt.rewrite import bypass, single_consumer


def _bn_affine(bn: gs.Node):
    """(scale, shift) with BN(y) = y * scale + shift per channel, or None when BN's parameters are not constant."""
    if len(bn.inputs) != 5 or len(bn.outputs) != 1 or bn.attrs.get("training_mode", 0):
        return None
    params = [t for t in bn.inputs[1:]]
    if not all(isinstance(t, gs.Constant) for t in params):
        return None
    gamma, beta, mean, var = (t.values.astype(np.float64) for t in params)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _set_bias(prod: gs.Node, bias: gs.Constant) -> None:
    """prod's third input (Conv / ConvTranspose bias, Gemm C) becomes bias, added when prod had none."""
    if len(prod.inputs) > 2:
        prod.inputs[2] = bias
    else:
        prod.inputs.append(bias)


def _fold_conv(prod: gs.Node, scale, shift, graph) -> bool:
    w = prod.inputs[1]
    if not isinstance(w, gs.Constant) or (len(prod.inputs) > 2 and not isinstance(prod.inputs[2], gs.Constant)):
        return False
    W = w.values.astype(np.float64)
    group = int(prod.attrs.get("group", 1))
    if prod.op == "Conv":
        if W.shape[0] != scale.size:
            return False
        Wn = W * scale.reshape((-1,) + (1,) * (W.ndim - 1))
        cout = W.shape[0]
    else:  # ConvTranspose: W is (Cin, Cout/group, k...) and output channel g*Cout/g + j
        cout = W.shape[1] * group
        if cout != scale.size:
            return False
        cin_g = W.shape[0] // group
        s = scale.reshape(group, W.shape[1])
        Wn = (W.reshape((group, cin_g) + W.shape[1:]) * s.reshape((group, 1, W.shape[1]) + (1,) * (W.ndim - 2)))
        Wn = Wn.reshape(W.shape)
    b = prod.inputs[2].values.astype(np.float64) if len(prod.inputs) > 2 else np.zeros(cout)
    dtype = w.values.dtype
    prod.inputs[1] = gs.Constant(w.name + "_bnfolded", Wn.astype(dtype))
    bias = gs.Constant(prod.name + "_bias_bnfolded", (b * scale + shift).astype(dtype))
    _set_bias(prod, bias)
    return True


def _fold_gemm(prod: gs.Node, scale, shift, graph) -> bool:
    b_t = prod.inputs[1]
    if not isinstance(b_t, gs.Constant) or prod.outputs[0].shape is None or len(prod.outputs[0].shape) != 2:
        return False
    B = b_t.values.astype(np.float64)
    trans_b = int(prod.attrs.get("transB", 0))
    n = B.shape[0] if trans_b else B.shape[1]
    if n != scale.size:
        return False
    alpha = float(prod.attrs.get("alpha", 1.0))
    beta = float(prod.attrs.get("beta", 1.0))
    Bn = B * (scale[:, None] if trans_b else scale[None, :])
    if len(prod.inputs) > 2:
        if not isinstance(prod.inputs[2], gs.Constant):
            return False
        C = np.broadcast_to(prod.inputs[2].values.astype(np.float64), (prod.outputs[0].shape[0], n)) \
            if prod.inputs[2].values.ndim == 2 else np.broadcast_to(prod.inputs[2].values.astype(np.float64), (n,))
    else:
        C = np.zeros(n)
    Cn = beta * C * scale + shift
    dtype = b_t.values.dtype
    prod.inputs[1] = gs.Constant(b_t.name + "_bnfolded", (Bn).astype(dtype))
    bias = gs.Constant(prod.name + "_bias_bnfolded", Cn.astype(dtype))
    _set_bias(prod, bias)
    prod.attrs["beta"] = 1.0
    prod.attrs["alpha"] = alpha
    return True


def _fold_matmul(prod: gs.Node, bn: gs.Node, scale, shift, graph) -> bool:
    w = prod.inputs[1]
    out = prod.outputs[0]
    # BN normalizes axis 1; MatMul's output channels are its last axis: they coincide only for 2-D outputs.
    if not isinstance(w, gs.Constant) or w.values.ndim != 2 or out.shape is None or len(out.shape) != 2:
        return False
    if w.values.shape[1] != scale.size:
        return False
    dtype = w.values.dtype
    prod.inputs[1] = gs.Constant(w.name + "_bnfolded", (w.values.astype(np.float64) * scale[None, :]).astype(dtype))
    bn_out = bn.outputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    graph.nodes.append(gs.Node("Add", bn.name + "_shift", outputs=[bn_out],
                               inputs=[out, gs.Constant(bn.name + "_shift", shift.astype(dtype))]))
    return True


def _channel_values(node: gs.Node, conv_out: gs.Variable, cout: int):
    """The per-output-channel values of node's other operand when node (an Add or Mul) combines conv_out with a
    constant that broadcasts along the conv output's channel axis only (shape (), (1,), (C, 1, .., 1) or
    (1, C, 1, .., 1)) and leaves its shape as it is; else None."""
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    other = node.inputs[1] if node.inputs[0] is conv_out else node.inputs[0]
    if other is conv_out or not isinstance(other, gs.Constant) or conv_out.shape is None:
        return None
    v = other.values
    rank = len(conv_out.shape)
    if v.dtype.kind != "f" or v.ndim > rank:
        return None
    if v.size == 1:
        return np.full(cout, float(v.reshape(())), np.float64)
    shape = (1,) * (rank - v.ndim) + tuple(v.shape)
    if shape != (1, cout) + (1,) * (rank - 2):
        return None
    return v.reshape(cout).astype(np.float64)


def _fold_affine(prod: gs.Node, node: gs.Node, graph) -> bool:
    """Fold `node`, an Add (a bias: into prod's bias) or Mul (a scale: into prod's weight and bias) of a
    per-channel constant after Conv / ConvTranspose prod, into prod; False (nothing changed) when it is not one."""
    w = prod.inputs[1] if len(prod.inputs) > 1 else None
    if not isinstance(w, gs.Constant) or w.values.ndim < 3 or \
            (len(prod.inputs) > 2 and not isinstance(prod.inputs[2], gs.Constant)):
        return False
    group = int(prod.attrs.get("group", 1))
    cout = w.values.shape[0] if prod.op == "Conv" else w.values.shape[1] * group
    values = _channel_values(node, prod.outputs[0], cout)
    if values is None:
        return False
    if node.op == "Mul":                # a scale: the weight is rewritten, so it must be prod's alone
        return len(w.outputs) == 1 and _fold_conv(prod, values, np.zeros(cout), graph)
    b = prod.inputs[2].values.astype(np.float64) if len(prod.inputs) > 2 else np.zeros(cout)
    bias = gs.Constant(prod.name + "_bias_addfolded", (b + values).astype(w.values.dtype))
    _set_bias(prod, bias)
    return True


def fold_channel_affine(graph) -> dict[str, int]:
    """Fold every per-channel constant Add (bias) or Mul (scale) that is the only consumer of a Conv /
    ConvTranspose output (whose bias is not shared) into that conv (exact up to float rounding, as folding a
    BatchNormalization is): {"bias_adds": n, "scale_muls": m}. A Conv -> Mul -> Add chain (a BatchNormalization
    exported as its arithmetic) folds whole, in node order."""
    counts = {"bias_adds": 0, "scale_muls": 0}
    for node in list(graph.nodes):
        if node.op not in ("Add", "Mul") or not node.inputs:
            continue
        x = next((t for t in node.inputs if not isinstance(t, gs.Constant) and len(t.inputs) == 1), None)
        if x is None or single_consumer(x, graph) is not node:
            continue
        prod = x.inputs[0]
        if prod.op not in ("Conv", "ConvTranspose") or len(prod.inputs) < 2:
            continue
        if len(prod.inputs) > 2 and len(prod.inputs[2].outputs) > 1:      # a shared bias stays as it is
            continue
        keep = node.inputs.index(x)
        # bypass cannot fail here (x has one producer and is not a graph output), so the fold is never left
        # without the node's removal
        if _fold_affine(prod, node, graph) and bypass(graph, node, keep_input=keep):
            counts["bias_adds" if node.op == "Add" else "scale_muls"] += 1
    return counts


@register
class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    help = ("Fold inference BatchNormalization into the preceding Conv, ConvTranspose, Gemm or MatMul, and a "
            "per-channel constant Add / Mul after a Conv / ConvTranspose into its bias / weight")

    def run(self, graph, ctx):
        by_affine = fold_channel_affine(graph)
        folded = 0
        for bn in list(graph.nodes):
            if bn.op != "BatchNormalization" or not bn.inputs or bn.inputs[0].inputs == []:
                continue
            x = bn.inputs[0]
            if len(x.inputs) != 1:
                continue
            prod = x.inputs[0]
            if single_consumer(x, graph) is not bn or prod.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                continue
            if len(prod.inputs) < 2 or len(prod.inputs[1].outputs) > 1:   # folding would copy a shared weight
                continue
            affine = _bn_affine(bn)
            if affine is None:
                continue
            scale, shift = affine
            if prod.op in ("Conv", "ConvTranspose"):
                ok = _fold_conv(prod, scale, shift, graph)
            elif prod.op == "Gemm":
                ok = _fold_gemm(prod, scale, shift, graph)
            else:
                if _fold_matmul(prod, bn, scale, shift, graph):
                    folded += 1
                continue
            if ok and bypass(graph, bn):   # bypass cannot fail here: BN's input has a producer
                folded += 1
        changed = folded + sum(by_affine.values()) > 0
        if changed:
            toposort(graph.cleanup(remove_unused_graph_inputs=False))
        return PassResult(graph, changed, {"folded": folded, **by_affine})
