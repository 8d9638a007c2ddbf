"""Resource limits checked before anything big is allocated: bytes of input data, bytes of one tensor, bytes of
a folded constant, threads. Byte limits default to half the memory available now and can be set with
GRAPHOPT_MAX_INPUT_BYTES (all arrays of one .npz file) and GRAPHOPT_MAX_TENSOR_BYTES (one tensor of a model)."""
from __future__ import annotations

import math
import os
import re

from .errors import BadInput, printable

#: onnxruntime does not fold constants above 1 GB either; bigger ones stay computed at run time
MAX_FOLD_BYTES = 1 << 30
#: protobuf cannot parse a message of 2 GB or more: an ONNX file this large must use external data
MAX_PROTOBUF_BYTES = (1 << 31) - 1
MAX_INT64 = (1 << 63) - 1


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str, what: str) -> int:
    """'8G', '512M', '1.5GiB', '8000000000' -> bytes (K/M/G/T are powers of 1024). BadInput naming `what`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise BadInput(f"{what}={printable(text)} is not a number of bytes; write for example 8000000000, 512M or 8G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _byte_limit(env: str) -> int:
    """The limit set in env (bytes, or with a K/M/G/T suffix: 8G), else half the available memory (at least 1 GB)."""
    text = os.environ.get(env, "").strip()
    if not text:
        return max(available_memory() // 2, 1 << 30)
    return parse_bytes(text, env)


def max_input_bytes() -> int:
    """The most bytes the arrays of one input .npz file may hold once decompressed."""
    return _byte_limit("GRAPHOPT_MAX_INPUT_BYTES")


def max_tensor_bytes() -> int:
    """The most bytes one tensor of a model may need."""
    return _byte_limit("GRAPHOPT_MAX_TENSOR_BYTES")


def human_bytes(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def nbytes(shape, itemsize: int) -> int:
    """Bytes of a tensor, computed with Python integers (no int64 overflow)."""
    return math.prod(int(d) for d in shape) * int(itemsize)


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads, what: str = "--threads") -> int:
    """threads as an int between 1 and the machine's cores; more threads than cores only slow a run down (and
    tens of thousands of them take minutes to start)."""
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise BadInput(f"{what} must be an integer, got {printable(repr(threads))}")
    cores = cpu_cores()
    if threads < 1:
        raise BadInput(f"{what} must be at least 1, got {threads}")
    if threads > cores:
        raise BadInput(f"{what} {threads} is more than the {cores} core(s) this machine gives graphopt; "
                       f"use at most {cores}")
    return threads
