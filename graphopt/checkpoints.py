"""Checkpoints of a compress run, for `--resume` after an interruption.

A folder holds, for one run (identified by a key hashed from the model, the data and every option that changes
the training):
* after every training phase k: `phase-k.onnx` (the trained student) and `phase-k.json` (its history record);
* during a phase, at most every `every_s` seconds: `partial-k.pt` (student weights, optimizer state, the step
  reached and the loss history so far), read back with torch.load(weights_only=True);
* `run.json`: the run key and the sha256 of every file above, written last, atomically (os.replace).

Resuming replays compress: passes run again (they are deterministic given the same graph), a completed phase is
read instead of trained, and the interrupted phase restarts from its partial state with the data stream
fast-forwarded to the same batch, so the result is the uninterrupted run's, bit for bit (array data; a DataLoader
resumes exactly only if it yields the same batches again). Nothing is trusted: a folder from another run, a file
whose hash does not match, or an unreadable file is refused with one line, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .artifact import sha256
from .errors import BadInput

FORMAT = 1
RUN_FILE = "run.json"


def run_key(parts: list) -> str:
    """sha256 over the parts of a run (bytes, numpy arrays, or anything JSON can write)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, (bytes, bytearray)):
            h.update(p)
        elif isinstance(p, np.ndarray):
            h.update(str((p.dtype.str, p.shape)).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def saved_nothing(folder: Path) -> bool:
    """The folder holds only graphopt's own index listing no saved state (a run that failed or was stopped before
    its first checkpoint): nothing to resume, so a new run may start over in it."""
    folder = Path(folder)
    if not folder.is_dir() or [p.name for p in folder.iterdir()] != [RUN_FILE]:
        return False
    try:
        run = json.loads((folder / RUN_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(run, dict) and run.get("format") == FORMAT and run.get("files") == {}


def discard_if_empty(folder) -> None:
    """Remove a checkpoint folder that saved nothing (see saved_nothing); anything else is left as it is."""
    if saved_nothing(Path(folder)):
        shutil.rmtree(folder, ignore_errors=True)


class Checkpoints:
    """The checkpoint folder of one run. writer=False (processes other than rank 0) reads but never writes."""

    def __init__(self, folder: str | os.PathLike, key: str, resume: bool = False, every_s: float = 300.0,
                 writer: bool = True):
        self.folder = Path(folder)
        self.key, self.every_s, self.writer = key, float(every_s), writer
        self.files: dict[str, str] = {}
        self._last_partial = time.monotonic()
        if self.folder.exists() and not self.folder.is_dir():
            raise BadInput(f"{self.folder}: exists and is not a folder; choose another checkpoint folder")
        existing = self.folder / RUN_FILE
        if resume:
            if not existing.is_file():
                raise BadInput(f"{self.folder}: no checkpoint to resume from (run without --resume to start)")
            self._load_run()
        elif self.writer and self.folder.is_dir() and any(self.folder.iterdir()) and not self._saved_nothing():
            raise BadInput(f"{self.folder}: holds a checkpoint of an interrupted run; add --resume to continue it, "
                           f"or remove the folder to start over")
        if self.writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_run()

    # ---------------------------------------------------------------- the index
    def _saved_nothing(self) -> bool:
        return saved_nothing(self.folder)

    def _load_run(self) -> None:
        path = self.folder / RUN_FILE
        try:
            run = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(f"{path}: unreadable checkpoint index ({type(e).__name__}); remove the folder to start "
                           f"over") from None
        if not isinstance(run, dict) or run.get("format") != FORMAT or not isinstance(run.get("files"), dict):
            raise BadInput(f"{path}: not a graphopt compress checkpoint; remove the folder to start over")
        if run.get("key") != self.key:
            raise BadInput(f"{self.folder}: the checkpoint is of another run (model, data or options differ); "
                           f"rerun with the same ones or remove the folder to start over")
        for name, digest in run["files"].items():
            f = self.folder / str(name)
            if "/" in str(name) or not f.is_file() or sha256(f) != digest:
                raise BadInput(f"{f}: missing or modified since it was checkpointed; remove the folder to start "
                               f"over")
        self.files = dict(run["files"])

    def _write_run(self) -> None:
        self._atomic(RUN_FILE, json.dumps({"format": FORMAT, "key": self.key, "files": self.files},
                                          indent=1, sort_keys=True).encode(), record=False)

    def _atomic(self, name: str, data: bytes, record: bool = True) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if record:
            self.files[name] = hashlib.sha256(data).hexdigest()
            self._write_run()

    # ---------------------------------------------------------------- phases
    def phase(self, k: int):
        """(graph, history record) of completed phase k, or None."""
        if f"phase-{k}.onnx" not in self.files or f"phase-{k}.json" not in self.files:
            return None
        import onnx

        from .graph import from_onnx
        graph = from_onnx(onnx.load(str(self.folder / f"phase-{k}.onnx")))
        record = json.loads((self.folder / f"phase-{k}.json").read_text())
        return graph, record

    def save_phase(self, k: int, graph, record: dict) -> None:
        if not self.writer:
            return
        from .graph import to_onnx
        self._atomic(f"phase-{k}.onnx", to_onnx(graph).SerializeToString())
        self._atomic(f"phase-{k}.json", json.dumps(record, sort_keys=True, default=float).encode())
        self.files.pop(f"partial-{k}.pt", None)
        (self.folder / f"partial-{k}.pt").unlink(missing_ok=True)
        self._write_run()
        self._last_partial = time.monotonic()

    # ---------------------------------------------------------------- within a phase
    def partial(self, k: int) -> dict | None:
        """The state saved during phase k (step, params, optimizer, history), or None."""
        name = f"partial-{k}.pt"
        if name not in self.files:
            return None
        import torch
        try:
            return torch.load(str(self.folder / name), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a file that passed its hash but torch cannot read
            raise BadInput(f"{self.folder / name}: unreadable checkpoint ({type(e).__name__}); remove the folder "
                           f"to start over") from None

    def due(self) -> bool:
        return self.writer and time.monotonic() - self._last_partial >= self.every_s

    def save_partial(self, k: int, state: dict) -> None:
        if not self.writer:
            return
        import io

        import torch
        buf = io.BytesIO()
        torch.save(state, buf)
        self._atomic(f"partial-{k}.pt", buf.getvalue())
        self._last_partial = time.monotonic()

    def finish(self) -> None:
        """The run completed: its checkpoints are no longer needed."""
        if self.writer:
            shutil.rmtree(self.folder, ignore_errors=True)
