"""Reading user .npz files with bounded memory: every member's name, dtype and shape are read from the zip
directory and the .npy headers, and checked, before any array data is decompressed."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from .errors import BadInput, printable
from .limits import human_bytes, max_input_bytes, nbytes

NUMERIC_KINDS = "biufc"      # bool, signed/unsigned integers, floats, complex: no objects, strings or records


def _header(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, header bytes) of one .npy member, reading its header only."""
    with z.open(info) as f:
        version = npy_format.read_magic(f)
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _, dtype = read(f)
        return shape, dtype, f.tell()


def check_npz(path: Path, max_bytes: int | None = None) -> dict[str, tuple[tuple, np.dtype]]:
    """{array name: (shape, dtype)} of an .npz file, after checking that every member is a numeric .npy array whose
    declared size its zip entry can hold, and that all arrays together fit in max_bytes (default
    limits.max_input_bytes()). Raises BadInput naming the file and the array."""
    limit = max_input_bytes() if max_bytes is None else max_bytes
    arrays, sizes = {}, {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else None
                if name is None:
                    raise BadInput(f"{path}: member '{printable(info.filename)}' is not an .npy array; "
                                   f"write the file with numpy.savez")
                if name in arrays:
                    raise BadInput(f"{path}: array '{printable(name)}' is stored twice")
                shape, dtype, offset = _header(z, info)
                if dtype.hasobject or dtype.kind not in NUMERIC_KINDS:
                    raise BadInput(f"{path}: array '{printable(name)}' has dtype {printable(dtype)}; graphopt reads "
                                   f"numeric arrays only (no objects, strings or records)")
                size = nbytes(shape, dtype.itemsize)
                if info.file_size < offset + size:
                    raise BadInput(f"{path}: array '{printable(name)}' declares {list(shape)} {dtype} but its entry "
                                   f"holds only {info.file_size} bytes; the file is truncated or corrupt")
                arrays[name] = (tuple(shape), dtype)
                sizes[name] = size
    except BadInput:
        raise
    except Exception as e:    # not a zip, a bad .npy header, a bad zip entry
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{path}: not a readable .npz file ({printable(first)})") from None
    total = sum(sizes.values())
    if total > limit:
        big = max(sizes, key=sizes.get)
        shape, dtype = arrays[big]
        raise BadInput(f"{path}: its arrays need {human_bytes(total)} once decompressed (array '{printable(big)}' "
                       f"alone is {list(shape)} {dtype}), more than the {human_bytes(limit)} graphopt reads from "
                       f"one file; set GRAPHOPT_MAX_INPUT_BYTES to change the limit")
    return arrays


def load_npz(path, what: str, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, checked by check_npz before they are read. what names the file's role in
    messages (e.g. "--calib")."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{printable(p)}: no such file ({what} must be an .npz file)")
    check_npz(p, max_bytes)
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{p}: not a readable .npz file ({printable(first)})") from None
