"""Compile-time (numpy) packing of fp32 weights into bf16 pairs for the bf16 kernels."""
from __future__ import annotations

import numpy as np


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits of float32 values, rounded to nearest even (the kernels' rounding of activations)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def pack_conv_weight(w: np.ndarray, C2: int) -> np.ndarray:
    """fp32 OIHW -> bf16 bits [OCp/16, KH, KW, C2, 16, 2] (channel pairs innermost), zero padded."""
    OC, C, KH, KW = w.shape
    OCp = -(-OC // 16) * 16
    wp = np.zeros((OCp, C2 * 2, KH, KW), np.float32)
    wp[:OC, :C] = w
    wp = wp.reshape(OCp // 16, 16, C2, 2, KH, KW).transpose(0, 4, 5, 2, 1, 3)
    return bf16_bits(wp)


def pack_dense_weight(w: np.ndarray, K2: int) -> np.ndarray:
    """fp32 [N, K] -> bf16 bits [Np/16, K2, 16, 2], zero padded."""
    N, K = w.shape
    Np = -(-N // 16) * 16
    wp = np.zeros((Np, K2 * 2), np.float32)
    wp[:N, :K] = w
    return bf16_bits(wp.reshape(Np // 16, 16, K2, 2).transpose(0, 2, 1, 3))


def padded_bias(b: np.ndarray | None, n: int, padded: int) -> np.ndarray:
    out = np.zeros(padded, np.float32)
    if b is not None:
        out[:n] = np.asarray(b, np.float32).reshape(n)
    return out
