"""Passes and analyses are found through entry-point groups: every built-in pass, and an outside distribution's."""
import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import graphopt.passes
from graphopt import plugins
from graphopt.errors import GraphoptError
from graphopt.passmanager import REGISTRY, Pass, get_pass_class

pytestmark = pytest.mark.fast


def _builtin_pass_classes() -> dict[str, str]:
    """name -> "module:Class" for every Pass subclass defined in graphopt/passes/."""
    found = {}
    for info in pkgutil.iter_modules(graphopt.passes.__path__):
        module = importlib.import_module(f"graphopt.passes.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Pass) and cls.__module__ == module.__name__ and cls.name:
                found[cls.name] = f"{module.__name__}:{cls.__name__}"
    return found


def test_every_builtin_pass_is_an_entry_point():
    declared = {ep.name: ep.value for ep in plugins.entry_points(plugins.PASSES)}
    builtin = _builtin_pass_classes()
    assert builtin and {n: declared.get(n) for n in builtin} == builtin
    for name, value in builtin.items():
        cls = get_pass_class(name)
        assert f"{cls.__module__}:{cls.__name__}" == value


def test_core_imports_no_pass_and_finds_analyses_through_entry_points():
    code = ("import sys, onnx_graphsurgeon as gs, graphopt.passes\n"
            "from graphopt.passmanager import PassContext\n"
            "PassContext().analyses.get('channel-groups', gs.Graph())\n"
            "print(sorted(m for m in sys.modules if m.startswith('graphopt.passes.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert "channel-groups" in {ep.name for ep in plugins.entry_points(plugins.ANALYSES)}


def _fake_distribution(root, name: str, entry_points: str, module: str):
    (root / f"{name}.py").write_text(module)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def outside(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("outside-double", "outside-broken"):
        REGISTRY.pop(name, None)


def test_outside_distribution_ships_a_pass(outside):
    _fake_distribution(outside, "outside_plugin", "[graphopt.passes]\noutside-double = outside_plugin:Double\n",
                       "from graphopt.passmanager import Pass, PassResult\n"
                       "class Double(Pass):\n"
                       "    name = 'outside-double'\n"
                       "    def run(self, graph, ctx):\n"
                       "        return PassResult(graph, False)\n")
    cls = get_pass_class("outside-double")
    assert cls.__module__ == "outside_plugin" and REGISTRY["outside-double"] is cls


def test_outside_pass_that_fails_to_import_is_one_line(outside):
    _fake_distribution(outside, "outside_broken", "[graphopt.passes]\noutside-broken = outside_broken:Broken\n",
                       "import a_module_that_is_not_installed\n")
    with pytest.raises(GraphoptError) as e:
        get_pass_class("outside-broken")
    assert "outside-broken" in str(e.value) and "ModuleNotFoundError" in str(e.value) and "\n" not in str(e.value)
