"""Block shapes of a weight (seen as [out features, in features]): detection, BSR packing, and the model's candidate
weights keyed by content. numpy and onnx only."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt import metadata

#: auto-detected block shapes (r over output features, c over input features); 1x1 and 2x2 are only used when
#: recorded: unstructured sparsity rarely beats a dense kernel
BLOCK_CANDIDATES = ((32, 1), (16, 1), (8, 1), (1, 16), (1, 8), (4, 4), (8, 4), (4, 8), (4, 1), (1, 4))
#: per stored block, the cost of fetching its column index and looping, in multiply-adds
BLOCK_OVERHEAD = 4
DEFAULT_MIN_SPARSITY = 0.5


def parse_block(b) -> tuple[int, int]:
    if isinstance(b, str):
        r, _, c = b.lower().partition("x")
        b = (r, c)
    r, c = (int(v) for v in b)
    if r < 1 or c < 1:
        raise ValueError(f"bad block shape {b}")
    return r, c


def block_mask(w: np.ndarray, block) -> np.ndarray:
    """[N/r, K/c] bool: which r x c blocks of w [N, K] hold a nonzero."""
    r, c = block
    n, k = w.shape
    return np.any(w.reshape(n // r, r, k // c, c) != 0, axis=(1, 3))


def block_sparsity(w: np.ndarray, block) -> float:
    m = block_mask(w, block)
    return 1.0 - float(m.sum()) / m.size


def fits(shape, block) -> bool:
    return shape[0] % block[0] == 0 and shape[1] % block[1] == 0


def choose_block(w: np.ndarray, min_sparsity: float = DEFAULT_MIN_SPARSITY, candidates=BLOCK_CANDIDATES):
    """The block shape with the least estimated work among those with at least min_sparsity zero blocks, or None.
    Work: stored blocks x (r*c + BLOCK_OVERHEAD); ties go to the larger block."""
    best = None
    for blk in candidates:
        if not fits(w.shape, blk):
            continue
        mask = block_mask(w, blk)
        nnz = int(mask.sum())
        if 1.0 - nnz / mask.size < min_sparsity:
            continue
        cost = (nnz * (blk[0] * blk[1] + BLOCK_OVERHEAD), -blk[0] * blk[1])
        if best is None or cost < best[0]:
            best = (cost, blk)
    return None if best is None else best[1]


@dataclass
class BSR:
    """w [N, K] in block-sparse rows: data [nnzb, r, c], indices [nnzb] (block column), indptr [N/r + 1]."""
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple
    block: tuple

    @property
    def nnzb(self) -> int:
        return int(self.indices.shape[0])

    def todense(self) -> np.ndarray:
        r, c = self.block
        n, k = self.shape
        out = np.zeros((n // r, k // c, r, c), self.data.dtype)
        rows = np.repeat(np.arange(n // r), np.diff(self.indptr))
        out[rows, self.indices] = self.data
        return out.transpose(0, 2, 1, 3).reshape(n, k)


def to_bsr(w: np.ndarray, block) -> BSR:
    r, c = block
    n, k = w.shape
    if not fits(w.shape, block):
        raise ValueError(f"block {r}x{c} does not tile a {n}x{k} weight")
    blocks = w.reshape(n // r, r, k // c, c).transpose(0, 2, 1, 3)
    nz = np.any(blocks != 0, axis=(2, 3))
    rows, cols = np.nonzero(nz)
    data = np.ascontiguousarray(blocks[rows, cols])
    if data.shape[0] == 0:     # an all-zero weight: one unused zero block keeps the buffers non-empty
        return BSR(np.zeros((1, r, c), w.dtype), np.zeros(1, np.int32), np.zeros(n // r + 1, np.int32), (n, k),
                   (r, c))
    indptr = np.concatenate([[0], np.cumsum(nz.sum(axis=1))])
    return BSR(data, cols.astype(np.int32), indptr.astype(np.int32), (n, k), (r, c))


def weight_key(w: np.ndarray) -> str:
    h = hashlib.sha1()
    h.update(str((w.shape, w.dtype.str)).encode())
    h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def _weight_oi(node: onnx.NodeProto, inits: dict) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(initializer name, the array as stored, the weight as [out, in]) for a node that could go sparse."""
    if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
        w = inits[node.input[1]]
        return (node.input[1], w, w.T) if w.ndim == 2 else None
    if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits:
        w = inits[node.input[1]]
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (node.input[1], w, w if trans_b else w.T) if w.ndim == 2 else None
    if node.op_type == "Conv" and len(node.input) >= 2 and node.input[1] in inits:
        w = inits[node.input[1]]
        if w.ndim == 4 and w.shape[2:] == (1, 1):
            return node.input[1], w, w[:, :, 0, 0]
    return None


def weight_table(model: onnx.ModelProto) -> dict[str, dict]:
    """weight_key of every Gemm / MatMul / 1x1-Conv constant weight -> {"node", "op", "block" (recorded or None)}.
    The Relax rewrite matches constants by content, since the importer keeps neither node nor tensor names."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rec = metadata.sparse_blocks(model)
    table = {}
    for node in model.graph.node:
        got = _weight_oi(node, inits)
        if got is None:
            continue
        _, stored, _ = got
        table.setdefault(weight_key(stored), {"node": node.name, "op": node.op_type, "block": rec.get(node.name)})
    return table
