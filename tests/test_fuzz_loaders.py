"""Property-based fuzzing of the loaders: mutated ONNX files and pipeline TOML give clear errors, never crashes."""
import os

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.build import BuildConfig
from graphopt.errors import GraphoptError

pytestmark = pytest.mark.fast

def _seed_bytes() -> bytes:
    from test_loading import _conv_model
    return _conv_model(17).SerializeToString()


SEED = _seed_bytes()
SETTINGS = settings(max_examples=int(os.environ.get("GRAPHOPT_FUZZ_EXAMPLES", 150)), deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def mutated(draw):
    data = bytearray(SEED)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            data = data[:i]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        else:
            j = draw(st.integers(0, len(data) - 1))
            data[i:i + 4] = data[j:j + 4]
    return bytes(data)


@SETTINGS
@given(mutated())
def test_mutated_onnx_files_give_clear_errors(tmp_path_factory, blob):
    p = tmp_path_factory.mktemp("fuzz") / "m.onnx"
    p.write_bytes(blob)
    try:
        g = graphopt.load(p)
    except GraphoptError as e:
        assert str(e) and "\n" not in str(e).strip()
        return
    # accepted: then the graph must be a valid, exportable model
    onnx.checker.check_model(graphopt.to_onnx(g))


TOML_SEED = """[model]
path = "m.onnx"
input_shapes = { x = [1, 2, 4, 4] }

[target]
name = "cpu"

[[pass]]
name = "cleanup"
max_iterations = 3

[data]
eval = "eval.npz"

[gates]
max_top1_drop = 0.02
min_speedup = true

[output]
dir = "out"
"""


@SETTINGS
@given(st.data())
def test_mutated_pipeline_toml_gives_clear_errors(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("tfuzz")
    (d / "m.onnx").write_bytes(SEED)
    (d / "eval.npz").write_bytes(b"")
    text = list(TOML_SEED)
    for _ in range(data.draw(st.integers(1, 5))):
        i = data.draw(st.integers(0, len(text) - 1))
        op = data.draw(st.sampled_from(["replace", "delete", "insert"]))
        ch = data.draw(st.sampled_from(list('[]{}="=,.0123456789abcxyz_ \n-#') + ["true", "1e9", "-1", "'"]))
        if op == "replace":
            text[i] = ch
        elif op == "delete":
            del text[i]
        else:
            text.insert(i, ch)
    (d / "p.toml").write_text("".join(text))
    try:
        BuildConfig(d / "p.toml")
    except GraphoptError as e:
        assert str(e) and "\n" not in str(e).strip()
