"""Progress of long steps (calibration, training, tuning): a rich progress bar on a terminal, plain lines when the
output is not a terminal (CI logs, pipes), nothing when off. Always on stderr: stdout stays the command's result
(tables, or JSON with --json).

    progress = Progress.for_stream(sys.stderr)        # "bar" on a TTY, "lines" otherwise
    with progress.task("calibration", total=64) as update:
        for i, batch in enumerate(batches):
            ...
            update(i + 1, "loss 0.31")                # done so far, optional detail (and new_total=)

Library calls get no progress unless they pass one (PassContext(progress=...), compress(progress=...),
tune(progress=...)); the CLI passes one.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

MODES = ("bar", "lines", "off")


class Progress:
    def __init__(self, mode: str = "lines", stream=None, line_every_s: float = 5.0, line_fraction: float = 0.1):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.stream = stream if stream is not None else sys.stderr
        self.line_every_s = line_every_s
        self.line_fraction = line_fraction

    @classmethod
    def for_stream(cls, stream=None, enabled: bool = True) -> "Progress":
        stream = stream if stream is not None else sys.stderr
        if not enabled:
            return cls("off", stream)
        return cls("bar" if getattr(stream, "isatty", lambda: False)() else "lines", stream)

    @contextlib.contextmanager
    def task(self, label: str, total: int) -> Iterator[Callable[..., None]]:
        total = max(1, int(total))
        if self.mode == "off":
            yield lambda done, detail="", new_total=None: None
        elif self.mode == "bar":
            yield from self._bar(label, total)
        else:
            yield from self._lines(label, total)

    def _bar(self, label, total):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Rich, TextColumn, TimeRemainingColumn
        with Rich(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[detail]}"), console=Console(file=self.stream), transient=False) as bar:
            tid = bar.add_task(label, total=total, detail="")

            def update(done, detail="", new_total=None):
                nonlocal total
                total = max(1, int(new_total)) if new_total else total
                bar.update(tid, total=total, completed=min(done, total), detail=detail)
            yield update

    def _lines(self, label, total):
        state = {"t": time.monotonic(), "last": 0, "total": total}

        def update(done, detail="", new_total=None):
            if new_total:
                state["total"] = max(1, int(new_total))
            total = state["total"]
            step = max(1, int(total * self.line_fraction))
            done = min(int(done), total)
            now = time.monotonic()
            if done > state["last"] and (done >= total or done - state["last"] >= step
                                         or now - state["t"] >= self.line_every_s):
                print(f"graphopt: {label} {done}/{total} ({100 * done // total}%)"
                      + (f" {detail}" if detail else ""), file=self.stream, flush=True)
                state.update(t=now, last=done)
        yield update
