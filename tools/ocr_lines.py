#!/usr/bin/env python3
"""Rendered text lines for the PP-OCR recognizers (rapidocr's PP-OCRv4 rec: input [1, 3, 48, 320]), as .npz files
`graphopt build` / `graphopt compress` read: x [N, 3, 48, 320] float32, prepared as PaddleOCR prepares a line
(resized to height 48 keeping the aspect ratio, at most 320 wide, (pixel / 255 - 0.5) / 0.5, zero padding on the
right). Text: words, numbers and prices in DejaVu Sans (the font matplotlib ships), dark on light backgrounds, a
little noise and rotation. No labels: the fp32 recognizer is the teacher (graphopt.task_metrics sequence agreement);
the rendered strings are written beside each file (.txt) for reference.

    .venv/bin/python tools/ocr_lines.py out/ocr_data --train 256 --eval 100
"""
import argparse
import sys
from pathlib import Path

import numpy as np

HEIGHT, WIDTH = 48, 320
WORDS = ("invoice total amount date paid order number customer address phone name item price quantity tax shipping "
         "balance due account bank transfer reference page report summary table figure section data model result "
         "value north south east west station street road city market hotel coffee bread milk").split()


def font_path() -> Path:
    import matplotlib
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def phrase(rng) -> str:
    out = []
    for _ in range(int(rng.integers(1, 5))):
        r = rng.random()
        if r < 0.2:
            out.append(str(int(rng.integers(1, 100000))))
        elif r < 0.3:
            out.append(f"{rng.integers(1, 999)}.{rng.integers(0, 99):02d}")
        else:
            w = WORDS[int(rng.integers(len(WORDS)))]
            out.append(w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.3 else w)
    return " ".join(out)


def render(text: str, rng) -> np.ndarray:
    """One line as the recognizer takes it: [3, 48, 320] float32."""
    from PIL import Image, ImageDraw, ImageFont
    size = int(rng.integers(28, 44))
    font = ImageFont.truetype(str(font_path()), size)
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(2, 10))
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    bg = tuple(int(v) for v in rng.integers(190, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 80, 3))
    img = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=fg)
    img = img.rotate(float(rng.uniform(-1.5, 1.5)), expand=False, fillcolor=bg)
    new_w = min(WIDTH, max(1, int(np.ceil(HEIGHT * w / h))))
    img = np.asarray(img.resize((new_w, HEIGHT), Image.BILINEAR), np.float32)
    img = np.clip(img + rng.normal(0, 3.0, img.shape), 0, 255)
    x = np.zeros((3, HEIGHT, WIDTH), np.float32)
    x[:, :, :new_w] = (img / 255.0 - 0.5).transpose(2, 0, 1) / 0.5
    return x


def lines(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    texts = [phrase(rng) for _ in range(n)]
    return np.stack([render(t, rng) for t in texts]), texts


def write(folder: Path, train: int, evaluation: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", train, 0), ("eval", evaluation, 1)):
        x, texts = lines(n, seed)
        np.savez(folder / f"{name}.npz", x=x)
        (folder / f"{name}.txt").write_text("\n".join(texts) + "\n")
    print(f"ocr lines: {train} training, {evaluation} evaluation lines written to {folder}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--eval", type=int, default=100)
    a = ap.parse_args(argv)
    write(a.folder, a.train, a.eval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
