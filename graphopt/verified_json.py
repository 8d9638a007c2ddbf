"""JSON files that carry the sha256 of their content (caches graphopt measured): {"body": ..., "sha256": ...}.
A file whose content does not match is not trusted; callers warn and compute again."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def digest(obj) -> str:
    """sha256 of obj's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read(path: Path) -> tuple[object, str | None]:
    """(body, None), or (None, why it is not trusted)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable: {type(e).__name__}"
    if not isinstance(doc, dict) or set(doc) != {"body", "sha256"}:
        return None, "not a graphopt cache file"
    if doc["sha256"] != digest(doc["body"]):
        return None, "its content does not match its sha256"
    return doc["body"], None


def write(path: Path, body) -> None:
    """Write atomically (a temporary beside path, renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"body": body, "sha256": digest(body)}, f, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
