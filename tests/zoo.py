"""A small zoo of PyTorch models for end-to-end compiler tests.

Every model is built from plain torch code (no torchvision, no downloads) and
is kept tiny so that ONNX export + compile + run takes seconds on a laptop CPU.

Interface::

    ZOO: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]]
    build(name)              -> (model in eval mode, example inputs)
    make_inputs(name, batch) -> seeded example inputs with the given batch size
    export_onnx(name, path, opset=17, dynamic_batch=False) -> input names

Weights are seeded (``torch.manual_seed(0)`` before construction) and every
BatchNorm / LayerNorm gets seeded, non-trivial affine parameters and running
statistics, so that BatchNorm folding and normalisation lowering are really
exercised (a freshly constructed BatchNorm is the identity in eval mode).

Note on export: the TorchScript exporter (``dynamo=False``) fuses Conv+BatchNorm
itself when exporting with ``training=TrainingMode.EVAL`` (its "eval peephole"
pass).  ``export_onnx`` therefore exports with ``TrainingMode.PRESERVE`` by
default (the model is already in eval mode, so BatchNormalization is still
exported in inference form) and the ONNX graph keeps its BatchNormalization
nodes for the compiler to fold.  Pass ``keep_batchnorm=False`` to get the
exporter's own fusion instead.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ZOO", "build", "make_inputs", "export_onnx", "INPUT_SHAPES"]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _randomize_norms(model: nn.Module, seed: int = 1234) -> None:
    """Give every BatchNorm/LayerNorm seeded, non-trivial parameters/statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                    m.bias.copy_(0.2 * torch.randn(n, generator=g))
                if m.track_running_stats:
                    m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                    m.num_batches_tracked.fill_(100)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def conv_bn_act(cin, cout, k=3, s=1, p=None, groups=1, act: type[nn.Module] | None = nn.ReLU):
    if p is None:
        p = k // 2
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------
# resnet
# --------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_act(3, 16, 3, 1)
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------
# mobilenet v3
# --------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    def __init__(self, c, reduce=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // reduce, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(c // reduce, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * s


class InvertedResidual(nn.Module):
    def __init__(self, cin, cexp, cout, k=3, stride=1, se=True, act=nn.Hardswish):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if cexp != cin:
            layers.append(conv_bn_act(cin, cexp, 1, act=act))
        layers.append(conv_bn_act(cexp, cexp, k, stride, groups=cexp, act=act))
        if se:
            layers.append(SqueezeExcite(cexp))
        layers.append(conv_bn_act(cexp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetV3(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_act(3, 16, 3, 2, act=nn.Hardswish)  # 16x16
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 16, 3, 1, se=True, act=nn.ReLU),  # no expand
            InvertedResidual(16, 48, 24, 3, 2, se=False, act=nn.ReLU),  # 8x8
            InvertedResidual(24, 72, 24, 3, 1, se=True, act=nn.Hardswish),
            InvertedResidual(24, 64, 24, 5, 1, se=True, act=nn.Hardswish),
        )
        self.last = conv_bn_act(24, 64, 1, act=nn.Hardswish)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(64, 32), nn.Hardswish(), nn.Linear(32, num_classes))

    def forward(self, x):
        x = self.last(self.blocks(self.stem(x)))
        return self.head(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------
# densenet
# --------------------------------------------------------------------------


class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size=2):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        y = self.conv1(F.relu(self.norm1(x)))
        y = self.conv2(F.relu(self.norm2(y)))
        return torch.cat([x, y], 1)


class Transition(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)

    def forward(self, x):
        return self.pool(self.conv(F.relu(self.norm(x))))


class DenseNet(nn.Module):
    def __init__(self, num_classes=10, growth=8):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        c = 16
        layers: list[nn.Module] = []
        for _ in range(3):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*layers)  # 40 channels
        self.trans = Transition(c, c // 2)  # 20 channels, 16x16
        c //= 2
        layers = []
        for _ in range(2):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block2 = nn.Sequential(*layers)  # 36 channels
        self.norm = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(self.stem(x))))
        x = F.relu(self.norm(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------
# inception
# --------------------------------------------------------------------------


class InceptionBlock(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, cp):
        super().__init__()
        self.b1 = conv_bn_act(cin, c1, 1)
        self.b2 = nn.Sequential(conv_bn_act(cin, c3r, 1), conv_bn_act(c3r, c3, 3))
        # 5x5 factorised as two 3x3 convs
        self.b3 = nn.Sequential(
            conv_bn_act(cin, c5r, 1), conv_bn_act(c5r, c5, 3), conv_bn_act(c5, c5, 3)
        )
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_act(cin, cp, 1))
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class Inception(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_act(3, 16, 3, 1)
        self.inc1 = InceptionBlock(16, 8, 8, 12, 4, 8, 8)  # 36
        self.pool = nn.MaxPool2d(2, 2)  # 16x16
        self.inc2 = InceptionBlock(36, 16, 12, 16, 8, 8, 8)  # 48
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = self.inc2(self.pool(self.inc1(self.stem(x))))
        return self.fc(torch.flatten(self.gap(x), 1))


# --------------------------------------------------------------------------
# resnext
# --------------------------------------------------------------------------


class ResNeXtBlock(nn.Module):
    def __init__(self, cin, width, cout, stride=1, groups=4):
        super().__init__()
        self.conv1 = conv_bn_act(cin, width, 1)
        self.conv2 = conv_bn_act(width, width, 3, stride, groups=groups)
        self.conv3 = conv_bn_act(width, cout, 1, act=None)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = conv_bn_act(cin, cout, 1, stride, act=None)
        self.relu = nn.ReLU()

    def forward(self, x):
        idt = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + idt)


class ResNeXt(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_act(3, 16, 3, 1)
        self.block1 = ResNeXtBlock(16, 16, 32, 1)  # projection (channel change)
        self.block2 = ResNeXtBlock(32, 32, 64, 2)  # strided projection, 16x16
        self.block3 = ResNeXtBlock(64, 32, 64, 1)  # identity shortcut
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------
# shufflenet v2
# --------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        bc = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                conv_bn_act(cin, cin, 3, stride, groups=cin, act=None),
                conv_bn_act(cin, bc, 1),
            )
            b2_in = cin
        else:
            assert cin == cout
            self.branch1 = None
            b2_in = bc
        self.branch2 = nn.Sequential(
            conv_bn_act(b2_in, bc, 1),
            conv_bn_act(bc, bc, 3, stride, groups=bc, act=None),
            conv_bn_act(bc, bc, 1),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_act(3, 24, 3, 2)  # 16x16
        self.stage = nn.Sequential(
            ShuffleUnit(24, 48, 2),  # 8x8
            ShuffleUnit(48, 48, 1),
            ShuffleUnit(48, 48, 1),
        )
        self.last = conv_bn_act(48, 64, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.last(self.stage(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------
# vit
# --------------------------------------------------------------------------


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # b h n d
        k = self.k(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = torch.softmax(attn, dim=-1)
        out = torch.matmul(attn, v)  # b h n d
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class EncoderLayer(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim)
        )

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, num_classes=10, img=32, patch=8, dim=32, heads=4, depth=2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        num_patches = (img // patch) ** 2
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, num_patches + 1, dim))
        self.layers = nn.Sequential(*[EncoderLayer(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # b n c
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.layers(x))
        return self.head(x[:, 0])


# --------------------------------------------------------------------------
# convnext
# --------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (permute, LN, permute back)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = super().forward(x)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, layer_scale=0.5):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # seeded, non-trivial layer scale (the usual 1e-6 init would hide the block)
        self.gamma = nn.Parameter(layer_scale * (0.5 + torch.rand(dim)))

    def forward(self, x):
        y = self.dwconv(x)
        y = y.permute(0, 2, 3, 1)  # NHWC
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = self.gamma * y
        y = y.permute(0, 3, 1, 2)
        return x + y


class ConvNeXt(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 4, 4), LayerNorm2d(32, eps=1e-6))  # 8x8
        self.stage1 = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.down = nn.Sequential(LayerNorm2d(32, eps=1e-6), nn.Conv2d(32, 64, 2, 2))  # 4x4
        self.stage2 = ConvNeXtBlock(64)
        self.norm = nn.LayerNorm(64, eps=1e-6)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        x = x.mean(dim=(2, 3))
        return self.head(self.norm(x))


# --------------------------------------------------------------------------
# yolo
# --------------------------------------------------------------------------


def yconv(cin, cout, k=1, s=1):
    return conv_bn_act(cin, cout, k, s, act=nn.SiLU)


class YoloBottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1 = yconv(c, c, 3)
        self.cv2 = yconv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, cin, cout, n=1, shortcut=True):
        super().__init__()
        self.c = cout // 2
        self.cv1 = yconv(cin, 2 * self.c, 1)
        self.cv2 = yconv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(YoloBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class YoloHead(nn.Module):
    def __init__(self, cin, num_anchors=3, num_classes=4):
        super().__init__()
        self.conv = yconv(cin, 32, 3)
        self.pred = nn.Conv2d(32, num_anchors * (5 + num_classes), 1)

    def forward(self, x):
        return self.pred(self.conv(x))


class Yolo(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = yconv(3, 16, 3, 2)  # 16x16
        self.down1 = yconv(16, 32, 3, 2)  # 8x8
        self.c2f1 = C2f(32, 32, n=1)  # P3
        self.down2 = yconv(32, 64, 3, 2)  # 4x4
        self.c2f2 = C2f(64, 64, n=2)  # P4
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.c2f3 = C2f(64 + 32, 32, n=1, shortcut=False)
        self.head_p3 = YoloHead(32)
        self.head_p4 = YoloHead(64)

    def forward(self, x):
        p3 = self.c2f1(self.down1(self.stem(x)))
        p4 = self.c2f2(self.down2(p3))
        f3 = self.c2f3(torch.cat([self.up(p4), p3], 1))
        return self.head_p3(f3), self.head_p4(p4)


# --------------------------------------------------------------------------
# unet
# --------------------------------------------------------------------------


def double_conv(cin, cout):
    return nn.Sequential(conv_bn_act(cin, cout, 3), conv_bn_act(cout, cout, 3))


class UNet(nn.Module):
    def __init__(self, cin=3, num_classes=2):
        super().__init__()
        self.enc1 = double_conv(cin, 8)  # 32x32
        self.enc2 = double_conv(8, 16)  # 16x16
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = double_conv(16, 32)  # 8x8
        self.up2 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec2 = double_conv(32, 16)
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec1 = double_conv(16, 8)
        self.out = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.out(d1)


# --------------------------------------------------------------------------
# recurrent
# --------------------------------------------------------------------------


class RNNClassifier(nn.Module):
    def __init__(self, cell: str, num_classes=4):
        super().__init__()
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn_cls(8, 16, num_layers=1, batch_first=True)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1, :])


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------


class MLPDigits(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


class CNNDigits(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(1, 16, 3),
            conv_bn_act(16, 32, 3),
            nn.MaxPool2d(2),  # 4x4
            conv_bn_act(32, 32, 3),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------

IMG = (1, 3, 32, 32)
DIGITS = (1, 1, 8, 8)
SEQ = (1, 12, 8)

# name -> (constructor, input shapes at batch 1, input kind)
_SPECS: dict[str, tuple[Callable[[], nn.Module], tuple[tuple[int, ...], ...], str]] = {
    "resnet": (ResNet, (IMG,), "randn"),
    "mobilenet_v3": (MobileNetV3, (IMG,), "randn"),
    "densenet": (DenseNet, (IMG,), "randn"),
    "inception": (Inception, (IMG,), "randn"),
    "resnext": (ResNeXt, (IMG,), "randn"),
    "shufflenet": (ShuffleNetV2, (IMG,), "randn"),
    "vit": (ViT, (IMG,), "randn"),
    "convnext": (ConvNeXt, (IMG,), "randn"),
    "yolo": (Yolo, (IMG,), "randn"),
    "unet": (UNet, (IMG,), "randn"),
    "lstm": (lambda: RNNClassifier("lstm"), (SEQ,), "randn"),
    "gru": (lambda: RNNClassifier("gru"), (SEQ,), "randn"),
    # digits pixels scaled to [0, 1) like sklearn's load_digits()/16
    "mlp_digits": (MLPDigits, (DIGITS,), "rand"),
    "cnn_digits": (CNNDigits, (DIGITS,), "rand"),
}

INPUT_SHAPES: dict[str, tuple[tuple[int, ...], ...]] = {k: v[1] for k, v in _SPECS.items()}


def make_inputs(name: str, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded example inputs for ``name`` with the given batch size."""
    _, shapes, kind = _SPECS[name]
    g = torch.Generator().manual_seed(seed)
    fn = torch.randn if kind == "randn" else torch.rand
    return tuple(fn((batch, *s[1:]), generator=g) for s in shapes)


def _builder(name: str) -> Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def build_entry() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        ctor = _SPECS[name][0]
        torch.manual_seed(0)
        model = ctor()
        _randomize_norms(model)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model, make_inputs(name)

    build_entry.__name__ = f"build_{name}"
    return build_entry


ZOO: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    name: _builder(name) for name in _SPECS
}


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Model ``name`` in eval mode with seeded weights, plus seeded example inputs."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {sorted(ZOO)}")
    return ZOO[name]()


def _io_names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}{i}" for i in range(n)]


def export_onnx(
    name: str,
    path: str | os.PathLike,
    opset: int = 17,
    dynamic_batch: bool = False,
    *,
    keep_batchnorm: bool = True,
) -> list[str]:
    """Export zoo model ``name`` to ONNX at ``path`` with the TorchScript exporter.

    Inputs are named "x" ("x0", "x1", ... for several), outputs "y" ("y0", ...).
    With ``dynamic_batch`` axis 0 of every input and output is the symbolic
    dimension "batch".  With ``keep_batchnorm`` (default) BatchNormalization
    nodes are kept in the graph instead of being fused into Conv by the
    exporter.  Returns the input names.
    """
    model, inputs = build(name)
    with torch.no_grad():
        out = model(*inputs)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    input_names = _io_names("x", len(inputs))
    output_names = _io_names("y", n_out)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in input_names + output_names}
    training = (
        torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    )
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated (and warns about batch_first
        # RNNs with dynamic batch); the warnings are noise for the tests.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            inputs,
            os.fspath(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            training=training,
            dynamo=False,
        )
    return input_names
