"""Outputs and artifacts under careless or hostile use: graphopt replaces only what it wrote, checks an output
before any work, trusts no artifact it cannot verify, and removes what killed runs left behind."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.artifact import Staging
from graphopt.cli import distributed_main, main
from graphopt.errors import BadInput

pytestmark = pytest.mark.fast

MODEL = Path(__file__).resolve().parent / "fixtures" / "digits_cnn.onnx"      # x [1, 1, 8, 8] -> logits [1, 10]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), err
    return lines[0]


def tree(folder: Path) -> dict:
    """Every file under folder with its bytes: to show that nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "art"
    assert main(["compile", str(MODEL), "-o", str(out), "--no-bench"]) == 0
    return out


@pytest.fixture
def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def live_pid():
    p = subprocess.Popen(["sleep", "600"])
    yield p.pid
    p.kill()
    p.wait()


def _web_app(d: Path):
    (d / "src").mkdir(parents=True)
    (d / "manifest.json").write_text('{"name": "my app", "start_url": "/"}\n')
    (d / "index.html").write_text("<!doctype html><title>app</title>\n")
    (d / "src" / "app.js").write_text("console.log('hi')\n")


def _artifact_plus_notes(d: Path, artifact: Path):
    shutil.copytree(artifact, d)
    (d / "notes.txt").write_text("my notes\n")


def _edited_artifact(d: Path, artifact: Path):
    shutil.copytree(artifact, d)
    m = onnx.load(str(d / "model.onnx"))
    m.doc_string = "edited by hand"
    onnx.save(m, str(d / "model.onnx"))


def _only_a_manifest(d: Path):
    d.mkdir()
    (d / "manifest.json").write_text('{"short_name": "pwa"}\n')


@pytest.mark.parametrize("make,needle", [
    (lambda d, a: _web_app(d), "it holds 'index.html', which graphopt does not write"),
    (_artifact_plus_notes, "it holds 'notes.txt', which graphopt does not write"),
    (_edited_artifact, "model.onnx does not match the manifest's sha256"),
    (lambda d, a: _only_a_manifest(d), "the manifest has no integer 'format'"),
], ids=["web-app", "artifact-plus-notes", "edited-artifact", "foreign-manifest"])
def test_compile_never_replaces_a_folder_it_did_not_write(capsys, tmp_path, artifact, make, needle):
    out = tmp_path / "w"
    make(out, artifact)
    before = tree(out)
    code, _, err = run_cli(capsys, "compile", MODEL, "-o", out, "--no-bench")
    line = one_error_line(err)
    assert code == 2
    assert f"{out}: exists and is not a graphopt artifact" in line and needle in line, line
    assert line.endswith("choose another -o or empty it"), line
    assert tree(out) == before
    assert temporaries(tmp_path) == []


def test_compile_replaces_its_own_artifact(capsys, tmp_path, artifact):
    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    (out / "report.html").write_text("<html></html>\n")           # graphopt build writes one
    code, _, err = run_cli(capsys, "compile", MODEL, "-o", out, "--no-bench", "--pipeline", "cleanup")
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["pipeline"]["text"] == "cleanup"
    assert not (out / "report.html").exists()
    assert temporaries(tmp_path) == []


def test_publish_checks_the_destination_again(tmp_path, artifact):
    """Something written into the destination during a long compile is not swept away at publish."""
    dest = tmp_path / "art"
    shutil.copytree(artifact, dest)
    with pytest.raises(BadInput, match="it holds 'mine.txt'"):
        with Staging(dest) as stage:
            shutil.copytree(artifact, stage.path, dirs_exist_ok=True)
            (dest / "mine.txt").write_text("mine\n")
            stage.publish()
    assert (dest / "mine.txt").read_text() == "mine\n"
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("case", ["folder", "missing-parent", "parent-is-a-file", "other-file"])
def test_compress_checks_its_output_before_any_work(capsys, tmp_path, case):
    """The output is checked before the model and data are loaded (so before training): the training data here
    does not even exist, and the error must still be about -o."""
    out = {"folder": tmp_path / "out.onnx", "missing-parent": tmp_path / "nope" / "out.onnx",
           "parent-is-a-file": tmp_path / "file" / "out.onnx", "other-file": tmp_path / "train.npz"}[case]
    if case == "folder":
        out.mkdir()
        (out / "keep.txt").write_text("keep\n")
    (tmp_path / "file").write_text("a file\n")
    (tmp_path / "train.npz").write_bytes(b"my data")
    needle = {"folder": f"{out}: exists and is a folder; choose another -o",
              "missing-parent": f"{out.parent}: no such folder (for -o out.onnx)",
              "parent-is-a-file": f"{out.parent}: is not a folder; choose another -o",
              "other-file": f"{out}: exists and is not a .onnx file"}[case]
    for cmd in (main, distributed_main):
        code = cmd(["compress", str(MODEL), "--train", str(tmp_path / "missing.npz"), "--pipeline", "cleanup",
                    "-o", str(out)])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and needle in line, (cmd, line)
    assert (tmp_path / "train.npz").read_bytes() == b"my data"
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_refused_before_any_work(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for argv in (["compile", MODEL, "-o", ro / "art", "--no-bench"],
                     ["compress", MODEL, "--train", tmp_path / "missing.npz", "--pipeline", "cleanup", "-o",
                      ro / "out.onnx"]):
            code, _, err = run_cli(capsys, *argv)
            assert code == 2 and f"{ro}: is not writable; choose another -o" in one_error_line(err), err
    finally:
        ro.chmod(0o755)


def test_compress_replaces_an_existing_onnx_file(capsys, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.random((64, 1, 8, 8), dtype=np.float32))
    out = tmp_path / "student.onnx"
    out.write_bytes(b"an older model")
    code, _, err = run_cli(capsys, "compress", MODEL, "--train", tmp_path / "train.npz", "--epochs", "1",
                           "--threads", "1", "--pipeline", "cleanup,prune-channels{flops=0.9}", "-o", out)
    assert code == 0, err
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx", "train.npz"]


def _edit(path: Path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _set(keys, value):
    def edit(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


def _delete(key):
    return lambda m: m.pop(key)


RUN_CASES = [
    ("no-hashes", _delete("files"), "'files' must give the sha256 of model.onnx and model.so"),
    ("empty-hashes", _set(["files"], {}), "'files' must give the sha256 of model.onnx and model.so"),
    ("library-not-listed", lambda m: m["files"].update({"lib.so": m["files"].pop("model.so")}),
     "'files' must give the sha256 of model.onnx and model.so"),
    ("bad-hash", _set(["files", "model.so"], "0" * 64), "model.so does not match the manifest's sha256"),
    ("hash-not-a-string", _set(["files", "model.so"], 7), "'files' holds a value that is not a sha256"),
    ("target-a-string", _set(["target"], "cpu"), "'target' is not an object with a 'name'"),
    ("unknown-target", _set(["target", "name"], "gpu9000"), "unknown target 'gpu9000'"),
    ("target-options-list", _set(["target", "options"], [1]), "'target.options' is not an object of values"),
    ("target-option-object", _set(["target", "options"], {"mcpu": {"a": 1}}), "'target.options' is not an object"),
    ("no-inputs", _delete("inputs"), "'inputs' is not a list"),
    ("inputs-a-dict", _set(["inputs"], {"x": [1, 1, 8, 8]}), "'inputs' is not a list"),
    ("shape-strings", _set(["inputs"], [{"name": "x", "dtype": "float32", "shape": ["1", 1, 8, 8]}]),
     "'inputs' holds an entry that is not {name, dtype, shape"),
    ("unknown-dtype", _set(["inputs"], [{"name": "x", "dtype": "float99", "shape": [1, 1, 8, 8]}]),
     "unknown dtype 'float99'"),
    ("edited-shape", _set(["inputs"], [{"name": "x", "dtype": "float32", "shape": [4, 1, 8, 8]}]),
     "the manifest's inputs differ from model.onnx's: x float32[1, 1, 8, 8]"),
    ("edited-dtype", _set(["inputs"], [{"name": "x", "dtype": "float64", "shape": [1, 1, 8, 8]}]),
     "the manifest's inputs differ from model.onnx's"),
    ("edited-output", _set(["outputs"], [{"name": "logits", "dtype": "float32", "shape": [1, 3]}]),
     "the manifest's outputs differ from model.onnx's: logits float32[1, 10]"),
    ("no-format", _delete("format"), "no integer 'format'"),
    ("newer-format", _set(["format"], 2), "manifest format 2; this graphopt reads format 1"),
    ("no-version", _delete("versions"), "no 'versions.graphopt'"),
    ("no-pipeline", _delete("pipeline"), "'pipeline' is not an object with a 'text'"),
    ("not-an-object", lambda m: m.clear() or m.update({"a": 1}), "no integer 'format'"),
]


@pytest.mark.parametrize("name,edit,needle", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_refuses_a_manifest_that_is_not_graphopts(capsys, tmp_path, artifact, name, edit, needle):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    _edit(art, edit)
    shape = (4, 1, 8, 8) if name == "edited-shape" else (1, 1, 8, 8)
    dtype = np.float64 if name == "edited-dtype" else np.float32
    np.savez(tmp_path / "in.npz", x=np.zeros(shape, dtype))        # what the edited manifest asks for
    code, _, err = run_cli(capsys, "run", art, "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "o.npz")
    line = one_error_line(err)
    assert code == 2 and f"{art}: not a graphopt artifact (" in line and needle in line, line
    assert not (tmp_path / "o.npz").exists()


def test_run_outputs_are_written_atomically(capsys, tmp_path, artifact, dead_pid):
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 1, 8, 8), np.float32))
    (tmp_path / "o.npz").mkdir()
    code, _, err = run_cli(capsys, "run", artifact, "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "o.npz")
    assert code == 2 and "o.npz: exists and is a folder; choose another --outputs" in one_error_line(err)
    stale = tmp_path / f".r.npz.tmp-{dead_pid}-abcd1234"
    stale.write_bytes(b"left by a killed run")
    code, _, err = run_cli(capsys, "run", artifact, "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "r.npz")
    assert code == 0, err
    assert np.load(tmp_path / "r.npz")["logits"].shape == (1, 10)
    assert temporaries(tmp_path) == []


def test_the_next_compile_removes_what_a_killed_one_left(capsys, tmp_path, dead_pid, live_pid):
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "graphopt.cli", "compile", str(MODEL), "-o", str(out),
                             "--no-bench"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not [p for p in tmp_path.iterdir() if p.name.startswith(".art.tmp-")]:
        assert proc.poll() is None and time.monotonic() < deadline, "the compile never staged its artifact"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = temporaries(tmp_path)
    assert killed and all(n.startswith(f".art.tmp-{proc.pid}-") for n in killed)
    kept = [f".art.tmp-{live_pid}-abcd1234", ".art.tmp-abcd1234", ".art.tmp-keep", f".other.tmp-{dead_pid}-abcd1234"]
    for name in kept + [f".art.old-{dead_pid}-abcd1234"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x\n")
    code, _, err = run_cli(capsys, "compile", MODEL, "-o", out, "--no-bench")
    assert code == 0, err
    assert temporaries(tmp_path) == sorted(kept)


def test_reports_take_numpy_scalars_of_every_kind():
    """(openWakeWord's hey-mycroft: a pruning record held a numpy bool) numpy bools, ints, floats and arrays are
    written as JSON values; a non-finite float becomes null."""
    from graphopt.artifact import json_text
    doc = json.loads(json_text({"b": np.bool_(True), "i": np.int64(3), "f": np.float32(0.5), "a": np.arange(2),
                                "nan": np.float64("nan")}))
    assert doc == {"a": [0, 1], "b": True, "f": 0.5, "i": 3, "nan": None}
