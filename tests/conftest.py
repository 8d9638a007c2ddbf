import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# strict mode (graphopt.errors.reraise_if_strict): a bug caught by a broad `except Exception` fails the test instead
# of turning into a fallback; child processes inherit it. GRAPHOPT_STRICT=0 runs the suite as users run graphopt.
os.environ.setdefault("GRAPHOPT_STRICT", "1")

import zoo  # noqa: E402


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def zoo_onnx(zoo_dir):
    """zoo_onnx(name, dynamic_batch=False) -> path of the model exported once per session."""
    cache = {}

    def get(name, dynamic_batch=False):
        key = (name, dynamic_batch)
        if key not in cache:
            path = zoo_dir / f"{name}{'_dyn' if dynamic_batch else ''}.onnx"
            zoo.export_onnx(name, path, dynamic_batch=dynamic_batch)
            cache[key] = path
        return cache[key]
    return get


@pytest.fixture(scope="session")
def pm_onnx(tmp_path_factory):
    """pm_onnx(name) -> path of a tests/prune_models.py model exported once per session."""
    import prune_models
    d = tmp_path_factory.mktemp("prune_models")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = prune_models.export(name, d / f"{name}.onnx")
        return cache[name]
    return get
