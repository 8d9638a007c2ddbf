"""deconv-as-depth-to-space: a ConvTranspose whose square kernel equals its stride (no padding, output padding or
dilation, one group: the 2x2 stride-2 upsampling of U-Nets and of DBNet's head, PP-OCRv4's detector) writes every
input pixel's k x k block of outputs and no two blocks overlap, so it is a 1x1 Conv to k*k*C_out channels followed
by DepthToSpace (mode DCR, blocksize k):

    y[n, o, h*k + i, w*k + j] = b[o] + sum_c x[n, c, h, w] * W[c, o, i, j]          (W: C_in x C_out x k x k)
                              = conv1x1(x, W', b')[n, (i*k + j)*C_out + o, h, w]
    with W'[(i*k + j)*C_out + o, c] = W[c, o, i, j] and b' = b repeated k*k times

Exact: every output is the same sum of the same products. quantize{scheme=int8} applies it before calibrating, so
the 1x1 Conv becomes an integer conv (the cpu target's int8 lowering has no transposed conv, and onnxruntime's
quantizer leaves DepthToSpace, a copy, in float); the fp32 cpu target does the same rewrite itself, channels-last,
inside its Relax lowering (targets/cpu_conv_transpose.py), so the pass is not in its legalization."""
import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import Names
from graphopt.passmanager import Pass, PassResult, register


def blocksize(node: gs.Node) -> int | None:
    """k for a ConvTranspose the rewrite takes (module docstring): 2-D, constant float weight (and bias), one group,
    kernel k x k = strides, no padding, output padding, dilation or output_shape; else None."""
    if node.op != "ConvTranspose" or len(node.inputs) < 2 or len(node.outputs) != 1:
        return None
    w = node.inputs[1]
    if not isinstance(w, gs.Constant) or w.values.dtype.kind != "f" or w.values.ndim != 4:
        return None
    if len(node.inputs) > 2 and not isinstance(node.inputs[2], gs.Constant):
        return None
    k = int(w.values.shape[2])
    a = node.attrs
    ok = (w.values.shape[3] == k and int(a.get("group", 1)) == 1
          and list(a.get("kernel_shape", [k, k])) == [k, k] and list(a.get("strides", [1, 1])) == [k, k]
          and all(int(p) == 0 for p in a.get("pads", [0, 0, 0, 0]))
          and all(int(p) == 0 for p in a.get("output_padding", [0, 0]))
          and all(int(d) == 1 for d in a.get("dilations", [1, 1]))
          and "output_shape" not in a and a.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))
    return k if ok and k > 1 else None


def rewrite_deconvs(graph: gs.Graph, skip=()) -> int:
    """Rewrite every ConvTranspose blocksize() takes, except nodes named in skip, in place; the number rewritten."""
    count, names = 0, Names(graph)
    for node in list(graph.nodes):
        k = blocksize(node)
        if k is None or node.name in skip:
            continue
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        W = w.values
        cin, cout = W.shape[0], W.shape[1]
        name = node.name or f"deconv_{count}"
        # W [ci, co, i, j] -> W' [(i, j, co), ci, 1, 1]
        w2 = gs.Constant(names(f"{w.name}_as_conv"),
                         np.ascontiguousarray(W.transpose(2, 3, 1, 0).reshape(k * k * cout, cin, 1, 1)))
        inputs = [x, w2]
        if len(node.inputs) > 2:
            inputs.append(gs.Constant(names(f"{node.inputs[2].name}_as_conv"), np.tile(node.inputs[2].values, k * k)))
        shape = None
        if y.shape is not None and len(y.shape) == 4 and all(isinstance(d, (int, np.integer)) for d in y.shape):
            shape = [y.shape[0], k * k * cout, y.shape[2] // k, y.shape[3] // k]
        blocks = gs.Variable(names(f"{y.name}_blocks"), dtype=y.dtype, shape=shape)
        graph.nodes.append(gs.Node("Conv", name=names(f"{name}_as_conv"), inputs=inputs, outputs=[blocks],
                                   attrs={"kernel_shape": [1, 1]}))
        graph.nodes.append(gs.Node("DepthToSpace", name=names(f"{name}_depth_to_space"), inputs=[blocks],
                                   outputs=[y], attrs={"blocksize": k, "mode": "DCR"}))
        node.inputs.clear()
        node.outputs.clear()
        count += 1
    if count:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return count


@register
class DeconvAsDepthToSpace(Pass):
    name = "deconv-as-depth-to-space"
    help = ("Rewrite ConvTranspose whose square kernel equals its stride (no padding) as a 1x1 Conv and a "
            "DepthToSpace (exact); quantize{scheme=int8} applies it so the int8 kernels take the upsampling")

    def run(self, graph, ctx):
        count = rewrite_deconvs(graph)
        return PassResult(graph, count > 0, {"rewritten": count})
