"""Writing outputs safely: checks before any work, temporaries beside the destination whose names carry the
owning process id (`.NAME.tmp-PID-XXXXXXXX`, `.NAME.old-PID-XXXXXXXX`), removal of those whose process is gone,
and atomic file writes that leave nothing behind on failure."""
from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

from .errors import BadInput, printable

#: tempfile's random part: 8 characters of [a-z0-9_]; secrets.token_hex(4) fits it too
_RANDOM = r"[a-z0-9_]{8}"


def temp_prefix(name: str, kind: str = "tmp") -> str:
    """Prefix of this process's temporaries for destination name: `.NAME.tmp-PID-` (kind "tmp" or "old")."""
    return f".{name}.{kind}-{os.getpid()}-"


def temp_pattern(name: str) -> re.Pattern:
    """Names of graphopt's temporaries for destination name, the owner's pid in group 'pid'."""
    return re.compile(rf"\.{re.escape(name)}\.(?:tmp|old)-(?P<pid>[0-9]+)-{_RANDOM}")


def process_alive(pid: int) -> bool:
    """Whether process pid exists on this machine (unknown counts as alive: nothing of it gets removed)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale(folder: Path, pattern: re.Pattern) -> list[str]:
    """Remove the entries of folder whose whole name matches pattern and whose owner (group 'pid') is gone: what a
    killed run left. Entries of live processes and every other name stay. Returns the names removed."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or process_alive(int(m["pid"])):
            continue
        p = Path(folder) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                continue
        removed.append(name)
    return removed


def check_parent(dest: Path, option: str, create: bool) -> None:
    """Refuse dest when its folder cannot take it: missing (unless create, then its nearest existing ancestor
    must be a writable folder), not a folder, or not writable."""
    parent = Path(dest).absolute().parent
    if not create and not parent.exists():
        raise BadInput(f"{printable(parent)}: no such folder (for {option} {printable(dest.name)}); create it or "
                       f"choose another {option}")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"{printable(parent)}: is not a folder; choose another {option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{printable(parent)}: is not writable; choose another {option}")


def check_output_file(dest: Path, option: str, replaceable_suffix: str | None = None) -> None:
    """Refuse, before any work, an output file graphopt cannot write or must not replace: a folder, a link or
    another non-regular file, an existing file whose name does not end in replaceable_suffix (when given), a
    missing or read-only parent folder. Removes this destination's stale temporaries."""
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and not dest.is_file()):
        what = "a folder" if dest.is_dir() and not dest.is_symlink() else "not a regular file"
        raise BadInput(f"{printable(dest)}: exists and is {what}; choose another {option}")
    if dest.is_file() and replaceable_suffix and not dest.name.endswith(replaceable_suffix):
        raise BadInput(f"{printable(dest)}: exists and is not a {replaceable_suffix} file, which graphopt would "
                       f"replace; choose another {option}")
    check_parent(dest, option, create=False)
    remove_stale(dest.absolute().parent, temp_pattern(dest.name))


def write_file(dest: Path, write, option: str, replaceable_suffix: str | None = None) -> None:
    """write(path) into a temporary beside dest, then rename it onto dest. dest is checked again first (a long run
    may have outlived the first check); on any failure the temporary is removed."""
    dest = Path(dest)
    check_output_file(dest, option, replaceable_suffix)
    tmp = dest.absolute().parent / f"{temp_prefix(dest.name)}{secrets.token_hex(4)}"
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        raise
