"""The artifact folder: model.onnx + compiled library + manifest.json + report.json, published atomically."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np

from .errors import BadInput, GraphoptError, printable
from .outputs import check_parent, remove_stale, temp_pattern, temp_prefix

MANIFEST = "manifest.json"
REPORT = "report.json"
REPORT_HTML = "report.html"
MODEL = "model.onnx"
#: the manifest format this graphopt writes and reads
FORMAT = 1
#: what graphopt writes into an artifact besides the files the manifest hashes (model.onnx, the library)
UNHASHED = (MANIFEST, REPORT, REPORT_HTML)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, data: dict) -> None:
    path.write_text(json_text(data) + "\n")


def json_text(data, default=None) -> str:
    """Strict JSON (RFC 8259, no bare NaN / Infinity): non-finite floats are written as null. default: the
    fallback for objects JSON has no form for (numpy scalars and arrays and paths are converted)."""
    def fallback(o):
        try:
            return _json_default(o)
        except TypeError:
            if default is None:
                raise
            return default(o)
    return json.dumps(_finite(data, fallback), indent=2, sort_keys=True, allow_nan=False)


def _finite(o, fallback):
    if isinstance(o, dict):
        return {k: _finite(v, fallback) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v, fallback) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    if o is None or isinstance(o, (str, bool, int)):
        return o
    return _finite(fallback(o), fallback)


def _json_default(o):
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def manifest_problem(manifest) -> str | None:
    """What makes manifest not graphopt's (None: nothing): its format and graphopt version, a known target (an
    object with a name and scalar options), the pipeline, inputs/outputs as {name, dtype, shape}, and a sha256 for
    exactly model.onnx and the target's library."""
    if not isinstance(manifest, dict):
        return "the manifest is not a JSON object"
    fmt = manifest.get("format")
    if type(fmt) is not int:
        return "the manifest has no integer 'format'"
    if fmt != FORMAT:
        return f"manifest format {fmt}; this graphopt reads format {FORMAT}"
    versions = manifest.get("versions")
    if not isinstance(versions, dict) or not isinstance(versions.get("graphopt"), str):
        return "the manifest has no 'versions.graphopt'"
    target = manifest.get("target")
    if not isinstance(target, dict) or not isinstance(target.get("name"), str):
        return "the manifest's 'target' is not an object with a 'name'"
    from .targets import names, target_class
    if target["name"] not in names():
        return f"the manifest names an unknown target '{printable(target['name'])}'"
    options = target.get("options", {})
    scalar = lambda v: v is None or isinstance(v, (str, int, float))     # noqa: E731 - bool is an int
    if not isinstance(options, dict) or not all(scalar(v) or (isinstance(v, list) and all(map(scalar, v)))
                                                for v in options.values()):
        return "the manifest's 'target.options' is not an object of values or lists of values"
    pipeline = manifest.get("pipeline")
    if not isinstance(pipeline, dict) or not isinstance(pipeline.get("text"), str):
        return "the manifest's 'pipeline' is not an object with a 'text'"
    for key in ("inputs", "outputs"):
        problem = _specs_problem(manifest.get(key))
        if problem:
            return f"the manifest's '{key}' {problem}"
    files = manifest.get("files")
    library = target_class(target["name"]).library
    if not isinstance(files, dict) or sorted(files) != sorted({MODEL, library}):
        return f"the manifest's 'files' must give the sha256 of {MODEL} and {library}"
    if not all(isinstance(d, str) and re.fullmatch("[0-9a-f]{64}", d) for d in files.values()):
        return "the manifest's 'files' holds a value that is not a sha256"
    return None


def _specs_problem(specs) -> str | None:
    if not isinstance(specs, list):
        return "is not a list"
    for s in specs:
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("dtype"), str)
                and isinstance(s.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in s["shape"])):
            return "holds an entry that is not {name, dtype, shape: [non-negative integers]}"
        try:
            np.dtype(s["dtype"])
        except TypeError:
            return f"holds an unknown dtype '{printable(s['dtype'])}'"
    if len({s["name"] for s in specs}) != len(specs):
        return "repeats a name"
    return None


def _io_problem(model_path: Path, manifest: dict) -> str | None:
    """Where the manifest's inputs/outputs disagree with those of the artifact's own model.onnx (None: nowhere)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype
    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception as e:   # noqa: BLE001 - whatever protobuf raises for a file that is not a model
        return f"{MODEL} is not a readable ONNX model ({type(e).__name__})"
    weights = {t.name for t in graph.initializer}

    def specs(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            try:
                dtype = np.dtype(tensor_dtype_to_np_dtype(t.elem_type)).name
            except (KeyError, TypeError, ValueError):
                dtype = f"onnx type {t.elem_type}"
            shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim] \
                if t.HasField("shape") else None
            out.append((v.name, dtype, shape))
        return out
    for key, values in (("inputs", [v for v in graph.input if v.name not in weights]), ("outputs", graph.output)):
        have = specs(values)
        listed = [(s["name"], np.dtype(s["dtype"]).name, s["shape"]) for s in manifest[key]]
        agree = len(have) == len(listed) and all(
            (n, dt) == (ln, ldt) and (shape is None or shape == lshape)
            for (n, dt, shape), (ln, ldt, lshape) in zip(have, listed))
        if not agree:
            text = ", ".join(f"{n} {dt}{shape}" for n, dt, shape in have)
            return f"the manifest's {key} differ from {MODEL}'s: {printable(text)}"
    return None


class _Vanished(Exception):
    """A file disappeared while the folder was read: a concurrent publisher replaced it."""


def _artifact_problem(folder: Path, complete: bool) -> tuple[dict | None, str | None]:
    """(manifest, None) when folder is a graphopt artifact: a manifest of graphopt's schema and every file it
    lists present with its sha256; with complete, also nothing in the folder that graphopt does not write.
    Else (None, what is wrong). Reads through one handle on the folder, so a folder renamed away meanwhile
    reads consistently or raises _Vanished."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise _Vanished from None
    except OSError as e:
        return None, f"cannot read it: {e.strerror}"
    try:
        names = os.listdir(fd)
        foreign = sorted(set(names) - _names_graphopt_writes()) if complete else []
        if foreign:
            return None, f"it holds '{printable(foreign[0])}', which graphopt does not write"
        if MANIFEST not in names:
            return None, f"no {MANIFEST}"
        try:
            manifest = json.loads(_read_at(fd, MANIFEST))
        except FileNotFoundError:
            raise _Vanished from None
        except (ValueError, OSError) as e:
            return None, f"unreadable {MANIFEST}: {printable(e, 120)}"
        problem = manifest_problem(manifest)
        if problem:
            return None, problem
        files = manifest["files"]
        for name in names if complete else ():
            if name not in files and name not in UNHASHED:
                return None, f"it holds '{printable(name)}', which graphopt does not write"
            if not stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                return None, f"'{printable(name)}' is not a regular file"
        for name, digest in files.items():
            if name not in names:
                return None, f"{name} is missing"
            if _sha256_at(fd, name) != digest:
                return None, f"{name} does not match the manifest's sha256: modified or corrupt"
        return manifest, None
    except FileNotFoundError:
        raise _Vanished from None
    finally:
        os.close(fd)


def _names_graphopt_writes() -> set[str]:
    from .targets import names, target_class
    return {MODEL, *UNHASHED, *(target_class(t).library for t in names())}


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _sha256_at(dir_fd: int, name: str) -> str:
    h = hashlib.sha256()
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replaceable_problem(folder: Path) -> str | None:
    """Why graphopt must not replace folder (None: it may: it is empty, gone, or a complete graphopt artifact
    with nothing else in it)."""
    for _ in range(3):              # a concurrent publisher may swap the folder under us; look again
        try:
            with os.scandir(folder) as entries:
                if not any(entries):
                    return None
        except FileNotFoundError:
            return None
        try:
            return _artifact_problem(folder, complete=True)[1]
        except _Vanished:
            continue
    return "it keeps changing while graphopt reads it"


def check_artifact_destination(dest: Path, option: str) -> None:
    """Refuse, before any work, an artifact destination graphopt may not fill: something other than a folder, a
    folder that is not empty and not a graphopt artifact (graphopt only ever replaces what it wrote), a parent
    graphopt cannot create or write. Removes dest's stale temporaries."""
    dest = Path(dest).absolute()
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise BadInput(f"{printable(dest)}: exists and is not a folder; choose another {option}")
    if dest.is_dir():
        problem = replaceable_problem(dest)
        if problem:
            raise BadInput(f"{printable(dest)}: exists and is not a graphopt artifact ({problem}); choose another "
                           f"{option} or empty it")
    check_parent(dest, option, create=True)
    remove_stale(dest.parent, temp_pattern(dest.name))


class Staging:
    """A temporary folder beside the destination (`.NAME.tmp-PID-XXXXXXXX`; those of dead processes are removed
    first); publish() renames it into place, and an exception (or leaving the with block without publish) deletes
    it, so a failed run never leaves a half artifact. option names the destination in messages ("-o")."""

    def __init__(self, dest: Path, option: str = "-o"):
        self.dest = Path(dest).absolute()
        self.option = option
        check_artifact_destination(self.dest, option)
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=temp_prefix(self.dest.name), dir=self.dest.parent))
        except OSError as e:
            raise BadInput(f"{printable(self.dest)}: cannot create it ({e.strerror}); choose another {option}") from None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        return False

    def publish(self) -> Path:
        """Rename the staging folder onto dest; what is there must still be empty or a graphopt artifact."""
        os.chmod(self.path, 0o755)
        old = None
        if self.dest.exists() or self.dest.is_symlink():
            check_artifact_destination(self.dest, self.option)
            old = self.dest.parent / f"{temp_prefix(self.dest.name, 'old')}{self.path.name[-8:]}"
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
        try:
            manifest, problem = _artifact_problem(self.path, complete=False)
        except _Vanished:
            manifest, problem = None, "no such folder"
        problem = problem or _io_problem(self.path / MODEL, manifest)
        if problem:
            raise BadInput(f"{printable(self.path)}: not a graphopt artifact ({problem}); compile one with "
                           f"`graphopt compile`")
        self.manifest = manifest
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
