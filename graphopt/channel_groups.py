"""channel-groups: which channels of an ONNX graph must be pruned together (a dependency graph over channels).

Model
-----
Every tensor that carries prunable channels gets ONE channel axis and a *slot* per position along that axis
(`Chan(axis, slots)`). Slots live in a union-find: two slots in the same class are the same channel seen in two
places and must be removed together. A class is a *unit* (the thing a pruning criterion ranks and removes: one
channel, one attention head, a block of flattened features, a channel of every group of a grouped conv...).

Slots are created at *sources*: the output-channel axis of a producer with constant weights (Conv /
ConvTranspose out channels, Gemm / MatMul out features). Propagation runs once over the graph in topological
order; every op maps its input slots to output slots with a per-op index map, given by the op's rule in
graphopt/prune_rules/ (one module per op family, which also holds the rewrite prune-channels does for it):

* Conv / ConvTranspose: out channels are new source slots (weight rows / columns and bias are sliced with them);
  input channels are *sinks* (the weight's input-channel slice is removed). Grouped convs keep every group the
  same size: channel j of every group is one unit (in and out). Depthwise convs (cin/group == 1) pass channels
  through (channel c in -> channels c*m..c*m+m-1 out, m the multiplier) and get `group` rewritten.
* Gemm / MatMul with a constant weight: out features are sources; the contracted axis of the activation is a
  sink. MatMul of two activations: batch axes couple (attention heads), the contracted axis is a weightless
  sink whose two sides are coupled, M/N axes pass through.
* BatchNormalization / InstanceNormalization: pass-through, parameters sliced. GroupNormalization: a whole
  group is one unit (num_groups rewritten); the [N, G, -1] Reshape + InstanceNormalization form that exporters
  emit gives the same units. LayerNormalization, LpNormalization, Softmax, LRN, reductions... over the channel
  axis mix channels: frozen. Over other axes: pass-through.
* Elementwise ops with broadcasting (Add, Mul, ...): the channel axes of all operands are aligned from the right
  and their slots united (a residual Add couples its summands; an SE gate's Mul couples the gate to the
  features). Constant operands with the full channel size (biases, layer scale, position embedding) are sliced.
  A non-constant operand without channel information that is not broadcast along the channel axis freezes.
* Activations and other unary ops, Cast, Identity, Dropout, Clip: pass-through.
* Concat: along the channel axis the slot lists are concatenated (offsets; the same tensor twice gives the same
  slots twice); along another axis the operands' slots are united (a constant operand, e.g. a class token, is
  sliced). Split / Slice along the channel axis take the slot sub-ranges (sizes and bounds are rewritten).
* Reshape / Flatten: the shapes are cut into blocks of axes with equal products; inside the block holding the
  channel axis an iota map says which input channels land on each position of the chosen output axis, and the
  slots of those channels are united. Merging (a channel becomes a block of features before a Gemm) gives
  every feature its channel's slot; splitting into (heads, head_dim) makes heads the unit (head-granular) and the
  Reshape constants are rewritten. A split that a Transpose immediately swaps (channel shuffle) keeps the inner
  factor instead, so the shuffle is a permutation of small units.
* Transpose (axis tracking, channels-last blocks), Squeeze / Unsqueeze, pooling, Resize (scale 1 on the channel
  axis), Pad / Tile (nothing on the channel axis), Gather (constant indices), Expand.
* Anything else freezes the channels it touches: never a guess. Graph outputs freeze their channels; so do
  weights that are not constant, operands without channel information, and channel axes of size one.
* A constant read by several nodes (shared weight) is sliced once: along each axis, the slices its readers record
  are united (same weight slice = same unit). A reader that reads the whole axis (no prunable channels there, an
  unmodelled op, a subgraph, a graph output) would need a second, unsliced copy: that axis freezes instead.

Besides the classes the analysis records, for the pass that removes channels: the sources, the sinks, every
constant slice (`ParamRef`), the rewrites of shape constants and attributes (`Rewrite`), per-node MAC factors,
and for every channel the value it provably always has (`Chan.cval`, NaN when unknown): the dead-channel
criterion removes units whose value is provably zero at every sink.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analyses import analysis, node_macs
from graphopt.errors import printable, reraise_if_strict
from graphopt.graph import constant_value
from graphopt.op_traits import traits
from graphopt.prune_rules import NAN, Freeze, Rule, rule_for


# ----------------------------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Chan:
    axis: int
    slots: list[int]
    cval: np.ndarray          # float64 per position: the value the channel always has, NaN when unknown


@dataclass
class ParamRef:
    """A constant input of a node, sliced along `axis` by `slots` (one slot per position of that axis)."""
    node: int
    input: int
    axis: int
    slots: list[int]
    role: str                 # weight_out, weight_in, bias, norm, data


@dataclass
class Sink:
    """A node input whose channels are contracted away (the contribution of a removed channel must vanish)."""
    node: int
    input: int
    axis: int
    slots: list[int]
    weight: tuple[int, int] | None = None      # (input index, axis) of the weight slice, when there is one
    rank: int | None = None                    # rank of the input (for the oracle's mask)


@dataclass
class Source:
    node: int
    slots: list[int]
    weight: tuple[int, int] | None = None      # (input index, axis) of the weight rows


@dataclass
class Rewrite:
    """An edit of the node itself that a removal needs (an attribute, a shape constant): `rule.rewrite` does it."""
    rule: Rule
    node: int
    data: dict


@dataclass
class Unit:
    id: int
    frozen: list[str]
    sources: list[str]
    layer: int = -1
    width: int = 1            # positions in the unit's first source output


@dataclass
class KernelAxes:
    """A weighted node's channel slots: output channels, input channels (None: not tracked), depthwise (in and
    out are the same channels)."""
    node: int
    out_slots: list[int]
    in_slots: list[int] | None
    depthwise: bool


@dataclass
class Layer:
    """Units that sit at the same place in the graph (the same tensors): ranked, rounded and capped together."""
    id: int
    units: list[int]
    name: str
    tensors: tuple[str, ...]


class _UF:
    def __init__(self):
        self.parent: list[int] = []
        self.reasons: dict[int, list[str]] = {}

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if rb in self.reasons:
            mine = self.reasons.setdefault(ra, [])
            for r in self.reasons.pop(rb):
                if r not in mine and len(mine) < 6:
                    mine.append(r)
        return ra

    def freeze(self, x: int, reason: str) -> None:
        r = self.find(x)
        mine = self.reasons.setdefault(r, [])
        if reason not in mine and len(mine) < 6:
            mine.append(reason)


# ----------------------------------------------------------------------------------------------------------------
# the analysis
# ----------------------------------------------------------------------------------------------------------------

class ChannelGroups:
    """Result of the channel-groups analysis. Nodes are referred to by their index in `nodes` (the graph's node
    list when analysed), tensors by name, so the records apply to a copy of the graph too."""

    def __init__(self, graph: gs.Graph, shapes: dict):
        self.graph = graph
        self.nodes: list[gs.Node] = list(graph.nodes)
        self.node_index = {id(n): i for i, n in enumerate(self.nodes)}
        self.shapes = shapes
        self.uf = _UF()
        self.chan: dict[str, Chan] = {}
        self.sources: list[Source] = []
        self.sinks: list[Sink] = []
        self.params: list[ParamRef] = []
        self.rewrites: list[Rewrite] = []
        self.mac_factors: dict[int, list[list[int]]] = {}
        self.opaque: list[dict] = []      # nodes the analysis does not model (their channels are never pruned)
        self._build()
        self._couple_shared_constants()
        self._finalize()

    # ---------------------------------------------------------------- helpers
    def name(self, i: int) -> str:
        n = self.nodes[i]
        return n.name or f"#{i}"

    def shape(self, t) -> tuple | None:
        if isinstance(t, gs.Constant):
            return tuple(t.values.shape)
        s = self.shapes.get(t.name)
        if s is None and t.shape is not None:
            s = tuple(t.shape)
        if s is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in s):
            return None
        return tuple(int(d) for d in s)

    @staticmethod
    def const(t) -> np.ndarray | None:
        if t is None or (isinstance(t, gs.Variable) and not t.name):
            return None
        return constant_value(t)

    def get(self, t) -> Chan | None:
        if isinstance(t, gs.Constant) or not t.name:
            return None
        return self.chan.get(t.name)

    def known_shape(self, t) -> tuple:
        """The static shape of t; an unknown one freezes the channels the node touches."""
        s = self.shape(t)
        if s is None:
            raise Freeze("unknown shape")
        return s

    def tracked_input(self, node) -> tuple[Chan, tuple] | None:
        """(channel info, static shape) of the node's first input, or None when it carries no channels."""
        x = self.get(node.inputs[0])
        return None if x is None else (x, self.known_shape(node.inputs[0]))

    def freeze(self, slots, reason: str) -> None:
        for s in slots:
            self.uf.freeze(s, reason)

    def freeze_inputs(self, node, reason: str) -> None:
        for t in node.inputs:
            c = self.get(t)
            if c is not None:
                self.freeze(c.slots, reason)

    def set(self, t, axis: int, slots: list[int], cval=None) -> None:
        if cval is None:
            cval = np.full(len(slots), NAN)
        self.chan[t.name] = Chan(axis, list(slots), np.asarray(cval, dtype=np.float64))

    def fresh(self, n: int) -> list[int]:
        return self.uf.new(n)

    def union_lists(self, a: list[int], b: list[int]) -> None:
        for x, y in zip(a, b):
            self.uf.union(x, y)

    def label(self, node) -> str:
        return f"node '{node.name or '?'}' ({node.op})"

    # ---------------------------------------------------------------- propagation
    def _order(self) -> list[int]:
        producer = {}
        for i, n in enumerate(self.nodes):
            for t in n.outputs:
                producer[t.name] = i
        indeg = [0] * len(self.nodes)
        users = defaultdict(list)
        for i, n in enumerate(self.nodes):
            deps = {producer[t.name] for t in n.inputs if t.name in producer and producer[t.name] != i}
            indeg[i] = len(deps)
            for d in deps:
                users[d].append(i)
        ready = [i for i in range(len(self.nodes)) if indeg[i] == 0]
        order = []
        while ready:
            i = ready.pop(0)
            order.append(i)
            for u in users[i]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    ready.append(u)
        if len(order) != len(self.nodes):
            order += [i for i in range(len(self.nodes)) if i not in set(order)]
        return order

    def _build(self) -> None:
        for i in self._order():
            node = self.nodes[i]
            self.cur = i
            op = node.op
            if (node.domain or "") not in ("", "ai.onnx"):
                self.freeze_inputs(node, f"unsupported op {node.domain}.{op} at {self.label(node)}")
                continue
            if op == "Constant":
                continue
            rule = rule_for(self, node)
            try:
                if rule is not None:
                    rule.propagate(self, node)
                else:
                    self.unknown(node)
            except Exception as e:     # noqa: BLE001 - whatever the analysis cannot prove freezes, never a guess
                reraise_if_strict(e)   # a rule's TypeError / IndexError is a bug, not a reason to freeze
                why = str(e) if isinstance(e, Freeze) else f"cannot analyse ({type(e).__name__}: {e})"
                self.freeze_inputs(node, f"{why} at {self.label(node)}")
                for t in node.outputs:
                    self.chan.pop(t.name, None)
            # tensors that other ops will read but that carry no channel information stay untracked
        for t in self.graph.outputs:
            c = self.get(t)
            if c is not None:
                self.freeze(c.slots, f"reaches graph output '{t.name}'")
        for node in self.nodes:        # tensors read implicitly inside subgraphs (If / Loop / Scan bodies)
            for v in node.attrs.values():
                if isinstance(v, gs.Graph):
                    for name in {t.name for sub in v.nodes for t in sub.inputs}:
                        if name in self.chan:
                            self.freeze(self.chan[name].slots, f"read inside a subgraph of {self.label(node)}")
        for t in self.chan:
            c = self.chan[t]
            if len(c.slots) == 1:
                self.uf.freeze(c.slots[0], "a single channel is never pruned")

    def unknown(self, node, why: str | None = None) -> None:
        if why is None and node.op in ("LSTM", "GRU", "RNN"):
            why = (f"recurrent op {node.op} at {self.label(node)} (run decompose-rnn,cleanup first to prune its "
                   f"hidden units)")
        why = why or f"unsupported op {node.op} at {self.label(node)}"
        self.opaque.append({"node": node.name or f"#{self.cur}", "op": node.op, "why": why})
        self.freeze_inputs(node, why)

    # ---- sources and sinks
    def sink(self, node_i, inp, c: Chan, axis, weight=None, rank=None):
        if rank is None:
            s = self.shape(self.nodes[node_i].inputs[inp])
            rank = len(s) if s is not None else None
        self.sinks.append(Sink(node_i, inp, axis, list(c.slots), weight, rank))

    def param(self, inp, axis, slots, role):
        self.params.append(ParamRef(self.cur, inp, axis, list(slots), role))

    def source(self, slots, weight=None) -> None:
        """The current node makes new channels `slots` (weight: (input index, axis) of its weight rows)."""
        self.sources.append(Source(self.cur, slots, weight))

    def rewrite(self, rule: Rule, data: dict) -> None:
        """Record that removing channels must edit the current node: prune-channels calls rule.rewrite(data)."""
        self.rewrites.append(Rewrite(rule, self.cur, data))

    def tracked_axes(self, node, default):
        """(tracked input, its shape, the node's axes) for an op with an `axes` attribute or input, default(shape)
        standing for absent axes; None when the input carries no channels."""
        got = self.tracked_input(node)
        if got is None:
            return None
        x, s = got
        axes = self.axes_of(node, len(s))
        return x, s, default(s) if axes is None else axes

    def axes_of(self, node, rank, input_index=1):
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > input_index and node.inputs[input_index].name:
            v = self.const(node.inputs[input_index])
            if v is None:
                raise Freeze("axes are not constant")
            axes = v.reshape(-1).tolist()
        if axes is None:
            return None
        return sorted(int(a) % rank for a in axes)

    def opset(self) -> int:
        return int(getattr(self.graph, "opset", 17) or 17)

    # ---- layout ops
    def _couple_shared_constants(self) -> None:
        """A constant read by several nodes (a weight shared by unrolled RNN steps, tied embeddings) is sliced once:
        along each axis, the slices every reader records are the same positions, so their slots are united (same
        weight slice = same unit) and the readers' pruning decisions agree. A reader that would keep the whole axis
        (an input without prunable channels, an op the analysis does not model, a subgraph, a graph output) would
        need an unsliced copy beside the sliced one: the channels on that axis freeze instead, and the reason says
        so."""
        refs = defaultdict(list)
        for p in self.params:
            t = self.nodes[p.node].inputs[p.input]
            if t.name:
                refs[t.name].append(p)
        readers = defaultdict(set)
        for i, n in enumerate(self.nodes):
            for j, t in enumerate(n.inputs):
                if t.name in refs:
                    readers[t.name].add((i, j))
        hidden = {t.name for t in self.graph.outputs if t.name in refs}
        for node in self.nodes:
            for v in node.attrs.values():
                if isinstance(v, gs.Graph):
                    hidden |= {t.name for sub in v.nodes for t in sub.inputs if t.name in refs}
        for name, ps in refs.items():
            nodes = {i for i, _ in readers[name]}
            if len(readers[name]) < 2 and name not in hidden:
                continue
            shared = f"weight '{printable(name)}' is shared by {len(nodes) + (name in hidden)} nodes"
            by_axis = defaultdict(list)
            for p in ps:
                by_axis[p.axis].append(p)
            for axis, on_axis in by_axis.items():
                slots = [s for p in on_axis for s in p.slots]
                unsliced = sorted(readers[name] - {(p.node, p.input) for p in on_axis})
                if unsliced or name in hidden:
                    who = (self.label(self.nodes[unsliced[0][0]]) if unsliced else
                           "a graph output or subgraph")
                    self.freeze(slots, f"{shared}; {who} reads it whole along axis {axis}, so its slices there are "
                                       f"not pruned (one copy of the weight is kept)")
                    continue
                for p in on_axis[1:]:
                    self.union_lists(on_axis[0].slots, p.slots)
                for s in on_axis[0].slots:
                    if self.uf.reasons.get(self.uf.find(s)):
                        self.uf.freeze(s, f"{shared}: its readers prune it together, so a channel frozen at one "
                                          f"is frozen at all")

    # ---------------------------------------------------------------- classes, units, layers
    def _finalize(self) -> None:
        n = len(self.uf.parent)
        roots = np.array([self.uf.find(i) for i in range(n)], dtype=np.int64) if n else np.zeros(0, np.int64)
        uniq, cls = np.unique(roots, return_inverse=True) if n else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.cls = cls.astype(np.int64)
        self.n_units = len(uniq)
        self.units: list[Unit] = [Unit(k, list(self.uf.reasons.get(int(r), [])), []) for k, r in enumerate(uniq)]
        for src in self.sources:
            c = self.cls[src.slots]
            seen = set()
            for k in c.tolist():
                if k not in seen:
                    seen.add(k)
                    self.units[k].sources.append(self.name(src.node))
        first_width: dict[int, int] = {}
        for src in self.sources:
            c = self.cls[src.slots]
            ks, counts = np.unique(c, return_counts=True)
            for k, w in zip(ks.tolist(), counts.tolist()):
                first_width.setdefault(k, w)
        for u in self.units:
            u.width = first_width.get(u.id, 1)
            if not u.sources and not u.frozen:
                u.frozen.append("no producer with constant weights")
        # layers: units that live in the same set of tensors
        where = defaultdict(set)
        for tname, c in self.chan.items():
            for k in set(self.cls[c.slots].tolist()):
                where[k].add(tname)
        by_key = defaultdict(list)
        for u in self.units:
            by_key[tuple(sorted(where.get(u.id, ())))].append(u.id)
        self.layers: list[Layer] = []
        for key, ids in by_key.items():
            srcs = []
            for k in ids:
                for s in self.units[k].sources:
                    if s not in srcs:
                        srcs.append(s)
            name = ",".join(srcs[:3]) + (f" (+{len(srcs) - 3})" if len(srcs) > 3 else "") if srcs else key[0] if key \
                else "?"
            lay = Layer(len(self.layers), ids, name, key)
            for k in ids:
                self.units[k].layer = lay.id
            self.layers.append(lay)

    # ---------------------------------------------------------------- queries
    def classes(self, slots) -> np.ndarray:
        return self.cls[np.asarray(slots, dtype=np.int64)] if len(slots) else np.zeros(0, np.int64)

    def frozen_summary(self, extra: dict[int, list[str]] | None = None) -> list[dict]:
        """Frozen layers and why (a layer is reported once, with the reasons of its units)."""
        out = []
        for lay in self.layers:
            reasons = []
            for k in lay.units:
                for r in self.units[k].frozen + (extra or {}).get(k, []):
                    if r not in reasons:
                        reasons.append(r)
            if reasons and all(self.units[k].frozen or (extra or {}).get(k) for k in lay.units) \
                    and any(self.units[k].sources for k in lay.units):
                out.append({"layer": lay.name, "channels": len(lay.units), "why": reasons[:3]})
        return out

    def base_macs(self) -> dict[int, int]:
        return {i: node_macs(n, self.shapes) for i, n in enumerate(self.nodes)}

    def kernels(self) -> list[KernelAxes]:
        """The weighted nodes (Conv, ConvTranspose, Gemm, MatMul with a constant weight) and the slots of their
        output and input channels, for the latency model: what a kernel's channel counts depend on."""
        sources = {s.node: s for s in self.sources}
        sinks = {s.node: s for s in self.sinks if s.input == 0}
        out = []
        for i, src in sorted(sources.items()):
            node = self.nodes[i]
            if traits(node.op).weight is None:
                continue
            if src.weight is None:       # depthwise: channels pass through, in == out
                out.append(KernelAxes(i, list(src.slots), list(src.slots), True))
            else:
                sink = sinks.get(i)
                out.append(KernelAxes(i, list(src.slots), list(sink.slots) if sink else None, False))
        return out


@analysis("channel-groups")
def channel_groups(graph: gs.Graph, ctx) -> ChannelGroups:
    shapes = ctx.analyses.get("shapes", graph) if ctx is not None else None
    if shapes is None:
        from graphopt.analyses import shapes as _shapes
        shapes = _shapes(graph, None)
    return ChannelGroups(graph, shapes)
