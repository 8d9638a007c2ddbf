"""Entry-point groups through which graphopt finds passes and analyses: the built-in ones (pyproject.toml) and
those an outside distribution ships, alike. Core code names no pass module; it asks for a group's entries."""
from __future__ import annotations

from importlib import metadata

from .errors import GraphoptError, printable, reraise_if_strict

PASSES = "graphopt.passes"          # name -> "module:PassClass" (or a module that registers the pass)
ANALYSES = "graphopt.analyses"      # name -> a module that registers the analysis (graphopt.analyses.analysis)


def entry_points(group: str, name: str | None = None) -> list[metadata.EntryPoint]:
    """The installed entry points of `group` (only those called `name` when given), sorted by name."""
    found = metadata.entry_points(group=group)
    return sorted((ep for ep in found if name is None or ep.name == name), key=lambda ep: ep.name)


def load(ep: metadata.EntryPoint):
    """What the entry point names (its module imported). A plugin that fails to import is one line naming it."""
    try:
        return ep.load()
    except Exception as e:
        reraise_if_strict(e)
        raise GraphoptError(f"{ep.group} entry point '{printable(ep.name)}' ({printable(ep.value)}) failed to "
                            f"load: {type(e).__name__}: {printable(e)}") from e
