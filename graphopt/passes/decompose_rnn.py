"""decompose-rnn: unroll LSTM, GRU and RNN nodes over their (static) sequence into MatMul/Add/activation ops.

TVM's ONNX importer has no recurrent ops; unrolled, they compile like any other graph. Supported: constant
weights, forward/reverse/bidirectional, layout 0 and 1, GRU's linear_before_reset, LSTM peepholes, and the
default activations. Anything else (custom activations, clip, variable sequence lengths) is refused by name.

Every step reads the same initializers (each direction's recurrent matrices, biases, peepholes, and the small
index / shape constants), so the unrolled graph holds the source's weights once, whatever the sequence length."""
import itertools

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import UnsupportedModel
from graphopt.graph import constant_value, node_label, toposort
from graphopt.passmanager import Pass, PassResult, register
from graphopt.shapes import infer

DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


class _Builder:
    SMALL = 64      # constants up to this many elements (indices, shapes) are shared by value

    def __init__(self, graph, prefix, dtype):
        self.graph, self.prefix, self.dtype = graph, prefix, dtype
        self.ids = itertools.count()
        self.small = {}

    def const(self, values, name="c"):
        """A new initializer; small ones are reused for equal values, so every step shares them."""
        values = np.asarray(values)
        key = (name, values.dtype.str, values.shape, values.tobytes()) if values.size <= self.SMALL else None
        if key in self.small:
            return self.small[key]
        c = gs.Constant(f"{self.prefix}_{name}_{next(self.ids)}", values)
        if key is not None:
            self.small[key] = c
        return c

    def op(self, op, inputs, attrs=None, dtype=None):
        out = gs.Variable(f"{self.prefix}_{op.lower()}_{next(self.ids)}", dtype=dtype or self.dtype)
        self.graph.nodes.append(gs.Node(op, f"{self.prefix}_{op}_{next(self.ids)}", attrs=attrs or {},
                                        inputs=list(inputs), outputs=[out]))
        return out

    def reshape(self, x, shape):
        return self.op("Reshape", [x, self.const(np.array(shape, dtype=np.int64), "shape")])

    def slice(self, x, start, end, axis):
        i64 = np.int64
        return self.op("Slice", [x, self.const(np.array([start], i64), "s"), self.const(np.array([end], i64), "e"),
                                 self.const(np.array([axis], i64), "a")])


def _refuse(node, why):
    raise UnsupportedModel(f"{node_label(node)}: {why}; decompose-rnn cannot unroll it")


def _decompose(graph, node):
    kind = node.op
    ins = list(node.inputs) + [gs.Variable.empty()] * (8 - len(node.inputs))
    X, W, R, B, seq_lens, h0, c0, P = ins[:8]
    Wv, Rv = constant_value(W), constant_value(R)
    if Wv is None or Rv is None:
        _refuse(node, "weights W and R must be constants")
    acts = node.attrs.get("activations")
    direction = node.attrs.get("direction", "forward")
    ndir = 2 if direction == "bidirectional" else 1
    expected = DEFAULT_ACTS[kind] * ndir
    if acts is not None and [a for a in acts] != expected:
        _refuse(node, f"activations {list(acts)} are not the defaults {expected}")
    if node.attrs.get("clip") is not None:
        _refuse(node, "the clip attribute is not supported")
    if kind == "LSTM" and node.attrs.get("input_forget", 0):
        _refuse(node, "input_forget=1 is not supported")
    layout = int(node.attrs.get("layout", 0))
    if X.shape is None or any(not isinstance(d, int) for d in X.shape):
        _refuse(node, "the input's shape must be static (bind it with --input-shape)")
    seq, batch = (X.shape[0], X.shape[1]) if layout == 0 else (X.shape[1], X.shape[0])
    if seq_lens.name:
        sl = constant_value(seq_lens)
        if sl is None or not np.all(sl == seq):
            _refuse(node, "sequence_lens must be absent or a constant equal to the full sequence length")
    H = int(node.attrs.get("hidden_size", Rv.shape[-1]))
    G = GATES[kind]
    dtype = Wv.dtype
    b = _Builder(graph, (node.name or kind).replace("/", "_") + "_unrolled", dtype)
    Bv = constant_value(B) if B.name else np.zeros((ndir, 2 * G * H), dtype)
    if Bv is None:
        _refuse(node, "bias B must be a constant")
    Pv = constant_value(P) if P.name else None
    if P.name and Pv is None:
        _refuse(node, "peepholes P must be a constant")
    lbr = int(node.attrs.get("linear_before_reset", 0))

    x = X if layout == 0 else b.op("Transpose", [X], {"perm": [1, 0, 2]})

    def initial(t, d):
        if not t.name:
            return b.const(np.zeros((batch, H), dtype), "zero_state")
        return b.reshape(b.slice(t if layout == 0 else b.op("Transpose", [t], {"perm": [1, 0, 2]}), d, d + 1, 0), [batch, H])

    ys, hs, cs = [], [], []
    for d in range(ndir):
        Wd, Rd, Bd = Wv[d], Rv[d], Bv[d]
        wb, rb = Bd[:G * H], Bd[G * H:]
        if kind == "GRU" and lbr:
            # h gate: Rbh stays inside the reset product; the other gates' biases fold together.
            xb = wb.copy()
            xb[:2 * H] += rb[:2 * H]
            hb = np.concatenate([np.zeros(2 * H, dtype), rb[2 * H:]])
        elif kind == "GRU":
            xb = wb + rb
            hb = None
        else:
            xb = wb + rb
            hb = None
        xw = b.op("Add", [b.op("MatMul", [x, b.const(Wd.T.copy(), "WT")]), b.const(xb.astype(dtype), "xb")])
        xw = b.reshape(xw, [seq * batch, G * H])      # step t's rows: t * batch ... (t + 1) * batch
        h = initial(h0, d)
        c = initial(c0, d) if kind == "LSTM" else None
        # The recurrent weights: one initializer per direction, read by every step (unrolling copies no weights).
        RT = b.const(Rd.T.copy(), "RT") if kind != "GRU" else None
        if kind == "GRU":
            RzrT, RhT = b.const(Rd[:2 * H].T.copy(), "RzrT"), b.const(Rd[2 * H:].T.copy(), "RhT")
            rbh = b.const(hb[2 * H:], "rbh") if lbr else None
        if Pv is not None:
            pi, po, pf = (b.const(Pv[d][k * H:(k + 1) * H], name) for k, name in enumerate(("pi", "po", "pf")))
        steps = range(seq) if (direction == "forward" or (direction == "bidirectional" and d == 0)) else range(seq - 1, -1, -1)
        outs = {}
        for t in steps:
            # a Slice per step: a Gather would cost TVM a constant-folding build per step, a Split of the whole
            # sequence one kernel whose LLVM build time grows with the square of the steps
            xt = b.slice(xw, t * batch, (t + 1) * batch, 0)
            if kind == "LSTM":
                gates = b.op("Add", [xt, b.op("MatMul", [h, RT])])
                gi, go, gf, gc = (b.slice(gates, k * H, (k + 1) * H, 1) for k in range(4))
                if Pv is not None:
                    gi = b.op("Add", [gi, b.op("Mul", [c, pi])])
                    gf = b.op("Add", [gf, b.op("Mul", [c, pf])])
                i_, f_, g_ = b.op("Sigmoid", [gi]), b.op("Sigmoid", [gf]), b.op("Tanh", [gc])
                c = b.op("Add", [b.op("Mul", [f_, c]), b.op("Mul", [i_, g_])])
                if Pv is not None:
                    go = b.op("Add", [go, b.op("Mul", [c, po])])
                h = b.op("Mul", [b.op("Sigmoid", [go]), b.op("Tanh", [c])])
            elif kind == "GRU":
                xz, xr, xh = (b.slice(xt, k * H, (k + 1) * H, 1) for k in range(3))
                hzr = b.op("MatMul", [h, RzrT])
                z = b.op("Sigmoid", [b.op("Add", [xz, b.slice(hzr, 0, H, 1)])])
                r = b.op("Sigmoid", [b.op("Add", [xr, b.slice(hzr, H, 2 * H, 1)])])
                if lbr:
                    hh = b.op("Add", [b.op("MatMul", [h, RhT]), rbh])
                    cand = b.op("Tanh", [b.op("Add", [xh, b.op("Mul", [r, hh])])])
                else:
                    cand = b.op("Tanh", [b.op("Add", [xh, b.op("MatMul", [b.op("Mul", [r, h]), RhT])])])
                # H = (1 - z) * cand + z * h = cand + z * (h - cand)
                h = b.op("Add", [cand, b.op("Mul", [z, b.op("Sub", [h, cand])])])
            else:
                h = b.op("Tanh", [b.op("Add", [xt, b.op("MatMul", [h, RT])])])
            outs[t] = h
        ys.append(b.op("Concat", [b.reshape(outs[t], [1, 1, batch, H]) for t in range(seq)], {"axis": 0}))
        hs.append(b.reshape(h, [1, batch, H]))
        if c is not None:
            cs.append(b.reshape(c, [1, batch, H]))
    Y = ys[0] if ndir == 1 else b.op("Concat", ys, {"axis": 1})
    Yh = hs[0] if ndir == 1 else b.op("Concat", hs, {"axis": 0})
    Yc = (cs[0] if ndir == 1 else b.op("Concat", cs, {"axis": 0})) if cs else None
    if layout == 1:
        Y = b.op("Transpose", [Y], {"perm": [2, 0, 1, 3]})
        Yh = b.op("Transpose", [Yh], {"perm": [1, 0, 2]})
        Yc = b.op("Transpose", [Yc], {"perm": [1, 0, 2]}) if Yc is not None else None
    results = [Y, Yh, Yc]
    for out, new in zip(node.outputs, results):
        if not out.name or new is None:
            continue
        b.graph.nodes.append(gs.Node("Identity", f"{b.prefix}_out_{next(b.ids)}", inputs=[new], outputs=[out]))
    node.outputs.clear()
    node.inputs.clear()


@register
class DecomposeRNN(Pass):
    name = "decompose-rnn"
    help = "Unroll LSTM, GRU and RNN over their static sequence into MatMul, Add and activations"

    def run(self, graph, ctx):
        def rnn_nodes(g):
            return [n for n in g.nodes if n.op in GATES and (n.domain or "") in ("", "ai.onnx")]
        nodes = rnn_nodes(graph)
        if any(n.inputs[0].shape is None for n in nodes):   # e.g. fed by a DequantizeLinear after quantize
            graph = infer(graph)
            nodes = rnn_nodes(graph)
        for n in nodes:
            _decompose(graph, n)
        if nodes:
            toposort(graph.cleanup(remove_unused_graph_inputs=False))
        return PassResult(graph, bool(nodes), {"unrolled": len(nodes)})
