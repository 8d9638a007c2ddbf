"""numpy reference for the int8 kernels' tests (x86 and aarch64): the exact s32 accumulators of a quantized conv."""
import numpy as np


def reference_acc_conv(x_nchw: np.ndarray, w: np.ndarray, spec) -> np.ndarray:
    """s32 accumulators sum((x - zx) * w) as NHWC [N, OH, OW, OC] (int64 math); spec: an int8 ConvSpec."""
    x = x_nchw.astype(np.int64) - spec.zx
    pt, pl, pb, pr = spec.pad
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    N, C, _, _ = x.shape
    OC, _, KH, KW = w.shape
    out = np.zeros((N, spec.OH, spec.OW, OC), np.int64)
    for kh in range(KH):
        for kw in range(KW):
            h0, w0 = kh * spec.dilation[0], kw * spec.dilation[1]
            patch = x[:, :, h0:h0 + spec.stride[0] * spec.OH:spec.stride[0], w0:w0 + spec.stride[1] * spec.OW:spec.stride[1]]
            out += np.einsum("nchw,oc->nhwo", patch, w[:, :, kh, kw].astype(np.int64))
    return out

