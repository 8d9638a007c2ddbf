"""tools/conformance.py: a few simple onnx backend node tests go through the CPU target and pass."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "conformance.py"
SIMPLE = ["test_relu", "test_add", "test_conv_with_strides_padding", "test_matmul_2d", "test_softmax_axis_1"]


def test_simple_node_tests_pass(tmp_path):
    out = tmp_path / "conf.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--filter", "^(" + "|".join(SIMPLE) + ")$", "--json", str(out),
                           "--check", "--quiet", "--timeout", "60"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert sorted(doc["tests"]) == sorted(SIMPLE)
    assert {name: t["status"] for name, t in doc["tests"].items()} == {name: "pass" for name in SIMPLE}
    assert doc["counts"]["pass"] == len(SIMPLE)
    assert "pass" in proc.stdout and "error-tvm" in proc.stdout     # the summary table


def test_compare_outputs_rules():
    sys.path.insert(0, str(TOOL.parent))
    try:
        import numpy as np
        import conformance as conf
    finally:
        sys.path.remove(str(TOOL.parent))
    f = np.array([1.0, 2.0, np.nan], np.float32)
    assert conf.compare_outputs(["y"], [f], [f * (1 + 5e-4)]) is None           # within rtol, NaN == NaN
    assert "elements off" in conf.compare_outputs(["y"], [f], [f * 1.01])
    assert "shape" in conf.compare_outputs(["y"], [f], [f[:2]])
    assert "dtype" in conf.compare_outputs(["y"], [f], [f.astype(np.float64)])
    i = np.array([1, 2, 3], np.int64)
    assert conf.compare_outputs(["y"], [i], [i.copy()]) is None
    assert "differ" in conf.compare_outputs(["y"], [i], [i + np.array([0, 0, 1])])
