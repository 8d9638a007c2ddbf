"""Layout ops: moving, selecting and reshaping channels (Transpose, Squeeze / Unsqueeze, Reshape / Flatten, Concat,
Split, Slice, Gather, Expand, Tile, Pad). Channels are tracked through the axis moves; the shape constants, sizes,
bounds and indices that name channel positions shrink with the removed channels."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import constant_value
from graphopt.prune_rules import NAN, Freeze, Rule, register, shrink_shape_input


def _blocks(a, b):
    """Blocks (i0, i1, j0, j1) of axes with equal products, or None."""
    res, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        i0, j0, pa, pb = i, j, 1, 1
        if i < len(a):
            pa *= a[i]
            i += 1
        if j < len(b):
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                pb *= b[j]
                j += 1
            else:
                return None
        res.append((i0, i, j0, j))
    return res


def _shuffle_follows(node, out_axes) -> bool:
    """A split whose two factors the only consumer (a Transpose) swaps: a channel shuffle."""
    y = node.outputs[0]
    if len(y.outputs) != 1 or y.outputs[0].op != "Transpose" or len(out_axes) < 2:
        return False
    perm = list(y.outputs[0].attrs.get("perm") or [])
    if not perm:
        return False
    return perm.index(out_axes[0]) > perm.index(out_axes[-1])


def _reshape_like(g, node, rule):
    """Reshape / Flatten's channel map; `rule` records the rewrite of a Reshape target (None: Flatten)."""
    x = g.get(node.inputs[0])
    if x is None:
        return
    si, so = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    if si is None or so is None:
        raise Freeze("unknown shape")
    blocks = _blocks(si, so)
    if blocks is None:
        raise Freeze("reshape without a block structure")
    for i0, i1, j0, j1 in blocks:
        if i0 <= x.axis < i1:
            break
    C = si[x.axis]
    in_block = si[i0:i1]
    out_block = so[j0:j1]
    shape = [1] * len(in_block)
    shape[x.axis - i0] = C
    vals = np.broadcast_to(np.arange(C).reshape(shape), in_block).reshape(out_block)
    in_nontrivial = [a for a in range(i0, i1) if si[a] > 1]
    out_nontrivial = [b for b in range(j0, j1) if so[b] > 1]
    if not out_nontrivial:
        out_nontrivial = [j0] if j1 > j0 else []
    if not out_nontrivial:
        raise Freeze("the channel axis disappears")
    sets_of = {}
    for b in out_nontrivial:
        sets_of[b] = [np.unique(np.take(vals, p, axis=b - j0)) for p in range(so[b])]
    if in_nontrivial == [x.axis] and len(out_nontrivial) > 1:
        choice = out_nontrivial[-1] if _shuffle_follows(node, out_nontrivial) else out_nontrivial[0]
    else:
        # prefer an axis whose positions hold whole channels (GroupNorm's [N, G, C/G*H*W] view), then the
        # finest units
        per_channel = vals.size // max(1, C)

        def complete(b):
            return all(np.take(vals, p, axis=b - j0).size == len(sets_of[b][p]) * per_channel
                       for p in range(so[b]))
        choice = min(out_nontrivial, key=lambda b: (not complete(b), max(len(s) for s in sets_of[b]), b))
    sets = sets_of[choice]
    slots, cv = [], []
    for s in sets:
        for c in s[1:]:
            g.uf.union(x.slots[s[0]], x.slots[c])
        slots.append(x.slots[s[0]])
        vv = x.cval[s]
        cv.append(vv[0] if np.all(vv == vv[0]) else NAN)
    g.set(node.outputs[0], choice, slots, np.array(cv))
    if rule is not None:
        g.rewrite(rule, {"axis": choice, "slots": list(slots)})


def _split_sizes(g, node, n_in):
    """The sizes of a Split's outputs (input, attribute, or equal parts)."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = g.const(node.inputs[1])
        if v is None:
            raise Freeze("split sizes are not constant")
        return [int(s) for s in v.reshape(-1)]
    if "split" in node.attrs:
        return [int(s) for s in node.attrs["split"]]
    k = len(node.outputs)
    q = -(-n_in // k)
    return [q] * (k - 1) + [n_in - q * (k - 1)]


@register
class Transpose(Rule):
    """Transpose: the channel axis moves with the permutation."""
    ops = frozenset({"Transpose"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        s = g.shape(node.inputs[0])
        perm = node.attrs.get("perm") or list(range(len(s)))[::-1]
        g.set(node.outputs[0], list(perm).index(x.axis), x.slots, x.cval)


@register
class Squeeze(Rule):
    """Squeeze of other axes: the channel axis shifts; squeezing it freezes."""
    ops = frozenset({"Squeeze"})

    def propagate(self, g, node):
        got = g.tracked_axes(node, lambda s: [i for i, d in enumerate(s) if d == 1])
        if got is None:
            return
        x, s, axes = got
        if x.axis in axes:
            raise Freeze("squeezes the channel axis")
        g.set(node.outputs[0], x.axis - sum(1 for a in axes if a < x.axis), x.slots, x.cval)


@register
class Unsqueeze(Rule):
    """Unsqueeze: the channel axis shifts."""
    ops = frozenset({"Unsqueeze"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        so = g.known_shape(node.outputs[0])
        axes = g.axes_of(node, len(so))
        kept = [i for i in range(len(so)) if i not in axes]
        g.set(node.outputs[0], kept[x.axis], x.slots, x.cval)


@register
class Reshape(Rule):
    """Reshape: the shapes are cut into blocks of axes with equal products; inside the block holding the channel
    axis an iota map says which input channels land on each position of the chosen output axis, and their slots
    are united (merging: a channel becomes a block of features; splitting into (heads, head_dim): heads are the
    unit; a split that a Transpose swaps, a channel shuffle, keeps the inner factor). The target shrinks."""
    ops = frozenset({"Reshape"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        if g.const(node.inputs[1]) is None:
            raise Freeze("the Reshape target is not constant")
        _reshape_like(g, node, self)

    def rewrite(self, node, data, edit):
        k = edit.keep(data["slots"])
        if k.all():
            return
        shape = constant_value(node.inputs[1]).astype(np.int64).copy()
        if shape[data["axis"]] > 0:
            shape[data["axis"]] = int(k.sum())
            edit.set_const(node, 1, shape, node.inputs[1].name + "_pruned")


@register
class Flatten(Rule):
    """Flatten: Reshape's block map, with no constant to rewrite."""
    ops = frozenset({"Flatten"})

    def propagate(self, g, node):
        _reshape_like(g, node, None)


@register
class Concat(Rule):
    """Concat along the channel axis: the slot lists are concatenated (the same tensor twice gives the same slots
    twice); along another axis the operands' slots are united (a constant operand, e.g. a class token, is sliced)."""
    ops = frozenset({"Concat"})

    def propagate(self, g, node):
        out = node.outputs[0]
        so = g.shape(out)
        tracked = [g.get(t) for t in node.inputs]
        if all(c is None for c in tracked):
            return
        if so is None:
            raise Freeze("unknown shape")
        ax = int(node.attrs["axis"]) % len(so)
        axes = {c.axis for c in tracked if c is not None}
        if len(axes) != 1:
            raise Freeze("operands carry channels on different axes")
        cax = axes.pop()
        if cax == ax:
            slots, cv = [], []
            for t, c in zip(node.inputs, tracked):
                if c is not None:
                    slots += c.slots
                    cv.append(c.cval)
                else:
                    s = g.shape(t)
                    n = s[ax] if s is not None else 0
                    new = g.fresh(n)
                    g.freeze(new, f"concatenated with an operand without prunable channels at {g.label(node)}")
                    slots += new
                    cv.append(np.full(n, NAN))
            g.set(out, ax, slots, np.concatenate(cv) if cv else None)
            return
        slots = next(c for c in tracked if c is not None).slots
        cvs = []
        for i, (t, c) in enumerate(zip(node.inputs, tracked)):
            if c is not None:
                g.union_lists(slots, c.slots)
                cvs.append(c.cval)
                continue
            v = g.const(t)
            if v is None:
                raise Freeze("an operand without channel information")
            g.param(i, cax, slots, "data")
            vv = np.moveaxis(v.astype(np.float64), cax, 0).reshape(v.shape[cax], -1)
            cvs.append(np.where(np.all(vv == vv[:, :1], axis=1), vv[:, 0], NAN))
        cv = np.where(np.all([c == cvs[0] for c in cvs], axis=0), cvs[0], NAN)
        g.set(out, cax, slots, cv)


@register
class Split(Rule):
    """Split along the channel axis: each output takes its sub-range; the sizes shrink."""
    ops = frozenset({"Split"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        s = g.shape(node.inputs[0])
        ax = int(node.attrs.get("axis", 0)) % len(s)
        if ax != x.axis:
            for t in node.outputs:
                g.set(t, x.axis, x.slots, x.cval)
            return
        sizes = _split_sizes(g, node, s[ax])
        off, parts = 0, []
        for t, n in zip(node.outputs, sizes):
            g.set(t, ax, x.slots[off:off + n], x.cval[off:off + n])
            parts.append(list(x.slots[off:off + n]))
            off += n
        g.rewrite(self, {"parts": parts})

    def rewrite(self, node, data, edit):
        sizes = [int(edit.keep(p).sum()) for p in data["parts"]]
        if sizes == [len(p) for p in data["parts"]]:
            return
        arr = np.array(sizes, dtype=np.int64)
        if len(node.inputs) > 1 and node.inputs[1].name:
            edit.set_const(node, 1, arr, node.inputs[1].name + "_pruned")
        elif edit.opset >= 13:
            node.attrs.pop("num_outputs", None)
            node.attrs.pop("split", None)
            node.inputs.append(gs.Constant(edit.new_name(node.name + "_split"), arr))
        else:
            node.attrs["split"] = sizes


@register
class Slice(Rule):
    """Slice of the channel axis (step 1): the sub-range; the bounds move with the removed channels."""
    ops = frozenset({"Slice"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        s = g.shape(node.inputs[0])
        vals = []
        for k in range(1, 5):
            if len(node.inputs) > k and node.inputs[k].name:
                v = g.const(node.inputs[k])
                if v is None:
                    raise Freeze("Slice bounds are not constant")
                vals.append([int(q) for q in v.reshape(-1)])
            else:
                vals.append(None)
        if len(node.inputs) < 3:
            raise Freeze("Slice with attribute bounds (opset < 10)")
        starts, ends, axes, steps = vals
        axes = [a % len(s) for a in (axes if axes is not None else range(len(starts)))]
        steps = steps if steps is not None else [1] * len(starts)
        if x.axis not in axes:
            g.set(node.outputs[0], x.axis, x.slots, x.cval)
            return
        k = axes.index(x.axis)
        if steps[k] != 1:
            raise Freeze("a strided Slice of the channel axis")
        C = s[x.axis]
        st, en = starts[k], ends[k]
        st = max(0, min(C, st + C if st < 0 else st))
        en = max(0, min(C, en + C if en < 0 else en))
        en = max(st, en)
        g.set(node.outputs[0], x.axis, x.slots[st:en], x.cval[st:en])
        g.rewrite(self, {"k": k, "slots": list(x.slots), "start": st, "end": en,
                          "orig_end": ends[k]})

    def rewrite(self, node, data, edit):
        k = edit.keep(data["slots"])
        if k.all():
            return
        st, en = int(k[:data["start"]].sum()), int(k[:data["end"]].sum())
        for inp, val in ((1, st), (2, en)):
            arr = constant_value(node.inputs[inp]).astype(np.int64).copy()
            arr[data["k"]] = val
            edit.set_const(node, inp, arr.astype(constant_value(node.inputs[inp]).dtype),
                           node.inputs[inp].name + "_pruned")


@register
class Gather(Rule):
    """Gather with constant indices: picked channels (1-D indices on the channel axis); the indices follow."""
    ops = frozenset({"Gather"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            if g.get(node.inputs[1]) is not None:
                raise Freeze("channels used as indices")
            return
        s = g.shape(node.inputs[0])
        ax = int(node.attrs.get("axis", 0)) % len(s)
        idx = g.const(node.inputs[1])
        if idx is None:
            raise Freeze("Gather indices are not constant")
        if ax != x.axis:
            oax = x.axis + (idx.ndim - 1) if ax < x.axis else x.axis
            g.set(node.outputs[0], oax, x.slots, x.cval)
            return
        if idx.ndim != 1:
            raise Freeze("Gather picks single channels")
        ii = [int(i) % s[ax] for i in idx]
        g.set(node.outputs[0], ax, [x.slots[i] for i in ii], x.cval[ii])
        g.rewrite(self, {"slots": list(x.slots), "indices": ii})

    def rewrite(self, node, data, edit):
        k = edit.keep(data["slots"])
        if k.all():
            return
        pos = np.cumsum(k) - 1
        idx = constant_value(node.inputs[1])
        new = np.array([pos[i] for i in data["indices"] if k[i]], dtype=idx.dtype)
        edit.set_const(node, 1, new, node.inputs[1].name + "_pruned")


@register
class Expand(Rule):
    """Expand that does not broadcast the channel axis: pass-through; the shape shrinks."""
    ops = frozenset({"Expand"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        s, so = g.shape(node.inputs[0]), g.shape(node.outputs[0])
        if s is None or so is None or g.const(node.inputs[1]) is None:
            raise Freeze("Expand with an unknown shape")
        oax = x.axis + len(so) - len(s)
        if so[oax] != s[x.axis]:
            raise Freeze("Expand broadcasts the channel axis")
        g.set(node.outputs[0], oax, x.slots, x.cval)
        g.rewrite(self, {"axis": oax - (len(so) - len(g.const(node.inputs[1]))),
                          "slots": list(x.slots)})

    def rewrite(self, node, data, edit):
        shrink_shape_input(node, 1, data["axis"], data["slots"], edit)


@register
class Tile(Rule):
    """Tile with one repeat on the channel axis: pass-through."""
    ops = frozenset({"Tile"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        r = g.const(node.inputs[1])
        if r is None or int(r.reshape(-1)[x.axis]) != 1:
            raise Freeze("Tile repeats the channel axis")
        g.set(node.outputs[0], x.axis, x.slots, x.cval)


@register
class Pad(Rule):
    """Pad of other axes: pass-through (constant padding keeps only zero values)."""
    ops = frozenset({"Pad"})

    def propagate(self, g, node):
        x = g.get(node.inputs[0])
        if x is None:
            return
        s = g.shape(node.inputs[0])
        pads = node.attrs.get("pads")
        if pads is None:
            pads = g.const(node.inputs[1]) if len(node.inputs) > 1 else None
            if pads is None:
                raise Freeze("Pad amounts are not constant")
            pads = pads.reshape(-1).tolist()
        axes = list(range(len(s)))
        if len(node.inputs) > 3 and node.inputs[3].name:
            a = g.const(node.inputs[3])
            if a is None:
                raise Freeze("Pad axes are not constant")
            axes = [int(q) % len(s) for q in a.reshape(-1)]
        if x.axis in axes:
            k = axes.index(x.axis)
            if pads[k] != 0 or pads[k + len(axes)] != 0:
                raise Freeze("Pad pads the channel axis")
        mode = node.attrs.get("mode", "constant")
        cv = np.where(x.cval == 0, 0.0, NAN) if mode == "constant" else x.cval
        g.set(node.outputs[0], x.axis, x.slots, cv)


@register
class ShapeOf(Rule):
    """Shape / Size of a channel tensor: the channel count would be read, so it freezes."""
    ops = frozenset({"Shape", "Size"})

    def propagate(self, g, node):
        if g.get(node.inputs[0]) is not None:
            raise Freeze("the shape of a channel tensor is read")
