"""Facts every CPU lowering reads off a TVM target, whatever its precision or ISA."""
from __future__ import annotations

import os


def num_cores(target) -> int:
    """The target's num-cores (else this machine's CPU count): the kernels' parallel split."""
    n = target.attrs.get("num-cores") if target is not None else None
    try:
        return max(1, int(n))
    except (TypeError, ValueError):
        return os.cpu_count() or 1
