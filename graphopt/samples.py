"""Sample data for a graph's inputs (--calib, --eval, --check-inputs; build's [data]): arrays named after the
graph inputs, cut into the feeds the graph takes.

Layout of the array for an input of static shape S (rank r):

* [N, *S] (rank r + 1): N samples on a leading axis added to the input's own shape. Always accepted, and the only
  layout for inputs whose first axis is not a batch: a recurrent state h0 of shape [layers*dirs, 1, H] takes
  [N, layers*dirs, 1, H]; a fixed audio chunk [4, 576] takes [N, 4, 576]. Each sample is one feed.
* [N, *S[1:]] (rank r): batch-first, for inputs whose axis 0 is a batch of 1 (or symbolic): each row is one
  sample (an input [1, 3, 32, 32] takes the usual [N, 3, 32, 32]). Inputs whose axis 0 is larger take [N, *S] only,
  so an array can never be cut along an axis that is not a batch.

Every input must give the same number of samples; a scalar input takes [N]. Dimensions that are not fixed
(symbolic) match any size.
"""
from __future__ import annotations

import numpy as np

from .errors import BadInput, printable


def _fixed(d) -> bool:
    return isinstance(d, (int, np.integer)) and d > 0


def _matches(shape, spec) -> bool:
    return len(shape) == len(spec) and all(not _fixed(s) or int(a) == int(s) for a, s in zip(shape, spec))


def _layout(name: str, a: np.ndarray, spec: tuple, what: str) -> bool:
    """True for [N, *S] (a sample axis added), False for batch-first [N, *S[1:]]; BadInput naming the layouts."""
    if a.ndim == len(spec) + 1 and _matches(a.shape[1:], spec):
        return True
    batch1 = len(spec) > 0 and (not _fixed(spec[0]) or spec[0] == 1)
    if batch1 and a.ndim == len(spec) and _matches(a.shape[1:], spec[1:]):
        return False

    def dims(rest):
        return "[" + ", ".join(["N"] + [str(d) for d in rest]) + "]"
    batch_first = f" or batch-first {dims(spec[1:])}" if batch1 and len(spec) > 1 else ""
    raise BadInput(f"{what}: array '{printable(name)}' has shape {list(a.shape)}; the graph input "
                   f"'{printable(name)}' is {list(spec)}: give {dims(spec)} (N samples on a leading axis)"
                   f"{batch_first}")


def feeds_from_samples(data: dict, specs, what: str, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Cut `data` ({input name: array}, extra arrays ignored) into feeds for specs [(name, shape, dtype)] following
    the layout above, one feed per sample; at most `limit` samples. Raises BadInput naming the input, its
    shape and the given shape when an array fits neither layout."""
    names = [n for n, _, _ in specs]
    if not names:
        return [{}]
    if not isinstance(data, dict) or not data:
        raise BadInput(f"{what}: expected arrays named after the graph inputs ({', '.join(map(printable, names))})")
    missing = [n for n in names if n not in data]
    if missing:
        raise BadInput(f"{what} lacks input(s) {', '.join(map(printable, missing))}; it has: "
                       f"{', '.join(printable(k) for k in sorted(data))}")
    arrays, added = {}, {}
    for name, shape, dtype in specs:
        a = np.asarray(data[name])
        added[name] = _layout(name, a, tuple(shape or ()), what)
        arrays[name] = a.astype(np.dtype(dtype), copy=False)
    counts = {n: len(a) for n, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise BadInput(f"{what}: the arrays give different numbers of samples ("
                       + ", ".join(f"{printable(n)}: {c}" for n, c in counts.items()) + ")")
    count = min(counts.values(), default=0)
    if count == 0:
        raise BadInput(f"{what}: the arrays hold no sample")
    if limit:
        count = min(count, limit)
    return [{n: np.ascontiguousarray(a[i] if added[n] else a[i:i + 1]) for n, a in arrays.items()}
            for i in range(count)]
