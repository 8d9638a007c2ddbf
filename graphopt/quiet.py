"""Keeping the libraries' own chatter off stderr, so that graphopt's lines are the only ones a user sees (unless
--debug): Python warnings (torch, onnx, numpy), onnxruntime's C++ log, onnx-graphsurgeon's log, the tvm loggers.
TVM's C++ LOG(WARNING) lines cannot be turned off from Python and still appear."""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings

from .errors import printable

OWN_WARNING = "graphopt: "          # graphopt's own warnings.warn messages start with this


def _show_own_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message)
    text = text[len(OWN_WARNING):] if text.startswith(OWN_WARNING) else text
    print(f"graphopt: warning: {printable(text, None)}", file=file or sys.stderr)


@contextlib.contextmanager
def quiet_libraries(debug: bool = False):
    """While inside: third-party warnings and logs are dropped; graphopt's own warnings are one
    `graphopt: warning:` line each. With debug, everything is shown as the libraries print it."""
    if debug:
        yield
        return
    import onnx_graphsurgeon as gs
    import onnxruntime
    gs_logger, tvm_logger = gs.logger.G_LOGGER, logging.getLogger("tvm")
    gs_level, tvm_level = gs_logger.severity, tvm_logger.level
    onnxruntime.set_default_logger_severity(4)      # onnxruntime's failures reach the user as graphopt's errors
    gs_logger.severity = gs_logger.CRITICAL + 1     # so do graphsurgeon's (critical() raises)
    tvm_logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.filterwarnings("always", message=OWN_WARNING)
            warnings.showwarning = _show_own_warning
            yield
    finally:
        onnxruntime.set_default_logger_severity(2)
        gs_logger.severity = gs_level
        tvm_logger.setLevel(tvm_level)
