"""Data from files that are not .npz: a folder of files (images, audio, ...) or a text file of lines (one example
per line), turned into arrays by a preprocessing hook the user writes.

The hook is a Python function, named "FILE.py:FUNCTION" on the command line and in build TOML (`--preprocess`,
`[data] preprocess`), or passed as a callable in the API. It is called once per example:
  * for a folder: hook(path) with the pathlib.Path of each file, in sorted name order (hidden files skipped);
  * for a .txt file: hook(line) with each non-empty line (without its newline).
It returns the example's arrays without a batch axis: {input name: array} for any model, or one array for a
model with one input; graphopt stacks them into a batch (labels are optional: a "labels" entry is kept as such).

    # prep.py
    import numpy as np
    from PIL import Image
    def image(path):                      # a 3x48x320 crop for an OCR recognizer, scaled to [-1, 1]
        im = Image.open(path).convert("RGB").resize((320, 48))
        return {"x": (np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1.0)}
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import BadInput, printable


def load_hook(spec: str, base: Path | None = None, what: str = "--preprocess") -> Callable:
    """The function named by "FILE.py:FUNCTION" (FILE relative to base, default the working folder)."""
    file, sep, func = str(spec).rpartition(":")
    if not sep or not file.endswith(".py") or not func.isidentifier():
        raise BadInput(f"{what} must be \"FILE.py:FUNCTION\", got {printable(spec)!r}")
    path = ((base or Path.cwd()) / file).resolve()
    if not path.is_file():
        raise BadInput(f"{what}: {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"graphopt_user_preprocess_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file failed to import
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{what}: importing {path} failed: {printable(first)}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise BadInput(f"{what}: {path} has no function '{func}'")
    return fn


def examples(source: Path) -> list:
    """What the hook is called on: the files of a folder (sorted, hidden ones skipped) or the lines of a .txt."""
    if source.is_dir():
        items = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    elif source.is_file() and source.suffix == ".txt":
        try:
            items = [line for line in source.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"{source}: cannot read the text lines ({type(e).__name__})") from None
    else:
        raise BadInput(f"{source}: give a folder of files or a .txt file of lines for data with a preprocessing hook")
    if not items:
        raise BadInput(f"{source}: no examples in it")
    return items


def load_folder(source: str | Path, hook: Callable, input_names: list[str], what: str,
                max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """{input name (and "labels"): stacked array} from every example of source through hook."""
    from .limits import human_bytes, max_input_bytes
    source = Path(source)
    items = examples(source)
    limit = max_bytes if max_bytes is not None else max_input_bytes()
    columns: dict[str, list] = {}
    for i, item in enumerate(items):
        where = f"{what}: example {i} ({printable(item.name if isinstance(item, Path) else item, 60)!r})"
        try:
            got = hook(item)
        except Exception as e:  # noqa: BLE001 - the user's hook failed on this example
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInput(f"{where}: the preprocessing hook failed: {printable(first)}") from None
        if not isinstance(got, dict):
            if len(input_names) != 1:
                raise BadInput(f"{where}: the model has inputs {', '.join(input_names)}: the hook must return "
                               f"{{input name: array}}")
            got = {input_names[0]: got}
        if i == 0:
            missing = [n for n in input_names if n not in got]
            if missing:
                raise BadInput(f"{where}: the hook's result lacks input(s) {', '.join(missing)}")
            columns = {k: [] for k in got}
            per_example = sum(np.asarray(v).nbytes for v in got.values())
            if per_example * len(items) > limit:
                raise BadInput(f"{what}: {len(items)} examples of {human_bytes(per_example)} need "
                               f"{human_bytes(per_example * len(items))}, more than the {human_bytes(limit)} graphopt "
                               f"reads at once (GRAPHOPT_MAX_INPUT_BYTES)")
        if set(got) != set(columns):
            raise BadInput(f"{where}: the hook returned {sorted(got)}, the first example {sorted(columns)}")
        for k, v in got.items():
            a = np.asarray(v)
            if columns[k] and a.shape != columns[k][0].shape:
                raise BadInput(f"{where}: '{k}' has shape {list(a.shape)}, the first example {list(columns[k][0].shape)}"
                               f"; every example must have the same shape")
            columns[k].append(a)
    return {k: np.stack(v) for k, v in columns.items()}
