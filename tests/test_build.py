"""graphopt build: gates, reproducibility, caching, the HTML report in a real browser, concurrent builds."""
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from graphopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_example  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "digits_cnn.onnx"


@pytest.fixture
def project(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "model.onnx")
    (xtr, ytr), (xte, yte) = make_example.digits_split()
    np.savez(tmp_path / "eval.npz", x=xte[:200], labels=yte[:200])
    np.savez(tmp_path / "calib.npz", x=xtr[:64])
    return tmp_path


def write_toml(d: Path, gates: str = "", passes: str = '[[pass]]\nname = "cleanup"\n', out="out/build", extra=""):
    (d / "pipeline.toml").write_text(f"""
[model]
path = "model.onnx"

[target]
name = "cpu"

{passes}
[data]
eval = "eval.npz"
calib = "calib.npz"

[gates]
{gates}

[evaluate]
threads = 1
repeat = 5
{extra}
[output]
dir = "{out}"
""")
    return d / "pipeline.toml"


def test_build_passes_gates_and_writes_reports(project, capsys):
    toml = write_toml(project, gates="max_top1_drop = true\nmin_agreement = 1.0\nmin_cka = 0.999\n"
                                     "max_noise_drop = true\nmax_adversarial_drop = true\n")
    assert main(["build", str(toml), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    m = summary["metrics"]
    assert m["top1_before"] > 0.95 and m["top1_drop"] == 0.0 and m["agreement"] == 1.0
    assert m["cka_min"] > 0.999
    assert all(g["passed"] for g in summary["gates"].values())
    art = project / "out" / "build"
    assert sorted(p.name for p in art.iterdir()) == ["manifest.json", "model.onnx", "model.so", "report.html",
                                                       "report.json"]
    assert json.loads((art / "report.json").read_text())["build"]["metrics"]["agreement"] == 1.0
    assert [s["stage"] for s in summary["stages"]] == ["original", "cleanup"]


def test_quantize_max_drop_reads_the_builds_evaluation_data(project, capsys):
    """quantize{max_drop} in a build without training data scores on [data] eval (here labelled: top-1)."""
    toml = write_toml(project, passes='[[pass]]\nname = "quantize"\nscheme = "int8"\nmax_drop = 0.5\n',
                      gates="max_top1_drop = 0.5\n")
    assert main(["build", str(toml), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in summary["stages"]][0] == "original" and "max_drop=0.5" in summary["stages"][1]["stage"]
    assert summary["metrics"]["top1_drop"] <= 0.005


def test_failing_gate_exits_1_and_names_it(project, capsys):
    toml = write_toml(project, gates="min_flops_reduction = true\nmax_latency_ms = 1000\n")
    code = main(["build", str(toml)])
    err = capsys.readouterr().err
    assert code == 1
    assert "min_flops_reduction: flops_reduction = 0 is below 0.75" in err
    assert "max_latency_ms" not in err
    report = json.loads((project / "out" / "build" / "report.json").read_text())["build"]
    assert report["gates"]["min_flops_reduction"]["passed"] is False
    assert report["gates"]["max_latency_ms"]["passed"] is True


def test_same_inputs_same_bytes_and_cache(project, capsys):
    toml = write_toml(project, out="out/a")
    assert main(["build", str(toml)]) == 0
    toml2 = write_toml(project, out="out/b", extra="")
    shutil.rmtree(project / ".graphopt-cache")
    assert main(["build", str(toml2)]) == 0
    a, b = project / "out" / "a", project / "out" / "b"
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    assert json.loads((a / "manifest.json").read_text())["files"] == json.loads((b / "manifest.json").read_text())["files"]
    capsys.readouterr()
    assert main(["build", str(toml2), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cached_stages"] == ["optimize", "compile", "evaluate"]


@pytest.mark.parametrize("content,needle", [
    ("[model]\npath = 'model.onnx'\n[bogus]\nx=1\n", "unknown section [bogus]"),
    ("[target]\nname='cpu'\n", "[model] needs path"),
    ("[model]\npath = 'nope.onnx'\n", "'nope.onnx' (resolved to"),
    ("[model]\npath = 'model.onnx'\n[gates]\nmin_speed = 2\n", "[gates] has no key 'min_speed'"),
    ("[model]\npath = 'model.onnx'\n[gates]\nmax_latency_ms = true\n", "gate max_latency_ms needs a number"),
    ("[model]\npath = 'model.onnx'\n[[pass]]\nname = 'nonsense'\n", "unknown pass 'nonsense'"),
    ("[model\npath = 'model.onnx'\n", "invalid TOML"),
    ("[model]\npath = 'model.onnx'\nmodule = 'net.py:build'\n", "[model] needs path"),
    ("[model]\nmodule = 'net.py'\n", 'must be "FILE.py:FUNCTION"'),
    ("[model]\nmodule = 'missing.py:build'\ninput_shapes = {x = [1, 1, 8, 8]}\n", "'missing.py' (resolved to"),
    ("[model]\npath = 'model.onnx'\ncheckpoint = 'model.onnx'\n", "checkpoint goes with module"),
    ("[model]\npath = 'model.onnx'\n[target]\nname = 'cpu'\nprecision = 'fp16'\n", "precision must be one of"),
    ("[model]\npath = 'model.onnx'\n[compress.schedule]\nlight_fractoin = 0.2\n", "unknown key 'light_fractoin'"),
    ("[model]\npath = 'model.onnx'\n[compress]\nschedule = 0.2\n", "must be a table: [compress.schedule]"),
    ("[model]\npath = 'model.onnx'\n[compress.schedule]\nlight_fraction = 'a'\n", "light_fraction must be a number"),
])
def test_bad_pipeline_files(project, capsys, content, needle):
    (project / "p.toml").write_text(content)
    assert main(["build", str(project / "p.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graphopt: error:") and needle in err and "\n" not in err


MODEL_PY = """
import torch.nn as nn


def build():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
"""


def test_pytorch_model_with_checkpoint(project, capsys):
    """[model] as PyTorch code + a state_dict checkpoint (read with weights_only=True); a checkpoint that pickles
    the whole module is refused in one line."""
    import torch
    (project / "net.py").write_text(MODEL_PY)
    ns = {}
    exec(MODEL_PY, ns)
    torch.manual_seed(3)
    net = ns["build"]().eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
    torch.save({"state_dict": net.state_dict(), "epoch": 7}, project / "weights.pt")
    toml = write_toml(project, out="out/torch")
    text = toml.read_text().replace('path = "model.onnx"', 'module = "net.py:build"\ncheckpoint = "weights.pt"\n'
                                                           'input_shapes = { x = [1, 1, 8, 8] }')
    toml.write_text(text)
    assert main(["build", str(toml), "--json"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    from graphopt.artifact import Artifact
    art = Artifact(project / "out" / "torch")
    x = np.random.default_rng(0).random((1, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = next(iter(art.run({"x": x}).values()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)        # the checkpoint's weights, not fresh ones
    torch.save(net, project / "weights.pt")                            # a pickled module: code, not weights
    assert main(["build", str(toml)]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights_only=True" in err and "state_dict()" in err and "\n" not in err


def test_concurrent_builds_leave_one_complete_artifact(project):
    toml = write_toml(project)
    results = []

    def go():
        results.append(subprocess.run([sys.executable, "-m", "graphopt.cli", "build", str(toml)],
                                      capture_output=True, text=True))
    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    art = project / "out" / "build"
    from graphopt.artifact import Artifact
    Artifact(art)   # checks every file against the manifest's sha256
    assert (art / "report.html").is_file()
    leftovers = [p.name for p in (project / "out").iterdir() if p.name != "build"]
    assert leftovers == []


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not _chromium(), reason="chromium not installed (tools/setup.sh installs it)")
def test_report_renders_in_headless_chromium(project):
    toml = write_toml(project, passes='[[pass]]\nname = "fold-batchnorm"\n\n[[pass]]\nname = "cleanup"\n')
    assert main(["build", str(toml)]) == 0
    page = project / "out" / "build" / "report.html"
    r = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={project / 'chrome'}", "--virtual-time-budget=3000", "--dump-dom",
                        page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = r.stdout
    assert 'data-plots="3"' in dom, dom[:500]
    assert '<div id="errors"></div>' in dom, "a script error was recorded"
    assert dom.count("<svg") >= 3


def test_prune_distill_quantize_compile_with_gates(project, capsys):
    """The progressive pipeline end to end: [data] train, prune-channels then quantize{scheme=int8}; compress prunes
    and distills, quantizes last (its evaluation runs the QDQ graph through the trainable view), compile lowers to
    int8 kernels and the gates hold."""
    (xtr, ytr), _ = make_example.digits_split()
    np.savez(project / "train.npz", x=xtr, labels=ytr)
    toml = write_toml(project, gates="max_top1_drop = 0.03\nmin_agreement = 0.95\nmin_flops_reduction = 0.4\n",
                      passes='[[pass]]\nname = "prune-channels"\nflops = 0.5\n\n'
                             '[[pass]]\nname = "quantize"\nscheme = "int8"\n',
                      extra="\n[compress]\nepochs = 8\nbatch_size = 64\n")
    text = toml.read_text().replace('calib = "calib.npz"', 'calib = "calib.npz"\ntrain = "train.npz"')
    toml.write_text(text)
    assert main(["build", str(toml), "--json"]) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert all(g["passed"] for g in summary["gates"].values())
    original, compressed = summary["stages"][0], summary["stages"][-1]
    assert compressed["stage"] == "compressed" and compressed["info"]["final"]["top1_drop"] <= 0.03
    assert 0.4 < compressed["macs"] / original["macs"] <= 0.55          # MACs and params seen through DequantizeLinear
    assert 0.3 < compressed["params"] / original["params"] < 1
    assert summary["metrics"]["adversarial_drop"] is not None          # FGSM through the QDQ graph's trainable view
    report = json.loads((project / "out" / "build" / "report.json").read_text())
    assert report["int8_kernels"] >= 3 and report["check"]["ok"]
    assert "onnxruntime_optimized" in report["check"]["outputs"]["logits"]


def test_progressive_example_prune_distill_qat_compile(tmp_path, capsys):
    """examples/digits_progressive.toml (fewer epochs, a speed gate no machine misses): prune -> distill -> QAT ->
    compile runs gated on max_top1_drop and min_speedup; the stages are original, pruned + distilled and quantized
    (QAT) with top-1 and agreement each, and report.html has the accuracy-against-latency plot."""
    (xtr, ytr), (xte, yte) = make_example.digits_split()
    np.savez(tmp_path / "train.npz", x=xtr, labels=ytr)
    np.savez(tmp_path / "eval.npz", x=xte, labels=yte)
    text = (ROOT / "examples" / "digits_progressive.toml").read_text()
    for old, new in [("../tests/fixtures/digits_cnn.onnx", str(FIXTURE)), ("../out/digits_data/", ""),
                     ("../out/digits_progressive", "out/build"), ("../out/.graphopt-cache", ".graphopt-cache"),
                     ("epochs = 12", "epochs = 6"), ("min_speedup = 0.8", "min_speedup = 0.25"),
                     ("repeat = 50", "repeat = 5")]:
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "pipeline.toml").write_text(text)
    assert main(["build", str(tmp_path / "pipeline.toml"), "--json"]) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["gates"]) == {"max_top1_drop", "min_speedup"} and all(g["passed"] for g in summary["gates"].values())
    stages = summary["stages"]
    assert [s["stage"] for s in stages] == ["original", "prune-channels + distilled", "compressed"]
    assert stages[-1]["label"] == "quantized (QAT)" and stages[-1]["info"]["quantization"]["qat"]
    assert all("top1" in s and "agreement" in s and s["ort_latency_ms"] > 0 for s in stages)
    assert stages[1]["macs"] < 0.6 * stages[0]["macs"] and stages[0]["agreement"] == 1.0
    m = summary["metrics"]
    assert m["top1_drop"] <= 0.01 and m["latency_ms"] > 0
    html = (tmp_path / "out" / "build" / "report.html").read_text()
    assert "id='plot-accuracy-latency'" in html
    report = json.loads((tmp_path / "out" / "build" / "report.json").read_text())
    assert report["int8_kernels"] >= 3 and report["check"]["ok"]
