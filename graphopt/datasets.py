"""Real data that ships in a package (scikit-learn's digits) and a plain torch training loop, shared by the
built-in example, the tests and the benchmarks."""
from __future__ import annotations

import numpy as np

SPLIT_SEED = 0
TEST_FRACTION = 0.25


def digits_split(seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION):
    """(x_train, y_train, x_test, y_test): scikit-learn digits as float32 (N, 1, 8, 8) images in [0, 1] and int64
    labels; a stratified, seeded split (1347 / 450 examples by default)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


def train_classifier(model, x: np.ndarray, y: np.ndarray, epochs: int, lr: float = 3e-3, batch: int = 64,
                     seed: int = 0):
    """Adam + cosine schedule, cross-entropy, seeded shuffling; returns the model in eval mode."""
    import torch
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    model.eval()
    return model
