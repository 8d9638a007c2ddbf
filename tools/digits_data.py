#!/usr/bin/env python3
"""Write the scikit-learn digits split (graphopt.datasets: 1347 training / 450 held-out images, stratified, seeded)
as the .npz files `graphopt build` and `graphopt compress` read: train.npz and eval.npz (x [N, 1, 8, 8] float32,
labels [N] int64), calib.npz (the first 256 training images).

    .venv/bin/python tools/digits_data.py out/digits_data
"""
import argparse
import sys
from pathlib import Path

import numpy as np


def write(folder: Path) -> None:
    from graphopt.datasets import digits_split
    x_tr, y_tr, x_te, y_te = digits_split()
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", x=x_tr, labels=y_tr)
    np.savez(folder / "eval.npz", x=x_te, labels=y_te)
    np.savez(folder / "calib.npz", x=x_tr[:256])
    print(f"digits: {len(x_tr)} training, {len(x_te)} held-out images written to {folder}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    write(ap.parse_args(argv).folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
