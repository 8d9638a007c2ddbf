"""The cpu target's Winograd rewrite (module pass `graphopt.Winograd`, target option winograd=auto, the default;
winograd=off keeps every conv direct): after the channels-last conversion (cpu_layout.to_nhwc), an fp32 NHWC conv2d
with a constant 3x3 weight, stride 1, dilation 1, groups 1 and padding 0 or 1, together with its epilogue (bias,
batch-norm arithmetic, relu / clip bounds, a residual add and its bounds: the chain bf16.rewrite.match_conv
follows), becomes one call of a Winograd F(2x2, 3x3) kernel (cpu_winograd_kernel) where the measured rule `pays`
says it is faster than the direct channels-last conv; the weight transform is done here, at compile time, in float64.
Depthwise and grouped convs, other kernel sizes and strides stay on the direct schedule (cpu_conv)."""
from __future__ import annotations

import logging

import numpy as np

from .cpu_schedules import fp32_lanes
from .relax_layout import LayoutRewriter, rewrite_counted, rewrite_pass

log = logging.getLogger("graphopt.winograd")


def _cycles(m_bn: int, v: int) -> float:
    """Cycles per reduction step of an m_bn x v-vector register tile (as cpu_matmul._tile_cycles)."""
    return max(m_bn * v / 2, (m_bn + v) / 2, 4.0)


def pick_tile(TW: int, K: int, lanes: int):
    """(m_bn tiles, nb channels) of least estimated time for a row of TW output tiles and K output channels: nb a
    multiple of the vector width dividing K (half a vector when none does), the accumulators plus the weight vectors
    and a broadcast within the vector registers (32 with AVX-512, else 16); tiles padded to a multiple of m_bn count
    as work. None when K has no such nb."""
    vls = [lanes * v for v in (1, 2, 3, 4) if K % (lanes * v) == 0] or \
        [lanes // 2] * (lanes >= 8 and K % (lanes // 2) == 0)
    regs, best = 32 if lanes >= 16 else 16, None
    for nb in vls:
        v = max(1, nb // lanes)
        for m_bn in range(2, 15):
            if m_bn * v + v + 1 > regs:
                continue
            cost = -(-TW // m_bn) * (K // nb) * _cycles(m_bn, v)
            cand = (cost, -m_bn * v, m_bn, nb)
            if best is None or cand < best:
                best = cand
    return None if best is None else best[2:]


#: the fewest input channels and output rows / columns measured faster with Winograd (1 thread, AMD EPYC Zen 5,
#: conv + batch norm + relu, Winograd vs direct channels-last: 160x160 16->16 0.50 vs 0.64 ms, 80x80 32->32 0.33 vs
#: 0.53, 56x56 64->64 0.56 vs 0.93, 28x28 128->128 0.50 vs 0.90, 14x14 256->256 0.42 vs 0.87, 7x7 512->512 0.80 vs
#: 0.95, 4x4 256->256 0.077 vs 0.094): smaller ones were not measured and stay direct
MIN_CHANNELS = 16
MIN_SIZE = 4
#: below this many output rows or columns, a conv whose direct schedule reads each weight block once for all its
#: rows (cpu_conv.weights_first) stays direct: the Winograd kernel's weights (16/9 as many, transformed) are read
#: for few tiles (1 thread, Intel Xeon, four 7x7 512->512 convs: 18.3 ms Winograd, 9.2 direct with channel blocks
#: outside the rows; 14x14 256->256: 4.6 Winograd, 6.3 direct)
MIN_SIZE_WEIGHTS_FIRST = 8


def pays(OH: int, OW: int, C: int, K: int) -> bool:
    """Winograd is used for a conv of this output size, input and output channel count: within what was measured
    faster."""
    from .cpu_conv import weights_first
    if min(OH, OW) < MIN_SIZE_WEIGHTS_FIRST and weights_first(OH * OW * C, 9 * C * K):
        return False
    return C >= MIN_CHANNELS and min(OH, OW) >= MIN_SIZE


class _Rewriter(LayoutRewriter):
    def __init__(self, mod, lanes: int):
        super().__init__(mod, "graphopt")
        self.lanes = lanes
        self.count = {"winograd_convs": 0, "winograd_residual_fused": 0, "winograd_skipped": 0}

    def spec_for(self, m):
        """The kernel spec of a matched chain, or None when Winograd does not apply or does not pay (a HardSwish
        epilogue, which match_conv takes for the bf16 kernels, is not one the Winograd kernel has)."""
        from .cpu_winograd_kernel import WinogradSpec
        if m.kind != "conv" or m.hswish or m.attrs["layout"] != "NHWC" or m.w.shape[2:] != (3, 3) \
                or m.attrs["stride"] != (1, 1) or m.attrs["dilation"] != (1, 1) \
                or any(p not in (0, 1) for p in m.attrs["pad"]):
            return None
        N, C, H, W = m.attrs["xshape"]
        K = m.w.shape[0]
        pt, pl, pb, pr = m.attrs["pad"]
        OH, OW = H + pt + pb - 2, W + pl + pr - 2
        tile = pick_tile(-(-OW // 2), K, self.lanes)
        if OH < 1 or OW < 1 or tile is None:
            return None
        if not pays(OH, OW, C, K):
            self.count["winograd_skipped"] += 1
            return None
        vl = min(self.lanes, tile[1])
        return WinogradSpec(N, H, W, C, K, (pt, pl, pb, pr), tile[0], tile[1], vl, m.act, m.residual is not None,
                            m.act2)

    def rewrite_block(self, block, outside_uses):
        from tvm import relax

        from .bf16.rewrite import match_conv
        from .relax_bindings import Block, op_name
        blk = Block(block, outside_uses)
        chains, claimed = {}, set()
        for i, b in enumerate(blk.bindings):
            if op_name(b.value) != "relax.nn.conv2d" or i in claimed:
                continue
            m = self.match_root(blk, i, "relax.nn.conv2d", claimed, match_conv, None, log)
            spec = None if m is None else self.spec_for(m)
            if spec is None:
                continue
            chains[m.root] = (m, spec)
            claimed.update(m.interior + [m.root])
        if not chains:
            return block, False
        drop = set().union(*(m.interior for m, _ in chains.values()))
        out = []
        for i, b in enumerate(blk.bindings):
            if i in chains:
                out.append(self.emit(*chains[i]))
            elif i not in drop:
                out.append(b)
        return relax.DataflowBlock(out), True

    def emit(self, m, spec):
        from tvm import relax

        from .cpu_winograd_kernel import pack_weight, winograd_conv2d
        args = [m.x, relax.const(pack_weight(m.w, spec.nb)), relax.const(np.asarray(m.bias, np.float32))]
        if m.residual is not None:
            args.append(m.residual)
            self.count["winograd_residual_fused"] += 1
        gv = self.add_kernel(("winograd", spec), lambda: winograd_conv2d(spec), "winograd_conv2d")
        self.count["winograd_convs"] += 1
        value = relax.call_tir(gv, args, relax.TensorType([spec.N, spec.OH, spec.OW, spec.K], "float32"))
        return self.bind(m.out_var, value)


def rewrite_winograd(mod, target):
    """Replace the conv chains of mod['main'] that Winograd takes (module docstring) with Winograd kernels.
    Returns (mod, facts): convs rewritten, residual adds fused, and convs that qualified but where the rule keeps
    the direct conv."""
    return rewrite_counted(mod, _Rewriter(mod, fp32_lanes(target)))


def winograd_pass(target):
    """rewrite_winograd as the module pass `graphopt.Winograd`, run after graphopt.ToNHWC (precision fp32)."""
    return rewrite_pass("graphopt.Winograd", rewrite_winograd, target)
