"""The built-in example: a small CNN trained on scikit-learn's digits (8x8 images, 10 classes).

    make_example.py OUT.onnx            train (about 10 s on 2 cores), report test accuracy, export ONNX
    make_example.py --evaluate ARTIFACT accuracy of a compiled artifact on the same held-out split
"""
import argparse
import sys

import numpy as np


def digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    return (x[idx[:cut]], y[idx[:cut]]), (x[idx[cut:]], y[idx[cut:]])


def build():
    import torch.nn as nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def train(out_path: str) -> None:
    import torch
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = digits_split()
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for epoch in range(15):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
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
