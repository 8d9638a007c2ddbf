"""The build's stage cache, verified on every use: CACHE/<stage>/<key>/ holds a stage's files and, written last,
`.sha256.json` with the sha256 of each of them. An entry that does not match it (tampered, truncated, foreign,
written by an older graphopt) or that its stage cannot read is discarded with a warning and built again."""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from .artifact import sha256
from .errors import GraphoptError, printable
from .outputs import remove_stale

HASHES = ".sha256.json"
#: temporaries `.KEY.tmp-PID-XXXXXXXX` (and `.KEY.tmp-PID`, as graphopt 0.1 named them)
_TEMP = re.compile(r"\.[0-9a-f]{64}\.tmp-(?P<pid>[0-9]+)(?:-[a-z0-9_]{8})?")


class StageCache:
    def __init__(self, root: Path, warn):
        """warn(message): one line about a discarded entry."""
        self.root = Path(root)
        self.warn = warn
        try:
            stages = [p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()]
        except OSError:
            stages = []
        for folder in stages:                  # what killed builds left
            remove_stale(folder, _TEMP)

    def get(self, stage: str, key: str, read):
        """read(folder) of the entry when it is intact and read() succeeds, else None (the entry discarded)."""
        d = self.root / stage / key
        if not d.exists() and not d.is_symlink():
            return None
        problem = entry_problem(d)
        if problem is None:
            try:
                return read(d)
            except Exception as e:  # noqa: BLE001 - any failure to read an entry means: build it again
                problem = f"{stage} cannot read it: {type(e).__name__}: {printable(e, 120)}"
        self.warn(f"cache entry {stage}/{key[:12]} in {printable(self.root)} is unusable ({problem}); discarding it "
                  f"and running {stage} again")
        self._discard(d)
        return None

    def put(self, stage: str, key: str, fill, read):
        """fill(folder) into a temporary entry, hash it, rename it into place; return read(entry)."""
        final = self.root / stage / key
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-{os.getpid()}-", dir=final.parent))
        try:
            fill(tmp)
            _write_hashes(tmp)
            if not _rename(tmp, final):          # a concurrent build filled it first
                if entry_problem(final) is None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return read(final)
                self._discard(final)
                if not _rename(tmp, final):
                    raise GraphoptError(f"{printable(final)}: cannot replace this cache entry; delete "
                                        f"{printable(self.root)}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return read(final)

    def _discard(self, d: Path) -> None:
        trash = d.parent / f".{d.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        if not _rename(d, trash):
            return                              # already gone (a concurrent build discarded it)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)


def _rename(src: Path, dst: Path) -> bool:
    try:
        os.rename(src, dst)
    except (FileNotFoundError, FileExistsError):
        return False
    except OSError as e:
        if e.errno == errno.ENOTEMPTY:  # dst is a folder that is not empty
            return False
        raise
    return True


def _files(folder: Path) -> list[str] | None:
    """Relative paths of folder's files, or None when it holds a link or something else that is not a plain file."""
    out = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            if os.path.islink(p) or not (os.path.isdir(p) or os.path.isfile(p)):
                return None
        out += [os.path.relpath(os.path.join(root, f), folder) for f in files]
    return sorted(out)


def _write_hashes(folder: Path) -> None:
    files = _files(folder)
    if files is None:
        raise GraphoptError(f"{folder}: a cache entry may hold only plain files")
    hashes = {f: sha256(folder / f) for f in files}
    tmp = folder / f"{HASHES}.tmp"
    tmp.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / HASHES)


def entry_problem(d: Path) -> str | None:
    """What is wrong with cache entry d (None: every file is there, matches its sha256, and nothing else is)."""
    if d.is_symlink() or not d.is_dir():
        return "not a folder"
    try:
        hashes = json.loads((d / HASHES).read_text())
    except FileNotFoundError:
        return f"no {HASHES}"
    except (OSError, ValueError):
        return f"unreadable {HASHES}"
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        return f"{HASHES} is not a map of sha256"
    files = _files(d)
    if files is None:
        return "it holds a link or a special file"
    files = [f for f in files if f != HASHES]
    if sorted(hashes) != files:
        return "its files are not those it lists"
    for f, digest in hashes.items():
        if sha256(d / f) != digest:
            return f"{printable(f)} does not match its sha256"
    return None
