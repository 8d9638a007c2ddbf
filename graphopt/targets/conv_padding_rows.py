"""Skip the kernel rows that fall on a conv's zero padding: the reduction over kernel rows of a scheduled conv tile
runs from the first to the last row that reads the input for that tile's output row, not over all KH.

A tile of the bf16 and int8 conv kernels covers output pixels along one output row (its parallel loop fuses the
channel blocks, the batch and the output row, the row innermost), so the rows a tile may skip depend on its output
row alone: kh in [max(0, pt - oh*sh), min(KH, H + pt - oh*sh)) for stride sh, top padding pt, dilation 1. The
skipped taps multiply a padding value of exactly zero, so the sums are unchanged, bit for bit. On the 7x7 maps of
ResNet-18 (3x3, 512 -> 512, bf16, 1 thread, AMD EPYC) 18% of the multiply-adds fall on padding, 9.5% on the top and
bottom rows: 1026 -> 914 us (OpenVINO's brgconv 926-945 in the model); 14x14: 1012 -> 970; 28x28: 1012 -> 996.
The loop's trip count is no longer a constant, which costs a little: 56x56 (1.2% of the taps on padding rows)
ran 1012 -> 1029 and the 7x7 stride-2 stem on 224x224 (0.6%) 1440 -> 1540, so the bound is applied only where
at least MIN_SHARE of the taps fall on padding rows.
"""
from __future__ import annotations

MIN_SHARE = 0.02


def padding_row_share(H: int, OH: int, KH: int, stride: int, pad_top: int, dilation: int = 1) -> float:
    """The fraction of a conv's kernel-row taps (over all output rows) that read top or bottom padding."""
    if dilation != 1 or OH <= 0 or KH <= 0:
        return 0.0
    skipped = 0
    for oh in range(OH):
        top = oh * stride - pad_top
        lo, hi = max(0, -top), min(KH, H - top)
        skipped += KH - max(0, hi - lo)
    return skipped / (OH * KH)


def pays(H: int, OH: int, KH: int, stride: int, pad_top: int, dilation: int = 1) -> bool:
    return padding_row_share(H, OH, KH, stride, pad_top, dilation) >= MIN_SHARE


def bound_kernel_rows(sch, par_loop, *, H: int, OH: int, KH: int, stride: int, pad_top: int) -> bool:
    """Bound the kernel-row loop of sch's tensorized (or plain) conv update block ("acc_update_o" / "acc_update",
    iter values (n, oh, ow, ob, oi, kh, ...)) by the rows its output row reads. par_loop: the parallel loop whose
    var v gives the output row as v % OH. Returns False (and changes nothing) where the loop nest is not the
    expected one."""
    from tvm import tirx

    from .cpu_sched_common import has_block, int_or_none
    names = [b for b in ("acc_update_o", "acc_update") if has_block(sch, b)]
    if not names:
        return False
    loops = sch.get_loops(sch.get_sblock(names[0]))
    realize = sch.get(loops[-1]).body
    if len(realize.iter_values) < 6:
        return False
    kh_value = realize.iter_values[5]
    kh_rv = next((lp for lp in loops if sch.get(lp).loop_var.same_as(kh_value)), None)
    if kh_rv is None:
        return False
    old = sch.get(kh_rv)
    if not (int_or_none(old.min) == 0 and int_or_none(old.extent) == KH):
        return False
    top = tirx.floormod(sch.get(par_loop).loop_var, OH) * stride - pad_top
    lo = tirx.max(-top, 0)
    hi = tirx.min(H - top, KH)
    new = tirx.For(old.loop_var, lo, tirx.max(hi - lo, 0), old.kind, old.body, old.thread_binding,
                   old.annotations)
    sch.state.replace(sch.get_sref(kh_rv), new)
    return True

