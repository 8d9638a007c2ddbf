"""The artifact folder: model.onnx + compiled library + manifest.json + report.json, published atomically."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import BadInput, GraphoptError

MANIFEST = "manifest.json"
REPORT = "report.json"
MODEL = "model.onnx"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


class Staging:
    """A temporary folder beside the destination; publish() renames it into place, and an exception
    (or close() without publish) deletes it, so a failed run never leaves a half artifact."""

    def __init__(self, dest: Path):
        self.dest = Path(dest).absolute()
        if self.dest.exists() and not self.dest.is_dir():
            raise BadInput(f"{self.dest}: exists and is not a folder; choose another -o")
        if self.dest.is_dir() and any(self.dest.iterdir()) and not (self.dest / MANIFEST).is_file():
            raise BadInput(f"{self.dest}: exists, is not empty and is not a graphopt artifact; choose another -o")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        return False

    def publish(self) -> Path:
        os.chmod(self.path, 0o755)
        old = None
        if self.dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.old-", dir=self.dest.parent))
            os.rmdir(old)
            try:
                os.rename(self.dest, old)
            except FileNotFoundError:   # a concurrent publisher moved it first
                old = None
        try:
            os.rename(self.path, self.dest)
        except OSError:
            # Another writer published the same folder between our two renames: theirs stays, complete.
            shutil.rmtree(self.path, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.dest


class Artifact:
    """A compiled model on disk. run() checks inputs against the manifest, then calls the target's runner."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise BadInput(f"{self.path}: not a graphopt artifact (no {MANIFEST}); compile one with `graphopt compile`")
        try:
            self.manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BadInput(f"{mpath}: unreadable manifest ({e})") from None
        for name, digest in self.manifest.get("files", {}).items():
            f = self.path / name
            if not f.is_file():
                raise BadInput(f"{self.path}: artifact is incomplete, {name} is missing")
            if sha256(f) != digest:
                raise BadInput(f"{f}: does not match the manifest's sha256; the artifact was modified or is corrupt")
        self._runner = None
        self._runner_threads = None

    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.manifest["outputs"]

    @property
    def report(self) -> dict:
        p = self.path / REPORT
        return json.loads(p.read_text()) if p.is_file() else {}

    def target(self):
        from importlib import import_module
        t = self.manifest["target"]
        return import_module("graphopt.targets").get_target(t["name"], **t.get("options", {}))

    def runner(self, threads: int | None = None):
        if self._runner is None or threads != self._runner_threads:
            self._runner = self.target().load(self.path, self.manifest, threads=threads)
            self._runner_threads = threads
        return self._runner

    def check_inputs(self, feeds: dict) -> list[np.ndarray]:
        names = [i["name"] for i in self.inputs]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise BadInput(f"{self.path}: missing input(s) {', '.join(missing)}; the model takes: "
                           + ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in self.inputs))
        extra = [n for n in feeds if n not in names and n != "labels"]
        if extra:
            raise BadInput(f"{self.path}: unknown input(s) {', '.join(extra)}; the model takes: {', '.join(names)}")
        arrays = []
        for spec in self.inputs:
            a = np.asarray(feeds[spec["name"]])
            if a.dtype != np.dtype(spec["dtype"]):
                raise BadInput(f"{self.path}: input '{spec['name']}' has dtype {a.dtype}, the model wants {spec['dtype']}")
            if list(a.shape) != list(spec["shape"]):
                raise BadInput(f"{self.path}: input '{spec['name']}' has shape {list(a.shape)}, the model wants {spec['shape']}")
            arrays.append(np.require(a, requirements='C'))   # keeps 0-d arrays 0-d
        return arrays

    def run(self, feeds: dict, threads: int | None = None) -> dict[str, np.ndarray]:
        arrays = self.check_inputs(feeds)
        outs = self.runner(threads)(arrays)
        names = [o["name"] for o in self.outputs]
        if len(outs) != len(names):
            raise GraphoptError(f"{self.path}: library returned {len(outs)} outputs, manifest lists {len(names)}")
        return dict(zip(names, outs))
