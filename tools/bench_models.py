"""Benchmark architectures for tools/bench.py, in plain torch (no torchvision, no downloads).

ResNet-50, EfficientNet-B0 and ConvNeXt-T re-implement torchvision's resnet50, efficientnet_b0 and convnext_tiny
layer for layer (same shapes). Weights are seeded random (latency does not depend on them); BatchNorm layers get
seeded, non-trivial statistics so the compiled graph really contains the normalisation arithmetic. Two real
models, PaddleOCR's PP-OCRv4 detector and recognizer, come from the rapidocr-onnxruntime wheel.

    MODELS: name -> (constructor, input shape)        WHEEL_MODELS: name -> (file in the wheel, input shape)
    NAMES: both                                       export_onnx(name, path) -> path (opset 17, input "x")
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def _randomize_norms(model: nn.Module, seed: int = 1234) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


# ---------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + idt)


class ResNet18(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------- MobileNetV2


def _cbr(cin, cout, k, s, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_cbr(cin, hidden, 1, 1)]
        layers += [_cbr(hidden, hidden, 3, stride, groups=hidden), _cbr(hidden, cout, 1, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.res else self.conv(x)


class MobileNetV2(nn.Module):
    CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=1000):
        super().__init__()
        layers, cin = [_cbr(3, 32, 3, 2)], 32
        for t, c, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_cbr(cin, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------- BERT-style encoder


class EncoderLayer(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.ln2 = nn.LayerNorm(dim)

    def forward(self, x):
        b, s, d = x.shape
        h = self.heads
        q, k, v = self.qkv(x).reshape(b, s, 3, h, d // h).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, d)
        x = self.ln1(x + self.proj(y))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class BertEncoder(nn.Module):
    """Input: embeddings (batch, seq, hidden); 4 post-LN layers with GELU FFN (4x hidden)."""

    def __init__(self, layers=4, dim=256, heads=4):
        super().__init__()
        self.layers = nn.Sequential(*[EncoderLayer(dim, heads, 4 * dim) for _ in range(layers)])

    def forward(self, x):
        return self.layers(x)


# ---------------------------------------------------------------- YOLO-style detector


def _ycv(cin, cout, k=1, s=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class _Bottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2, self.add = _ycv(c, c, 3), _ycv(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class _C2f(nn.Module):
    def __init__(self, cin, cout, n=1, shortcut=True):
        super().__init__()
        self.c = cout // 2
        self.cv1 = _ycv(cin, 2 * self.c, 1)
        self.cv2 = _ycv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(_Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class _SPPF(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = _ycv(c, c // 2, 1), _ycv(c * 2, c, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class YoloDetector(nn.Module):
    """YOLOv8n-like: C2f backbone to stride 32, SPPF, top-down + bottom-up neck, three 1x1 heads."""

    def __init__(self, num_classes=80, w=(16, 32, 64, 128, 256)):
        super().__init__()
        c1, c2, c3, c4, c5 = w
        self.stem = _ycv(3, c1, 3, 2)
        self.d1, self.s1 = _ycv(c1, c2, 3, 2), _C2f(c2, c2, 1)
        self.d2, self.s2 = _ycv(c2, c3, 3, 2), _C2f(c3, c3, 2)
        self.d3, self.s3 = _ycv(c3, c4, 3, 2), _C2f(c4, c4, 2)
        self.d4, self.s4 = _ycv(c4, c5, 3, 2), _C2f(c5, c5, 1)
        self.sppf = _SPPF(c5)
        self.n1 = _C2f(c5 + c4, c4, 1, False)
        self.n2 = _C2f(c4 + c3, c3, 1, False)
        self.n3d, self.n3 = _ycv(c3, c3, 3, 2), _C2f(c3 + c4, c4, 1, False)
        self.n4d, self.n4 = _ycv(c4, c4, 3, 2), _C2f(c4 + c5, c5, 1, False)
        no = num_classes + 5
        self.heads = nn.ModuleList(nn.Sequential(_ycv(c, c, 3), nn.Conv2d(c, no, 1)) for c in (c3, c4, c5))

    def forward(self, x):
        p3 = self.s2(self.d2(self.s1(self.d1(self.stem(x)))))
        p4 = self.s3(self.d3(p3))
        p5 = self.sppf(self.s4(self.d4(p4)))
        up = lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
        t4 = self.n1(torch.cat([up(p5), p4], 1))
        o3 = self.n2(torch.cat([up(t4), p3], 1))
        o4 = self.n3(torch.cat([self.n3d(o3), t4], 1))
        o5 = self.n4(torch.cat([self.n4d(o4), p5], 1))
        return tuple(h(o) for h, o in zip(self.heads, (o3, o4, o5)))


# ---------------------------------------------------------------- ResNet-50 (torchvision resnet50: v1.5, stride on 3x3)


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + idt)


class ResNet50(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = 4 * width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------- EfficientNet-B0 (torchvision efficientnet_b0)


def _cbs(cin, cout, k, s=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=1e-3)]
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


class MBConv(nn.Module):
    """Expand 1x1 (unless ratio 1), depthwise kxk, squeeze-excite (input channels / 4), project 1x1; residual when
    shapes allow (stochastic depth is off in eval)."""

    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_cbs(cin, hidden, 1)]
        layers += [_cbs(hidden, hidden, k, stride, groups=hidden), SqueezeExcitation(hidden, max(1, cin // 4)),
                   _cbs(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.res else self.block(x)


class EfficientNetB0(nn.Module):
    CFG = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
           (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]   # expand, k, stride, in, out, n

    def __init__(self, num_classes=1000):
        super().__init__()
        layers = [_cbs(3, 32, 3, 2)]
        for expand, k, stride, cin, cout, n in self.CFG:
            for i in range(n):
                layers.append(MBConv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1, expand))
        layers.append(_cbs(320, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------- ConvNeXt-T (torchvision convnext_tiny)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor, computed channels-last (as torchvision's)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim, layer_scale=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


class ConvNeXtTiny(nn.Module):
    def __init__(self, num_classes=1000, dims=(96, 192, 384, 768), depths=(3, 3, 9, 3)):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers += [CNBlock(dim) for _ in range(depth)]
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.norm = LayerNorm2d(dims[-1], eps=1e-6)
        self.classifier = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.norm(F.adaptive_avg_pool2d(self.features(x), 1))
        return self.classifier(torch.flatten(x, 1))


MODELS = {
    "resnet18": (ResNet18, (1, 3, 224, 224)),
    "resnet18_b8": (ResNet18, (8, 3, 224, 224)),
    "mobilenet_v2": (MobileNetV2, (1, 3, 224, 224)),
    "bert_encoder": (BertEncoder, (1, 128, 256)),
    "yolo_320": (YoloDetector, (1, 3, 320, 320)),
    "resnet50": (ResNet50, (1, 3, 224, 224)),
    "efficientnet_b0": (EfficientNetB0, (1, 3, 224, 224)),
    "convnext_tiny": (ConvNeXtTiny, (1, 3, 224, 224)),
}

#: real models shipped in the rapidocr-onnxruntime wheel (tools/setup.sh): file, the shape bound to input "x"
WHEEL_MODELS = {
    "ppocr_det_640": ("ch_PP-OCRv4_det_infer.onnx", (1, 3, 640, 640)),
    "ppocr_rec_48x320": ("ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320)),
}

NAMES = [*MODELS, *WHEEL_MODELS]


def build(name: str):
    ctor, shape = MODELS[name]
    torch.manual_seed(0)
    model = ctor()
    _randomize_norms(model)
    model.eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(shape, generator=g)


def wheel_model_path(file: str) -> str:
    import importlib.util
    spec = importlib.util.find_spec("rapidocr_onnxruntime")     # find only: importing it needs OpenCV
    if spec is None:
        raise FileNotFoundError("rapidocr-onnxruntime is not installed: run tools/setup.sh (it carries the models)")
    return os.path.join(next(iter(spec.submodule_search_locations)), "models", file)


def export_onnx(name: str, path: str | os.PathLike) -> str:
    """Write model `name` as ONNX: a torch model exported, or a wheel model with its input shape bound by
    graphopt.load (dimensions fixed, shape subgraphs folded), so every engine runs this one file."""
    if name in WHEEL_MODELS:
        import onnx
        import graphopt
        file, shape = WHEEL_MODELS[name]
        onnx.save(graphopt.to_onnx(graphopt.load(wheel_model_path(file), input_shapes={"x": shape})), str(path))
        return str(path)
    model, x = build(name)
    with torch.no_grad():
        out = model(x)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    outputs = ["y"] if n_out == 1 else [f"y{i}" for i in range(n_out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=outputs, opset_version=17,
                          dynamo=False, training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)
    return str(path)
