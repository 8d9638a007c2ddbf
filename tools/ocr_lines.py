#!/usr/bin/env python3
"""Training and evaluation text lines for the PP-OCR recognizers as the .npz files `graphopt build` / `graphopt
compress` read (x: float32 [N, 3, 48, 320]), rendered by tools/ocr_data.render_lines (Debian fonts, Latin words,
numbers and Chinese characters from the recognizer's dictionary). No labels: the fp32 recognizer is the teacher
(graphopt.task_metrics sequence agreement); the rendered strings are written beside each file (.txt).

    .venv/bin/python tools/ocr_lines.py out/ocr_data --train 1024 --eval 100
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ocr_data  # noqa: E402

SEEDS = {"train": 0, "eval": 1}          # distinct, so the evaluation lines are not the training lines


def write(folder: Path, train: int, evaluation: int, source: str = "catalogs") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", train), ("eval", evaluation)):
        data, texts = ocr_data.render_lines(n, SEEDS[name], source)
        np.savez(folder / f"{name}.npz", x=data["x"])
        (folder / f"{name}.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(f"ocr lines: {train} training, {evaluation} evaluation lines written to {folder}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--text", choices=("catalogs", "random"), default="catalogs", help="the lines' text (tools/ocr_data.py)")
    a = ap.parse_args(argv)
    write(a.folder, a.train, a.eval, a.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
