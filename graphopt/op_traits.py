"""One table of facts about ONNX ops, shared by the analyses and passes that need them (channel groups, the
trainable view, insert-adapters, lower-int8, remove-identity) instead of each keeping its own op-name sets.

`traits(op)` gives an op's OpTraits (ops not in the table get the defaults: family "other", no flags);
`ops(...)` the op names whose traits match; `weight_out_axis(node)` the output-channel axis of a node's weight.
An op's facts are written once, in TABLE; adding an op to an analysis starts here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

#: what an op does, as the channel-dependency analysis dispatches on it
FAMILIES = ("conv", "linear", "norm", "unary", "elementwise", "pool", "reduce", "axis_mixer", "other")


@dataclass(frozen=True)
class OpTraits:
    family: str = "other"
    #: input index of the weight of a weighted layer (conv, linear), of its bias, and the weight's output-channel
    #: axis (Gemm: for transB=0; weight_out_axis(node) reads the attribute)
    weight: int | None = None
    bias: int | None = None
    out_axis: int | None = None
    #: inputs that hold learnable parameters when they are float initializers (the trainable view)
    params: tuple[int, ...] = ()
    #: inputs that are never parameters: shapes, axes, indices, statistics, bounds, exponents, scales
    fixed: tuple[int, ...] = ()
    #: unary / elementwise / reduce: f(0, ..., 0) = 0 whatever the attributes
    zero_preserving: bool = False
    #: the output keeps channels at axis 1 and spatial axes after (insert-adapters' channels-first layouts)
    channels_first: bool = False
    #: moves, selects, reshapes or casts values, or makes shapes and constants: no new features
    layout: bool = False
    #: the output's axes cannot be matched to an input's by rank (reductions, ArgMax/ArgMin, TopK, Einsum)
    opaque_layout: bool = False
    #: lower-int8 runs it on the integer tensor between DequantizeLinear and QuantizeLinear of one scale: it only
    #: moves or selects values, so it commutes with the monotone dequantization
    int8_passthrough: bool = False
    #: the op is the identity when its output has its input's static shape (remove-identity)
    noop_if_same_shape: bool = False
    #: x op c == x when every element of the constant second operand c is this value (remove-identity)
    neutral: float | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown op family {self.family!r}")


_t = OpTraits


#: reductions and whether reducing zeros gives 0 (log-sum-exp gives log n, log-sum -inf)
_REDUCES = {"ReduceMean": True, "ReduceSum": True, "ReduceMax": True, "ReduceMin": True, "ReduceProd": True,
            "ReduceL1": True, "ReduceL2": True, "ReduceLogSumExp": False, "ReduceSumSquare": True,
            "ReduceLogSum": False}
#: unary ops and whether f(0) = 0
_UNARY = {
    "Relu": True, "LeakyRelu": True, "Sigmoid": False, "HardSigmoid": False, "HardSwish": True, "Tanh": True,
    "Erf": True, "Gelu": True, "Elu": True, "Selu": True, "Celu": True, "Softplus": False, "Softsign": True,
    "Mish": True, "ThresholdedRelu": True, "Exp": False, "Log": False, "Abs": True, "Neg": True, "Sqrt": True,
    "Reciprocal": False, "Floor": True, "Ceil": True, "Round": True, "Sign": True, "Sin": True, "Cos": False,
}

TABLE: dict[str, OpTraits] = {
    # weighted layers
    "Conv": _t(family="conv", weight=1, bias=2, out_axis=0, params=(1, 2), channels_first=True),
    "ConvTranspose": _t(family="conv", weight=1, bias=2, out_axis=1, params=(1, 2), channels_first=True),
    "Gemm": _t(family="linear", weight=1, bias=2, out_axis=1, params=(0, 1, 2)),
    "MatMul": _t(family="linear", weight=1, out_axis=-1, params=(0, 1)),
    "Einsum": _t(params=tuple(range(8)), opaque_layout=True),
    # normalizations (scale, shift)
    "BatchNormalization": _t(family="norm", params=(1, 2), fixed=(3, 4), channels_first=True),
    "InstanceNormalization": _t(family="norm", params=(1, 2), channels_first=True),
    "GroupNormalization": _t(family="norm", params=(1, 2), channels_first=True),
    "LayerNormalization": _t(family="norm", params=(1, 2)),
    # unary
    **{op: _t(family="unary", zero_preserving=z) for op, z in _UNARY.items()},
    "Clip": _t(family="unary", fixed=(1, 2)),                       # bounds
    # elementwise with broadcasting
    "Add": _t(family="elementwise", zero_preserving=True, neutral=0.0),
    "Sub": _t(family="elementwise", zero_preserving=True, neutral=0.0),
    "Mul": _t(family="elementwise", zero_preserving=True, neutral=1.0),
    "Div": _t(family="elementwise", neutral=1.0),
    "Pow": _t(family="elementwise", fixed=(1,)),
    "Max": _t(family="elementwise", zero_preserving=True),
    "Min": _t(family="elementwise", zero_preserving=True),
    "Sum": _t(family="elementwise", zero_preserving=True),
    "Mean": _t(family="elementwise", zero_preserving=True),
    "PRelu": _t(family="elementwise", zero_preserving=True, params=(1,)),
    "Where": _t(family="elementwise", fixed=(0,)),
    # pooling
    "MaxPool": _t(family="pool", channels_first=True, int8_passthrough=True),
    "AveragePool": _t(family="pool", channels_first=True),
    "LpPool": _t(family="pool", channels_first=True),
    "GlobalAveragePool": _t(family="pool", channels_first=True),
    "GlobalMaxPool": _t(family="pool", channels_first=True),
    "GlobalLpPool": _t(family="pool"),
    # reductions (input 1: axes)
    **{op: _t(family="reduce", fixed=(1,), opaque_layout=True, zero_preserving=z) for op, z in _REDUCES.items()},
    # ops that mix values along one axis
    "Softmax": _t(family="axis_mixer"),
    "LogSoftmax": _t(family="axis_mixer"),
    "Hardmax": _t(family="axis_mixer"),
    "LpNormalization": _t(family="axis_mixer"),
    "CumSum": _t(family="axis_mixer", fixed=(1,)),
    "ArgMax": _t(family="axis_mixer", opaque_layout=True),
    "ArgMin": _t(family="axis_mixer", opaque_layout=True),
    "TopK": _t(fixed=(1,), opaque_layout=True),
    # resampling
    "Resize": _t(fixed=(1, 2, 3), channels_first=True, noop_if_same_shape=True),
    "Upsample": _t(fixed=(1,), channels_first=True),
    "DepthToSpace": _t(channels_first=True),
    "SpaceToDepth": _t(channels_first=True),
    # layout: moving, selecting, reshaping
    "Transpose": _t(layout=True, int8_passthrough=True),
    "Reshape": _t(layout=True, fixed=(1,), int8_passthrough=True, noop_if_same_shape=True),
    "Flatten": _t(layout=True, int8_passthrough=True, noop_if_same_shape=True),
    "Squeeze": _t(layout=True, fixed=(1,), int8_passthrough=True, noop_if_same_shape=True),
    "Unsqueeze": _t(layout=True, fixed=(1,), int8_passthrough=True, noop_if_same_shape=True),
    "Expand": _t(layout=True, fixed=(1,), noop_if_same_shape=True),
    "Tile": _t(layout=True, fixed=(1,), noop_if_same_shape=True),
    "Slice": _t(layout=True, fixed=(1, 2, 3, 4)),
    "Split": _t(layout=True, fixed=(1,)),
    "Gather": _t(layout=True, fixed=(1,)),
    "GatherElements": _t(layout=True, fixed=(1,)),
    "Pad": _t(layout=True, fixed=(1, 2, 3)),
    "Shape": _t(layout=True, fixed=(0,)),
    "Size": _t(layout=True, fixed=(0,)),
    "Constant": _t(layout=True),
    "ConstantOfShape": _t(layout=True, fixed=(0,)),
    "Range": _t(layout=True, fixed=(0, 1, 2)),
    "Identity": _t(family="unary", zero_preserving=True, layout=True),
    "Dropout": _t(family="unary", zero_preserving=True, layout=True),
    "Cast": _t(family="unary", zero_preserving=True, layout=True),
    # quantization and indices
    "QuantizeLinear": _t(fixed=(1, 2)),
    "DequantizeLinear": _t(fixed=(1, 2)),
    "OneHot": _t(fixed=(1, 2)),
}

_DEFAULT = OpTraits()


def traits(op: str) -> OpTraits:
    """The facts about `op` (the defaults for an op the table does not list)."""
    return TABLE.get(op, _DEFAULT)


def ops(**where) -> frozenset[str]:
    """The ops whose traits have every given value, e.g. ops(family="pool"), ops(layout=True)."""
    names = {f.name for f in fields(OpTraits)}
    unknown = set(where) - names
    if unknown:
        raise TypeError(f"no op trait {', '.join(sorted(unknown))}")
    return frozenset(op for op, t in TABLE.items() if all(getattr(t, k) == v for k, v in where.items()))


def weight_out_axis(node) -> int | None:
    """The output-channel axis of `node`'s weight input (None for ops without a weight); Gemm reads transB."""
    t = traits(node.op)
    if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
        return 0
    return t.out_axis
