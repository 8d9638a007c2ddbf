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
