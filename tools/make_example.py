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


class DigitsViT:
    """A small ViT-style encoder for 8x8 digits (built lazily so importing this file needs no torch): 2x2 patches
    -> 16 tokens of width 64, a class token and position embeddings, 2 pre-LN encoder layers (4 heads, GELU MLP of
    width 256), LayerNorm, linear head. About 0.9 M MACs, most of them in the attention and MLP projections."""

    def __new__(cls, dim: int = 64, depth: int = 2, heads: int = 4, mlp: int = 256):
        import torch
        import torch.nn as nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
                self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
                self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

            def forward(self, x):
                b, n, _ = x.shape
                q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
                a = torch.softmax(q @ k.transpose(-2, -1) / (dim // heads) ** 0.5, dim=-1)
                x = x + self.proj((a @ v).transpose(1, 2).reshape(b, n, dim))
                return x + self.mlp(self.ln2(x))

        class ViT(nn.Module):
            def __init__(self):
                super().__init__()
                self.patch = nn.Conv2d(1, dim, 2, stride=2)
                self.cls = nn.Parameter(torch.zeros(1, 1, dim))
                self.pos = nn.Parameter(0.02 * torch.randn(1, 17, dim))
                self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
                self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

            def forward(self, x):
                t = self.patch(x).flatten(2).transpose(1, 2)
                t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
                return self.head(self.norm(self.blocks(t))[:, 0])

        return ViT()


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
