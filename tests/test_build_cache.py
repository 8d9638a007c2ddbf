"""graphopt build's stage cache is verified, not trusted; its output dir is replaced only when graphopt wrote it;
what killed builds left in the cache is removed."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphopt.cli import main
from test_build import project, write_toml  # noqa: F401 - the project fixture

HEX = "0123456789abcdef" * 4


def entry(project: Path, stage: str) -> Path:
    entries = [p for p in (project / ".graphopt-cache" / stage).iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1, entries
    return entries[0]


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("graphopt: warning: ")]


def test_zeroed_weight_in_the_cached_model_is_never_published(project, capsys):
    toml = write_toml(project, out="out/a")
    assert main(["build", str(toml)]) == 0
    capsys.readouterr()
    cached = entry(project, "optimize") / "model.onnx"
    m = onnx.load(str(cached))
    w = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(w)), w.name))
    onnx.save(m, str(cached))
    for stage in ("compile", "evaluate"):          # what a fresh machine with this cache would have
        shutil.rmtree(project / ".graphopt-cache" / stage)
    toml = write_toml(project, out="out/b")
    assert main(["build", str(toml), "--json"]) == 0
    out, err = capsys.readouterr()
    assert (project / "out" / "b" / "model.onnx").read_bytes() == (project / "out" / "a" / "model.onnx").read_bytes()
    assert "optimize" not in json.loads(out)["cached_stages"]
    [warning] = warnings(err)
    assert "cache entry optimize/" in warning and "model.onnx does not match its sha256" in warning


def test_edited_cached_metrics_do_not_pass_a_failing_gate(project, capsys):
    toml = write_toml(project, gates="min_flops_reduction = true\n")
    assert main(["build", str(toml)]) == 1
    capsys.readouterr()
    metrics = entry(project, "evaluate") / "metrics.json"
    m = json.loads(metrics.read_text())
    m["flops_reduction"] = 0.9
    metrics.write_text(json.dumps(m))
    assert main(["build", str(toml)]) == 1
    err = capsys.readouterr().err
    [warning] = warnings(err)
    assert "cache entry evaluate/" in warning and "metrics.json does not match its sha256" in warning
    assert "min_flops_reduction: flops_reduction = 0 is below 0.75" in err


def test_truncated_and_foreign_entries_are_rebuilt(project, capsys):
    toml = write_toml(project)
    assert main(["build", str(toml)]) == 0
    capsys.readouterr()
    model = entry(project, "optimize") / "model.onnx"
    model.write_bytes(model.read_bytes()[:100])
    compiled = entry(project, "compile")
    shutil.rmtree(compiled)                    # a folder graphopt 0.1 would have trusted: it has the done marker
    (compiled / "artifact").mkdir(parents=True)
    (compiled / "artifact" / "junk.txt").write_text("junk\n")
    (compiled / ".done").write_text("ok\n")
    assert main(["build", str(toml), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["cached_stages"] == ["evaluate"]
    assert [w.split("cache entry ")[1].split("/")[0] for w in warnings(err)] == ["optimize", "compile"]
    assert main(["build", str(toml), "--json"]) == 0       # and the rebuilt entries are good
    out, err = capsys.readouterr()
    assert json.loads(out)["cached_stages"] == ["optimize", "compile", "evaluate"] and not warnings(err)


def test_changed_graphopt_code_builds_every_stage_again(project, capsys, monkeypatch):
    """The cache keys hold the fingerprint of graphopt's code: an entry made by other code is not reused."""
    from graphopt import build
    toml = write_toml(project)
    assert main(["build", str(toml), "--json"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(build, "code_fingerprint", lambda: "other code")
    assert main(["build", str(toml), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cached_stages"] == []


def test_code_fingerprint_covers_the_package_sources(tmp_path):
    """The fingerprint changes with any .py file's bytes or path under the package folder (a new module, an edit in
    a subpackage, a rename), not with other files; graphopt's is that of its own folder."""
    from pathlib import Path

    import graphopt
    from graphopt.version import code_fingerprint, sources_fingerprint
    assert code_fingerprint() == sources_fingerprint(Path(graphopt.__file__).resolve().parent)
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    seen = {sources_fingerprint(tmp_path)}
    (tmp_path / "notes.txt").write_text("not code\n")
    assert sources_fingerprint(tmp_path) in seen
    for change in (lambda: (tmp_path / "sub" / "b.py").write_text("y = 3\n"),
                   lambda: (tmp_path / "sub" / "b.py").rename(tmp_path / "sub" / "c.py"),
                   lambda: (tmp_path / "d.py").write_text("")):
        change()
        fp = sources_fingerprint(tmp_path)
        assert len(fp) == 64 and fp not in seen
        seen.add(fp)


@pytest.mark.fast
def test_output_dir_that_graphopt_did_not_write_is_refused_before_any_work(project, capsys):
    site = project / "out" / "build"
    site.mkdir(parents=True)
    (site / "manifest.json").write_text('{"name": "site"}\n')
    (site / "index.html").write_text("<html></html>\n")
    toml = write_toml(project)
    assert main(["build", str(toml)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), lines
    assert f"{site}: exists and is not a graphopt artifact (it holds 'index.html'" in lines[0]
    assert lines[0].endswith("choose another [output] dir or empty it")
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "manifest.json"]
    assert not (project / ".graphopt-cache").exists()


@pytest.fixture
def live_pid():
    p = subprocess.Popen(["sleep", "600"])
    yield p.pid
    p.kill()
    p.wait()


@pytest.mark.fast
def test_the_next_build_removes_what_killed_builds_left(project, capsys, live_pid):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = p.pid
    compile_dir = project / ".graphopt-cache" / "compile"
    compile_dir.mkdir(parents=True)
    stale = [f".{HEX}.tmp-{dead}", f".{HEX}.tmp-{dead}-abcd1234"]      # as graphopt 0.1 and now name them
    kept = [f".{HEX}.tmp-{live_pid}-abcd1234", f".{HEX}.tmp-x", "notes.txt"]
    for name in stale + kept:
        (compile_dir / name).mkdir()
    (project / "model.onnx").write_bytes(b"not a model")        # the build stops right after the cache opens
    assert main(["build", str(write_toml(project))]) == 2
    capsys.readouterr()
    assert sorted(p.name for p in compile_dir.iterdir()) == sorted(kept)
