"""graphopt's version (in manifests, reports and cache keys) and the fingerprint of its code (cache keys); the
package and its modules read them here."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__version__ = "0.1.0"


@functools.cache
def code_fingerprint() -> str:
    """sha256 over graphopt's own .py files (sources_fingerprint of the package folder), for cache keys that must
    change with the code that made an entry, not only with the version number: `graphopt build` reused a stale
    optimize stage after compress's divergence rule changed within 0.1.0. About 4 ms, once per process."""
    return sources_fingerprint(Path(__file__).resolve().parent)


def sources_fingerprint(root: Path) -> str:
    """sha256 over the .py files under root: each one's path relative to root and its bytes, in path order."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()
