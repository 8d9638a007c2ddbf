"""Compile's self-check of a compiled library, run so that it also sees results that depend on more than the input.

One onnxruntime comparison on one input once passed a library that left part of an intermediate buffer unwritten:
that memory held zeros in a fresh process and garbage after other work or with more threads. check_library
therefore compares with onnxruntime on two inputs at the thread count a plain run uses (every thread of the pool),
and requires the same input to give bit-identical outputs when run again after the other input and on one thread
(graphopt's parallel loops only split independent outputs among threads, so the thread count never changes a
result)."""
from __future__ import annotations

import numpy as np

from .errors import printable


def second_input(feeds: dict, seed: int) -> dict:
    """feeds with each input's elements in a seeded random order: another input with the same values (token ids
    stay within their table, images within their range)."""
    rng = np.random.default_rng(seed + 7919)
    out = {}
    for name, value in feeds.items():
        a = np.asarray(value)
        out[name] = rng.permutation(a.reshape(-1)).reshape(a.shape) if a.size > 1 else a.copy()
    return out


def first_difference(a: dict, b: dict) -> tuple[str, float] | None:
    """(output, largest difference) for the first output where a and b are not bit-identical (NaN equal to NaN;
    a NaN against a number or a changed shape counts as infinite), else None."""
    for name, x in a.items():
        x, y = np.asarray(x), np.asarray(b.get(name))
        if x.shape != y.shape or x.dtype != y.dtype:
            return name, float("inf")
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        same = (x64 == y64) | (np.isnan(x64) & np.isnan(y64))
        if not same.all():
            d = np.abs(x64 - y64)[~same]
            return name, float(np.max(np.where(np.isnan(d), np.inf, d)))
    return None


def _failed(res: dict) -> bool:
    return res.get("ok") is False or bool(res.get("problem"))


def check_library(art, seed: int, feeds: dict, compare) -> dict:
    """compare(art, seed, feeds) (the onnxruntime comparison, a dict with "ok") on feeds and on second_input(feeds)
    at the default thread count, then feeds run again (after the other input) and on one thread must give exactly
    the first run's outputs. Returns the first comparison's result with "second_input" and "repeatable" added, or
    a failing result ("ok" False; "problem" says what failed unless it is the first comparison's own failure)."""
    first = art.run(feeds)
    res = compare(art, seed, feeds)
    if _failed(res):
        return res
    res2 = compare(art, seed, second_input(feeds, seed))     # same seed: the same extra inputs for a float64 arbiter
    if _failed(res2):
        if res2.get("problem"):
            return res2
        fp64 = (f"; against float64 {res2['fp64_error_graphopt']:.3g}, onnxruntime {res2['fp64_error_onnxruntime']:.3g}"
                if "fp64_error_graphopt" in res2 else "")
        return dict(res2, problem=f"on a second input (the first one's values shuffled) the library differs from "
                                  f"onnxruntime on output '{printable(str(res2.get('worst_output')))}' (max abs error "
                                  f"{res2.get('max_abs_error', float('nan')):.3g}{fp64}); please report this model")
    for when, threads in (("after another input", None), ("on one thread", 1)):
        diff = first_difference(first, art.run(feeds, threads=threads))
        if diff is not None:
            name, d = diff
            return dict(res, ok=False, repeatable=False,
                        problem=f"the library gives different outputs for the same input: output "
                                f"'{printable(name)}' changed by up to {d:.3g} when run again {when} (it reads "
                                f"memory it never wrote, or its threads race); please report this model")
    summary = {k: res2[k] for k in ("ok", "max_abs_error", "worst_output") if k in res2}
    return dict(res, second_input=summary, repeatable=True)
