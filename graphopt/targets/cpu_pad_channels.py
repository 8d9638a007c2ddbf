"""fp32 convolutions whose output channel count the register tiles fit badly are computed at a padded count:
pad_channels (the module pass `graphopt.PadConvChannels`, run before the channels-last conversion in both layouts)
gives such a conv2d zero output channels up to the next multiple of a step and slices the real channels back out.

Where the convs go channels-last (cpu_layout) and the SIMD width is above 8 (AVX-512), every count above 8 that is not
a multiple of the width is padded to the next one (nhwc_padded_count): the channels-last schedule vectorizes the output
channels, so a multiple of 8 but not of 16 ran in half-width vectors, and a count that is not a multiple of 8 stayed
NCHW with layout transforms on both sides. 1x1 conv -> Conv 3x3 [1, 64, 40, 40] -> N (+ bias, relu) -> 1x1 conv to
64, 1 thread, AMD EPYC (Zen 5), ms unpadded -> padded (onnxruntime): N = 24: 0.45 -> 0.33 (0.35); 40: 0.79 -> 0.45
(0.49); 136: 2.37 -> 1.29 (1.41); 10: 0.28 -> 0.24 (0.30); 20: 0.41 -> 0.33 (0.36); 60: 1.04 -> 0.61 (0.61); 255:
5.39 -> 2.32 (2.34); the same with a 1x1 conv at [1, 64, 56, 56] gained 7-44%. 8 channels stay (half a vector either
way). The slice after the epilogue goes into the conv's kernel, which writes only the real channels (EfficientNet-B0's
1x1 conv 144 -> 24 at 56x56 with batch-norm: 182 -> 124 us, onnxruntime 124). With AVX2 (8 lanes) padding counts
that are not a multiple of 8 did not pay (Conv 3x3 -> 60 above: 1.47 -> 1.81 ms, mcpu haswell on the same machine),
so there only untileable counts are padded, as in NCHW:

the NCHW conv schedule tiles output channels by a divisor of their count from 4 to 12, and the channels-last
conversion keeps convs whose count is not a multiple of 8 NCHW, so a count without such a divisor (a prime such as 17
or 131, or 2 x a prime such as 34) ran in one- or two-channel tiles: a 17-channel 3x3 conv of a pruned PP-OCRv4
detector took 5.9 of its 14.3 ms (Conv 3x3 [1, 64, 80, 80], 1 thread, AMD EPYC: 17 channels 3.6 ms, 24 channels
0.9 ms; 131: 27 ms, 136: 5.3 ms).

Their step is the SIMD width (at least 8) where the conv's channels are vectorized: channels-last, and NCHW convs
the NCHW rule gives its channel tile (stride 2, rows that do not fill vectors); there a count that is a multiple of 8
but not of the SIMD width gets half-width vectors (the conv above channels-last: 24 channels 1.68 ms, 32: 1.14 ms;
136: 9.1 ms, 144: 4.7 ms; [1, 64, 40, 40] NCHW: 24 channels 0.40 ms, 32: 0.26 ms). It is PAD_STEP for NCHW convs
the NCHW rule vectorizes along their rows (cpu_conv.pixel_tile), which tile any multiple of 8 channels ([1, 64, 80,
80] NCHW: 24 channels 0.94 ms, 32: 1.26 ms).

The padding is carried through what follows the conv element by element, so the slice comes as late as possible
and not between the conv and its epilogue (which would then no longer be fused into the conv's tiles): unary
activations, and binary ops whose other operand is another padded tensor of the same counts or a constant that is
per channel (padded by repeating its last channel, so padded channels hold values a real channel could hold, never
a division by zero) or broadcast along the channels. A conv (groups 1, constant weight) that reads a padded tensor
takes it whole, with zero weights for the padded input channels, when that costs fewer operations than the slice
would move bytes (ABSORB_MACS_PER_BYTE); everything else reads the slice.

Modules with kernels already scheduled (int8 / bf16 rewrites) keep them; only the relax conv2d calls left are
considered. Results are those of the unpadded graph up to float summation order (padded channels are added as
exact zeros or sliced away)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from graphopt.errors import reraise_if_strict

from .cpu_conv import pixel_tile
from .relax_bindings import const_value, dtype_of, free_vars, op_name, shape_of
from .relax_layout import LayoutRewriter, rewrite_main

log = logging.getLogger("graphopt.cpu_pad_channels")

#: the smallest step (cpu_layout.MIN_NHWC_CHANNELS)
PAD_STEP = 8
#: output channel counts with a divisor in this range have an NCHW register tile; counts above its top without one
#: are padded (smaller ones would grow by more than they have)
TILE_DIVISORS = range(4, 13)
#: a consumer conv takes a padded tensor whole when its extra multiply-adds (zero weights) number fewer than this
#: times the bytes a slice would read and write; else it reads the slice. Measured break-even 1-2 (Conv 3x3 64 -> 17
#: at 80x80 + relu, then a 1x1 / 3x3 conv to 8-64 channels, 1 thread, AMD EPYC: the slice costs ~0.02 ms per MB;
#: either choice within 0.03 ms for 1x1 consumers, slicing 0.25 ms faster before a 3x3 conv to 64)
ABSORB_MACS_PER_BYTE = 1.0

_UNARY = {"relax.nn.relu", "relax.sigmoid", "relax.tanh", "relax.nn.silu", "relax.nn.gelu", "relax.nn.gelu_tanh",
          "relax.nn.leakyrelu", "relax.clip", "relax.negative"}
_BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.maximum", "relax.minimum"}
#: binary ops carried only when their second operand is a constant (never a division by a padded channel)
_BY_CONSTANT = {"relax.divide"}


def padded_count(channels: int, step: int = PAD_STEP) -> int | None:
    """The count a conv with `channels` output channels is computed at (a multiple of step), or None to keep it."""
    if channels <= TILE_DIVISORS[-1] or any(channels % d == 0 for d in TILE_DIVISORS):
        return None
    return -(-channels // step) * step


def nhwc_padded_count(channels: int, lanes: int) -> int | None:
    """The count a conv that goes channels-last is computed at, or None to keep it: with a SIMD width above PAD_STEP
    (AVX-512) a count above PAD_STEP goes up to the next multiple of the width; otherwise an untileable count
    (padded_count) does."""
    wide = max(PAD_STEP, lanes)
    if wide > PAD_STEP and channels > PAD_STEP:
        return -(-channels // wide) * wide if channels % wide else None
    return None if padded_count(channels) is None else padded_count(channels, wide)


@dataclass
class _Padded:
    var: object        # the padded tensor (channels-first, `padded` channels)
    channels: int      # the real ones: the first `channels` of it
    padded: int


def _plain_conv(call) -> bool:
    """An fp32 NCHW / OIHW conv2d with a constant 4-d weight and groups 1."""
    if op_name(call) != "relax.nn.conv2d" or dtype_of(call) != "float32":
        return False
    a = call.attrs
    w = const_value(call.args[1])
    return w is not None and w.ndim == 4 and int(a.groups) == 1 and str(a.data_layout) == "NCHW" and \
        str(a.kernel_layout) == "OIHW" and str(a.out_layout) == "NCHW"


def _pad_axis(a: np.ndarray, axis: int, size: int, mode: str) -> np.ndarray:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return np.pad(a, widths, mode=mode)


class _Rewriter(LayoutRewriter):
    """Rewrites the dataflow blocks of main (relax_layout.rewrite_main): padded convs, the ops carrying their padding,
    consumer convs taking it, slices where the real channels are read."""

    def __init__(self, mod, minmax: dict, lanes: int, nhwc: bool):
        super().__init__(mod, "padch")
        self.minmax = minmax      # GlobalVar name -> "max" / "min" (the importer's Clip kernels)
        self.lanes = lanes
        self.nhwc = nhwc          # the convs will go channels-last
        self.convs: list[str] = []

    def rewrite_block(self, block, later):
        from tvm import relax
        out, padded, sliced = [], {}, set()
        changed = False

        def materialize(v):
            if v in padded and v not in sliced:
                p = padded[v]
                out.append(self.bind(v, relax.op.strided_slice(p.var, axes=[1], begin=[0], end=[p.channels])))
                sliced.add(v)

        for b in block.bindings:
            v, e = b.var, b.value
            got = self._padded_value(e, padded) if isinstance(e, relax.Call) else None
            if got is not None:
                call, p = got
                changed = True
                for u in free_vars(call):     # a padded conv reading a padded tensor it does not take whole
                    materialize(u)
                if p is None:                 # a conv that took padded input channels: same output
                    out.append(self.bind(v, call))
                    continue
                call = self.bb.normalize(call)
                pv = self.dfvar("padded", shape_of(call), dtype_of(call))
                out.append(relax.VarBinding(pv, call))
                padded[v] = _Padded(pv, p[0], p[1])
                continue
            for u in free_vars(e):
                materialize(u)
            out.append(b)
        for v in list(padded):
            if v in later:
                materialize(v)
        if not changed:
            return block, False
        return relax.DataflowBlock(out), True

    def _padded_value(self, call, padded):
        """(new call, (channels, padded) of its result or None when unpadded) when `call` is a conv to pad, one that
        absorbs padded input channels, or an op carrying padding; None to keep it."""
        from tvm import relax
        op = op_name(call)
        rank = len(shape_of(call) or ())
        if _plain_conv(call):
            return self._conv(call, padded)
        if op in _UNARY and call.args and call.args[0] in padded:
            p = padded[call.args[0]]
            return relax.Call(call.op, [p.var, *call.args[1:]], call.attrs), (p.channels, p.padded)
        if op in _BINARY | _BY_CONSTANT and len(call.args) == 2:
            return self._binary(call, call.args, rank, padded, op in _BY_CONSTANT)
        kind = self.minmax.get(call.args[0].name_hint) if op == "relax.call_tir" else None
        if kind is not None and isinstance(call.args[1], relax.Tuple) and len(call.args[1].fields) == 2:
            f = relax.op.maximum if kind == "max" else relax.op.minimum
            return self._binary(f(*call.args[1].fields), call.args[1].fields, rank, padded, True)
        return None

    def _conv(self, call, padded):
        from tvm import relax
        x, w = call.args[0], const_value(call.args[1])
        oc = w.shape[0]
        pc = _padded_conv_count(call, self.lanes, self.nhwc)
        src = padded.get(x)
        if src is not None and not self._absorbs(call, src):
            src = None
        if pc is None and src is None:
            return None
        if src is not None:
            x = src.var
            w = _pad_axis(w, 1, src.padded, "constant")
        if pc is not None:
            w = _pad_axis(w, 0, pc, "constant")
            self.convs.append(f"{oc}->{pc}")
        new = relax.Call(call.op, [x, relax.const(np.ascontiguousarray(w), "float32")], call.attrs)
        return new, (None if pc is None else (oc, pc))

    @staticmethod
    def _absorbs(call, src: _Padded) -> bool:
        """Reading the padded tensor whole (zero weights for the padded channels) costs fewer multiply-adds than
        ABSORB_MACS_PER_BYTE times the bytes a slice reads and writes."""
        out, inp = shape_of(call), shape_of(call.args[0])
        if out is None or inp is None:
            return False
        n, _, oh, ow = out
        n_in, _, ih, iw = inp
        ocs, _, kh, kw = const_value(call.args[1]).shape
        extra = (src.padded - src.channels) * n * oh * ow * ocs * kh * kw
        moved = 4 * n_in * ih * iw * (src.padded + src.channels)
        return extra < ABSORB_MACS_PER_BYTE * moved

    @staticmethod
    def _binary(call, args, rank: int, padded, const_second: bool):
        """call on the padded operands (same counts) and constants padded along the channels, or None; with
        const_second only the first operand may be padded and the second must be a constant."""
        from tvm import relax
        ps = [padded[a] for a in args if a in padded]
        if rank != 4 or not ps or any((p.channels, p.padded) != (ps[0].channels, ps[0].padded) for p in ps):
            return None
        if const_second and (args[0] not in padded or args[1] in padded):
            return None
        c, pc = ps[0].channels, ps[0].padded
        new = []
        for a in args:
            if a in padded:
                new.append(padded[a].var)
                continue
            k = const_value(a)
            if k is None:
                return None
            axis = k.ndim - 3             # the channel axis, right-aligned against 4 dims
            if axis >= 0 and k.shape[axis] == c:
                new.append(relax.const(np.ascontiguousarray(_pad_axis(k, axis, pc, "edge")), str(k.dtype)))
            elif axis < 0 or k.shape[axis] == 1:
                new.append(a)
            else:
                return None
        return relax.Call(call.op, new, call.attrs), (c, pc)


def _nchw_step(call, channels: int, lanes: int) -> int:
    """The SIMD width, or PAD_STEP for an NCHW conv the NCHW rule vectorizes along its output width at `channels`
    (a multiple of PAD_STEP) output channels: unit stride and a width that fills vectors."""
    wide = max(PAD_STEP, lanes)
    if int(call.attrs.strides[1]) != 1 or shape_of(call) is None:
        return wide
    return PAD_STEP if pixel_tile(shape_of(call)[3], channels, None, lanes) else wide


def _padded_conv_count(call, lanes: int, nhwc: bool) -> int | None:
    """The output channel count plain conv `call` is computed at, or None to keep it: nhwc_padded_count where the
    convs go channels-last, else padded_count at _nchw_step."""
    oc = int(const_value(call.args[1]).shape[0])
    if nhwc:
        return nhwc_padded_count(oc, lanes)
    pc = padded_count(oc)
    return None if pc is None else padded_count(oc, _nchw_step(call, pc, lanes))


def _has_conv_to_pad(mod, lanes: int, nhwc: bool) -> bool:
    from .cpu_layout import calls
    return any(_plain_conv(c) and _padded_conv_count(c, lanes, nhwc) for c in calls(mod))


def pad_channels(mod, target, nhwc: bool):
    """(mod with its fp32 convs computed at padded output channel counts where the tiles fit theirs badly, facts):
    see the module docstring. nhwc: the build converts convs to channels-last where it can (cpu_layout)."""
    import tvm
    from tvm import relax

    from .cpu_layout import converts, minmax_kernels
    from .cpu_schedules import fp32_lanes

    lanes, nhwc = fp32_lanes(target), nhwc and converts(mod)
    if not _has_conv_to_pad(mod, lanes, nhwc):
        return mod, {}
    with target:
        # batch-norm as arithmetic and biases as constants, so they carry the padding
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                        relax.transform.FoldConstant()])(mod)
    rw = _Rewriter(mod, minmax_kernels(mod), lanes, nhwc)
    try:
        new, changed = rewrite_main(mod, rw)
    except Exception as e:  # noqa: BLE001 - an unexpected form: the convs keep their counts (correct, slower)
        reraise_if_strict(e)
        log.debug("padding conv channels failed: %s", e)
        return mod, {}
    return new, ({"padded_conv_channels": rw.convs} if changed and rw.convs else {})


def pad_channels_pass(target, nhwc: bool):
    """pad_channels as the module pass `graphopt.PadConvChannels`, for tvm_lowering.build(passes=...)."""
    from .relax_layout import rewrite_pass
    return rewrite_pass("graphopt.PadConvChannels", lambda mod, tgt: pad_channels(mod, tgt, nhwc), target)
