"""A latency model measured on the compiled target: how long each weighted layer's kernel takes at other channel
counts, and the whole model, for latency budgets (prune-channels{latency=...}, factorize-lowrank{latency=...}) and
`graphopt profile`.

For each Conv / ConvTranspose / Gemm / MatMul layer, a one-node ONNX graph at the layer's real input shape is
compiled for the target (graphopt.compile, default schedules, no tuning) at a few output and input channel counts
(100%, 75%, 50%, 25%, 10% rounded to the target's channel step, plus one count just below and one just above a
step multiple) and timed: every variant of a layer in one process, interleaved rounds, the median, minus the call
overhead of an empty model. Per axis the points make a `Curve`: piecewise linear through the step multiples, and
counts off the multiples cost what the measured off-multiple points cost relative to that line (the step
structure), so a count that is not faster than a larger one is never chosen (`Curve.fast_counts`). A layer's
latency at (out, in) channels is separable: full * out_curve(out) / full * in_curve(in) / full.

Tables are cached per target and machine (CPU model and flags, target description, TVM and graphopt versions) in
$GRAPHOPT_CACHE_DIR/latency/ (default ~/.cache/graphopt/latency/), one JSON file each, keyed by layer signature
(op, shapes, attributes) and thread count. The file carries the sha256 of its content; a file that does not match
it, is not graphopt's or is for another machine is not trusted: a warning, and the tables are measured again.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import verified_json
from .version import __version__
from .errors import BadInput
from .timing import ROUNDS, clock_name, time_interleaved, timer  # noqa: F401 (clock_name: the passes' reports)

FORMAT = 1
#: fractions of a layer's channels measured (rounded to the channel step)
FRACTIONS = (0.75, 0.5, 0.25, 0.1)
OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# ----------------------------------------------------------------------------------------------------------------
# where: machine identity and the verified cache file
# ----------------------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    root = os.environ.get("GRAPHOPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "graphopt")
    return Path(root) / "latency"


def _cpu() -> tuple[str, str]:
    """(CPU model name, sha256 of its sorted flags) from /proc/cpuinfo ('' where there is none)."""
    name, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return name, hashlib.sha256(flags.encode()).hexdigest()[:16]


def machine(target) -> dict:
    """What a measurement depends on besides the layer: the CPU, the target as configured, the compilers."""
    import tvm
    name, flags = _cpu()
    return {"cpu": name, "cpu_flags": flags, "target": target.describe(), "tvm": tvm.__version__,
            "graphopt": __version__}


def threads_used() -> int:
    """The thread count TVM runs with here: $TVM_NUM_THREADS (the CLI's --threads sets it), else the cores."""
    try:
        return max(1, int(os.environ.get("TVM_NUM_THREADS", "")))
    except ValueError:
        return os.cpu_count() or 1


_digest = verified_json.digest


class Cache:
    """The verified JSON file (graphopt.verified_json) of one target + machine: {"format", "machine", "kernels",
    "models", "overhead"}.
    kernels: {key: {"signature", "threads", "ms": {"OUT,IN": ms}}}; models: {key: {"threads", "ms"}};
    overhead: {threads: ms}."""

    def __init__(self, target, root: Path | None = None):
        self.machine = machine(target)
        self.path = Path(root or cache_dir()) / f"{target.name}-{_digest(self.machine)[:16]}.json"
        self.kernels, self.models, self.overhead = {}, {}, {}
        if self.path.exists():
            problem = self._load()
            if problem:
                warnings.warn(f"graphopt: latency table {self.path} is not trusted ({problem}); measuring again")
                self.kernels, self.models, self.overhead = {}, {}, {}

    def _load(self) -> str | None:
        body, problem = verified_json.read(self.path)
        if problem:
            return problem
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            return "not a graphopt latency table"
        if body.get("machine") != self.machine:
            return "measured on another machine or configuration"
        kernels, models, overhead = body.get("kernels"), body.get("models"), body.get("overhead")
        if not (isinstance(kernels, dict) and isinstance(models, dict) and isinstance(overhead, dict)):
            return "malformed"
        for key, e in kernels.items():
            if not (isinstance(e, dict) and isinstance(e.get("ms"), dict) and _key(e.get("signature"),
                                                                                    e.get("threads")) == key
                    and all(_ms_ok(v) for v in e["ms"].values())):
                return f"malformed entry {key[:12]}"
        if not all(isinstance(e, dict) and _ms_ok(e.get("ms")) for e in models.values()) or \
                not all(_ms_ok(v) for v in overhead.values()):
            return "malformed model entry"
        self.kernels, self.models, self.overhead = kernels, models, overhead
        return None

    def save(self) -> None:
        """Merge what another process saved meanwhile (when trusted), then write; under a lock file, so that two
        runs filling one table lose nothing."""
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                disk = Cache.__new__(Cache)
                disk.machine, disk.path = self.machine, self.path
                if disk._load() is None:
                    self.kernels = {**disk.kernels, **self.kernels}
                    self.models = {**disk.models, **self.models}
                    self.overhead = {**disk.overhead, **self.overhead}
            verified_json.write(self.path, {"format": FORMAT, "machine": self.machine, "kernels": self.kernels,
                                            "models": self.models, "overhead": self.overhead})


def _ms_ok(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _key(signature, threads) -> str:
    return _digest({"signature": signature, "threads": threads})


# ----------------------------------------------------------------------------------------------------------------
# what is measured: a layer's kernel as a one-node graph
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kernel:
    """A weighted layer as measured: op, input shape, weight shape, bias shape (or None) and attributes.
    n_out / n_in: its output / input channels (depthwise: n_in is the number of groups)."""
    op: str
    x: tuple
    w: tuple
    bias: tuple | None
    attrs: tuple
    depthwise: bool = False

    @property
    def signature(self) -> dict:
        return {"op": self.op, "x": list(self.x), "w": list(self.w), "bias": None if self.bias is None
                else list(self.bias), "attrs": [[k, v] for k, v in self.attrs], "depthwise": self.depthwise}

    def _a(self, name, default=0):
        return dict(self.attrs).get(name, default)

    @property
    def n_out(self) -> int:
        if self.op == "Conv":
            return self.w[0]
        if self.op == "ConvTranspose":
            return self.w[1]
        if self.op == "Gemm":
            return self.w[0] if self._a("transB") else self.w[1]
        return self.w[1]

    @property
    def n_in(self) -> int:
        if self.depthwise:
            return self.x[1]
        if self.op in ("Conv", "ConvTranspose"):
            return self.x[1]
        if self.op == "Gemm":
            return self.x[0] if self._a("transA") else self.x[1]
        return self.x[-1]

    @property
    def multiplier(self) -> int:
        return self.w[0] // self.x[1] if self.depthwise else 1

    def model(self, k_out: int, k_in: int, seed: int = 0) -> onnx.ModelProto:
        """The one-node graph with k_out output and k_in input channels (depthwise: k_in groups)."""
        rng = np.random.default_rng(seed)
        x, w, attrs = list(self.x), list(self.w), dict(self.attrs)
        b = list(self.bias) if self.bias is not None else None
        if self.depthwise:
            x[1], w[0], attrs["group"] = k_in, k_in * self.multiplier, k_in
            k_out = w[0]
        elif self.op == "Conv":
            x[1], w[0], w[1] = k_in, k_out, k_in
        elif self.op == "ConvTranspose":
            x[1], w[0], w[1] = k_in, k_in, k_out
        elif self.op == "Gemm":
            x[0 if attrs.get("transA") else 1] = k_in
            w[:] = [k_out, k_in] if attrs.get("transB") else [k_in, k_out]
        else:
            x[-1], w[:] = k_in, [k_in, k_out]
        if b is not None and b and b[-1] == self.n_out:
            b[-1] = k_out
        inits = [numpy_helper.from_array(rng.standard_normal(w).astype(np.float32) * 0.1, "w")]
        names = ["x", "w"]
        if b is not None:
            inits.append(numpy_helper.from_array(rng.standard_normal(b).astype(np.float32), "b"))
            names.append("b")
        node = helper.make_node(self.op, names, ["y"], name="layer", **attrs)
        graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m = onnx.shape_inference.infer_shapes(m)
        return m


def _attr_value(v):
    if isinstance(v, (list, tuple)):
        return tuple(_attr_value(a) for a in v)
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(type(v).__name__)


def kernel_of(node, shapes: dict) -> Kernel | None:
    """The Kernel of a Conv / ConvTranspose / Gemm / MatMul with a constant float weight and known shapes; None for
    what the model does not measure (grouped non-depthwise convs, non-constant Gemm bias, unknown shapes)."""
    import onnx_graphsurgeon as gs
    if node.op not in OPS or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    wv = node.inputs[1].values
    if wv.dtype.kind != "f" or isinstance(node.inputs[0], gs.Constant):
        return None
    x = shapes.get(node.inputs[0].name)
    if x is None or not all(isinstance(d, (int, np.integer)) and d > 0 for d in x):
        return None
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        if not isinstance(node.inputs[2], gs.Constant):
            return None
        bias = tuple(int(d) for d in node.inputs[2].values.shape)
    try:
        attrs = tuple(sorted((k, _attr_value(v)) for k, v in node.attrs.items()))
    except TypeError:
        return None
    group = int(dict(attrs).get("group", 1))
    depthwise = False
    if node.op in ("Conv", "ConvTranspose") and group > 1:
        if node.op == "ConvTranspose" or wv.shape[1] != 1 or x[1] != group:
            return None
        depthwise = True
    if node.op == "MatMul" and wv.ndim != 2:
        return None
    return Kernel(node.op, tuple(int(d) for d in x), tuple(int(d) for d in wv.shape), bias, attrs, depthwise)


def sample_counts(n: int, step: int) -> list[int]:
    """Channel counts measured for an axis of n channels: n, FRACTIONS of n rounded down to multiples of step,
    and one count just below and just above the middle multiple (where the step structure shows)."""
    step = max(1, int(step))
    if n <= 1:
        return [n]
    if n <= 2 * step:
        pts = {n} | {max(1, math.ceil(n * f)) for f in FRACTIONS}
    else:
        pts = {n} | {max(step, int(n * f) // step * step) for f in FRACTIONS}
        mid = max(step, int(n * 0.5) // step * step)
        pts |= {c for c in (mid - 1, mid + 1, mid + step) if 1 <= c <= n}
    return sorted(pts)


# ----------------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------------

def _compile(model: onnx.ModelProto, target: str, target_options: dict | None, folder: Path):
    from . import api
    return api.compile(model, target, folder, target_options=target_options, measure=False,
                       verify_level="structural")


def _empty_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
    return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "empty", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 17)])


class Profiler:
    """Measures kernels and models for one target on this machine, through the verified cache."""

    def __init__(self, target: str = "cpu", target_options: dict | None = None, progress=None,
                 cache_root: Path | None = None):
        from . import api
        self.target_name, self.target_options = target, dict(target_options or {})
        self.target = api.get_target(target, **self.target_options)
        if not self.target.measures_here():
            raise BadInput(f"a latency budget needs the {target} target's latency, which cannot be measured on this "
                           f"machine (no {target} device here); use flops= or params= instead")
        self.step = self.target.hw().structure.channels
        self.threads = threads_used()
        self.cache = Cache(self.target, cache_root)
        self.progress = progress

    def overhead_ms(self) -> float:
        """Time of one call of an (almost) empty compiled model: what every layer measurement includes."""
        key = str(self.threads)
        if key not in self.cache.overhead:
            with tempfile.TemporaryDirectory(prefix="graphopt-latency-") as d:
                art = _compile(_empty_model(), self.target_name, self.target_options, Path(d) / "a")
                ms = time_interleaved([timer(art, self.threads)], rounds=15, threads=self.threads)[0]
                self.cache.overhead[key] = round(ms, 6)
            self.cache.save()
        return self.cache.overhead[key]

    def variants_table(self, signature: dict, variants: dict, full: str) -> dict[str, float]:
        """{label: ms} of variants of one layer (label -> function making its ONNX model; `full` labels the
        reference variant). Cached under the signature; missing variants are compiled and timed together with the
        reference in interleaved rounds, and put on the scale of the reference's cached time."""
        key = _key(signature, self.threads)
        entry = self.cache.kernels.get(key) or {"signature": signature, "threads": self.threads, "ms": {}}
        missing = [label for label in variants if label not in entry["ms"]]
        if missing:
            over = self.overhead_ms()
            todo = list(dict.fromkeys([full, *missing]))      # the reference again: one scale for old and new
            with tempfile.TemporaryDirectory(prefix="graphopt-latency-") as d:
                calls = []
                for i, label in enumerate(todo):
                    art = _compile(variants[label](), self.target_name, self.target_options, Path(d) / f"v{i}")
                    calls.append(timer(art, self.threads))
                ms = time_interleaved(calls, threads=self.threads)
            ms = [max(m - over, 0.1 * m) for m in ms]
            old_full = entry["ms"].get(full)
            scale = old_full / ms[0] if old_full else 1.0
            for label, m in zip(todo, ms):
                if label != full or old_full is None:
                    entry["ms"][label] = round(m * scale, 6)
            self.cache.kernels[key] = entry
            self.cache.save()
        return {label: entry["ms"][label] for label in variants}

    def kernel_table(self, kernel: Kernel, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
        """{(out, in): ms} for the kernel at these channel counts (variants_table of kernel.model)."""
        full = (kernel.n_out, kernel.n_in)
        want = list(dict.fromkeys([full, *pairs]))
        ms = self.variants_table(kernel.signature, {f"{o},{i}": (lambda o=o, i=i: kernel.model(o, i)) for o, i in want},
                                 f"{full[0]},{full[1]}")
        return {(o, i): ms[f"{o},{i}"] for o, i in want}

    def model_ms(self, model: onnx.ModelProto) -> float:
        """Median ms of the whole model compiled for the target (cached by the model's bytes)."""
        key = _digest({"model": hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest(),
                       "threads": self.threads})
        if key not in self.cache.models:
            with tempfile.TemporaryDirectory(prefix="graphopt-latency-") as d:
                art = _compile(model, self.target_name, self.target_options, Path(d) / "m")
                ms = time_interleaved([timer(art, self.threads)], rounds=15, threads=self.threads)[0]
            self.cache.models[key] = {"threads": self.threads, "ms": round(max(ms - self.overhead_ms(), 0.1 * ms), 6)}
            self.cache.save()
        return self.cache.models[key]["ms"]

    def curves(self, kernel: Kernel, out: bool, inp: bool) -> tuple[float, "Curve | None", "Curve | None"]:
        """(full ms, curve over output channels at full input, curve over input channels at full output); a
        depthwise kernel has one curve (its groups) returned as the output curve."""
        n_out, n_in = kernel.n_out, kernel.n_in
        if kernel.depthwise:
            out, inp = out or inp, False
            pairs = [(c * kernel.multiplier, c) for c in sample_counts(n_in, self.step)]
        else:
            pairs = [(c, n_in) for c in sample_counts(n_out, self.step)] if out else []
            pairs += [(n_out, c) for c in sample_counts(n_in, self.step)] if inp else []
        table = self.kernel_table(kernel, pairs)
        full = table[(n_out, n_in)]
        if kernel.depthwise:
            return full, Curve([(ki, ms) for (ko, ki), ms in table.items()], n_in, self.step), None
        co = Curve([(ko, ms) for (ko, ki), ms in table.items() if ki == n_in], n_out, self.step) if out else None
        ci = Curve([(ki, ms) for (ko, ki), ms in table.items() if ko == n_out], n_in, self.step) if inp else None
        return full, co, ci


class Baseline:
    """A model compiled once, to time variants of it against: fraction(variant) = variant ms / baseline ms, both
    timed warm in the same interleaved rounds. A context manager (the compiled files live until it closes)."""

    def __init__(self, profiler: Profiler, model: onnx.ModelProto):
        self.p = profiler
        self._dir = tempfile.TemporaryDirectory(prefix="graphopt-latency-")
        self._n = 0
        self.call = timer(_compile(model, profiler.target_name, profiler.target_options,
                                   Path(self._dir.name) / "base"), profiler.threads)

    def fraction(self, model: onnx.ModelProto, rounds: int = 2 * ROUNDS) -> tuple[float, float, float]:
        """(variant ms / baseline ms, variant ms, baseline ms)."""
        self._n += 1
        art = _compile(model, self.p.target_name, self.p.target_options, Path(self._dir.name) / f"v{self._n}")
        ms, base = time_interleaved([timer(art, self.p.threads), self.call], rounds=rounds,
                                    threads=self.p.threads)
        return ms / base, ms, base

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._dir.cleanup()


# ----------------------------------------------------------------------------------------------------------------
# the fitted model
# ----------------------------------------------------------------------------------------------------------------

class Curve:
    """ms of a kernel against the channel count of one axis: piecewise linear through the measured step multiples
    (and the full and smallest counts); counts off the multiples cost the largest measured excess of the measured
    off-multiple counts over that line (at least 0, at most 2x): an unmeasured count may be as slow as the worst
    measured one (a prime count can lose the schedule's tiling)."""

    def __init__(self, points, n: int, step: int):
        pts = sorted({int(k): float(v) for k, v in points}.items())
        self.n, self.step, self.points = n, step, pts
        base = [(k, v) for k, v in pts if k % step == 0 or k == n or k == pts[0][0]]
        self.base_k = np.array([k for k, _ in base], dtype=np.float64)
        self.base_v = np.array([v for _, v in base], dtype=np.float64)
        off = [(k, v) for k, v in pts if (k, v) not in base]
        ratios = [v / self._line(k) for k, v in off if self._line(k) > 0]
        self.penalty = float(min(2.0, max(1.0, max(ratios)))) if ratios else 1.0

    def _line(self, k: float) -> float:
        bk, bv = self.base_k, self.base_v
        if len(bk) == 1:
            return float(bv[0] * k / bk[0])
        if k < bk[0]:           # below the smallest measured count: the first segment's slope, never below k/k0
            slope = (bv[1] - bv[0]) / (bk[1] - bk[0])
            return float(max(bv[0] + slope * (k - bk[0]), bv[0] * k / bk[0]))
        return float(np.interp(k, bk, bv))

    def at(self, k: int) -> float:
        """The measured value at a measured count; else the line, times the penalty off the step."""
        measured = dict(self.points).get(k)
        if measured is not None:
            return measured
        v = self._line(k)
        if k % self.step and k != self.n:
            v *= self.penalty
        return v

    def fast_counts(self, counts) -> list[int]:
        """Of these counts, those faster than every larger one (largest first): the others are never worth it."""
        out, best = [], math.inf
        for k in sorted(set(counts), reverse=True):
            v = self.at(k)
            if v < best - 1e-12:
                out.append(k)
                best = v
        return out


@dataclass
class Term:
    """One layer's kernel in a model's latency: full ms and its curves (None: that axis does not change). A
    depthwise kernel has one curve, `out`, over its groups: at() takes its output channel count."""
    name: str
    kernel: Kernel
    full: float
    out: Curve | None
    inp: Curve | None

    def at(self, k_out: int | None, k_in: int | None) -> float:
        """ms at k_out output and k_in input channels (None: that axis at full size)."""
        if self.kernel.depthwise and k_out is not None:
            k_out = max(1, k_out // self.kernel.multiplier)
        v = self.full
        if self.out is not None and k_out is not None:
            v *= self.out.at(k_out) / max(self.out.at(self.out.n), 1e-12)
        if self.inp is not None and k_in is not None:
            v *= self.inp.at(k_in) / max(self.inp.at(self.inp.n), 1e-12)
        return v


def remainder(model_ms: float, terms: list[Term]) -> float:
    """The part of the whole model's time that no modelled layer accounts for (never negative): other ops, moving
    activations, and what kernels cost in the model beyond their warm, isolated timing (weights from memory)."""
    return max(0.0, model_ms - sum(t.full for t in terms))


# ----------------------------------------------------------------------------------------------------------------
# graphopt profile
# ----------------------------------------------------------------------------------------------------------------

def profile_model(model, target: str = "cpu", input_shapes: dict | None = None, target_options: dict | None = None,
                  progress=None, cache_root: Path | None = None, input_values: dict | None = None) -> dict:
    """The latency table prune-channels{latency=...} uses for this model (after cleanup): every weighted layer
    whose channels can be pruned, measured (or read from the cache) at its sample counts, and the whole model."""
    import contextlib
    from .graph import copy as copy_graph, to_onnx
    from .loading import load
    from .passmanager import PassContext, PassManager
    import onnx_graphsurgeon as gs
    prof = Profiler(target, target_options, progress, cache_root)
    graph = copy_graph(model) if isinstance(model, gs.Graph) else load(model, input_shapes=input_shapes,
                                                                       input_values=input_values)
    ctx = PassContext(target=target, hw=prof.target.hw(), verify="structural", target_options=target_options)
    graph = PassManager.parse("cleanup").run(graph, ctx).graph
    g = ctx.analyses.get("channel-groups", graph)
    free = np.array([not u.frozen for u in g.units], dtype=bool)
    todo, skipped = [], []
    for ka in g.kernels():
        node = g.nodes[ka.node]
        k = kernel_of(node, g.shapes)
        oc = g.classes(ka.out_slots)
        ic = None if ka.depthwise or ka.in_slots is None else g.classes(ka.in_slots)
        vary = (bool(free[oc].any()), ic is not None and bool(free[ic].any()))
        if not any(vary):
            continue
        if k is None:
            skipped.append({"layer": g.name(ka.node), "op": node.op, "why": "not measured (grouped conv, non-constant "
                                                                         "bias or unknown shape)"})
            continue
        todo.append((g.name(ka.node), k, vary))
    rows = []
    with (progress.task("latency table", len(todo)) if progress is not None
          else contextlib.nullcontext(lambda *a, **k: None)) as update:
        for i, (name, k, (vo, vi)) in enumerate(todo):
            full, co, ci = prof.curves(k, vo, vi)
            for axis, c in (("out" if not k.depthwise else "groups", co), ("in", ci)):
                if c is not None:
                    fast = set(c.fast_counts([count for count, _ in c.points]))
                    rows.append({"layer": name, "op": k.op, "axis": axis, "channels": c.n, "full_ms": round(full, 4),
                                 "ms": [[kk, round(v, 6), kk in fast] for kk, v in sorted(c.points, reverse=True)]})
            update(i + 1, name)
    model_ms = prof.model_ms(to_onnx(graph))
    return {"target": target, "threads": prof.threads, "step": prof.step, "table": str(prof.cache.path),
            "model_ms": round(model_ms, 4), "layers": rows, "skipped": skipped}
