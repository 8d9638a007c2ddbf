"""Channels-last transposed convolutions whose kernel equals their stride: a conv2d_transpose with kernel = stride,
no padding, output padding or dilation and one group (the upsampling of U-Nets and of DBNet's head, PP-OCRv4's
detector: 2x2, stride 2) writes every input pixel's kernel-sized block of outputs and no two blocks overlap, so it is
a 1x1 convolution to kh*kw*C_out channels followed by a depth-to-space rearrangement:

    y[n, h*kh + i, w*kw + j, o] = sum_c x[n, h, w, c] * W[c, o, i, j]           (W: IOHW)
                                = conv1x1(x, W')[n, h, w, (i*kw + j)*C_out + o]  (W' OHWI: W'[(i, j, o), 0, 0, c])

TVM 0.27 legalizes conv2d_transpose only in NCHW, but ConvertLayout has a rule for it: cpu_layout asks for such
convs in NHWC (IOHW weights, left as they are) like for conv2d, so the layout is carried through them, and
as_conv_depth_to_space then replaces each NHWC one by the NHWC 1x1 conv2d (OHWI weights, which the channels-last
conv schedule takes) and a depth-to-space copy [N, H, W, kh*kw*C_out] -> [N, H*kh, W*kw, C_out], which FuseOps
fuses with the ops after it (bias, batch norm, activation, a skip concat). With the channels ordered (i, j, o) each
copied run is C_out contiguous floats. A 1x1 conv to a count that is not a multiple of the channels-last minimum
(cpu_layout.MIN_NHWC_CHANNELS; DBNet's last one has 4) computes zero channels up to the next multiple, and the copy
reads the real ones. Exact up to float summation order (each output is the same sum of C_in products).

PP-OCRv4's detector at 640x640 (1 thread, AMD EPYC): its two transposed convs with their fused epilogues took
11.6 and 6.2 ms NCHW, the 1x1 convs and copies with the same epilogues 1.4 ms in all; the whole model 50.0 -> 35.4
ms."""
from __future__ import annotations

from .relax_bindings import shape_of

#: the layouts cpu_layout asks ConvertLayout for on a conv2d_transpose that is_depth_to_space accepts
NHWC_LAYOUTS = {"relax.nn.conv2d_transpose": ["NHWC", "IOHW"]}


def is_depth_to_space(call) -> bool:
    """call is an fp32 relax conv2d_transpose of static shapes, IOHW weights, one group, strides equal to its kernel
    and no padding, output padding or dilation (in any data layout)."""
    if getattr(call.op, "name", None) != "relax.nn.conv2d_transpose" or \
            str(getattr(call.ty, "dtype", "")) != "float32":
        return False
    a, x_shape, w_shape = call.attrs, shape_of(call.args[0]), shape_of(call.args[1])
    if w_shape is None or x_shape is None or len(w_shape) != 4 or len(x_shape) != 4:
        return False
    return int(a.groups) == 1 and str(a.kernel_layout) == "IOHW" and str(a.out_layout) == str(a.data_layout) and \
        [int(s) for s in a.strides] == list(w_shape[2:]) and all(int(p) == 0 for p in a.padding) and \
        all(int(p) == 0 for p in a.output_padding) and all(int(d) == 1 for d in a.dilation)


def as_conv_depth_to_space(mod, min_channels: int):
    """mod with every NHWC conv2d_transpose that is_depth_to_space accepts replaced by a 1x1 conv2d and a
    depth-to-space copy (see the module docstring); the 1x1 conv's channels padded to a multiple of min_channels."""
    from .relax_layout import rewrite_calls

    def rewrite(bb, call):
        if not is_depth_to_space(call) or str(call.attrs.data_layout) != "NHWC":
            return call
        return _conv_depth_to_space(bb, call, min_channels)

    return rewrite_calls(mod, rewrite)


def _conv_depth_to_space(bb, call, min_channels: int):
    from tvm import relax
    x, w = call.args
    ci, co, kh, kw = shape_of(w)
    ch = kh * kw * co
    padded = -(-ch // min_channels) * min_channels
    # W [ci, co, kh, kw] -> W' [(kh, kw, co), 1, 1, ci]: output channel (i*kw + j)*co + o
    w2 = bb.emit(relax.op.reshape(bb.emit(relax.op.permute_dims(w, [2, 3, 1, 0])), [ch, 1, 1, ci]))
    if padded != ch:
        w2 = bb.emit(relax.op.nn.pad(w2, [0, padded - ch, 0, 0, 0, 0, 0, 0]))
    conv = bb.emit(relax.op.nn.conv2d(x, w2, data_layout="NHWC", kernel_layout="OHWI", out_layout="NHWC",
                                      out_dtype=call.attrs.out_dtype))
    return bb.emit_te(_depth_to_space, conv, kh, kw, co, primfunc_name_hint="depth_to_space")


def _depth_to_space(x, kh: int, kw: int, co: int):
    """[N, H, W, >= kh*kw*co] -> [N, H*kh, W*kw, co]: out[n, y, x, o] = x[n, y//kh, x//kw, (y%kh*kw + x%kw)*co + o]
    as one TE compute: the equivalent reshape / permute_dims / reshape chain, inlined, leaves index arithmetic TVM
    does not simplify (a U-Net's copy fused with its skip concat, [1, 128, 128, 32] -> [1, 256, 256, 16]: 1.05 ms
    that way, 0.48 this way; 1 thread, AMD EPYC)."""
    from tvm import te
    n, h, w, _ = x.shape
    return te.compute((n, h * kh, w * kw, co),
                      lambda b, y, xx, o: x[b, y // kh, xx // kw, ((y % kh) * kw + xx % kw) * co + o],
                      name="depth_to_space")
