"""scikit-learn digits for distillation tests: float32 1x8x8 images in [0, 1], a fixed seeded stratified
train/test split, and a small CNN teacher (tests/zoo.py's "cnn_digits" architecture) trained with plain torch and
cached as ONNX under tests/fixtures/ (tools/make_fixtures.py regenerates it).

    load_digits_split() -> (x_train, y_train, x_test, y_test)     # x: (N, 1, 8, 8) float32, y: int64
    teacher_path()      -> Path of the cached teacher ONNX (trained and written if missing)
    train_teacher()     -> trained torch module (eval mode)
    export_teacher(path)
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from graphopt.datasets import digits_split, train_classifier

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

FIXTURES = HERE / "fixtures"
TEACHER_ONNX = FIXTURES / "digits_teacher.onnx"
SPLIT_SEED = 0
TEST_FRACTION = 0.25
TEACHER_SEED = 0
TEACHER_EPOCHS = 30


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): 1347 / 450 examples, stratified, seeded."""
    return digits_split(SPLIT_SEED, TEST_FRACTION)


def teacher_module() -> nn.Module:
    import zoo
    torch.manual_seed(TEACHER_SEED)
    return zoo.CNNDigits()


def train_teacher(epochs: int = TEACHER_EPOCHS, seed: int = TEACHER_SEED) -> nn.Module:
    """Train the cnn_digits architecture on the training split with Adam; returns it in eval mode."""
    x_tr, y_tr, _, _ = load_digits_split()
    return train_classifier(teacher_module(), x_tr, y_tr, epochs, lr=3e-3, seed=seed)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export_teacher(model: nn.Module, path: str | os.PathLike) -> None:
    """Static batch-1 export with the TorchScript exporter (BatchNormalization kept, like tests/zoo.py)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(tmp), input_names=["x"], output_names=["y"],
                          opset_version=17, do_constant_folding=True, training=torch.onnx.TrainingMode.PRESERVE,
                          dynamo=False)
    os.replace(tmp, path)


def make_teacher(path: str | os.PathLike = TEACHER_ONNX, force: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not force:
        return path
    model = train_teacher()
    _, _, x_te, y_te = load_digits_split()
    acc = accuracy(model, x_te, y_te)
    if acc < 0.97:
        raise RuntimeError(f"digits teacher reached only {acc:.3f} test accuracy (< 0.97)")
    export_teacher(model, path)
    return path


def teacher_path() -> Path:
    """The cached teacher ONNX (trained and written on first use when missing)."""
    return make_teacher(TEACHER_ONNX)


class NarrowCNN(nn.Module):
    """A student half as wide as cnn_digits: conv 8 -> conv 16 -> pool -> conv 16 -> GAP -> fc."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def export_narrow_student(path: str | os.PathLike, seed: int = 1) -> None:
    torch.manual_seed(seed)
    export_teacher(NarrowCNN().eval(), path)
