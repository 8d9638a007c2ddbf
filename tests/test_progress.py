"""Progress: a rich bar on a terminal, plain lines otherwise, nothing when off; wired into calibration and training
(the CLI passes it; library calls stay silent unless given one)."""
import io
import subprocess
import sys

import numpy as np
import pytest

from graphopt.progress import Progress

pytestmark = pytest.mark.fast


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    p = Progress.for_stream(out)
    assert p.mode == "lines"
    with p.task("calibration", 20) as update:
        for i in range(20):
            update(i + 1, "x")
    lines = out.getvalue().splitlines()
    assert lines[-1] == "graphopt: calibration 20/20 (100%) x"
    assert 2 <= len(lines) <= 11                      # about every 10%, not every step
    assert all(line.startswith("graphopt: calibration ") for line in lines)


def test_total_can_change_and_final_line_once():
    out = io.StringIO()
    with Progress("lines", out).task("training", 3) as update:
        update(1, new_total=100)
        update(100)
        update(100)
    assert out.getvalue().splitlines()[-1] == "graphopt: training 100/100 (100%)"
    assert out.getvalue().count("100/100") == 1


def test_bar_on_a_terminal_and_off():
    tty = _Tty()
    p = Progress.for_stream(tty)
    assert p.mode == "bar"
    with p.task("tuning", 4) as update:
        for i in range(4):
            update(i + 1, "best 1.2 ms")
    text = tty.getvalue()
    assert "tuning" in text and "4/4" in text and "graphopt: " not in text
    off = io.StringIO()
    with Progress.for_stream(off, enabled=False).task("x", 3) as update:
        update(3)
    assert off.getvalue() == ""
    with pytest.raises(ValueError):
        Progress("fancy")


def test_cli_calibration_prints_progress_lines(tmp_path, zoo_onnx):
    x = np.random.default_rng(0).random((32, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "compile", str(zoo_onnx("cnn_digits")),
                           "-o", str(tmp_path / "q"), "--pipeline", "quantize{scheme=int8}",
                           "--calib", str(tmp_path / "calib.npz"), "--no-bench"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "graphopt: calibration (minmax) 32/32 (100%)" in proc.stderr
    assert "graphopt: calibration" not in proc.stdout
