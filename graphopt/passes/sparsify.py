"""sparsify: magnitude sparsity on Gemm, MatMul and 1x1-Conv weights, unstructured or in blocks.

Every eligible weight is viewed as a matrix W[out, in] (out = output features / channels, in = the reduction
axis: Gemm's B with transB, B^T without; MatMul's constant B^T; a 1x1 Conv's W[:, :, 0, 0]). The pattern:

* `block=RxC` (1x1 = unstructured, 1x16, 4x4, ...): W is cut into R x C tiles (R output rows, C consecutive
  inputs; edge tiles are partial); the `sparsity` fraction of tiles with the smallest L2 norm is zeroed.
* `block=N:M` (2:4 semi-structured): in every run of M consecutive inputs of an output row the M-N smallest
  |w| are zeroed (sparsity is then 1 - N/M; layers whose input count is not a multiple of M are skipped).

The zeros are written into the ONNX initializers (the graph stays dense and runs anywhere); the pattern is
recorded in the pass info and in the graph metadata (graphopt.metadata: `sparse_blocks` (rows, cols) per node,
`sparse_nm` for N:M), so a target that stores block-sparse weights (BSR on cuda) can find them. Ties break by
position, so running the pass again on its own output picks the same mask (and reports no change). The pass is
lossy: the PassManager reports its drift.
"""
from __future__ import annotations

import re

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import metadata
from graphopt.errors import BadInput, printable
from graphopt.graph import constant_value
from graphopt.passmanager import Option, Pass, PassResult, register

#: the longest block side (or M of N:M) sparsify accepts: larger blocks are not block sparsity, and the mask of
#: a weight is padded to whole blocks
MAX_BLOCK_SIDE = 256
_BLOCK_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_block(text: str) -> tuple[str, int, int]:
    """'4x4' -> ('block', 4, 4); '2:4' -> ('nm', 2, 4). Raises BadInput."""
    m = _BLOCK_RE.match(str(text))
    if m and int(m.group(1)) >= 1 and int(m.group(2)) >= 1:
        return "block", int(m.group(1)), int(m.group(2))
    m = _NM_RE.match(str(text))
    if m and 1 <= int(m.group(1)) < int(m.group(2)):
        return "nm", int(m.group(1)), int(m.group(2))
    raise BadInput(f"pass 'sparsify': block={text} is not a block shape; write RxC (1x1 unstructured, 1x16, 4x4) "
                   f"or N:M (2:4)")


def weight_matrix(node: gs.Node):
    """(input index, W[out, in] as float64, to_weight(matrix) -> array of the input's layout) or None."""
    if node.op == "Gemm" and len(node.inputs) > 1:
        v = constant_value(node.inputs[1])
        if v is None or v.ndim != 2 or constant_value(node.inputs[0]) is not None:
            return None
        if int(node.attrs.get("transB", 0)):
            return 1, v.astype(np.float64), lambda m: m.astype(v.dtype)
        return 1, v.T.astype(np.float64), lambda m: np.ascontiguousarray(m.T).astype(v.dtype)
    if node.op == "MatMul":
        v = constant_value(node.inputs[1])
        if v is None or v.ndim != 2 or constant_value(node.inputs[0]) is not None:
            return None
        return 1, v.T.astype(np.float64), lambda m: np.ascontiguousarray(m.T).astype(v.dtype)
    if node.op == "Conv" and len(node.inputs) > 1:
        v = constant_value(node.inputs[1])
        if v is None or v.ndim < 3 or any(d != 1 for d in v.shape[2:]):
            return None
        return 1, v.reshape(v.shape[0], v.shape[1]).astype(np.float64), lambda m: m.reshape(v.shape).astype(v.dtype)
    return None


def block_mask(W: np.ndarray, kind: str, r: int, c: int, sparsity: float) -> np.ndarray:
    """Boolean keep-mask of W[out, in]."""
    out, inp = W.shape
    if kind == "nm":
        n, m = r, c
        g = np.abs(W).reshape(out, inp // m, m)
        order = np.argsort(g, axis=2, kind="stable")
        keep = np.ones_like(g, dtype=bool)
        np.put_along_axis(keep, order[:, :, :m - n], False, axis=2)
        return keep.reshape(out, inp)
    R, C = -(-out // r), -(-inp // c)
    pad = np.zeros((R * r, C * c))
    pad[:out, :inp] = W
    norms = np.sqrt((pad.reshape(R, r, C, c) ** 2).sum(axis=(1, 3))).reshape(-1)
    k = int(round(sparsity * norms.size))
    keep_b = np.ones(norms.size, dtype=bool)
    if k > 0:
        keep_b[np.argsort(norms, kind="stable")[:k]] = False
    keep = np.repeat(np.repeat(keep_b.reshape(R, C), r, axis=0), c, axis=1)
    return keep[:out, :inp]


@register
class Sparsify(Pass):
    name = "sparsify"
    help = "Zero the smallest weights of Gemm/MatMul/1x1-Conv layers, unstructured or in blocks (1x16, 4x4, 2:4)"
    lossy = True
    options = {
        "sparsity": Option(float, 0.5, "fraction of each weight (in blocks) set to zero", minimum=0.0,
                           maximum=0.99),
        "block": Option(str, "", "RxC block (1x1 unstructured, 1x16, 4x4) or N:M (2:4); empty: the target's "
                                 "block shape (hw.structure.blocks), else 1x1"),
        "ignore": Option(list, [], "node names left dense"),
        "min_params": Option(int, 0, "leave weights smaller than this dense", minimum=0),
    }

    @classmethod
    def target_defaults(cls, hw):
        return {"block": "{}x{}".format(*(hw.structure.blocks or (1, 1)))}

    def validate(self):
        if self.opts["block"]:
            kind, n, m = parse_block(self.opts["block"])
            if max(n, m) > MAX_BLOCK_SIDE:
                raise BadInput(f"pass 'sparsify': block={printable(self.opts['block'])} has a side above "
                               f"{MAX_BLOCK_SIDE}; blocks are small tiles of a weight (1x16, 4x4, 32x1, 2:4)")
            if kind == "nm" and "sparsity" in self.changed() and abs(self.opts["sparsity"] - (1 - n / m)) > 1e-9:
                raise BadInput(f"pass 'sparsify': block={self.opts['block']} fixes the sparsity at {1 - n / m:g}; "
                               f"drop sparsity= or give sparsity={1 - n / m:g}")

    def run(self, graph, ctx):
        o = self.opts
        block = o["block"] or "{}x{}".format(*(ctx.hw.structure.blocks or (1, 1)))
        kind, r, c = parse_block(block)
        names = {n.name for n in graph.nodes}
        for n in o["ignore"]:
            if n not in names:
                raise BadInput(f"pass 'sparsify': ignore names node '{n}', which is not in the graph")
        sparsity = (1 - r / c) if kind == "nm" else o["sparsity"]
        layers, skipped = {}, {}
        before = metadata.sparse_blocks(graph), metadata.sparse_nm(graph)
        changed = False
        zeros = total = 0
        used = set(graph.tensors().keys())
        for node in graph.nodes:
            view = weight_matrix(node)
            if view is None:
                continue
            idx, W, back = view
            label = node.name or f"{node.op}#{id(node)}"
            if node.name in o["ignore"]:
                skipped[label] = "ignored by the user"
                continue
            if W.size < o["min_params"]:
                skipped[label] = f"{W.size} weights < min_params"
                continue
            if kind == "nm" and W.shape[1] % c:
                skipped[label] = f"{W.shape[1]} inputs is not a multiple of {c}"
                continue
            keep = block_mask(W, kind, r, c, sparsity)
            newW = np.where(keep, W, 0.0)
            old = constant_value(node.inputs[idx])
            new = back(newW)
            if not np.array_equal(new, old):
                changed = True
                t = node.inputs[idx]
                base = t.name if t.name.endswith("_sparse") else f"{t.name}_sparse"
                nm, k = base, 0
                while nm in used:
                    k += 1
                    nm = f"{base}_{k}"
                used.add(nm)
                node.inputs[idx] = gs.Constant(nm, np.ascontiguousarray(new))
            nz = int((newW == 0).sum())
            zeros += nz
            total += W.size
            layers[label] = {"block": block, "shape": [int(W.shape[0]), int(W.shape[1])], "layout": "out x in",
                             "weight": node.inputs[idx].name, "sparsity": round(nz / W.size, 4),
                             "kept_blocks": int(keep[::r, ::c].sum()) if kind == "block" else None}
            if kind == "nm":
                metadata.set_sparse_nm(graph, node.name, (r, c))
            else:
                metadata.set_sparse_block(graph, node.name, (r, c))
        changed = changed or (metadata.sparse_blocks(graph), metadata.sparse_nm(graph)) != before
        info = {"block": block, "sparsity_target": round(sparsity, 4), "layers": layers, "skipped": skipped,
                "weights": total, "zeros": zeros, "sparsity": round(zeros / total, 4) if total else 0.0}
        return PassResult(graph, changed, info)
