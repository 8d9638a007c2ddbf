"""What one integer kernel computes: the conv / dense shapes and the epilogue after the s32 accumulation."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..conv_geometry import ConvOutputSize


@dataclass
class Epilogue:
    """What follows the s32 accumulation. mode 'q': requantize to out_dtype; 'f': fp32 out; 'qadd': requantize
    (s1, z1), add the dequantized residual (sr, zr), requantize (s2, z2). Activation bounds are already in the
    quantized domain for 'q'/'qadd' (lo, hi) and in fp32 for 'f' (flo, fhi)."""
    mode: str = "q"
    out_dtype: str = "uint8"
    zy: int = 0
    lo: float = 0.0
    hi: float = 255.0
    flo: float | None = None
    fhi: float | None = None
    # residual (mode qadd)
    s1: float = 1.0
    z1: int = 0
    lo1: float = 0.0
    hi1: float = 255.0
    res_dtype: str = "uint8"
    sr: float = 1.0
    zr: int = 0
    s2: float = 1.0
    act2_lo: float | None = None   # fp32 bounds of the activation after the add (relu: 0)
    act2_hi: float | None = None

    def key(self):
        return tuple(sorted(self.__dict__.items()))


@dataclass
class ConvSpec(ConvOutputSize):
    N: int
    H: int
    W: int
    C: int                 # logical input channels
    OC: int                # logical output channels
    KH: int
    KW: int
    stride: tuple = (1, 1)
    pad: tuple = (0, 0, 0, 0)   # top, left, bottom, right
    dilation: tuple = (1, 1)
    in_layout: str = "NCHW"     # NCHW (logical) or NHWC (physical, channels Cphys)
    Cphys: int = 0              # channels of the NHWC input (>= C); 0: C
    in_dtype: str = "uint8"
    zx: int = 0
    epi: Epilogue = field(default_factory=Epilogue)
    amx: bool = False           # the target has AMX: the AMX kernel where it takes the shape (amx_kernels.conv_fits)

    @property
    def C4(self):
        """Channels the kernel reduces over: the logical input channels rounded up to 4. An NHWC input from another
        kernel has more (Cphys, padded to 16): the reduction reads past them instead of multiplying zero weights
        (MobileNetV2's 24-channel inputs: 6 channel quads instead of 8)."""
        return -(-self.C // 4) * 4

    @property
    def OCp(self):
        return -(-self.OC // 16) * 16


@dataclass
class DenseSpec:
    M: int
    K: int                 # logical reduction length
    N: int                 # logical output features
    Kphys: int = 0         # columns of the input (>= K; padded activations from another int8 kernel)
    in_dtype: str = "uint8"
    zx: int = 0
    epi: Epilogue = field(default_factory=Epilogue)
    amx: bool = False           # the target has AMX: the AMX kernel where it takes the shape (amx_kernels.dense_fits)

    @property
    def K4(self):
        return -(-max(self.K, self.Kphys) // 4) * 4

    @property
    def Np(self):
        return -(-self.N // 16) * 16


@dataclass(frozen=True)
class BatchMatmulSpec:
    """quantize(dequantize(A, sa, za) @ dequantize(B, sb, zb), sy, zy) of two quantized activations A [*batch, M, K],
    B [*batch, K, N] (N a multiple of 16); mult = sa * sb / sy."""
    batch: tuple
    M: int
    K: int
    N: int
    a_dtype: str
    za: int
    b_dtype: str
    zb: int
    mult: float
    zy: int
    out_dtype: str
