"""The built-in example: a small CNN trained on scikit-learn's digits (8x8 images, 10 classes).

    make_example.py OUT.onnx            train (about 10 s on 2 cores), report test accuracy, export ONNX
    make_example.py --evaluate ARTIFACT accuracy of a compiled artifact on the same held-out split
"""
import argparse
import sys

import numpy as np


def digits_split():
    """((x_train, y_train), (x_test, y_test)) from graphopt.datasets.digits_split (stratified, seeded)."""
    from graphopt.datasets import digits_split as split
    x_tr, y_tr, x_te, y_te = split()
    return (x_tr, y_tr), (x_te, y_te)


def build():
    import torch.nn as nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def train(out_path: str) -> None:
    import torch
    from graphopt.datasets import train_classifier
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = digits_split()
    model = train_classifier(build(), xtr, ytr, epochs=15, lr=3e-3, seed=0)
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean()
    print(f"example: trained digits CNN, torch test accuracy {acc:.4f} on {len(xte)} held-out images")
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), out_path, input_names=["x"], output_names=["logits"],
                      dynamo=False, opset_version=17, training=torch.onnx.TrainingMode.PRESERVE)


def evaluate(artifact: str) -> None:
    import graphopt
    art = graphopt.Artifact(artifact)
    _, (xte, yte) = digits_split()
    pred = np.array([np.argmax(art.run({"x": xte[i:i + 1]})["logits"]) for i in range(len(xte))])
    print(f"example: compiled artifact {artifact} test accuracy {(pred == yte).mean():.4f} on {len(xte)} images")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--evaluate", action="store_true")
    a = p.parse_args()
    evaluate(a.path) if a.evaluate else train(a.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
