"""The output size of a 2-D convolution, one definition for the kernel specs (bf16, int8)."""
from __future__ import annotations


class ConvOutputSize:
    """Mixin of a conv spec dataclass with fields H, W, KH, KW, stride, pad (top, left, bottom, right) and
    dilation: its output rows OH and columns OW."""

    @property
    def OH(self) -> int:
        return (self.H + self.pad[0] + self.pad[2] - self.dilation[0] * (self.KH - 1) - 1) // self.stride[0] + 1

    @property
    def OW(self) -> int:
        return (self.W + self.pad[1] + self.pad[3] - self.dilation[1] * (self.KW - 1) - 1) // self.stride[1] + 1
