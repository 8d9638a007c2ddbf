"""channel-groups: which channels of an ONNX graph must be pruned together (a dependency graph over channels).

Model
-----
Every tensor that carries prunable channels gets ONE channel axis and a *slot* per position along that axis
(`Chan(axis, slots)`). Slots live in a union-find: two slots in the same class are the same channel seen in two
places and must be removed together. A class is a *unit* (the thing a pruning criterion ranks and removes: one
channel, one attention head, a block of flattened features, a channel of every group of a grouped conv...).

Slots are created at *sources*: the output-channel axis of a producer with constant weights (Conv /
ConvTranspose out channels, Gemm / MatMul out features). Propagation runs once over the graph in topological
order; every op maps its input slots to output slots with a per-op index map:

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

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.analyses import analysis, node_macs
from graphopt.errors import printable
from graphopt.graph import constant_value
from graphopt.op_traits import traits

NAN = float("nan")


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
    kind: str                 # group, reshape, split, slice, gather, resize, expand
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
# op tables
# ----------------------------------------------------------------------------------------------------------------

def _relu(x, n):
    return np.maximum(x, 0.0)


def _leaky(x, n):
    a = float(n.attrs.get("alpha", 0.01))
    return np.where(x < 0, a * x, x)


def _hsig(x, n):
    return np.clip(float(n.attrs.get("alpha", 0.2)) * x + float(n.attrs.get("beta", 0.5)), 0.0, 1.0)


def _erf(x):
    return np.vectorize(lambda v: math.erf(v) if np.isfinite(v) else NAN, otypes=[np.float64])(x) if x.size else x


#: the value a unary op's output channel provably has, from its input's (ops op_traits lists as family "unary" and
#: that are not here get NaN: unknown, or computed in _unary)
UNARY_VALUES = {
    "Relu": _relu, "LeakyRelu": _leaky,
    "Sigmoid": lambda x, n: 1.0 / (1.0 + np.exp(-x)),
    "HardSigmoid": _hsig,
    "HardSwish": lambda x, n: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Tanh": lambda x, n: np.tanh(x),
    "Erf": lambda x, n: _erf(x),
    "Gelu": lambda x, n: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "Elu": lambda x, n: np.where(x < 0, float(n.attrs.get("alpha", 1.0)) * (np.exp(x) - 1.0), x),
    "Selu": lambda x, n: float(n.attrs.get("gamma", 1.0507)) * np.where(
        x <= 0, float(n.attrs.get("alpha", 1.67326)) * (np.exp(x) - 1.0), x),
    "Celu": lambda x, n: np.maximum(x, 0) + np.minimum(0, float(n.attrs.get("alpha", 1.0)) * (
        np.exp(x / float(n.attrs.get("alpha", 1.0))) - 1.0)),
    "Softplus": lambda x, n: np.log1p(np.exp(x)),
    "Softsign": lambda x, n: x / (1.0 + np.abs(x)),
    "Mish": lambda x, n: x * np.tanh(np.log1p(np.exp(x))),
    "ThresholdedRelu": lambda x, n: np.where(x > float(n.attrs.get("alpha", 1.0)), x, 0.0),
    "Exp": lambda x, n: np.exp(x), "Abs": lambda x, n: np.abs(x), "Neg": lambda x, n: -x,
    "Floor": lambda x, n: np.floor(x), "Ceil": lambda x, n: np.ceil(x),
    "Round": lambda x, n: np.round(x), "Sign": lambda x, n: np.sign(x), "Sin": lambda x, n: np.sin(x),
    "Cos": lambda x, n: np.cos(x), "Identity": lambda x, n: x, "Dropout": lambda x, n: x,
}


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
            raise _Freeze("unknown shape")
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
            handler = getattr(self, "_op_" + op, None)
            family = traits(op).family
            try:
                if handler is not None:
                    handler(node)
                elif family == "unary":
                    self._unary(node)
                elif family == "elementwise":
                    self._elementwise(node)
                elif family == "pool":
                    self._pool(node)
                elif family == "reduce":
                    self._reduce(node)
                elif family == "axis_mixer":
                    self._axis_op(node)
                else:
                    self._unknown(node)
            except Exception as e:     # noqa: BLE001 - whatever the analysis cannot prove freezes, never a guess
                why = str(e) if isinstance(e, _Freeze) else f"cannot analyse ({type(e).__name__}: {e})"
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

    def _unknown(self, node, why: str | None = None) -> None:
        if why is None and node.op in ("LSTM", "GRU", "RNN"):
            why = (f"recurrent op {node.op} at {self.label(node)} (run decompose-rnn,cleanup first to prune its "
                   f"hidden units)")
        why = why or f"unsupported op {node.op} at {self.label(node)}"
        self.opaque.append({"node": node.name or f"#{self.cur}", "op": node.op, "why": why})
        self.freeze_inputs(node, why)

    # ---- sources and sinks
    def _sink(self, node_i, inp, c: Chan, axis, weight=None, rank=None):
        if rank is None:
            s = self.shape(self.nodes[node_i].inputs[inp])
            rank = len(s) if s is not None else None
        self.sinks.append(Sink(node_i, inp, axis, list(c.slots), weight, rank))

    def _param(self, inp, axis, slots, role):
        self.params.append(ParamRef(self.cur, inp, axis, list(slots), role))

    def _op_Conv(self, node):
        self._conv(node, transpose=False)

    def _op_ConvTranspose(self, node):
        self._conv(node, transpose=True)

    def _conv(self, node, transpose):
        x = node.inputs[0]
        W = self.const(node.inputs[1]) if len(node.inputs) > 1 else None
        B = None
        has_b = len(node.inputs) > 2 and node.inputs[2].name
        if has_b:
            B = self.const(node.inputs[2])
        xin = self.get(x)
        if W is None or (has_b and B is None):
            if xin is not None:
                self.freeze(xin.slots, f"{'weight' if W is None else 'bias'} of {self.label(node)} is not constant")
            return
        G = int(node.attrs.get("group", 1))
        if transpose:
            cin, cout_g = W.shape[0], W.shape[1]
            cin_g, cout = cin // G, cout_g * G
        else:
            cout, cin_g = W.shape[0], W.shape[1]
            cin, cout_g = cin_g * G, cout // G
        y = node.outputs[0]
        out_w_axis = 1 if transpose else 0
        in_w_axis = 0 if transpose else 1
        xc = xin.cval if (xin is not None and xin.axis == 1 and len(xin.slots) == cin) else np.full(cin, NAN)
        bias = B.astype(np.float64).reshape(-1) if B is not None else np.zeros(cout)
        if G > 1 and cin_g == 1:     # depthwise (with multiplier m): channels pass through
            m = cout // G
            if xin is None or xin.axis != 1 or len(xin.slots) != cin:
                if xin is not None:
                    self.freeze(xin.slots, f"depthwise {self.label(node)} reads channels on axis {xin.axis}")
                slots = self.fresh(cout)
                self.freeze(slots, f"depthwise {self.label(node)} reads an input without prunable channels")
                self.set(y, 1, slots)
                return
            slots = [xin.slots[o // m] for o in range(cout)]
            Wf = W.reshape(W.shape[0] if not transpose else cin, -1)
            if transpose:      # W (cin, m, k..): output channel o = i*m + j
                zero_w = ~np.any(W.reshape(cout, -1) != 0, axis=1)
                self._param(1, 0, xin.slots, "weight_out")
            else:
                zero_w = ~np.any(Wf != 0, axis=1)
                self._param(1, 0, slots, "weight_out")
            if has_b:
                self._param(2, 0, slots, "bias")
            self.rewrites.append(Rewrite("group", self.cur, {"slots": list(xin.slots)}))
            self.mac_factors[self.cur] = [slots]
            xo = np.array([xc[o // m] for o in range(cout)])
            cv = np.where(zero_w | (xo == 0), bias, NAN)
            self.set(y, 1, slots, cv)
            self.sources.append(Source(self.cur, slots, None))
            return
        factors = []
        # input side: a sink
        if xin is not None:
            if xin.axis != 1 or len(xin.slots) != cin:
                self.freeze(xin.slots, f"{self.label(node)} reads channels on axis {xin.axis}")
                xc = np.full(cin, NAN)
            else:
                for j in range(cin_g):
                    for k in range(1, G):
                        self.uf.union(xin.slots[j], xin.slots[k * cin_g + j])
                self._sink(self.cur, 0, xin, 1, (1, in_w_axis), rank=W.ndim)
                self._param(1, in_w_axis, xin.slots if transpose else xin.slots[:cin_g], "weight_in")
                factors.append(list(xin.slots))
        out = self.fresh(cout)
        for j in range(cout_g):
            for k in range(1, G):
                self.uf.union(out[j], out[k * cout_g + j])
        self._param(1, out_w_axis, out[:cout_g] if transpose else out, "weight_out")
        if has_b:
            self._param(2, 0, out, "bias")
        factors.append(out)
        self.mac_factors[self.cur] = factors
        self.sources.append(Source(self.cur, out, (1, out_w_axis)))
        # provable values: out channel o is its bias when every input channel it reads has zero weight or is 0
        if transpose:      # W (cin, cout_g, k..) -> live[o, j]: input j of o's group reaches output o
            lv = np.any(W.reshape(G, cin_g, cout_g, -1) != 0, axis=3).transpose(0, 2, 1).reshape(cout, cin_g)
        else:
            lv = np.any(W.reshape(cout, cin_g, -1) != 0, axis=2)
        xs = (xc.reshape(G, cin_g) == 0)[np.arange(cout) // cout_g]
        cv = np.where(~np.any(lv & ~xs, axis=1), bias, NAN)
        self.set(y, 1, out, cv)

    def _op_Gemm(self, node):
        a, b = node.inputs[0], node.inputs[1]
        Bv = self.const(b)
        ain = self.get(a)
        y = node.outputs[0]
        if Bv is None or self.const(a) is not None:
            self._unknown(node, f"{self.label(node)} has no constant weight")
            return
        ta, tb = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
        K, N = (Bv.shape[1], Bv.shape[0]) if tb else Bv.shape
        kax = 0 if ta else 1
        factors = []
        xc = np.full(K, NAN)
        if ain is not None:
            if ain.axis != kax or len(ain.slots) != K:
                self.freeze(ain.slots, f"{self.label(node)} reads channels on a non-contracted axis")
            else:
                self._sink(self.cur, 0, ain, kax, (1, 1 if tb else 0), rank=2)
                self._param(1, 1 if tb else 0, ain.slots, "weight_in")
                factors.append(list(ain.slots))
                xc = ain.cval
        out = self.fresh(N)
        self._param(1, 0 if tb else 1, out, "weight_out")
        factors.append(out)
        self.mac_factors[self.cur] = factors
        self.sources.append(Source(self.cur, out, (1, 0 if tb else 1)))
        beta = float(node.attrs.get("beta", 1.0))
        bias = np.zeros(N)
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = node.inputs[2]
            Cv = self.const(c)
            cin = self.get(c)
            if Cv is None:
                shp = self.shape(c)
                if cin is not None and cin.axis == len(shp) - 1 and len(cin.slots) == N:
                    self.union_lists(cin.slots, out)
                    bias = np.full(N, NAN)
                elif shp is not None and (len(shp) == 0 or shp[-1] == 1):
                    if cin is not None:
                        self.freeze(cin.slots, f"bias of {self.label(node)} is broadcast")
                    bias = np.full(N, NAN)
                else:
                    self.freeze(out, f"bias of {self.label(node)} is not constant")
                    bias = np.full(N, NAN)
            else:
                Cv64 = Cv.astype(np.float64)
                if Cv.ndim >= 1 and Cv.shape[-1] == N and N > 1:
                    self._param(2, Cv.ndim - 1, out, "bias")
                    rows = Cv64.reshape(-1, N)
                    bias = np.where(np.all(rows == rows[:1], axis=0), beta * rows[0], NAN)
                else:
                    bias = np.full(N, beta * float(Cv64.reshape(-1)[0])) if Cv64.size == 1 else np.full(N, NAN)
        Bk = Bv.T if tb else Bv     # (K, N)
        live = Bk != 0
        dead_in = (xc == 0)[:, None]
        cv = np.where(~np.any(live & ~dead_in, axis=0), bias, NAN)
        self.set(y, 1, out, cv)

    def _op_MatMul(self, node):
        a, b = node.inputs
        Av, Bv = self.const(a), self.const(b)
        sa, sb, so = self.shape(a), self.shape(b), self.shape(node.outputs[0])
        ain, bin_ = self.get(a), self.get(b)
        y = node.outputs[0]
        if sa is None or sb is None or so is None:
            self._unknown(node, f"{self.label(node)} has unknown shapes")
            return
        if Bv is not None and Av is None:
            if Bv.ndim != 2 or len(sa) < 1:
                self._unknown(node, f"{self.label(node)} has a batched constant weight")
                return
            K, N = Bv.shape
            ra = len(sa)
            factors = []
            xc = np.full(K, NAN)
            if ain is not None:
                if ain.axis != ra - 1:
                    self.freeze(ain.slots, f"{self.label(node)} reads channels on a non-contracted axis")
                else:
                    self._sink(self.cur, 0, ain, ra - 1, (1, 0))
                    self._param(1, 0, ain.slots, "weight_in")
                    factors.append(list(ain.slots))
                    xc = ain.cval
            out = self.fresh(N)
            self._param(1, 1, out, "weight_out")
            factors.append(out)
            self.mac_factors[self.cur] = factors
            self.sources.append(Source(self.cur, out, (1, 1)))
            live = Bv != 0
            cv = np.where(~np.any(live & ~(xc == 0)[:, None], axis=0), 0.0, NAN)
            self.set(y, len(so) - 1, out, cv)
            return
        if Av is not None or len(sa) < 2 or len(sb) < 2:
            self._unknown(node, f"{self.label(node)} is not an activation x weight or activation x activation MatMul")
            return
        ra, rb, ro = len(sa), len(sb), len(so)
        factors = []
        # contraction
        ka = ain is not None and ain.axis == ra - 1
        kb = bin_ is not None and bin_.axis == rb - 2
        if ka and kb:
            self.union_lists(ain.slots, bin_.slots)
            self._sink(self.cur, 0, ain, ra - 1)
            self._sink(self.cur, 1, bin_, rb - 2)
            factors.append(list(ain.slots))
        elif ka or kb:
            c = ain if ka else bin_
            self.freeze(c.slots, f"{self.label(node)} contracts channels with an operand without channel information")
        # pass-through axes
        outs = []
        if ain is not None and not ka:
            ax = ain.axis
            oax = ro - 2 if ax == ra - 2 else ax + (ro - ra)
            outs.append(("a", oax, ain))
        if bin_ is not None and not kb:
            ax = bin_.axis
            oax = ro - 1 if ax == rb - 1 else ax + (ro - rb)
            outs.append(("b", oax, bin_))
        if not outs:
            if factors:
                self.mac_factors[self.cur] = factors
            return
        axes = {o[1] for o in outs}
        if len(axes) > 1:
            for _, _, c in outs:
                self.freeze(c.slots, f"{self.label(node)} would carry channels on two axes")
            return
        oax = outs[0][1]
        if len(outs) == 2:
            ca, cb = outs[0][2], outs[1][2]
            if len(ca.slots) != len(cb.slots):
                self.freeze(ca.slots + cb.slots, f"{self.label(node)} broadcasts a channel axis")
                return
            self.union_lists(ca.slots, cb.slots)
            cv = np.where((ca.cval == 0) | (cb.cval == 0), 0.0, NAN)
            slots = ca.slots
        else:
            side, _, c = outs[0]
            # the other operand must not need the same channels (a batch axis of size > 1 without slots)
            if oax < ro - 2:
                other_shape, other_rank = (sb, rb) if side == "a" else (sa, ra)
                oth = oax - (ro - other_rank)
                if oth >= 0 and other_shape[oth] > 1:
                    self.freeze(c.slots, f"{self.label(node)} pairs the channels with an operand without channel "
                                         f"information")
                    return
            slots = c.slots
            cv = np.where(c.cval == 0, 0.0, NAN)
        factors.append(list(slots))
        self.mac_factors[self.cur] = factors
        self.set(y, oax, slots, cv)

    # ---- per-channel ops
    def _op_BatchNormalization(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            return
        if node.attrs.get("training_mode", 0) or any(t.outputs or t in self.graph.outputs
                                                     for t in node.outputs[1:] if t.name):
            raise _Freeze("BatchNormalization in training mode")
        if x.axis != 1:
            raise _Freeze("BatchNormalization over a non-channel axis")
        ps = [self.const(t) for t in node.inputs[1:5]]
        if any(p is None for p in ps):
            raise _Freeze("BatchNormalization parameters are not constant")
        for k in range(1, 5):
            self._param(k, 0, x.slots, "norm")
        g, b, m, v = (p.astype(np.float64) for p in ps)
        scale = g / np.sqrt(v + float(node.attrs.get("epsilon", 1e-5)))
        self.set(node.outputs[0], 1, x.slots, x.cval * scale + (b - m * scale))

    def _op_InstanceNormalization(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            return
        if x.axis != 1:
            raise _Freeze("InstanceNormalization normalizes over the channel axis")
        ps = [self.const(t) for t in node.inputs[1:3]]
        if any(p is None for p in ps):
            raise _Freeze("InstanceNormalization parameters are not constant")
        self._param(1, 0, x.slots, "norm")
        self._param(2, 0, x.slots, "norm")
        cv = np.where(np.isnan(x.cval), NAN, ps[1].astype(np.float64))
        self.set(node.outputs[0], 1, x.slots, cv)

    def _op_LayerNormalization(self, node):
        got = self.tracked_input(node)
        if got is None:
            return
        x, s = got
        ax = int(node.attrs.get("axis", -1)) % len(s)
        if x.axis >= ax:
            raise _Freeze("LayerNormalization normalizes over the channel axis")
        if any(t.name and t.outputs for t in node.outputs[1:]):
            raise _Freeze("LayerNormalization statistics are used")
        self.set(node.outputs[0], x.axis, x.slots)

    def _op_GroupNormalization(self, node):
        """Statistics per group of channels: a whole group is one unit (num_groups is rewritten)."""
        x = self.get(node.inputs[0])
        if x is None:
            return
        if x.axis != 1:
            raise _Freeze("GroupNormalization over the channel axis")
        G = int(node.attrs["num_groups"])
        C = len(x.slots)
        if C % G:
            raise _Freeze("GroupNormalization with uneven groups")
        cpg = C // G
        for g in range(G):
            for c in range(1, cpg):
                self.uf.union(x.slots[g * cpg], x.slots[g * cpg + c])
        gslots = [x.slots[g * cpg] for g in range(G)]
        for k in (1, 2):
            v = self.const(node.inputs[k])
            if v is None:
                raise _Freeze("GroupNormalization parameters are not constant")
            if v.size == C and C != G:
                self._param(k, 0, x.slots, "norm")
            elif v.size == G:
                self._param(k, 0, gslots, "norm")
        self.rewrites.append(Rewrite("groups", self.cur, {"slots": gslots}))
        self.set(node.outputs[0], 1, x.slots)

    def _op_LRN(self, node):
        if self.get(node.inputs[0]) is not None:
            raise _Freeze("LRN mixes neighbouring channels")

    def _op_MeanVarianceNormalization(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            return
        axes = node.attrs.get("axes", [0, 2, 3])
        s = self.shape(node.inputs[0])
        if s is None or x.axis in [a % len(s) for a in axes]:
            raise _Freeze("MeanVarianceNormalization over the channel axis")
        self.set(node.outputs[0], x.axis, x.slots)

    def _unary(self, node):
        x = self.get(node.inputs[0]) if node.inputs else None
        if x is None:
            return
        for t in node.inputs[1:]:
            if t.name and self.get(t) is not None:
                raise _Freeze("a channel tensor used as a bound")
            if t.name and self.const(t) is None:
                raise _Freeze("a non-constant bound")
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            raise _Freeze("Dropout mask is used")
        fn = UNARY_VALUES.get(node.op)
        cv = np.full(len(x.slots), NAN)
        with np.errstate(all="ignore"):
            if fn is not None:
                cv = fn(x.cval, node)
            elif node.op == "Clip":
                lo = self.const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
                hi = self.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
                lo = float(lo) if lo is not None else float(node.attrs.get("min", -np.inf))
                hi = float(hi) if hi is not None else float(node.attrs.get("max", np.inf))
                cv = np.clip(x.cval, lo, hi)
            elif node.op == "Cast":
                cv = x.cval
        self.set(node.outputs[0], x.axis, x.slots, np.asarray(cv, dtype=np.float64))

    def _elementwise(self, node):
        out = node.outputs[0]
        so = self.shape(out)
        ins = [t for t in node.inputs]
        tracked = [(i, self.get(t)) for i, t in enumerate(ins) if self.get(t) is not None]
        if not tracked:
            return
        if so is None:
            raise _Freeze("unknown shape")
        ro = len(so)
        axes = set()
        for i, c in tracked:
            r = len(self.shape(ins[i]))
            axes.add(c.axis + ro - r)
        if len(axes) != 1:
            raise _Freeze("operands carry channels on different axes")
        oax = axes.pop()
        C = so[oax]
        full = [(i, c) for i, c in tracked if len(c.slots) == C]
        if not full:
            raise _Freeze("channels broadcast against a larger axis")
        slots = full[0][1].slots
        for i, c in full[1:]:
            self.union_lists(slots, c.slots)
        # per-channel value of each operand (NaN unknown)
        vals = []
        for i, t in enumerate(ins):
            c = self.get(t)
            if c is not None:
                vals.append(c.cval if len(c.cval) == C else np.full(C, c.cval[0]))
                continue
            s = self.known_shape(t)
            r = len(s)
            pax = oax - (ro - r)
            size = s[pax] if 0 <= pax < r else 1
            v = self.const(t)
            if size != 1:
                if v is None:
                    raise _Freeze("an operand without channel information is not broadcast along the channel axis")
                self._param(i, pax, slots, "data")
            if v is None:
                vals.append(np.full(C, NAN))
                continue
            v = v.astype(np.float64)
            if v.size == 1:
                vals.append(np.full(C, float(v.reshape(-1)[0])))
            else:          # the operand's value per channel when it is constant along every other axis
                vr = v.reshape((1,) * (ro - r) + v.shape)
                vv = np.moveaxis(vr, oax, 0).reshape(vr.shape[oax], -1)
                per = np.where(np.all(vv == vv[:, :1], axis=1), vv[:, 0], NAN)
                vals.append(per if len(per) == C else np.full(C, per[0]))
        cv = self._ew_value(node, vals, C)
        self.set(out, oax, slots, cv)

    def _ew_value(self, node, vals, C):
        op = node.op
        with np.errstate(all="ignore"):
            if op == "Mul":
                r = vals[0].copy()
                for v in vals[1:]:
                    r = r * v
                anyzero = np.any([v == 0 for v in vals], axis=0)
                return np.where(anyzero, 0.0, r)
            if op in ("Add", "Sum"):
                return np.sum(vals, axis=0)
            if op == "Mean":
                return np.mean(vals, axis=0)
            if op == "Sub":
                return vals[0] - vals[1]
            if op == "Div":
                ok = ~np.isnan(vals[1]) & (vals[1] != 0)
                return np.where(ok, vals[0] / np.where(ok, vals[1], 1.0), NAN)
            if op == "Max":
                return np.max(vals, axis=0)
            if op == "Min":
                return np.min(vals, axis=0)
            if op == "PRelu":
                return np.where(vals[0] < 0, vals[0] * vals[1], vals[0])
            if op == "Pow":
                return np.where(vals[1] > 0, np.power(vals[0], vals[1]), NAN)
        return np.full(C, NAN)

    def _pool(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            return
        if x.axis >= 2:
            raise _Freeze("pooling over the channel axis")
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            raise _Freeze("pooling indices are used")
        cv = x.cval
        if node.op in ("AveragePool",) and any(node.attrs.get("pads", [0])) and node.attrs.get("count_include_pad", 0):
            cv = np.where(cv == 0, 0.0, NAN)
        elif node.op in ("LpPool", "GlobalLpPool"):
            cv = np.where(cv == 0, 0.0, NAN)
        self.set(node.outputs[0], x.axis, x.slots, cv)

    def _axes_of(self, node, rank, input_index=1):
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > input_index and node.inputs[input_index].name:
            v = self.const(node.inputs[input_index])
            if v is None:
                raise _Freeze("axes are not constant")
            axes = v.reshape(-1).tolist()
        if axes is None:
            return None
        return sorted(int(a) % rank for a in axes)

    def _reduce(self, node):
        got = self.tracked_input(node)
        if got is None:
            return
        x, s = got
        axes = self._axes_of(node, len(s))
        if axes is None:
            if node.attrs.get("noop_with_empty_axes", 0):
                axes = []
            else:
                axes = list(range(len(s)))
        if x.axis in axes:
            raise _Freeze(f"{node.op} over the channel axis")
        keep = int(node.attrs.get("keepdims", 1))
        oax = x.axis if keep else x.axis - sum(1 for a in axes if a < x.axis)
        cv = x.cval if node.op in ("ReduceMean", "ReduceMax", "ReduceMin") else np.where(x.cval == 0, 0.0, NAN)
        self.set(node.outputs[0], oax, x.slots, cv)

    def _axis_op(self, node):
        got = self.tracked_input(node)
        if got is None:
            return
        x, s = got
        if node.op in ("ArgMax", "ArgMin"):
            raise _Freeze(f"{node.op} output")
        legacy = node.op in ("Softmax", "LogSoftmax", "Hardmax") and self._opset() < 13
        ax = int(node.attrs.get("axis", 1 if legacy else -1)) % len(s)
        if legacy:          # coerced to 2-D: every axis from `axis` on is normalized together
            if x.axis >= ax:
                raise _Freeze(f"{node.op} over the channel axis")
        elif x.axis == ax:
            raise _Freeze(f"{node.op} over the channel axis")
        self.set(node.outputs[0], x.axis, x.slots)

    def _opset(self) -> int:
        return int(getattr(self.graph, "opset", 17) or 17)

    # ---- layout ops
    def _op_Transpose(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            return
        s = self.shape(node.inputs[0])
        perm = node.attrs.get("perm") or list(range(len(s)))[::-1]
        self.set(node.outputs[0], list(perm).index(x.axis), x.slots, x.cval)

    def _op_Squeeze(self, node):
        got = self.tracked_input(node)
        if got is None:
            return
        x, s = got
        axes = self._axes_of(node, len(s))
        if axes is None:
            axes = [i for i, d in enumerate(s) if d == 1]
        if x.axis in axes:
            raise _Freeze("squeezes the channel axis")
        self.set(node.outputs[0], x.axis - sum(1 for a in axes if a < x.axis), x.slots, x.cval)

    def _op_Unsqueeze(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            return
        so = self.known_shape(node.outputs[0])
        axes = self._axes_of(node, len(so))
        kept = [i for i in range(len(so)) if i not in axes]
        self.set(node.outputs[0], kept[x.axis], x.slots, x.cval)

    def _op_Flatten(self, node):
        self._reshape_like(node, rewrite=False)

    def _op_Reshape(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            return
        if self.const(node.inputs[1]) is None:
            raise _Freeze("the Reshape target is not constant")
        self._reshape_like(node, rewrite=True)

    def _shuffle_follows(self, node, out_axes) -> bool:
        """A split whose two factors the only consumer (a Transpose) swaps: a channel shuffle."""
        y = node.outputs[0]
        if len(y.outputs) != 1 or y.outputs[0].op != "Transpose" or len(out_axes) < 2:
            return False
        perm = list(y.outputs[0].attrs.get("perm") or [])
        if not perm:
            return False
        return perm.index(out_axes[0]) > perm.index(out_axes[-1])

    def _reshape_like(self, node, rewrite):
        x = self.get(node.inputs[0])
        if x is None:
            return
        si, so = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if si is None or so is None:
            raise _Freeze("unknown shape")
        blocks = _blocks(si, so)
        if blocks is None:
            raise _Freeze("reshape without a block structure")
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
            raise _Freeze("the channel axis disappears")
        sets_of = {}
        for b in out_nontrivial:
            sets_of[b] = [np.unique(np.take(vals, p, axis=b - j0)) for p in range(so[b])]
        if in_nontrivial == [x.axis] and len(out_nontrivial) > 1:
            choice = out_nontrivial[-1] if self._shuffle_follows(node, out_nontrivial) else out_nontrivial[0]
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
                self.uf.union(x.slots[s[0]], x.slots[c])
            slots.append(x.slots[s[0]])
            vv = x.cval[s]
            cv.append(vv[0] if np.all(vv == vv[0]) else NAN)
        self.set(node.outputs[0], choice, slots, np.array(cv))
        if rewrite:
            self.rewrites.append(Rewrite("reshape", self.cur, {"axis": choice, "slots": list(slots)}))

    def _op_Concat(self, node):
        out = node.outputs[0]
        so = self.shape(out)
        tracked = [self.get(t) for t in node.inputs]
        if all(c is None for c in tracked):
            return
        if so is None:
            raise _Freeze("unknown shape")
        ax = int(node.attrs["axis"]) % len(so)
        axes = {c.axis for c in tracked if c is not None}
        if len(axes) != 1:
            raise _Freeze("operands carry channels on different axes")
        cax = axes.pop()
        if cax == ax:
            slots, cv = [], []
            for t, c in zip(node.inputs, tracked):
                if c is not None:
                    slots += c.slots
                    cv.append(c.cval)
                else:
                    s = self.shape(t)
                    n = s[ax] if s is not None else 0
                    new = self.fresh(n)
                    self.freeze(new, f"concatenated with an operand without prunable channels at {self.label(node)}")
                    slots += new
                    cv.append(np.full(n, NAN))
            self.set(out, ax, slots, np.concatenate(cv) if cv else None)
            return
        slots = next(c for c in tracked if c is not None).slots
        cvs = []
        for i, (t, c) in enumerate(zip(node.inputs, tracked)):
            if c is not None:
                self.union_lists(slots, c.slots)
                cvs.append(c.cval)
                continue
            v = self.const(t)
            if v is None:
                raise _Freeze("an operand without channel information")
            self._param(i, cax, slots, "data")
            vv = np.moveaxis(v.astype(np.float64), cax, 0).reshape(v.shape[cax], -1)
            cvs.append(np.where(np.all(vv == vv[:, :1], axis=1), vv[:, 0], NAN))
        cv = np.where(np.all([c == cvs[0] for c in cvs], axis=0), cvs[0], NAN)
        self.set(out, cax, slots, cv)

    def _split_sizes(self, node, n_in):
        if len(node.inputs) > 1 and node.inputs[1].name:
            v = self.const(node.inputs[1])
            if v is None:
                raise _Freeze("split sizes are not constant")
            return [int(s) for s in v.reshape(-1)]
        if "split" in node.attrs:
            return [int(s) for s in node.attrs["split"]]
        k = len(node.outputs)
        q = -(-n_in // k)
        return [q] * (k - 1) + [n_in - q * (k - 1)]

    def _op_Split(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            return
        s = self.shape(node.inputs[0])
        ax = int(node.attrs.get("axis", 0)) % len(s)
        if ax != x.axis:
            for t in node.outputs:
                self.set(t, x.axis, x.slots, x.cval)
            return
        sizes = self._split_sizes(node, s[ax])
        off, parts = 0, []
        for t, n in zip(node.outputs, sizes):
            self.set(t, ax, x.slots[off:off + n], x.cval[off:off + n])
            parts.append(list(x.slots[off:off + n]))
            off += n
        self.rewrites.append(Rewrite("split", self.cur, {"parts": parts}))

    def _op_Slice(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            return
        s = self.shape(node.inputs[0])
        vals = []
        for k in range(1, 5):
            if len(node.inputs) > k and node.inputs[k].name:
                v = self.const(node.inputs[k])
                if v is None:
                    raise _Freeze("Slice bounds are not constant")
                vals.append([int(q) for q in v.reshape(-1)])
            else:
                vals.append(None)
        if len(node.inputs) < 3:
            raise _Freeze("Slice with attribute bounds (opset < 10)")
        starts, ends, axes, steps = vals
        axes = [a % len(s) for a in (axes if axes is not None else range(len(starts)))]
        steps = steps if steps is not None else [1] * len(starts)
        if x.axis not in axes:
            self.set(node.outputs[0], x.axis, x.slots, x.cval)
            return
        k = axes.index(x.axis)
        if steps[k] != 1:
            raise _Freeze("a strided Slice of the channel axis")
        C = s[x.axis]
        st, en = starts[k], ends[k]
        st = max(0, min(C, st + C if st < 0 else st))
        en = max(0, min(C, en + C if en < 0 else en))
        en = max(st, en)
        self.set(node.outputs[0], x.axis, x.slots[st:en], x.cval[st:en])
        self.rewrites.append(Rewrite("slice", self.cur, {"k": k, "slots": list(x.slots), "start": st, "end": en,
                                                        "orig_end": ends[k]}))

    def _op_Gather(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            if self.get(node.inputs[1]) is not None:
                raise _Freeze("channels used as indices")
            return
        s = self.shape(node.inputs[0])
        ax = int(node.attrs.get("axis", 0)) % len(s)
        idx = self.const(node.inputs[1])
        if idx is None:
            raise _Freeze("Gather indices are not constant")
        if ax != x.axis:
            oax = x.axis + (idx.ndim - 1) if ax < x.axis else x.axis
            self.set(node.outputs[0], oax, x.slots, x.cval)
            return
        if idx.ndim != 1:
            raise _Freeze("Gather picks single channels")
        ii = [int(i) % s[ax] for i in idx]
        self.set(node.outputs[0], ax, [x.slots[i] for i in ii], x.cval[ii])
        self.rewrites.append(Rewrite("gather", self.cur, {"slots": list(x.slots), "indices": ii}))

    def _op_Resize(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            return
        s, so = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if s is None or so is None or so[x.axis] != s[x.axis]:
            raise _Freeze("Resize scales the channel axis")
        if len(node.inputs) > 1 and node.inputs[1].name and self.get(node.inputs[1]) is not None:
            raise _Freeze("channels used as a Resize parameter")
        if len(node.inputs) > 3 and node.inputs[3].name:
            if self.const(node.inputs[3]) is None:
                raise _Freeze("Resize sizes are not constant")
            self.rewrites.append(Rewrite("resize", self.cur, {"axis": x.axis, "slots": list(x.slots)}))
        cv = x.cval if node.attrs.get("mode", "nearest") == "nearest" else np.where(x.cval == 0, 0.0, NAN)
        self.set(node.outputs[0], x.axis, x.slots, cv)

    _op_Upsample = _op_Resize

    def _op_Expand(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            return
        s, so = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if s is None or so is None or self.const(node.inputs[1]) is None:
            raise _Freeze("Expand with an unknown shape")
        oax = x.axis + len(so) - len(s)
        if so[oax] != s[x.axis]:
            raise _Freeze("Expand broadcasts the channel axis")
        self.set(node.outputs[0], oax, x.slots, x.cval)
        self.rewrites.append(Rewrite("expand", self.cur, {"axis": oax - (len(so) - len(self.const(node.inputs[1]))),
                                                          "slots": list(x.slots)}))

    def _op_Tile(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            return
        r = self.const(node.inputs[1])
        if r is None or int(r.reshape(-1)[x.axis]) != 1:
            raise _Freeze("Tile repeats the channel axis")
        self.set(node.outputs[0], x.axis, x.slots, x.cval)

    def _op_Pad(self, node):
        x = self.get(node.inputs[0])
        if x is None:
            return
        s = self.shape(node.inputs[0])
        pads = node.attrs.get("pads")
        if pads is None:
            pads = self.const(node.inputs[1]) if len(node.inputs) > 1 else None
            if pads is None:
                raise _Freeze("Pad amounts are not constant")
            pads = pads.reshape(-1).tolist()
        axes = list(range(len(s)))
        if len(node.inputs) > 3 and node.inputs[3].name:
            a = self.const(node.inputs[3])
            if a is None:
                raise _Freeze("Pad axes are not constant")
            axes = [int(q) % len(s) for q in a.reshape(-1)]
        if x.axis in axes:
            k = axes.index(x.axis)
            if pads[k] != 0 or pads[k + len(axes)] != 0:
                raise _Freeze("Pad pads the channel axis")
        mode = node.attrs.get("mode", "constant")
        cv = np.where(x.cval == 0, 0.0, NAN) if mode == "constant" else x.cval
        self.set(node.outputs[0], x.axis, x.slots, cv)

    def _op_Shape(self, node):
        if self.get(node.inputs[0]) is not None:
            raise _Freeze("the shape of a channel tensor is read")

    _op_Size = _op_Shape

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


class _Freeze(Exception):
    pass


@analysis("channel-groups")
def channel_groups(graph: gs.Graph, ctx) -> ChannelGroups:
    shapes = ctx.analyses.get("shapes", graph) if ctx is not None else None
    if shapes is None:
        from graphopt.analyses import shapes as _shapes
        shapes = _shapes(graph, None)
    return ChannelGroups(graph, shapes)
