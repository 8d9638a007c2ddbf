"""insert-adapters: FitNets-style adapters from student layers to teacher layers, as a training side-graph.

The student graph gets, for every (student tensor s, teacher tensor t) pair, an adapter that maps s into t's
channel space (a 1x1 Conv for channels-first feature maps, MatMul + Add for channels-last tokens and vectors; an
Identity when the channel counts already match) and an extra graph output named "<s>__adapted". The original
outputs, nodes and weights are untouched, so the pass is exact on the original outputs; distillation trains the
student together with its adapters and `remove_adapters` takes them out again, restoring the student's structure
exactly, so adapters never reach an artifact.

Pairs come from the option `pairs=[student_tensor:teacher_tensor,...]` or automatically:

* candidate layers are float feature tensors with a known layout (channels at axis 1, or channels last, or one
  vector per example), produced by a computing op (not by Reshape/Transpose/Slice...), batch first, not graph
  outputs, and not 1x1 side branches (squeeze-excitation gates) feeding back into larger maps;
* a candidate is a stage output (the FitNets "hint") when none of its nearest candidate descendants has the same
  spatial size: the last map of each resolution in a ResNet, the bottleneck and decoder stages of a U-Net (whose
  encoder maps flow on at their own size through the skip connections), the pooled vector of a classifier;
* student and teacher stage outputs are aligned in depth order (both sequences increasing), only between tensors
  of the same spatial size and layout; among the alignments with the most pairs, linear CKA on the data decides
  (the largest total CKA, by dynamic programming);
* `max_pairs` keeps that many pairs spread over the depth, always including the deepest.

Adapters are initialized by ridge least squares from student to teacher features on the data (ridge=0.1 of the
mean feature energy: an unregularized fit of a random student's correlated features gives huge adapter weights
that blow up the student's gradients; on digits, 0.1 distilled better than 1e-4, 1e-2, 1 or a random init), or
randomly with init=random. The data: ctx.data["calib"] or ctx.data["train"] ({input name: array}, batch first);
without it, `samples` seeded normal inputs. The teacher (a gs.Graph) is ctx.data["teacher"].

Adapter nodes are named "<s>__adapted/<part>" and their pairing is recorded in the graph metadata
(graphopt.metadata `adapters`), so `adapter_pairs(graph)` and `remove_adapters(graph)` work on any copy of the
graph, including after a save/load round trip.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import metadata
from graphopt.adapters import ADAPTED_SUFFIX, adapter_pairs, remove_adapters  # noqa: F401 (remove_adapters: API)
from graphopt.errors import BadInput, CheckFailed
from graphopt.graph import to_onnx
from graphopt.layouts import tensor_layouts
from graphopt.op_traits import traits
from graphopt.passmanager import Option, Pass, PassResult, register


# ----------------------------------------------------------------------------------------------------------------
# candidate layers
# ----------------------------------------------------------------------------------------------------------------

def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)


def _spatial(shape, layout) -> tuple:
    if layout == "cf":
        return tuple(int(d) for d in shape[2:])
    if layout == "cl":
        return tuple(int(d) for d in shape[1:-1])
    return ()


def _channels(shape, layout) -> int:
    return int(shape[1]) if layout in ("cf", "vec") else int(shape[-1])


def candidate_layers(graph: gs.Graph) -> list[dict]:
    """Feature tensors usable as hints, in topological order: {name, layout, spatial, channels, shape, kind,
    index}. `kind` is what pairing compares besides the spatial size: 'cf' (channels first), 'cl' (channels last)
    or 'vec' (one vector per example: rank 2, or channels first with 1x1 spatial size)."""
    lay = tensor_layouts(graph)
    adapters = metadata.adapter_tags(graph)
    outputs = {t.name for t in graph.outputs}
    batch = {int(t.shape[0]) for t in graph.inputs if t.shape and isinstance(t.shape[0], (int, np.integer))}
    cands = []
    for node in graph.nodes:
        if traits(node.op).layout or node.name in adapters:
            continue
        for t in node.outputs:
            if not t.name or t.name in outputs or t.name not in lay or not _static(t.shape):
                continue
            if t.dtype is not None and np.dtype(t.dtype).kind != "f":
                continue
            if batch and int(t.shape[0]) not in batch:
                continue
            layout = lay[t.name]
            spatial = _spatial(t.shape, layout)
            kind = layout
            if layout == "cf" and int(np.prod(spatial)) == 1:
                kind, spatial = "vec", ()
            cands.append({"name": t.name, "layout": layout, "kind": kind, "spatial": spatial,
                          "channels": _channels(t.shape, layout), "shape": tuple(int(d) for d in t.shape)})
    # 1x1 tensors followed by larger feature maps are side branches (squeeze-excitation gates), not features
    keep, later_big = [], False
    for c in reversed(cands):
        if c["kind"] == "vec" and c["layout"] == "cf" and later_big:
            continue
        later_big = later_big or int(np.prod(c["spatial"] or (1,))) > 1
        keep.append(c)
    cands = keep[::-1]
    for i, c in enumerate(cands):
        c["index"] = i
    return cands


def stage_outputs(graph: gs.Graph) -> list[dict]:
    """Candidates that end a stage, in depth order: those none of whose nearest candidate descendants (reached
    through non-candidate tensors: reshapes, transposes, side branches) has the same spatial size. In a
    ResNet, the output of each resolution's last block; in a U-Net, the bottleneck and the decoder stages (encoder
    maps flow on at their own size through the skip connections)."""
    cands = candidate_layers(graph)
    by_name = {c["name"]: c for c in cands}
    tensors = graph.tensors()
    stages = []
    for c in cands:
        same = False
        seen = set()
        frontier = [tensors[c["name"]]]
        while frontier and not same:
            t = frontier.pop()
            for node in t.outputs:
                for o in node.outputs:
                    if not o.name or o.name in seen:
                        continue
                    seen.add(o.name)
                    d = by_name.get(o.name)
                    if d is None:
                        frontier.append(o)
                    elif d["spatial"] == c["spatial"]:
                        same = True
                        break
                if same:
                    break
        if not same:
            stages.append(c)
    return stages


# ----------------------------------------------------------------------------------------------------------------
# data, features, CKA
# ----------------------------------------------------------------------------------------------------------------

def _sample_inputs(graph: gs.Graph, data: dict | None, samples: int, seed: int) -> list[np.ndarray]:
    names = [t.name for t in graph.inputs]
    if data:
        arrays = [np.asarray(data[n]) if n in data else None for n in names]
        if any(a is None for a in arrays):
            values = list(data.values())
            if len(values) != len(names):
                raise BadInput(f"insert-adapters: the data has inputs {sorted(data)}, the student needs {names}")
            arrays = [np.asarray(v) for v in values]
        return [a[:samples] for a in arrays]
    rng = np.random.default_rng(seed)
    out = []
    for t in graph.inputs:
        shape = (samples,) + tuple(int(d) for d in t.shape[1:])
        dt = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
        out.append(rng.standard_normal(shape).astype(dt) if dt.kind == "f" else rng.integers(0, 4, shape).astype(dt))
    return out


def _features(graph: gs.Graph, inputs: list[np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    import torch

    from graphopt.trainable import TrainableGraph
    if not names:
        return {}
    tg = TrainableGraph(graph)
    with torch.no_grad():
        _, feats = tg(*inputs, features=names)
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in feats.items()}


def _normalized_gram(feat: np.ndarray) -> np.ndarray:
    """The centered Gram matrix of n examples' features (n x n, float64) over its Frobenius norm (zero when the
    features are constant): the linear CKA of two representations is the sum of the elementwise product of their
    normalized Grams, so scoring every student/teacher pair needs one Gram per tensor, not one per pair."""
    x = np.asarray(feat, np.float64).reshape(len(feat), -1)
    x = x - x.mean(0, keepdims=True)
    k = x @ x.T
    norm = np.linalg.norm(k)
    return k / norm if norm > 0 else np.zeros_like(k)


def _rows(feat: np.ndarray, layout: str) -> np.ndarray:
    """(examples * positions, channels)."""
    if layout == "cf":
        feat = np.moveaxis(feat, 1, -1)
    return feat.reshape(-1, feat.shape[-1])


def _align(students: list[dict], teachers: list[dict], score) -> list[tuple[int, int]]:
    """Monotone alignment maximizing the total score over compatible pairs (score None: incompatible)."""
    S, T = len(students), len(teachers)
    best = np.zeros((S + 1, T + 1))
    move = np.zeros((S + 1, T + 1), dtype=np.int8)  # 0 skip student, 1 skip teacher, 2 pair
    scores = {}
    for i in range(1, S + 1):
        for j in range(1, T + 1):
            best[i, j], move[i, j] = best[i - 1, j], 0
            if best[i, j - 1] > best[i, j]:
                best[i, j], move[i, j] = best[i, j - 1], 1
            s = score(students[i - 1], teachers[j - 1])
            if s is not None:
                scores[i, j] = s
                # every pair is worth at least 1 so more pairs beat fewer; CKA breaks ties between alignments
                if best[i - 1, j - 1] + 1.0 + s > best[i, j]:
                    best[i, j], move[i, j] = best[i - 1, j - 1] + 1.0 + s, 2
    pairs, i, j = [], S, T
    while i > 0 and j > 0:
        if move[i, j] == 2:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif move[i, j] == 1:
            j -= 1
        else:
            i -= 1
    return pairs[::-1]


def _spread(pairs: list, k: int) -> list:
    if len(pairs) <= k:
        return pairs
    idx = sorted({int(round(x)) for x in np.linspace(len(pairs) - 1, 0, k)})  # spacing >= 1: all distinct
    return [pairs[i] for i in idx]


# ----------------------------------------------------------------------------------------------------------------
# inserting and removing
# ----------------------------------------------------------------------------------------------------------------

def _tag(tags: dict[str, metadata.AdapterTag], taken: set[str], output: str, student: str, teacher: str,
         part: str) -> str:
    """A new node name "<output>/<part>" (unique among `taken`), recorded in `tags` with its pairing."""
    name, k = f"{output}/{part}", 1
    while name in taken:
        name, k = f"{output}/{part}_{k}", k + 1
    taken.add(name)
    tags[name] = metadata.AdapterTag(student, teacher, part)
    return name


def structure_differences(a: gs.Graph, b: gs.Graph) -> list[str]:
    """Where two graphs differ in structure: inputs, outputs, nodes (op, name, wiring, attributes) and
    initializer names/shapes/dtypes. Empty when they are the same graph up to weight values."""
    ma, mb = to_onnx(a).graph, to_onnx(b).graph
    diffs = []

    def io(vs):
        return [(v.name, v.type.SerializeToString()) for v in vs]
    if io(ma.input) != io(mb.input):
        diffs.append("graph inputs differ")
    if io(ma.output) != io(mb.output):
        diffs.append(f"graph outputs differ: {[o.name for o in ma.output]} vs {[o.name for o in mb.output]}")
    if len(ma.node) != len(mb.node):
        diffs.append(f"{len(ma.node)} vs {len(mb.node)} nodes")
    for na, nb in zip(ma.node, mb.node):
        if na.SerializeToString() != nb.SerializeToString():
            diffs.append(f"node '{na.name}' ({na.op_type}) differs from '{nb.name}' ({nb.op_type})")
            break
    ia = [(i.name, tuple(i.dims), i.data_type) for i in ma.initializer]
    ib = [(i.name, tuple(i.dims), i.data_type) for i in mb.initializer]
    if ia != ib:
        diffs.append("initializers differ (names, shapes or dtypes)")
    return diffs


def check_removed(before: gs.Graph, after: gs.Graph, seed: int = 0) -> None:
    """The oracle of remove_adapters: same structure and weights as `before`, and bit-identical outputs in
    onnxruntime on seeded inputs. Raises CheckFailed."""
    from graphopt import ort, verify
    diffs = structure_differences(before, after)
    if diffs:
        raise CheckFailed(f"remove_adapters did not restore the student: {diffs[0]}")
    ma, mb = to_onnx(before).graph, to_onnx(after).graph
    for x, y in zip(ma.initializer, mb.initializer):
        if x.SerializeToString() != y.SerializeToString():
            raise CheckFailed(f"remove_adapters changed initializer '{x.name}'")
    feeds = verify.seeded_inputs(before, seed)
    ra = ort.run(to_onnx(before), feeds)
    rb = ort.run(to_onnx(after), feeds)
    for name, v in ra.items():
        if name not in rb or v.shape != rb[name].shape or v.tobytes() != rb[name].tobytes():
            raise CheckFailed(f"remove_adapters changed output '{name}'")


def _parse_pairs(items: list[str], student: gs.Graph, teacher: gs.Graph) -> list[tuple[str, str]]:
    s_names = {n for n, t in student.tensors().items() if isinstance(t, gs.Variable)}
    t_names = {n for n, t in teacher.tensors().items() if isinstance(t, gs.Variable)}
    pairs = []
    for item in items:
        splits = [(item[:i], item[i + 1:]) for i, ch in enumerate(item) if ch == ":"]
        ok = [(s, t) for s, t in splits if s in s_names and t in t_names]
        if len(ok) == 1:
            pairs.append(ok[0])
            continue
        if len(ok) > 1:
            raise BadInput(f"insert-adapters: pair '{item}' can be split into student:teacher in several ways: "
                           + ", ".join(f"'{s}' : '{t}'" for s, t in ok))
        if not splits:
            raise BadInput(f"insert-adapters: pair '{item}' must be student_tensor:teacher_tensor")
        s, t = splits[0]
        what = f"student tensor '{s}'" if s not in s_names else f"teacher tensor '{t}'"
        raise BadInput(f"insert-adapters: pair '{item}': no {what} (a tensor name of the "
                       f"{'student' if s not in s_names else 'teacher'} graph)")
    seen = set()
    for s, _ in pairs:
        if s in seen:
            raise BadInput(f"insert-adapters: student tensor '{s}' is paired twice")
        seen.add(s)
    return pairs


def _describe(graph: gs.Graph, name: str, lay: dict) -> dict:
    t = graph.tensors()[name]
    if not _static(t.shape):
        raise BadInput(f"insert-adapters: tensor '{name}' has no static shape")
    layout = lay.get(name) or ("cf" if len(t.shape) >= 4 else "cl" if len(t.shape) == 3 else "vec")
    spatial, kind = _spatial(t.shape, layout), layout
    if layout == "cf" and int(np.prod(spatial)) == 1:
        spatial, kind = (), "vec"
    return {"name": name, "layout": layout, "kind": kind, "spatial": spatial,
            "channels": _channels(t.shape, layout), "shape": tuple(int(d) for d in t.shape)}


def _fit(S: np.ndarray, T: np.ndarray, ridge: float = 0.1) -> tuple[np.ndarray, np.ndarray, float]:
    """Ridge least squares T ~ S @ W + b. Returns (W (Cs, Ct), b (Ct), R^2)."""
    A = np.concatenate([S, np.ones((len(S), 1))], 1)
    G = A.T @ A
    lam = ridge * np.trace(G) / G.shape[0] + 1e-8
    sol = np.linalg.solve(G + lam * np.eye(G.shape[0]), A.T @ T)
    W, b = sol[:-1], sol[-1]
    resid = T - A @ sol
    denom = np.sum((T - T.mean(0)) ** 2)
    r2 = float(1.0 - np.sum(resid ** 2) / denom) if denom > 0 else 1.0
    return W, b, r2


def insert(student: gs.Graph, teacher: gs.Graph, pairs: list[tuple[str, str]] | None = None, max_pairs: int = 4,
           init: str = "lstsq", samples: int = 64, data: dict | None = None, seed: int = 0,
           adapt_equal: bool = False, ridge: float = 0.1) -> tuple[gs.Graph, list[dict]]:
    """Insert adapters into `student` (in place; also returned). Returns (graph, records)."""
    from graphopt.evaluate import linear_cka
    existing = adapter_pairs(student)
    if existing:
        raise BadInput("insert-adapters: the student already has adapters; remove them first (remove_adapters)")
    s_lay, t_lay = tensor_layouts(student), tensor_layouts(teacher)
    s_inputs = _sample_inputs(student, data, samples, seed)
    t_inputs = _sample_inputs(teacher, data, samples, seed) if data else s_inputs
    if len(t_inputs) != len(s_inputs):
        raise BadInput("insert-adapters: the teacher and the student take different numbers of inputs")
    cka = {}
    if pairs:
        chosen = [(_describe(student, s, s_lay), _describe(teacher, t, t_lay)) for s, t in pairs]
        for s, t in chosen:
            if s["spatial"] != t["spatial"]:
                raise BadInput(f"insert-adapters: student tensor '{s['name']}' {list(s['shape'])} and teacher tensor "
                               f"'{t['name']}' {list(t['shape'])} have different spatial sizes; pair tensors of equal "
                               f"spatial size")
            if s["kind"] != t["kind"]:
                raise BadInput(f"insert-adapters: student tensor '{s['name']}' ({s['kind']}) and teacher tensor "
                               f"'{t['name']}' ({t['kind']}) have different layouts (channels first, channels last "
                               f"or one vector per example)")
        need_s = [s["name"] for s, _ in chosen]
        need_t = [t["name"] for _, t in chosen]
        fs = _features(student, s_inputs, need_s)
        ft = _features(teacher, t_inputs, need_t)
    else:
        ss, ts = stage_outputs(student), stage_outputs(teacher)
        compatible = [(a, b) for a in ss for b in ts if a["spatial"] == b["spatial"] and a["kind"] == b["kind"]]
        fs = _features(student, s_inputs, sorted({a["name"] for a, _ in compatible}))
        ft = _features(teacher, t_inputs, sorted({b["name"] for _, b in compatible}))

        grams = {}

        def gram(side: str, name: str, feats: dict) -> np.ndarray:
            if (side, name) not in grams:
                grams[side, name] = _normalized_gram(feats[name])
            return grams[side, name]

        def score(a, b):
            if a["spatial"] != b["spatial"] or a["kind"] != b["kind"]:
                return None
            key = (a["name"], b["name"])
            if key not in cka:      # linear CKA from the cached Grams
                cka[key] = float(np.sum(gram("s", a["name"], fs) * gram("t", b["name"], ft)))
            return cka[key]
        aligned = _align(ss, ts, score)
        if not aligned:
            raise BadInput("insert-adapters: no student layer matches a teacher layer of the same spatial size and "
                           "layout; give pairs=[student_tensor:teacher_tensor,...]")
        chosen = [(ss[i], ts[j]) for i, j in _spread(aligned, max_pairs)]
    records = []
    tags, taken = {}, {n.name for n in student.nodes}
    dtype = np.float32
    for s, t in chosen:
        sname, tname = s["name"], t["name"]
        if (sname, tname) not in cka and sname in fs and tname in ft:
            cka[sname, tname] = linear_cka(fs[sname], ft[tname])
        src = student.tensors()[sname]
        dtype = np.dtype(src.dtype) if src.dtype is not None else np.dtype(np.float32)
        cs, ct = s["channels"], t["channels"]
        out_shape = list(s["shape"])
        if s["layout"] == "cf" or s["layout"] == "vec":
            out_shape[1] = ct
        else:
            out_shape[-1] = ct
        name = sname + ADAPTED_SUFFIX
        existing_names = set(student.tensors())
        k = 1
        while name in existing_names:
            name = f"{sname}{ADAPTED_SUFFIX}_{k}"
            k += 1
        out = gs.Variable(name, dtype=dtype, shape=out_shape)
        rec = {"student": sname, "teacher": tname, "output": name, "student_channels": cs, "teacher_channels": ct,
               "spatial": list(s["spatial"]), "cka": round(cka.get((sname, tname), float("nan")), 6)}
        if cs == ct and not adapt_equal:
            student.nodes.append(gs.Node("Identity", _tag(tags, taken, name, sname, tname, "identity"),
                                         inputs=[src], outputs=[out]))
            rec["adapter"] = "identity"
        else:
            if init == "lstsq" and sname in fs and tname in ft:
                S, T = _rows(fs[sname], s["layout"]), _rows(ft[tname], t["layout"])
                W, b, r2 = _fit(S, T, ridge)
                rec["fit_r2"] = round(r2, 6)
            else:
                rng = np.random.default_rng(seed)
                bound = np.sqrt(6.0 / cs)
                W, b = rng.uniform(-bound, bound, (cs, ct)), np.zeros(ct)
            base = name
            if s["layout"] == "cf":
                nsp = len(s["shape"]) - 2
                w = gs.Constant(base + "/adapter_weight", W.T.reshape((ct, cs) + (1,) * nsp).astype(dtype))
                bias = gs.Constant(base + "/adapter_bias", b.astype(dtype))
                student.nodes.append(gs.Node("Conv", _tag(tags, taken, name, sname, tname, "conv"),
                                             attrs={"kernel_shape": [1] * nsp, "strides": [1] * nsp,
                                                    "pads": [0] * (2 * nsp), "dilations": [1] * nsp, "group": 1},
                                             inputs=[src, w, bias], outputs=[out]))
                rec["adapter"] = "conv1x1"
            else:
                w = gs.Constant(base + "/adapter_weight", W.astype(dtype))
                bias = gs.Constant(base + "/adapter_bias", b.astype(dtype))
                mid = gs.Variable(base + "/adapter_matmul", dtype=dtype, shape=out_shape)
                student.nodes.append(gs.Node("MatMul", _tag(tags, taken, name, sname, tname, "matmul"),
                                             inputs=[src, w], outputs=[mid]))
                student.nodes.append(gs.Node("Add", _tag(tags, taken, name, sname, tname, "bias"),
                                             inputs=[mid, bias], outputs=[out]))
                rec["adapter"] = "linear"
            rec["adapter_params"] = int(cs * ct + ct)
        student.outputs.append(out)
        records.append(rec)
    if tags:
        metadata.set_adapter_tags(student, tags)
    return student, records


@register
class InsertAdapters(Pass):
    name = "insert-adapters"
    help = ("Pair student layers with teacher layers (ctx.data['teacher']) and add FitNets adapters as extra "
            "'<tensor>__adapted' outputs for feature distillation")
    # exact (not lossy): the original outputs are untouched; only training side outputs are added
    options = {
        "pairs": Option(list, [], "student_tensor:teacher_tensor pairs; empty: pair automatically by spatial "
                                  "size and depth, linear CKA choosing"),
        "max_pairs": Option(int, 4, "automatic pairing: at most this many pairs, spread over the depth", minimum=1),
        "init": Option(str, "lstsq", "adapter initialization", choices=("lstsq", "random")),
        "samples": Option(int, 64, "examples used for CKA and the least-squares fit", minimum=2),
        "adapt_equal": Option(bool, False, "insert a learnable adapter also where the channel counts match"),
        "ridge": Option(float, 0.1, "least-squares regularization, relative to the mean feature energy",
                        minimum=0.0),
    }

    def run(self, graph, ctx):
        teacher = ctx.data.get("teacher")
        if teacher is None:
            raise BadInput("insert-adapters needs the teacher graph: PassContext(data={'teacher': graph}) "
                           "(graphopt compress passes the original model)")
        if isinstance(teacher, (list, tuple)):
            teacher = teacher[0]
        if not isinstance(teacher, gs.Graph):
            raise BadInput("insert-adapters: ctx.data['teacher'] must be an onnx-graphsurgeon Graph")
        data = ctx.data.get("calib")
        if data is None:
            data = ctx.data.get("train")
        if data is not None and not isinstance(data, dict):
            data = None  # a DataLoader: fall back to seeded inputs
        pairs = _parse_pairs(self.opts["pairs"], graph, teacher) if self.opts["pairs"] else None
        graph, records = insert(graph, teacher, pairs, self.opts["max_pairs"], self.opts["init"],
                                self.opts["samples"], data, ctx.seed, self.opts["adapt_equal"], self.opts["ridge"])
        return PassResult(graph, bool(records), {"adapters": records})
