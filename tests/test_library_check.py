"""graphopt/library_check.py: compile's self-check on two inputs, with the library compared with itself (the same
input run again after another one, and on one thread). A real compiled artifact is used; the faulty libraries are
that artifact with a fault injected into its outputs (a stale-memory read, a thread-count dependence)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_builders import model, rnd, vi

import graphopt
from graphopt.api import compare_with_onnxruntime
from graphopt.artifact import Artifact
from graphopt.library_check import check_library, first_difference, second_input

pytest.importorskip("tvm")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    d = tmp_path_factory.mktemp("library_check")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    m = model(nodes, [vi("x", [1, 3, 16, 16])], [vi("y", None)], [("w", rnd(8, 3, 3, 3)), ("b", rnd(8, seed=1))])
    onnx.save(m, str(d / "m.onnx"))
    return graphopt.compile(str(d / "m.onnx"), out=d / "art", measure=False)


def feeds():
    return {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}


class Faulty(Artifact):
    """The real artifact with a fault added to its outputs: fault(feeds, threads, calls) -> value added to y[0, 0, 0, 0]."""

    def __init__(self, path, fault):
        super().__init__(path)
        self.fault, self.calls = fault, 0

    def run(self, feeds, threads=None):
        out = super().run(feeds, threads)
        self.calls += 1
        y = out["y"].copy()
        y[0, 0, 0, 0] += self.fault(feeds, threads, self.calls)
        return dict(out, y=y)


def test_second_input_is_the_first_shuffled():
    f = {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "ids": np.array([3, 1, 2, 0], np.int64),
         "sr": np.array(16000, np.int64)}
    g = second_input(f, 0)
    for k in f:
        assert g[k].shape == f[k].shape and g[k].dtype == f[k].dtype
        assert sorted(g[k].reshape(-1).tolist()) == sorted(f[k].reshape(-1).tolist())
    assert not np.array_equal(g["x"], f["x"]) and g["sr"] == 16000
    assert np.array_equal(second_input(f, 0)["x"], g["x"])      # seeded


def test_first_difference():
    a = {"y": np.array([1.0, np.nan, 3.0], np.float32)}
    assert first_difference(a, {"y": a["y"].copy()}) is None     # NaN where NaN: the same
    assert first_difference(a, {"y": np.array([1.0, np.nan, 3.5], np.float32)}) == ("y", 0.5)
    assert first_difference(a, {"y": np.array([1.0, 2.0, 3.0], np.float32)}) == ("y", float("inf"))
    assert first_difference(a, {"y": np.zeros(2, np.float32)}) == ("y", float("inf"))


def test_a_correct_library_passes(art):
    res = check_library(art, 0, feeds(), compare_with_onnxruntime)
    assert res["ok"] and res["repeatable"] and res["second_input"]["ok"], res
    assert res["max_abs_error"] < 1e-4 and res["second_input"]["max_abs_error"] < 1e-4


def test_a_result_that_changes_between_runs_fails(art):
    """A change far inside onnxruntime's tolerance (what stale memory under a relu can give), only from the third
    run on: the comparisons pass, the repeat run does not."""
    res = check_library(Faulty(art.path, lambda f, t, calls: 1e-6 if calls > 2 else 0.0), 0, feeds(),
                        compare_with_onnxruntime)
    assert res["ok"] is False and res["repeatable"] is False
    assert "different outputs for the same input" in res["problem"] and "after another input" in res["problem"]


def test_a_result_that_depends_on_the_thread_count_fails(art):
    res = check_library(Faulty(art.path, lambda f, t, calls: 1e-6 if t == 1 else 0.0), 0, feeds(),
                        compare_with_onnxruntime)
    assert res["ok"] is False and "on one thread" in res["problem"]


def test_a_wrong_result_on_the_second_input_fails(art):
    first = feeds()["x"]
    res = check_library(Faulty(art.path, lambda f, t, calls: 0.0 if np.array_equal(f["x"], first) else 1.0), 0,
                        feeds(), compare_with_onnxruntime)
    assert res["ok"] is False and res["problem"].startswith("on a second input")
    assert "output 'y'" in res["problem"]
