"""Checking a MetaSchedule tuning database folder before TVM reads it (TVM answers a missing or garbled file with a
bare `Check failed` or a tokenizer error). The folder holds database_workload.json (one `[hash, module]` JSON
array a line) and database_tuning_record.json (one `[workload index, record]` array a line)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import BadInput, printable

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


def _lines(path: Path):
    """(line number, parsed JSON) of each non-empty line; BadInput at the first line that is not JSON."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: unreadable tuning database file ({e.__class__.__name__})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError:
                raise BadInput(f"{path}: line {number} is not JSON ('{printable(line, 40)}'); not a tuning database "
                               f"graphopt wrote: remove it or tune again with `graphopt tune`") from None


def check_tuning_db(folder, must_exist: bool = True) -> None:
    """Refuse a tuning database folder TVM could not read: not a folder, a file missing (when must_exist, or when
    only one of the two is there), a line that is not a workload or record of the expected form."""
    folder = Path(folder)
    if not folder.exists() and not must_exist:
        return
    if not folder.is_dir():
        raise BadInput(f"{printable(folder)}: no such tuning database folder (create one with `graphopt tune`)")
    files = [folder / WORKLOADS, folder / RECORDS]
    if not must_exist and not any(f.exists() for f in files):
        return
    for f in files:
        if not f.is_file():
            raise BadInput(f"{printable(folder)}: not a tuning database ({f.name} is missing); create one with "
                           f"`graphopt tune`")
    workloads = 0
    for number, value in _lines(files[0]):
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
                and isinstance(value[1], (str, dict))):
            raise BadInput(f"{files[0]}: line {number} is not a [hash, module] workload; tune again with "
                           f"`graphopt tune`")
        workloads += 1
    for number, value in _lines(files[1]):
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], int)
                and not isinstance(value[0], bool) and 0 <= value[0] < workloads and isinstance(value[1], list)):
            raise BadInput(f"{files[1]}: line {number} is not a [workload index, record] tuning record of this "
                           f"database; tune again with `graphopt tune`")
