"""The command line: exit codes 0/1/2, one clear error line, no traceback, no half-written output."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
import onnx_builders as ob
from graphopt.cli import main
from node_lookup import node_of

pytestmark = pytest.mark.fast

GRAPHOPT = [sys.executable, "-m", "graphopt.cli"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, *needles):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("graphopt: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, zoo_onnx):
    out = tmp_path_factory.mktemp("cli") / "art"
    assert main(["compile", str(zoo_onnx("cnn_digits")), "-o", str(out), "--pipeline", "cleanup", "--no-bench"]) == 0
    return out


def test_compile_run_bench_inspect_passes(compiled, capsys, tmp_path, zoo_onnx):
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    code, out, _ = run_cli(capsys, "run", compiled, "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "out.npz")
    assert code == 0 and "y" in out
    y = np.load(tmp_path / "out.npz")["y"]
    from graphopt import ort
    np.testing.assert_allclose(y, ort.run(onnx.load(str(zoo_onnx("cnn_digits"))), {"x": x})["y"], atol=1e-5)

    code, out, _ = run_cli(capsys, "bench", compiled, "--threads", 1, "--repeat", 5, "--json")
    res = json.loads(out)
    assert code == 0 and res["threads"] == 1 and res["graphopt_ms"] > 0 and res["onnxruntime_ms"] > 0

    code, out, _ = run_cli(capsys, "inspect", zoo_onnx("resnet"), "--json")
    info = json.loads(out)
    assert code == 0 and info["op_counts"]["Conv"] == 8 and info["macs"] > 0 and len(info["layers"]) == info["nodes"]
    code, out, _ = run_cli(capsys, "inspect", zoo_onnx("resnet"))
    assert code == 0 and "MACs" in out and node_of(graphopt.load(zoo_onnx("resnet")), "fc").name in out

    code, out, _ = run_cli(capsys, "passes")
    assert code == 0 and "fold-batchnorm (exact)" in out and "cleanup" in out


def test_bench_profile_prints_both_engines_kernel_tables(compiled, capsys):
    code, out, _ = run_cli(capsys, "bench", compiled, "--threads", 1, "--repeat", 3, "--profile")
    assert code == 0, out
    for title in ("graphopt kernels by op type", "onnxruntime nodes by op type", "graphopt top", "onnxruntime top",
                  "same ONNX node in both profiles"):
        assert title in out, title
    assert sum(line.startswith("total ") for line in out.splitlines()) == 2, out

    code, out, _ = run_cli(capsys, "bench", compiled, "--threads", 1, "--repeat", 3, "--profile", "--json")
    prof = json.loads(out)["profile"]
    for engine in ("graphopt", "onnxruntime"):
        assert prof[engine]["total_ms"] > 0 and prof[engine]["by_op"]
        assert all(len(item["us"]) == 3 for item in prof[engine]["items"])
    # every Conv of the model is tied to its ONNX node in both engines' profiles
    convs = {n.name for n in onnx.load(str(Path(compiled) / "model.onnx")).graph.node if n.op_type == "Conv"}
    assert convs and convs <= {row["node"] for row in prof["same_node"]}


def test_compile_prints_report_table(capsys, tmp_path, zoo_onnx):
    code, out, _ = run_cli(capsys, "compile", zoo_onnx("mlp_digits"), "-o", tmp_path / "a", "--threads", 1)
    assert code == 0
    for needle in ("max |err| vs onnxruntime", "ratio to onnxruntime", "MACs"):
        assert needle in out


def test_compile_with_toml_config(capsys, tmp_path, zoo_onnx):
    (tmp_path / "p.toml").write_text('[[pass]]\nname = "fold-batchnorm"\n\n[[pass]]\nname = "cleanup"\nmax_iterations = 2\n')
    code, out, _ = run_cli(capsys, "compile", zoo_onnx("cnn_digits"), "-o", tmp_path / "a", "--config",
                           tmp_path / "p.toml", "--no-bench", "--json")
    assert code == 0
    assert json.loads(out)["manifest"]["pipeline"]["text"] == "fold-batchnorm,cleanup{max_iterations=2}"


def _bad_files(tmp_path, zoo_onnx):
    trunc = tmp_path / "trunc.onnx"
    data = Path(zoo_onnx("resnet")).read_bytes()
    trunc.write_bytes(data[: len(data) // 3])
    text = tmp_path / "text.onnx"
    text.write_text("hello, I am not a model\n" * 20)
    dyn = ob.save(ob.dynamic_reshape(), tmp_path / "dyn.onnx")
    dom = ob.save(ob.custom_domain(), tmp_path / "dom.onnx")
    return trunc, text, dyn, dom


def test_bad_input_cases(capsys, tmp_path, zoo_onnx):
    trunc, text, dyn, dom = _bad_files(tmp_path, zoo_onnx)
    good = zoo_onnx("mlp_digits")
    out = tmp_path / "out"
    cases = [
        (["compile", tmp_path / "missing.onnx", "-o", out], ["missing.onnx: no such file"]),
        (["compile", trunc, "-o", out], ["trunc.onnx", "truncated"]),
        (["compile", text, "-o", out], ["text.onnx"]),
        (["compile", dyn, "-o", out], ["input 'x' has dynamic shape", "--input-shape x=N,2,3"]),
        (["compile", dyn, "-o", out, "--input-shape", "y=1,2,3"], ["'y', which is not a graph input; inputs are: x"]),
        (["compile", dyn, "-o", out, "--input-shape", "x=1,two,3"], ["non-integer dimension"]),
        (["compile", dyn, "-o", out, "--input-shape", "x"], ["malformed"]),
        (["compile", good, "-o", out, "--target", "gpu9000"], ["unknown target 'gpu9000'"]),
        (["compile", good, "-o", out, "--pipeline", "fold-everything"], ["unknown pass 'fold-everything'"]),
        (["compile", good, "-o", out, "--pipeline", "cleanup{speed=11}"], ["pass 'cleanup' has no option 'speed'"]),
        (["compile", dom, "-o", out], ["'fancy' (FancyOp, domain 'com.acme')"]),
        (["compile", good, "-o", out, "--pipeline", "cleanup", "--config", "x.toml"], ["either --pipeline or --config"]),
    ]
    for argv, needles in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert_one_line_error(err, *needles)
        assert not out.exists(), argv
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary folder left behind"


def test_run_bad_inputs(capsys, tmp_path, compiled):
    cases = [({"y": np.zeros((1, 1, 8, 8), np.float32)}, ["missing input(s) x"]),
             ({"x": np.zeros((1, 1, 8, 8), np.float64)}, ["'x' has dtype float64, the model wants float32"]),
             ({"x": np.zeros((2, 1, 8, 8), np.float32)}, ["'x' has shape [2, 1, 8, 8], the model wants [1, 1, 8, 8]"])]
    for feeds, needles in cases:
        np.savez(tmp_path / "in.npz", **feeds)
        code, _, err = run_cli(capsys, "run", compiled, "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "o.npz")
        assert code == 2
        assert_one_line_error(err, *needles)
        assert not (tmp_path / "o.npz").exists()
    (tmp_path / "junk.npz").write_bytes(b"nope")
    code, _, err = run_cli(capsys, "run", compiled, "--inputs", tmp_path / "junk.npz")
    assert code == 2
    assert_one_line_error(err, "not a readable .npz file")
    code, _, err = run_cli(capsys, "run", tmp_path, "--inputs", tmp_path / "junk.npz")
    assert code == 2
    assert_one_line_error(err, "not a graphopt artifact")


def test_external_data_outside_folder_via_cli(capsys, tmp_path):
    m = ob.model([onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [ob.vi("x", [1, 4])],
                 [ob.vi("y", [1, 4])], [("w", ob.rnd(4, 4))])
    onnx.external_data_helper.convert_model_to_external_data(m, location="w.bin", size_threshold=0)
    d = tmp_path / "m"
    d.mkdir()
    onnx.save_model(m, str(d / "m.onnx"))
    (tmp_path / "secret.bin").write_bytes((d / "w.bin").read_bytes())
    m = onnx.load(str(d / "m.onnx"), load_external_data=False)
    m.graph.initializer[0].external_data[0].value = "../secret.bin"   # points outside the model's folder
    onnx.save_model(m, str(d / "m.onnx"))
    code, _, err = run_cli(capsys, "compile", d / "m.onnx", "-o", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, "outside the model's folder")


def test_console_script_exit_codes_and_debug(tmp_path):
    r = subprocess.run(GRAPHOPT + ["compile", str(tmp_path / "nope.onnx")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"graphopt: error: {tmp_path / 'nope.onnx'}: no such file"
    r = subprocess.run(GRAPHOPT + ["--debug", "compile", str(tmp_path / "nope.onnx")], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = subprocess.run(GRAPHOPT + ["frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_unknown_option_names_the_subcommand_help(capsys):
    assert main(["compile", "model.onnx", "--passes", "cleanup"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "graphopt: error: unrecognized arguments: --passes cleanup (see graphopt compile --help)"
    with pytest.raises(SystemExit) as e:
        main(["inspect"])
    assert e.value.code == 2 and "see graphopt inspect --help" in capsys.readouterr().err


def test_factorization_summary_in_report_and_terminal(capsys, tmp_path, zoo_onnx):
    out = tmp_path / "f"
    assert main(["compile", str(zoo_onnx("cnn_digits")), "-o", str(out), "--no-bench",
                 "--pipeline", "cleanup,factorize-lowrank{flops=0.6}"]) == 0
    text = capsys.readouterr().out
    assert "factorize-lowrank (flops): MACs x" in text and "tucker2" in text and "output drift on" in text
    (f,) = json.loads((out / "report.json").read_text())["factorization"]
    assert f["macs_ratio"] <= 0.6 and f["factorized"] >= 1 and all("rel_error" in x for x in f["layers"])
