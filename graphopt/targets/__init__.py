"""Targets: each turns a verified ONNX graph into a compiled library. The only code that imports tvm
(lazily, inside the lowering functions, so listing targets or passes stays fast)."""
from __future__ import annotations

from graphopt.errors import BadInput

from .base import Target

_TARGETS = {
    "cpu": ("graphopt.targets.cpu", "CpuTarget"),
    "cuda": ("graphopt.targets.cuda", "CudaTarget"),
    "arm-sve": ("graphopt.targets.arm_sve", "ArmSveTarget"),
}


def names() -> list[str]:
    return sorted(_TARGETS)


def target_class(name: str) -> type[Target]:
    """The Target subclass called name (its module imported; tvm is not)."""
    if name not in _TARGETS:
        raise BadInput(f"unknown target '{name}'; choose one of: {', '.join(names())}")
    import importlib
    module, cls = _TARGETS[name]
    return getattr(importlib.import_module(module), cls)


def get_target(name: str, **options) -> Target:
    return target_class(name)(**options)
