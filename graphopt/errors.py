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
