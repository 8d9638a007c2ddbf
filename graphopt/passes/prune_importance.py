"""prune-channels' importance criteria: a score per channel unit (low scores go first) for l1, l2, bn_scale,
activation and taylor, and the provably dead units of criterion=dead."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import channel_groups as cg
from graphopt import ort
from graphopt.errors import reraise_if_strict
from graphopt.graph import constant_value, copy as copy_graph, to_onnx, toposort

from .prune_removal import Names


def _slice_stats(g: cg.ChannelGroups, roles, fn) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: sum over its parameter slices (of the given roles) of fn(slice) and the number of slices. A slice
    of a weight that several nodes share counts once."""
    tot = np.zeros(g.n_units)
    cnt = np.zeros(g.n_units)
    seen = set()
    for p in g.params:
        t = g.nodes[p.node].inputs[p.input]
        if p.role not in roles or (t.name, p.axis) in seen:
            continue
        seen.add((t.name, p.axis))
        v = constant_value(t)
        if v is None or v.shape[p.axis] != len(p.slots):
            continue
        m = np.moveaxis(v.astype(np.float64), p.axis, 0).reshape(len(p.slots), -1)
        vals = fn(m)
        c = g.classes(p.slots)
        np.add.at(tot, c, vals)
        np.add.at(cnt, c, 1)
    return tot, cnt


def magnitude_scores(g: cg.ChannelGroups, kind: str) -> np.ndarray:
    """l1: mean |w|, l2: root-mean-square w, over every weight slice of the unit (producer rows and consumer
    columns), averaged over the slices."""
    if kind == "l1":
        tot, cnt = _slice_stats(g, ("weight_out", "weight_in"), lambda m: np.mean(np.abs(m), axis=1))
    else:
        tot, cnt = _slice_stats(g, ("weight_out", "weight_in"), lambda m: np.sqrt(np.mean(m * m, axis=1)))
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0)


def bn_scale_scores(g: cg.ChannelGroups) -> tuple[np.ndarray, np.ndarray]:
    """|gamma| of the BatchNormalization / InstanceNormalization slices of each unit; (scores, has_norm)."""
    tot = np.zeros(g.n_units)
    cnt = np.zeros(g.n_units)
    for p in g.params:
        node = g.nodes[p.node]
        if p.role != "norm" or p.input != 1 or node.op not in ("BatchNormalization", "InstanceNormalization"):
            continue
        v = constant_value(node.inputs[1]).astype(np.float64)
        c = g.classes(p.slots)
        np.add.at(tot, c, np.abs(v))
        np.add.at(cnt, c, 1)
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0), cnt > 0


def bn_scale_ranking(g: cg.ChannelGroups, cand: np.ndarray) -> tuple[np.ndarray, str | None]:
    """criterion=bn_scale: |gamma| where every prunable unit of a layer has a norm, l2 for the other layers; (scores,
    a note naming how many layers fell back to l2, or None)."""
    s, has = bn_scale_scores(g)
    fallback = magnitude_scores(g, "l2")
    missing = []
    for lay in g.layers:
        ids = [k for k in lay.units if cand[k]]
        if ids and not all(has[k] for k in ids):
            s[ids] = fallback[ids]
            missing.append(lay.name)
    note = f"bn_scale: {len(missing)} layer(s) without a BatchNormalization ranked by l2" if missing else None
    return s, note


def activation_scores(graph: gs.Graph, g: cg.ChannelGroups, runs: list[dict], centered: bool = False) -> np.ndarray:
    """criterion=activation: what removing a unit takes away, measured on data. At every sink (an input whose
    channels are contracted away: a Conv's, a MatMul's, a Gemm's) the channel's mean square over the runs (with
    `centered`, its variance: what remains once the consumer absorbs the mean, prune-channels reconstruct=), times
    the squared norm of the weight slice that reads it (1 where the sink has no constant weight), summed over the
    unit's sinks. Unlike l1/l2 it sees the activation itself: a channel with small weights but a large folded
    BatchNorm bias (a constant that everything downstream relies on) scores high, and on PP-OCRv4's recognizer
    removing the lowest-l1 4 of 480 channels of one block already changed 17% of the decoded frames where this
    criterion (like taylor) changed under 1%. Forward passes only (onnxruntime), no gradients."""
    m, nodes, masks = _sink_inputs(graph, g)
    reads = sorted({(x.name, s.axis) for s, _, x in masks})     # a tensor two sinks read is measured once
    if not reads:
        return np.zeros(g.n_units)
    energy = {k: 0.0 for k in reads}
    mean = {k: 0.0 for k in reads}
    for vals in ort.tensor_values(m, sorted({name for name, _ in reads}), runs):
        for name, axis in reads:
            v = vals[name]
            e = np.moveaxis(v, axis, 0).reshape(v.shape[axis], -1)
            energy[name, axis] = energy[name, axis] + np.mean(e * e, axis=1)
            mean[name, axis] = mean[name, axis] + np.mean(e, axis=1)
    scores = np.zeros(g.n_units)
    n = max(1, len(runs))
    for s, _, x in masks:
        e = energy[x.name, s.axis] / n
        if centered:
            e = np.maximum(e - (mean[x.name, s.axis] / n) ** 2, 0.0)
        if e.shape[0] != len(s.slots):
            continue
        if s.weight is not None:
            w = constant_value(nodes[s.node].inputs[s.weight[0]])
            if w is not None and w.shape[s.weight[1]] == len(s.slots):
                wm = np.moveaxis(w.astype(np.float64), s.weight[1], 0).reshape(len(s.slots), -1)
                e = e * np.sum(wm * wm, axis=1)
        np.add.at(scores, g.classes(s.slots), e)
    return scores


def _loss(outs: list[np.ndarray], labels: list) -> float:
    total = 0.0
    for y, lab in zip(outs, labels):
        y = y.astype(np.float64)
        if lab is not None:
            z = y - y.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            total += float(-np.mean(logp[np.arange(len(lab)), lab]))
        else:
            total += 0.5 * float(np.mean(y * y))
    return total


def taylor_scores(graph: gs.Graph, g: cg.ChannelGroups, units: list[int], runs: list[dict],
                  eps: float = 1e-2) -> tuple[np.ndarray, str]:
    """First-order Taylor importance |sum a * dL/da| over a unit's sink inputs, averaged over the runs.
    L: cross-entropy against the model's own top-1 for 2-D outputs, 0.5*mean(y^2) otherwise. Gradients from
    graphopt.trainable (torch autograd) when it can run the graph, else central differences of L in a scale
    alpha put on the unit's sink inputs (onnxruntime)."""
    try:
        return _taylor_autograd(graph, g, runs), "taylor: autograd"
    except Exception as e:     # noqa: BLE001 - fall back to finite differences (the trainable view is optional)
        reraise_if_strict(e)
    budget = 6000                       # onnxruntime runs: 2 per unit per batch
    runs = runs[:max(1, budget // max(1, 2 * len(units)))]
    return _taylor_fd(graph, g, units, runs, eps), f"taylor: central differences on {len(runs)} batch(es)"


def _sink_inputs(graph, g):
    """Masked copy where each sink input with a prunable unit is multiplied by a named mask tensor."""
    m = copy_graph(graph)
    nodes = list(m.nodes)
    masks = []
    for s in g.sinks:
        if len(s.slots) < 2:           # a single channel is frozen: nothing to rank
            continue
        node = nodes[s.node]
        x = node.inputs[s.input]
        mshape = [1] * s.rank
        mshape[s.axis] = len(s.slots)
        masks.append((s, mshape, x))
    return m, nodes, masks


def _taylor_autograd(graph, g, runs):
    import torch
    from graphopt.trainable import TrainableGraph
    m, nodes, masks = _sink_inputs(graph, g)
    names = Names(m)
    mask_names = []
    for s, mshape, x in masks:
        nm = names(f"__taylor_mask_{len(mask_names)}")
        c = gs.Constant(nm, np.ones(mshape, dtype=np.float32))
        y = gs.Variable(names(nm + "_out"), dtype=x.dtype)
        m.nodes.append(gs.Node("Mul", names(nm + "_mul"), inputs=[x, c], outputs=[y]))
        nodes[s.node].inputs[s.input] = y
        mask_names.append(nm)
    toposort(m)
    tg = TrainableGraph(m, trainable=mask_names, tie_identical=False)
    params = tg.graph_parameters()
    scores = np.zeros(g.n_units)
    for feeds in runs:
        for p in tg.parameters():
            p.grad = None
        outs = tg(feeds)
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = 0
        for y in outs:
            if y.dim() == 2 and y.shape[1] > 1:
                loss = loss + torch.nn.functional.cross_entropy(y, y.detach().argmax(1))
            else:
                loss = loss + 0.5 * (y * y).mean()
        loss.backward()
        per = np.zeros(g.n_units)
        for (s, _, _), nm in zip(masks, mask_names):
            grad = params[nm].grad
            if grad is None:
                continue
            np.add.at(per, g.classes(s.slots), grad.detach().numpy().reshape(-1).astype(np.float64))
        scores += np.abs(per)
    return scores / max(1, len(runs))


def _taylor_fd(graph, g, units, runs, eps):
    m, nodes, masks = _sink_inputs(graph, g)
    names = Names(m)
    inputs = []
    for i, (s, mshape, x) in enumerate(masks):
        nm = names(f"__taylor_alpha_{i}")
        v = gs.Variable(nm, dtype=np.float32, shape=mshape)
        y = gs.Variable(names(nm + "_out"), dtype=x.dtype)
        m.nodes.append(gs.Node("Mul", names(nm + "_mul"), inputs=[x, v], outputs=[y]))
        nodes[s.node].inputs[s.input] = y
        m.inputs.append(v)
        inputs.append((nm, s, mshape))
    toposort(m)
    sess = ort.session(to_onnx(m))
    out_names = [o.name for o in sess.get_outputs()]
    ones = {nm: np.ones(sh, np.float32) for nm, _, sh in inputs}
    member = {}
    for nm, s, sh in inputs:
        cls = g.classes(s.slots)
        for k in set(cls.tolist()):
            member.setdefault(k, []).append((nm, (cls == k).reshape(sh)))
    scores = np.zeros(g.n_units)
    for feeds in runs:
        base = sess.run(out_names, {**feeds, **ones})
        labels = [np.argmax(y, 1) if y.ndim == 2 and y.shape[1] > 1 else None for y in base]
        for k in units:
            vals = []
            for sign in (1.0, -1.0):
                f = dict(ones)
                for nm, sel in member.get(k, []):
                    f[nm] = np.where(sel, 1.0 + sign * eps, f[nm]).astype(np.float32)
                vals.append(_loss(sess.run(out_names, {**feeds, **f}), labels))
            scores[k] += abs(vals[0] - vals[1]) / (2 * eps)
    return scores / max(1, len(runs))


def dead_units(g, cand, extra) -> tuple[np.ndarray, list[dict]]:
    """Every prunable unit that is zero at every consumer the analysis tracks, whatever round_to says (padding
    to a vector width is the target's business), except the last unit of a layer. Also the dead-looking units
    kept, counted by why: [{"channels", "why"}]."""
    dead = np.ones(g.n_units, dtype=bool)
    read = np.zeros(g.n_units, dtype=bool)        # read by a tracked consumer (else dead only vacuously)
    for s in g.sinks:
        t = g.nodes[s.node].inputs[s.input]
        c = g.chan.get(t.name)
        cls = g.classes(s.slots)
        cv = c.cval if c is not None and len(c.cval) == len(s.slots) else np.full(len(s.slots), np.nan)
        bad = cls[~(cv == 0)]
        dead[bad] = False
        read[cls] = True
    removed = dead & cand
    last = 0
    for lay in g.layers:
        if lay.units and all(removed[k] for k in lay.units):
            removed[lay.units[0]] = False
            last += 1
    counts = ((int((dead & read & np.array([bool(u.frozen) for u in g.units])).sum()),
               "zero but in a frozen group (see 'frozen')"),
              (sum(1 for k in extra if dead[k] and not g.units[k].frozen), "dead but ignored by the user"),
              (last, "dead, but a layer keeps at least one channel"))
    return removed, [{"channels": n, "why": why} for n, why in counts if n]
