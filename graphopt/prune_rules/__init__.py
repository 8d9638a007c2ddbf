"""Pruning rules: one rule object per op family owns both halves of pruning its ops.

* `propagate(groups, node)`: how channels flow through the node, for the channel-groups analysis
  (graphopt/channel_groups.py): it reads the input channels (`groups.get`), sets the output's (`groups.set`),
  unites, freezes, records sources, sinks, parameter slices (`groups.param`) and, when the removal must edit the
  node itself (an attribute, a shape constant), a rewrite (`groups.rewrite(rule, data)`). Raising `Freeze(why)`
  freezes every channel the node touches: whatever a rule cannot prove is never guessed.
* `rewrite(node, data, edit)`: that edit, done by prune-channels when it removes channels (`edit.keep(slots)`:
  which positions stay; `edit.set_const(node, i, values)`: a new constant input).

Each module of this package is one family and registers its rules with `@register`; the package loads them all on
the first lookup, so a new family is one new file. An op may have several rules that split its nodes between them
(`claims`: MatMul with a constant weight is a linear layer, of two activations attention); ops without a rule
freeze the channels they touch.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import numpy as np

from graphopt.graph import constant_value

NAN = float("nan")


class Freeze(Exception):
    """The rule cannot model this node: the channels it touches are frozen with this reason."""


@dataclass
class Edit:
    """What a rule's rewrite may do to the graph being pruned."""
    keep: Callable[[list[int]], np.ndarray]            # slots -> bool per position: stays
    set_const: Callable[..., None]                     # (node, input, values) -> input becomes a new constant
    new_name: Callable[[str], str]                     # an unused tensor / node name from a base
    opset: int


class Rule:
    """The pruning rule of an op family: `ops` it handles, `propagate`, and `rewrite` when it records one."""
    ops: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return type(self).__name__

    def claims(self, groups, node) -> bool:
        """Whether this rule handles the node (when an op has several rules, exactly one claims each node)."""
        return True

    def propagate(self, groups, node) -> None:
        raise NotImplementedError

    def rewrite(self, node, data: dict, edit: Edit) -> None:
        raise NotImplementedError(f"{self.name} records no rewrite")


RULES: dict[str, list[Rule]] = {}
_loaded = False


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: one instance of the rule handles its ops (the nodes it claims)."""
    rule = cls()
    for op in cls.ops:
        RULES.setdefault(op, []).append(rule)
    return cls


def rules_for(op: str) -> list[Rule]:
    """The rules registered for an ONNX op (none: the analysis freezes what the op touches)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for m in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{m.name}")
    return RULES.get(op, [])


def rule_for(groups, node) -> Rule | None:
    """The rule that claims `node`, or None."""
    return next((r for r in rules_for(node.op) if r.claims(groups, node)), None)


def shrink_shape_input(node, inp: int, axis: int, slots, edit: Edit) -> None:
    """A shape constant (Resize sizes, Expand shape) loses the removed channels at `axis` (sizes of 1 and 0 stay:
    broadcast and copy)."""
    k = edit.keep(slots)
    if k.all():
        return
    arr = constant_value(node.inputs[inp]).astype(np.int64).copy()
    if arr[axis] > 1:
        arr[axis] = int(k.sum())
        edit.set_const(node, inp, arr, node.inputs[inp].name + "_pruned")
