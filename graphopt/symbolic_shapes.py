"""Shapes as formulas in a model's dynamic input dimensions, for `graphopt inspect` without --input-shape.

onnx shape inference keeps a dim_param only through ops that pass it on unchanged: after a strided Conv, a Resize or
a Reshape computed at run time the dimension is unknown. So the formulas come from concrete bindings instead. Every
dynamic input dimension becomes a symbol (the model's own dim_param when it is a short name, else N for a leading
axis, H and W for image axes, T or L for sequences); the graph's shapes are inferred, with shape subgraphs folded as
`load` does, at a few values of each symbol; and every dimension that depends on the symbols is fitted as a
multilinear polynomial in them (Conv, pooling and Reshape arithmetic is exactly that on sizes where the strides
divide evenly) and checked at one more binding. A dimension the check refutes stays unknown; a symbol that cannot
be varied at all (the model takes it only in a narrow range) is fixed at a value the model takes, and the result
says so. Formulas are `Poly`s: exact rational coefficients, printed as `5622*N*H*W`."""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from fractions import Fraction

import onnx
import onnx_graphsurgeon as gs

from .errors import reraise_if_strict

#: (first value, step) tried for a symbol, in order: the probes bind it to first, first+step (fit) and first+2*step
#: (check). Steps that are multiples of 32 (and 3) keep the strides of detectors and recognizers exact; 960 also
#: those of audio front ends (hops of 160), which need long inputs.
LATTICES_LEADING = ((1, 1), (96, 96), (48, 16))
LATTICES_OTHER = ((96, 96), (1024, 960), (48, 16))
MAX_PROBES = 32           # shape inferences one model may cost
MAX_SYMBOLS_PER_DIM = 4   # a dimension depending on more symbols than this is left unknown (2^k probes)


# ----------------------------------------------------------------------------------------------------------------
# polynomials
# ----------------------------------------------------------------------------------------------------------------

class Poly:
    """A polynomial with rational coefficients in a fixed tuple of symbol names; monomials are exponent tuples."""
    __slots__ = ("names", "terms")

    def __init__(self, names: tuple[str, ...], terms: dict | None = None):
        self.names = names
        self.terms = {m: Fraction(c) for m, c in (terms or {}).items() if c}

    @classmethod
    def var(cls, names, i: int) -> Poly:
        return cls(names, {tuple(int(j == i) for j in range(len(names))): 1})

    @classmethod
    def const(cls, names, c) -> Poly:
        return cls(names, {(0,) * len(names): c})

    def _lift(self, other) -> Poly:
        return other if isinstance(other, Poly) else Poly.const(self.names, other)

    def __add__(self, other):
        other = self._lift(other)
        out = dict(self.terms)
        for m, c in other.terms.items():
            out[m] = out.get(m, 0) + c
        return Poly(self.names, out)

    __radd__ = __add__

    def __sub__(self, other):
        return self + (-1) * self._lift(other)

    def __mul__(self, other):
        other = self._lift(other)
        out = {}
        for (m1, c1), (m2, c2) in itertools.product(self.terms.items(), other.terms.items()):
            m = tuple(a + b for a, b in zip(m1, m2))
            out[m] = out.get(m, 0) + c1 * c2
        return Poly(self.names, out)

    __rmul__ = __mul__

    def __bool__(self):
        return bool(self.terms)

    def at(self, values) -> Fraction:
        """The value with symbol i bound to values[i]."""
        total = Fraction(0)
        for m, c in self.terms.items():
            v = c
            for x, e in zip(values, m):
                v *= Fraction(x) ** e
            total += v
        return total

    def constant(self) -> int | None:
        """The polynomial's value when it is an integer constant, else None."""
        if any(any(m) for m in self.terms):
            return None
        c = self.terms.get((0,) * len(self.names), Fraction(0))
        return int(c) if c.denominator == 1 else None

    def symbols(self) -> set[int]:
        """Indices of the symbols the polynomial depends on."""
        return {i for m in self.terms for i, e in enumerate(m) if e}

    def is_sum(self) -> bool:
        return len(self.terms) > 1

    def __str__(self) -> str:
        if not self.terms:
            return "0"
        parts = []
        for m, c in sorted(self.terms.items(), key=lambda t: (-sum(t[0]), tuple(-e for e in t[0]))):
            mono = "*".join(n if e == 1 else f"{n}^{e}" for n, e in zip(self.names, m) if e)
            num, den = abs(c.numerator), c.denominator
            text = mono if num == 1 and mono else (f"{num}*{mono}" if mono else str(num))
            text += f"/{den}" if den != 1 else ""
            parts.append(("-" if c < 0 else "+", text))
        first_sign, first = parts[0]
        return ("-" if first_sign == "-" else "") + first + "".join(f" {s} {t}" for s, t in parts[1:])

    __repr__ = __str__


def simplest(p):
    """An int when the polynomial is an integer constant, else the polynomial."""
    if isinstance(p, Poly):
        c = p.constant()
        return p if c is None else c
    return p


def dim_text(d) -> str:
    if d is None:
        return "?"
    if isinstance(d, Poly) and d.is_sum():
        return f"({d})"
    return str(d)


def shape_text(shape) -> str:
    """'1x3x224x224' for numbers, 'N x 3 x H x W' when a dimension is a formula or unknown."""
    if shape is None:
        return "?"
    if all(isinstance(d, int) for d in shape):
        return "x".join(str(d) for d in shape)
    return " x ".join(dim_text(d) for d in shape)


# ----------------------------------------------------------------------------------------------------------------
# symbols
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Symbol:
    name: str
    where: list[tuple[str, int]]                # (input, axis) it stands for
    dim_param: str | None                       # the model's name for it (None when the model leaves it unnamed)
    lattices: tuple = ()
    first: int = 0
    step: int = 0
    fitted: bool = False                        # False: fixed at `first` (the model takes no other value tried)
    multiple_of: int = 1                        # the formulas hold where the symbol is `first` modulo this


def _dynamic(d) -> bool:
    return not (isinstance(d, int) and d >= 0)


def _base_name(param, input_name: str, rank: int, axis: int) -> str:
    if isinstance(param, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,19}", param) and not param.startswith("unk__"):
        return param
    if axis == 0 and rank >= 2:
        return "N"
    if rank == 4 and axis in (2, 3):
        return "HW"[axis - 2]
    if rank == 5 and axis in (2, 3, 4):
        return "DHW"[axis - 2]
    if rank in (2, 3) and axis == 1:
        return "T"
    if rank == 3 and axis == 2:
        return "L"
    return re.sub(r"\W", "_", f"{input_name}_{axis}") if re.match(r"[A-Za-z_]", input_name) else f"d{axis}"


def find_symbols(graph: gs.Graph) -> tuple[list[Symbol], dict[tuple[str, int], int]]:
    """The symbols of the graph's dynamic input dimensions (one per distinct dim_param, one per unnamed dimension)
    and which symbol each (input, axis) is."""
    symbols: list[Symbol] = []
    by_param: dict[str, int] = {}
    at: dict[tuple[str, int], int] = {}
    taken: set[str] = set()
    for t in graph.inputs:
        shape = list(t.shape or [])
        for axis, d in enumerate(shape):
            if not _dynamic(d):
                continue
            named = isinstance(d, str) and d not in ("", "?")
            if named and d in by_param:
                k = by_param[d]
                symbols[k].where.append((t.name, axis))
            else:
                base = _base_name(d if named else None, t.name, len(shape), axis)
                name, n = base, 1
                while name in taken:
                    n += 1
                    name = f"{base}{n}"
                taken.add(name)
                k = len(symbols)
                lat = LATTICES_LEADING if axis == 0 else LATTICES_OTHER
                symbols.append(Symbol(name, [(t.name, axis)], d if named else None, lat, *lat[0]))
                if named:
                    by_param[d] = k
            at[(t.name, axis)] = k
    return symbols, at


# ----------------------------------------------------------------------------------------------------------------
# probing and fitting
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class SymbolicShapes:
    symbols: list[Symbol]
    shapes: dict[str, tuple | None]             # tensor name -> dims (int, Poly, or None when unknown); None: rank unknown
    note: str

    def input_shape(self, t) -> list:
        return [dim_json(d) for d in (self.shapes.get(t.name) or t.shape or [])]


def dim_json(d):
    return d if isinstance(d, int) else ("?" if d is None else str(d))


class _Prober:
    def __init__(self, graph: gs.Graph, symbols: list[Symbol], at: dict):
        self.graph, self.symbols, self.at = graph, symbols, at
        self.cache: dict[tuple, dict | None] = {}
        self.model = _weightless(graph)
        self.targets = [t for t in graph.tensors().values()
                        if isinstance(t, gs.Variable) and (t.shape is None or any(_dynamic(d) for d in t.shape))]

    def __call__(self, values: tuple[int, ...]) -> dict | None:
        """Static shapes of the target tensors with the symbols bound to values: None for a shape still unknown,
        absent for a tensor folded away (a shape computation). None: the model cannot take the values."""
        if values in self.cache:
            return self.cache[values]
        if len(self.cache) >= MAX_PROBES:
            return None
        from .folding import fold
        from .graph import from_onnx
        from .shapes import bind_input_shapes, infer_model
        binding = {t.name: tuple(values[self.at[(t.name, a)]] if _dynamic(d) else d for a, d in enumerate(t.shape))
                   for t in self.graph.inputs if t.shape is not None}
        try:
            model = onnx.ModelProto()
            model.CopyFrom(self.model)
            bind_input_shapes(model, binding, False, "probe")
            probed, _ = fold(from_onnx(infer_model(model, "probe")))
            tensors = probed.tensors()
            out = {}
            for t in self.targets:
                p = tensors.get(t.name)
                if p is None:
                    continue
                s = tuple(p.shape) if p.shape is not None else None
                out[t.name] = s if s is not None and all(isinstance(d, int) and d >= 0 for d in s) else None
        except Exception as e:  # noqa: BLE001 - a binding the model cannot take is just not a usable probe
            reraise_if_strict(e)
            out = None
        self.cache[values] = out
        return out

    def unknown(self, probe) -> int:
        """Tensors the probe leaves unknown (a binding the model cannot take leaves more)."""
        return len(self.targets) + 1 if probe is None else sum(1 for s in probe.values() if s is None)


def _weightless(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a model whose float weights are inputs of the same shape: shape inference and the folding of
    shape computations see the same shapes, and no probe copies the weights."""
    from .graph import to_onnx
    model = to_onnx(graph)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    keep = []
    for init in model.graph.initializer:
        if init.data_type in floats and math.prod(init.dims) > 16:
            model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def _values(symbols, hi: set = frozenset(), check: bool = False) -> tuple[int, ...]:
    out = []
    for i, s in enumerate(symbols):
        if not s.fitted:
            out.append(s.first)
        elif check:
            out.append(s.first + 2 * s.step)
        else:
            out.append(s.first + (s.step if i in hi else 0))
    return tuple(out)


def _choose_bases(symbols, probe) -> dict | None:
    """Coordinate search for first values the model takes (fewest unknown shapes); returns the base probe."""
    for s in symbols:
        s.fitted = True
    base = probe(_values(symbols))
    score = probe.unknown(base)
    for s in sorted(symbols, key=lambda s: s.lattices is LATTICES_LEADING):     # a batch size is rarely the cause
        for first, step in s.lattices[1:]:
            if score == 0:
                return base
            old = (s.first, s.step)
            s.first, s.step = first, step
            p = probe(_values(symbols))
            if probe.unknown(p) < score:
                base, score = p, probe.unknown(p)
            else:
                s.first, s.step = old
    return base


def symbolic_shapes(graph: gs.Graph) -> SymbolicShapes:
    """Every tensor's shape as formulas in the graph's dynamic input dimensions (see the module docstring)."""
    symbols, at = find_symbols(graph)
    names = tuple(s.name for s in symbols)
    known = {t.name: tuple(t.shape) if t.shape is not None else None for t in graph.tensors().values()}
    if not symbols or any(t.shape is None for t in graph.inputs):
        why = "an input of unknown rank" if symbols else "no dynamic dimension"
        return SymbolicShapes(symbols, {k: _onnx_dims(v, {}, names) for k, v in known.items()},
                              f"shapes as onnx infers them ({why})")
    probe = _Prober(graph, symbols, at)
    base = _choose_bases(symbols, probe)
    if base is None:
        params = {s.dim_param: i for i, s in enumerate(symbols) if s.dim_param}
        return SymbolicShapes(symbols, {k: _onnx_dims(v, params, names) for k, v in known.items()},
                              "the model takes none of the sizes tried: shapes as onnx infers them")
    # one symbol at a time: its fit and check probes must be as complete as the base
    singles = {}
    for i, s in enumerate(symbols):
        hi, chk = probe(_values(symbols, {i})), _check_one(symbols, i, probe)
        s.fitted = hi is not None and chk is not None and probe.unknown(hi) <= probe.unknown(base) \
            and probe.unknown(chk) <= probe.unknown(base)
        singles[i] = (hi, chk)
    base = probe(_values(symbols))         # fixed symbols stay at their first value everywhere
    fits = {}
    params = {s.dim_param: i for i, s in enumerate(symbols) if s.dim_param}
    for t in probe.targets:
        dims = t.shape if t.shape is not None else [None] * len(base.get(t.name) or ())
        if t.shape is not None or base.get(t.name):
            fits[t.name] = tuple(_fit_dim(t.name, a, d, symbols, names, params, probe, base, singles)
                                 for a, d in enumerate(dims))
    check = probe(_values(symbols, check=True))
    if check is not None:
        vals = _values(symbols, check=True)
        for name, dims in fits.items():
            got = check.get(name)
            fits[name] = tuple(d if not isinstance(d, Poly) or (got is not None and len(got) == len(dims) and
                                                                d.at(vals) == got[a]) else None
                               for a, d in enumerate(dims))
    else:        # formulas in one symbol were checked one symbol at a time; the others cannot be
        fits = {name: tuple(None if isinstance(d, Poly) and len(d.symbols()) > 1 else d for d in dims)
                for name, dims in fits.items()}
    shapes = {k: _onnx_dims(v, params, names) for k, v in known.items()}
    shapes.update({k: tuple(simplest(d) for d in v) for k, v in fits.items()})
    if not all(s.fitted for s in symbols):
        shapes = {t: _fix(v, symbols) for t, v in shapes.items()}
    for i, s in enumerate(symbols):
        s.multiple_of = _granularity(shapes.values(), i) if s.fitted else 1
    return SymbolicShapes(symbols, shapes, _note(symbols, check is not None))


def _check_one(symbols, i, probe):
    s = symbols[i]
    vals = list(_values(symbols))
    vals[i] = s.first + 2 * s.step
    return probe(tuple(vals))


def _fit_dim(name, axis, d, symbols, names, params, probe, base, singles):
    """Dimension `axis` of tensor `name`: an int, a Poly, or None (unknown)."""
    if not _dynamic(d):
        return d
    if isinstance(d, str) and d in params and symbols[params[d]].fitted:
        return Poly.var(names, params[d])        # onnx carried the input's dimension through unchanged
    v0 = base.get(name)
    if v0 is None:
        return None
    rank = len(v0)
    deps = []
    for i, s in enumerate(symbols):
        if not s.fitted:
            continue
        hi, chk = singles[i]
        v1, v2 = hi.get(name), chk.get(name)
        if v1 is None or v2 is None or len(v1) != rank or len(v2) != rank:
            return None
        if v2[axis] - v0[axis] != 2 * (v1[axis] - v0[axis]):
            return None              # not affine in this symbol on the lattice
        if v1[axis] != v0[axis]:
            deps.append(i)
    if len(deps) > MAX_SYMBOLS_PER_DIM:
        return None
    # multilinear in t_i = (s_i - first_i) / step_i: coefficient of a subset by inclusion-exclusion over corners
    corner = {}
    for r in range(len(deps) + 1):
        for sub in itertools.combinations(deps, r):
            p = probe(_values(symbols, set(sub)))
            v = p.get(name) if p is not None else None
            if v is None or len(v) != rank:
                return None
            corner[sub] = v[axis]
    poly = Poly.const(names, 0)
    ts = {i: (Poly.var(names, i) - symbols[i].first) * Fraction(1, symbols[i].step) for i in deps}
    for sub in corner:
        c = sum((-1) ** (len(sub) - len(u)) * corner[u] for r in range(len(sub) + 1)
                for u in itertools.combinations(sub, r))
        term = Poly.const(names, c)
        for i in sub:
            term = term * ts[i]
        poly = poly + term
    return poly


def _onnx_dims(shape, params, names):
    """onnx's own shape: static dims, input dim_params as their symbols, other dims unknown."""
    if shape is None:
        return None
    return tuple(d if not _dynamic(d) else (Poly.var(names, params[d]) if isinstance(d, str) and d in params else None)
                 for d in shape)


def _fix(shape, symbols):
    """Substitute the fixed symbols' values."""
    if shape is None:
        return None
    vals = [s.first if not s.fitted else None for s in symbols]
    out = []
    for d in shape:
        if isinstance(d, Poly) and any(v is not None for v in vals):
            d = _substitute(d, vals)
        out.append(simplest(d))
    return tuple(out)


def _substitute(p: Poly, vals) -> Poly:
    out = Poly.const(p.names, 0)
    for m, c in p.terms.items():
        coef, mono = Fraction(c), []
        for v, e in zip(vals, m):
            if v is not None:
                coef *= Fraction(v) ** e
                mono.append(0)
            else:
                mono.append(e)
        out = out + Poly(p.names, {tuple(mono): coef})
    return out


def _granularity(shapes, i: int) -> int:
    """The least common multiple of the denominators of the symbol's linear terms (H/32 -> 32): the period of the
    rounding in strided layers, so the formulas fitted at `first` hold at every size congruent to it."""
    g = 1
    for shape in shapes:
        for d in shape or ():
            if isinstance(d, Poly):
                for m, c in d.terms.items():
                    if sum(m) == 1 and m[i] == 1:
                        g = math.lcm(g, c.denominator)
    return g


def _note(symbols, checked: bool) -> str:
    fitted = [s for s in symbols if s.fitted]
    fixed = [s for s in symbols if not s.fitted]
    parts = []
    if fitted:
        parts.append("formulas fitted from shape inference at " + ", ".join(
            f"{s.name} = {s.first}, {s.first + s.step}" for s in fitted)
            + (" and checked at " + ", ".join(f"{s.name} = {s.first + 2 * s.step}" for s in fitted) if checked
               else " (the check binding failed: formulas in several symbols are left unknown)"))
        even = [s for s in fitted if s.multiple_of > 1]
        if even:
            parts.append("exact for sizes that strided layers divide as they divide the fitted ones (" + ", ".join(
                f"{s.name} a multiple of {s.multiple_of}" if s.first % s.multiple_of == 0 else
                f"{s.name} = {s.first % s.multiple_of} mod {s.multiple_of}" for s in even) + "); other sizes round")
    if fixed:
        parts.append("fixed at " + ", ".join(f"{s.name} = {s.first}" for s in fixed)
                     + " (the model takes no other value tried)")
    return "; ".join(parts)
