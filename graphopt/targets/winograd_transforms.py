"""Winograd F(2x2, 3x3) (Lavin & Gray) transforms shared by the fp32 kernel (cpu_winograd_kernel) and the bf16 one
(bf16/winograd): the matrices, the compile-time weight transform, and the TIR helpers that spell a transform out
as additions and subtractions."""
from __future__ import annotations

import numpy as np

#: B^T (input), G (weights), A^T (output)
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)


def transformed_weight(w: np.ndarray) -> np.ndarray:
    """OIHW 3x3 weights -> float64 U [16, C, K]: G g G^T per (k, c), component e = 4 i + j."""
    K, C = w.shape[:2]
    return np.einsum("ia,kcab,jb->ijck", G, w.astype(np.float64), G).reshape(16, C, K)


def combination(coef: np.ndarray, term):
    """sum of coef[a, b] * term(a, b) over the nonzero coefficients (+-1 as additions / subtractions)."""
    out = None
    for (a, b), c in np.ndenumerate(coef):
        if c == 0:
            continue
        t = term(a, b)
        if out is None:
            out = t if c == 1 else -t if c == -1 else t * float(c)
        elif c in (1, -1):
            out = out + t if c == 1 else out - t
        else:
            out = out + t * float(c)
    return out


def select(index, values):
    """values[index] for a TIR index (a chain of Selects that unrolling folds)."""
    from tvm import tirx
    out = values[-1]
    for i in range(len(values) - 2, -1, -1):
        out = tirx.Select(index == i, values[i], out)
    return out


def transformed_input(th, tw, e, pad_top: int, pad_left: int, H: int, W: int, load, also=None):
    """Component e of B^T d B for tile (th, tw) (TIR): d(a, b) = load(h, w) at the tap's input row and column,
    clamped into the image, and zero outside it (or where the condition `also` is false)."""
    from tvm import tirx

    def d(a, b):
        h, w = th * 2 + (a - pad_top), tw * 2 + (b - pad_left)
        inside = tirx.all(h >= 0, h < H, w >= 0, w < W, *([] if also is None else [also]))
        hh, ww = tirx.min(tirx.max(h, 0), H - 1), tirx.min(tirx.max(w, 0), W - 1)
        # if_then_else, not Select: under a Select's condition the simplifier drops the clamp, and the load (which a
        # Select evaluates either way) then reads the row above the image: SIGSEGV when the input starts a fresh
        # mapping (tests/targets/guarded_kernels.py)
        return tirx.if_then_else(inside, load(hh, ww), tirx.const(0.0, "float32"))
    return select(e, [combination(np.outer(BT[i], BT[j]), d) for i in range(4) for j in range(4)])


def output_at(m, h, w):
    """Output pixel (h, w) of its 2x2 tile A^T M A, for m(a, b) component 4 a + b of the tile's M (TIR)."""
    outs = [combination(np.outer(AT[i], AT[j]), m) for i in range(2) for j in range(2)]
    return select(h % 2, [select(w % 2, outs[:2]), select(w % 2, outs[2:])])
