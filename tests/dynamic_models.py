"""Models whose exported graphs compute shapes at run time, as exported detectors and OCR networks do:
Reshape targets from Shape, Resize to another tensor's size, Range-built grids, dynamic batch/width/height."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class CRNN(nn.Module):
    """OCR-style: conv features, (b, c, h, w) -> (w, b, c*h) sequence, bidirectional LSTM, per-column classes."""

    def __init__(self, classes=12):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d((2, 1)))
        self.rnn = nn.LSTM(16 * 4, 16, bidirectional=True)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        f = self.conv(x)
        b, c, h, w = f.shape
        seq = f.permute(3, 0, 1, 2).reshape(w, b, c * h)
        out, _ = self.rnn(seq)
        return self.fc(out).log_softmax(-1)


class Detector(nn.Module):
    """YOLO/FPN-style: upsample to the skip's size (Resize from Shape), decode with a Range-built grid,
    flatten anchors with reshape(b, -1, k) computed from the input's dynamic size."""

    def __init__(self, classes=3):
        super().__init__()
        self.k = 5 + classes
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.SiLU())
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.SiLU())
        self.lat = nn.Conv2d(32, 16, 1)
        self.head = nn.Conv2d(16, self.k, 1)

    def forward(self, x):
        s = self.stem(x)
        d = self.down(s)
        up = F.interpolate(self.lat(d), size=s.shape[-2:], mode="nearest")
        p = self.head(s + up)                                    # b, k, h, w
        b, _, h, w = p.shape
        gy = torch.arange(h, dtype=torch.float32).view(1, h, 1).expand(1, h, w)
        gx = torch.arange(w, dtype=torch.float32).view(1, 1, w).expand(1, h, w)
        xy = (p[:, :2].sigmoid() + torch.stack([gx, gy], 1)) * (x.shape[-1] / w)
        rest = p[:, 2:].sigmoid()
        return torch.cat([xy, rest], 1).reshape(b, self.k, -1).transpose(1, 2)


def export(model, path, example, dynamic_axes):
    model.eval()
    torch.onnx.export(model, (example,), str(path), input_names=["x"], output_names=["y"], dynamo=False, opset_version=17,
                      dynamic_axes=dynamic_axes)
    return path
