"""Error types. Every error a user can cause is a GraphoptError: the CLI prints its message on one
line and exits with its code (2 bad input/usage, 1 a check or quality gate failed)."""


class GraphoptError(Exception):
    exit_code = 2


class BadInput(GraphoptError):
    """The model, an option or a data file is unusable as given."""
    exit_code = 2


class UnsupportedModel(BadInput):
    """The model uses something graphopt (or a target) cannot handle."""


class CheckFailed(GraphoptError):
    """A verification or quality gate failed: the output would be wrong."""
    exit_code = 1


def printable(text, limit: int | None = 200) -> str:
    """text for a one-line message: control characters and newlines escaped as repr does, at most limit chars
    (None: no cut), so that user text (node names, file names, pipeline text) cannot forge a `graphopt:` line."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return s if limit is None or len(s) <= limit else s[:limit - 3] + "..."


#: exception types that mean a bug in graphopt, not a model or machine graphopt cannot handle
BUG_TYPES = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError)


def strict_mode() -> bool:
    """GRAPHOPT_STRICT=1 (the test suite sets it): bugs caught by a broad `except Exception` are re-raised."""
    import os
    return os.environ.get("GRAPHOPT_STRICT") == "1"


def reraise_if_strict(exc: BaseException, strict: bool | None = None) -> None:
    """Call first in a broad `except Exception as exc:` whose fallback is meant for expected failures: in strict
    mode (strict, default strict_mode()) an exception of a BUG_TYPES type is raised again instead of being turned
    into a quiet fallback."""
    if isinstance(exc, BUG_TYPES) and (strict_mode() if strict is None else strict):
        raise exc
