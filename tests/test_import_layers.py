"""No import cycles among graphopt's modules.

Every import counts, also those inside functions and `importlib.import_module("graphopt....")` with a literal
name. A package's own `__init__` is not counted as imported by its submodules' imports (Python runs it, but
that edge is the package's, not the importer's choice).
"""
import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent / "graphopt"


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The graphopt modules `module` imports anywhere in its body."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {m for m in found if m in known and m != module}


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {m: imports_of(m, p, set(names)) for m, p in names.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_finder_sees_function_level_and_importlib_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import importlib\ndef f():\n    from .b import x\n"
                    "def g():\n    return importlib.import_module('graphopt.c')\n")
    assert imports_of("graphopt.a", path, {"graphopt.a", "graphopt.b", "graphopt.c"}) == {"graphopt.b", "graphopt.c"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: cycles still to break, each with where it goes
KNOWN = []


def test_no_import_cycles_among_graphopt_modules():
    found = [c for c in cycles(import_graph()) if c not in KNOWN]
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


#: the layers of ARCHITECTURE.md's picture, top to bottom: a module imports only modules of its own layer or below
#: (a package entry covers its submodules; a new module must be placed here)
LAYERS = [
    ("front ends", {"cli", "build", "compress", "distributed", "distributed.__main__"}),
    ("passes", {"passes"}),
    ("on the target", {"latency", "sensitivity", ""}),
    ("drivers", {"api", "distill", "evaluate", "artifact", "timing", "profiling", "inspect_model", "checkpoints",
                 "stage_cache"}),
    ("targets", {"targets"}),
    ("core", {"passmanager", "instruments", "analyses", "channel_groups", "prune_rules", "verify", "loading",
              "folding", "control_flow", "shapes", "symbolic_shapes", "check_inputs", "trainable", "qat",
              "quant_check", "memory_estimate"}),
    ("foundation", {"allocator", "errors", "version", "graph", "metadata", "op_traits", "hardware", "ort", "limits", "npz",
                    "outputs", "text_table", "quiet", "progress", "pipeline_text", "plugins", "samples", "tuning_db",
                    "library_check", "verified_json", "micro_batching", "datasets",
                    "task_metrics", "bf16_check", "rewrite", "layouts", "adapters", "data_checks", "folder_data",
                    "report_html"}),
]


def layer_of(module: str) -> int | None:
    rest = module[len("graphopt."):] if module.startswith("graphopt.") else ""
    for depth, (_, names) in enumerate(LAYERS):
        if rest in names or any(rest.startswith(n + ".") for n in names if n and n != "distributed"):
            return depth
    return None


def test_every_module_has_a_layer():
    assert [m for m in import_graph() if layer_of(m) is None] == []


def test_every_import_points_down_the_layers():
    up = sorted(f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
                for a, bs in import_graph().items() for b in bs if layer_of(b) < layer_of(a))
    assert not up, "imports pointing up the layers of ARCHITECTURE.md:\n" + "\n".join(up)
