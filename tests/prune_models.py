"""Small torch models for the channel-pruning tests: the structures the zoo does not isolate.

Each builder returns (module in eval mode, example inputs); `export(name, path)` writes ONNX with the same
TorchScript exporter settings as tests/zoo.py (BatchNormalization kept)."""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def _bn(c, seed):
    bn = nn.BatchNorm2d(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(c, generator=g))
        bn.bias.copy_(0.2 * torch.randn(c, generator=g))
        bn.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return bn


class CatTwice(nn.Module):
    """conv -> cat([y, y]) -> conv: the same channel twice in one tensor."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = _bn(32, 1)
        self.b = nn.Conv2d(64, 8, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.bn(self.a(x)))
        return self.b(torch.cat([y, y], 1))


class OneChannel(nn.Module):
    """A conv with one output channel between two convs (never pruned to zero)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 1, 3, padding=1)
        self.b = nn.Conv2d(1, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class DepthwiseResidual(nn.Module):
    """y = x + bn(dw(x)), with x from a conv: the depthwise conv couples its input and output channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.bn = _bn(32, 2)
        self.dw2 = nn.Conv2d(32, 64, 3, padding=1, groups=32)     # multiplier 2
        self.b = nn.Conv2d(64, 4, 1)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = x + self.bn(self.dw(x))
        return self.b(F.relu(self.dw2(x)))


class LinearToDeconv(nn.Module):
    """Linear -> view(-1, 256, 4, 4) -> ConvTranspose: a channel is a block of 16 features of the Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 256 * 16)
        self.up = nn.ConvTranspose2d(256, 8, 2, stride=2)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z):
        h = F.relu(self.fc(z)).view(-1, 256, 4, 4)
        return self.out(F.relu(self.up(h)))


class BareParams(nn.Module):
    """Patch embedding, class token, position embedding and a layer scale on a token stream that is only read by
    Linear layers (no LayerNorm), so the stream's channels are prunable and the bare parameters are sliced."""

    def __init__(self, dim=32):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Conv2d(3, dim, 4, 4)                          # 16 tokens
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.5 * torch.randn(1, 17, dim))
        self.scale = nn.Parameter(0.5 + torch.rand(dim))
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, dim)
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        t = t * self.scale
        t = t + self.gamma * self.fc2(F.gelu(self.fc1(t)))
        return self.head(t[:, 0])


class SEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.fc1 = nn.Conv2d(32, 8, 1)
        self.fc2 = nn.Conv2d(8, 32, 1)
        self.b = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = F.hardswish(self.a(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.b(y * s)


class DeadChannels(nn.Module):
    """Channels whose contribution is provably zero: zero weights with a BN that maps 0 to 0, zero weights with
    a negative bias before a Relu (a dead Relu), a zero Linear row before x*sigmoid(x)."""

    DEAD_A = (1, 4, 9, 30)       # conv a (+ BN) channels
    DEAD_B = (0, 5, 6)           # conv b channels (negative bias, Relu)
    DEAD_H = (2, 3, 17, 40, 63)  # linear hidden units (SiLU)

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn = _bn(32, 4)
        self.b = nn.Conv2d(32, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 6)
        with torch.no_grad():
            for c in self.DEAD_A:
                self.a.weight[c] = 0
                self.bn.bias[c] = 0.0
                self.bn.running_mean[c] = 0.0
            for c in self.DEAD_B:
                self.b.weight[c] = 0
                self.b.bias[c] = -0.5
            for h in self.DEAD_H:
                self.fc1.weight[h] = 0
                self.fc1.bias[h] = 0

    def forward(self, x):
        y = F.relu(self.bn(self.a(x)))
        y = F.relu(self.b(y))
        h = self.fc1(F.adaptive_avg_pool2d(y, 1).flatten(1))
        return self.fc2(h * torch.sigmoid(h))


class UnknownOp(nn.Module):
    """Channels that reach an op the analysis does not model (LRN mixes neighbouring channels)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.lrn = nn.LocalResponseNorm(3)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(self.lrn(self.a(x)))))


class SqueezeGate(nn.Module):
    """Squeeze / Unsqueeze around a Linear gate: GAP -> squeeze -> Linear -> unsqueeze -> broadcast Mul."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.fc = nn.Linear(32, 32)
        self.b = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        s = torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1).squeeze(3).squeeze(2)))
        return self.b(y * s.unsqueeze(-1).unsqueeze(-1))


class SplitBranches(nn.Module):
    """torch.split with unequal sizes (an ONNX Split with a sizes input), branches concatenated back."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 48, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(32, 32, 1)
        self.d = nn.Conv2d(48, 4, 1)

    def forward(self, x):
        p, q = torch.split(F.relu(self.a(x)), [16, 32], dim=1)
        return self.d(torch.cat([F.relu(self.b(p)), q + self.c(q)], 1))


class GroupNormNet(nn.Module):
    """nn.GroupNorm (exported as Reshape [N, G, -1] + InstanceNormalization + Reshape + affine): whole groups."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 64, 3, padding=1)
        self.gn = nn.GroupNorm(4, 64)
        self.gn2 = nn.GroupNorm(32, 64)
        self.b = nn.Conv2d(64, 64, 3, padding=1)
        self.c = nn.Conv2d(64, 4, 1)
        with torch.no_grad():
            for gn in (self.gn, self.gn2):
                gn.weight.copy_(0.5 + torch.rand(64))
                gn.bias.copy_(0.2 * torch.randn(64))

    def forward(self, x):
        y = F.relu(self.gn(self.a(x)))
        return self.c(F.relu(self.gn2(self.b(y))))


MODELS = {
    "cat_twice": (CatTwice, (1, 3, 8, 8)),
    "one_channel": (OneChannel, (1, 3, 8, 8)),
    "depthwise_residual": (DepthwiseResidual, (1, 3, 8, 8)),
    "linear_to_deconv": (LinearToDeconv, (1, 16)),
    "bare_params": (BareParams, (1, 3, 16, 16)),
    "se_block": (SEBlock, (1, 3, 8, 8)),
    "dead_channels": (DeadChannels, (1, 3, 8, 8)),
    "unknown_op": (UnknownOp, (1, 3, 8, 8)),
    "squeeze_gate": (SqueezeGate, (1, 3, 8, 8)),
    "split_branches": (SplitBranches, (1, 3, 8, 8)),
    "group_norm": (GroupNormNet, (1, 3, 8, 8)),
}


def build(name):
    ctor, shape = MODELS[name]
    torch.manual_seed(0)
    model = ctor().eval()
    return model, (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)


def export(name, path) -> str:
    model, inputs = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, os.fspath(path), input_names=["x"], output_names=["y"], opset_version=17,
                          do_constant_folding=True, training=torch.onnx.TrainingMode.PRESERVE, dynamo=False)
    return os.fspath(path)
