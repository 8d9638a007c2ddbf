"""Compile-time (numpy) weight packing for the int8 kernels and the per-channel epilogue constants."""
from __future__ import annotations

import numpy as np

from .intrinsics import TENSOR_INTRINS


def pack_conv_weight(w: np.ndarray, C4: int, dot: str = "vnni") -> np.ndarray:
    """int8 OIHW -> [OCp/16, KH, KW, C4/4, 16, 4] (vnni, usdot) or [.., 4, 16] (avx2), zero padded."""
    OC, C, KH, KW = w.shape
    OCp = -(-OC // 16) * 16
    wp = np.zeros((OCp, C4, KH, KW), np.int8)
    wp[:OC, :C] = w
    wp = wp.reshape(OCp // 16, 16, C4 // 4, 4, KH, KW)
    return np.ascontiguousarray(wp.transpose(0, 4, 5, 2, 1, 3) if dot in TENSOR_INTRINS
                                else wp.transpose(0, 4, 5, 2, 3, 1))


def pack_dense_weight(w: np.ndarray, K4: int, dot: str = "vnni") -> np.ndarray:
    """int8 [N, K] -> [Np/16, K4/4, 16, 4] (vnni, usdot) or [.., 4, 16] (avx2), zero padded."""
    N, K = w.shape
    Np = -(-N // 16) * 16
    wp = np.zeros((Np, K4), np.int8)
    wp[:N, :K] = w
    wp = wp.reshape(Np // 16, 16, K4 // 4, 4)
    return np.ascontiguousarray(wp.transpose(0, 2, 1, 3) if dot in TENSOR_INTRINS else wp.transpose(0, 2, 3, 1))


def epilogue_constants(w: np.ndarray, sx: float, sw: np.ndarray, zx_u: int, bias_i32: np.ndarray | None,
                       bias_f: np.ndarray | None, sy: float | None, padded: int):
    """(Bi int32, M f32, Bf f32) per (padded) output channel, for acc computed on u8 inputs with zero point zx_u:
    value = float(acc + Bi) * M + Bf; 'q' modes divide by the output scale sy (M = sx*sw/sy, Bf = bias_f/sy)."""
    OC = w.shape[0]
    colsum = w.reshape(OC, -1).astype(np.int64).sum(1)
    bi = -zx_u * colsum
    if bias_i32 is not None:
        bi = bi + bias_i32.astype(np.int64)
    if np.abs(bi).max(initial=0) >= 2 ** 31:
        raise ValueError("int32 bias overflow")
    s = (np.float32(sx) * np.asarray(sw, np.float32)).astype(np.float32) * np.ones(OC, np.float32)
    bf = np.zeros(OC, np.float32) if bias_f is None else np.asarray(bias_f, np.float32).reshape(OC)
    if sy is not None:
        s = (s.astype(np.float64) / sy).astype(np.float32)
        bf = (bf.astype(np.float64) / sy).astype(np.float32)
    Bi = np.zeros(padded, np.int32)
    M = np.zeros(padded, np.float32)
    Bf = np.zeros(padded, np.float32)
    Bi[:OC], M[:OC], Bf[:OC] = bi, s, bf
    return Bi, M, Bf

def pack_dw_weight(w: np.ndarray) -> np.ndarray:
    """int8 depthwise [C, 1, KH, KW] -> [KH, KW, Cp] (channels last, zero padded to a multiple of 16)."""
    C, _, KH, KW = w.shape
    Cp = -(-C // 16) * 16
    wp = np.zeros((KH, KW, Cp), np.int8)
    wp[:, :, :C] = w[:, 0].transpose(1, 2, 0)
    return wp
