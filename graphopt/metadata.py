"""Graph metadata that travels with the graph: what a pass records for later passes and targets. Read and write it
through this module only.

Where: the graph's doc_string, one line per kind, `graphopt.<kind>: <JSON>`; other doc_string lines (an exporter's
notes) are kept as they are. The graph doc_string is the one place that onnx-graphsurgeon's import and export (and
so graph.copy and every pass that goes through ModelProto) and ONNX save/load all keep: node metadata_props, model
metadata_props and custom node attributes are dropped or refused on the way. Entries are keyed by node name, which
loading makes unique (graph.name_nodes).

Kinds:
  sparse_blocks   {node: [rows, cols]}  sparsify's block shape over the weight seen as [out, in]; the cuda target
                                        packs those weights into BSR with that block
  sparse_nm       {node: [n, m]}        sparsify's N:M pattern (n kept of every m consecutive inputs)
  qat_biases      {float initializer: {"node", "output", "int", "scale", "zero_point", "attrs"}}
                                        graphopt.qat: an int32 bias trained as a float initializer, with the
                                        DequantizeLinear it stands for (names, scale and zero point as
                                        [name, dtype, shape, values]) so that export can write it back;
                                        optionally "x_scale", "w_scale" ([name, values]: the scales of the op's
                                        input and weight, to recompute the bias scale when they were learned)
  quantized       {"scheme", "activations"} the quantize pass's scheme (int8, weight_int8, weight_int4) and, for
                                        int8, the activation type (u8, s8; null otherwise)
  pruned_widths   {layer: width}        prune-channels: each layer's width before the first prune-channels run
                                        (layer = channel_groups.Layer.name), so that max_layer_ratio caps what a
                                        layer loses in all of a compress run's prune steps together, not per step
  adapters        {node: {"student", "teacher", "part"}}
                                        insert-adapters' FitNets adapter nodes: the student and teacher tensors the
                                        adapter pairs and the node's part (conv, matmul, bias, identity)

Every reader accepts a gs.Graph, an onnx.GraphProto or an onnx.ModelProto; a malformed entry is a BadInput naming
the node. A new kind gets one typed reader and writer here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import onnx

from .errors import BadInput, printable

PREFIX = "graphopt."
BlockShape = tuple[int, int]


def _holder(obj):
    """The object whose doc_string holds the metadata: a gs.Graph or onnx.GraphProto; a ModelProto's graph."""
    return obj.graph if isinstance(obj, onnx.ModelProto) else obj


def _read(obj, kind: str):
    """The JSON value of `graphopt.<kind>:`, or None."""
    head = f"{PREFIX}{kind}:"
    for line in (_holder(obj).doc_string or "").splitlines():
        if line.strip().startswith(head):
            text = line.split(":", 1)[1]
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise BadInput(f"graph doc_string: {PREFIX}{kind} is not JSON ({e})") from None
    return None


def _write(obj, kind: str, value) -> None:
    """Replace the `graphopt.<kind>:` line (remove it when value is empty)."""
    h = _holder(obj)
    head = f"{PREFIX}{kind}:"
    lines = [ln for ln in (h.doc_string or "").splitlines() if not ln.strip().startswith(head)]
    if value:
        lines.append(f"{head} {json.dumps(value, sort_keys=True)}")
    h.doc_string = "\n".join(lines)


def _pairs(obj, kind: str, what: str) -> dict[str, tuple[int, int]]:
    table = _read(obj, kind)
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise BadInput(f"graph doc_string: {PREFIX}{kind} must map node names to {what}")
    out = {}
    for node, v in table.items():
        if not (isinstance(v, list) and len(v) == 2 and all(type(x) is int and x >= 1 for x in v)):
            raise BadInput(f"graph doc_string: {PREFIX}{kind}, node '{printable(node)}': bad {what} "
                           f"{printable(repr(v))}; write [rows, cols] of positive integers")
        out[node] = (v[0], v[1])
    return out


def _set_pair(obj, kind: str, other: str, node: str, pair) -> None:
    """Record pair for node under kind, and drop the node from the other sparse kind (one pattern per node)."""
    table = {k: list(v) for k, v in _pairs(obj, kind, "pair").items()}
    table[node] = [int(pair[0]), int(pair[1])]
    _write(obj, kind, table)
    rest = {k: list(v) for k, v in _pairs(obj, other, "pair").items() if k != node}
    _write(obj, other, rest)


def block_shape(value) -> BlockShape:
    """(rows, cols) from a pair of positive integers (tuple or list, as JSON gives it back). Raises ValueError."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(type(v) is int and v >= 1 for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{value!r} is not a (rows, cols) block shape")


def sparse_blocks(obj) -> dict[str, BlockShape]:
    """{node name: (rows, cols)} block shapes sparsify recorded."""
    return _pairs(obj, "sparse_blocks", "block shape")


def set_sparse_block(obj, node: str, block: BlockShape) -> None:
    _set_pair(obj, "sparse_blocks", "sparse_nm", node, block_shape(tuple(block)))


def sparse_nm(obj) -> dict[str, tuple[int, int]]:
    """{node name: (n, m)} N:M patterns sparsify recorded."""
    return _pairs(obj, "sparse_nm", "N:M pattern")


def set_sparse_nm(obj, node: str, nm: tuple[int, int]) -> None:
    _set_pair(obj, "sparse_nm", "sparse_blocks", node, nm)


_QAT_BIAS_KEYS = {"node", "output", "int", "scale", "zero_point", "attrs"}
_QAT_BIAS_OPERANDS = {"x_scale", "w_scale"}       # both or neither: the scales of the op's input and weight


def qat_biases(obj) -> dict[str, dict]:
    """{float initializer name: record} of the int32 biases graphopt.qat trains as floats (see Kinds)."""
    table = _read(obj, "qat_biases")
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise BadInput(f"graph doc_string: {PREFIX}qat_biases must map initializer names to records")
    for name, rec in table.items():
        if not isinstance(rec, dict) or set(rec) not in (_QAT_BIAS_KEYS, _QAT_BIAS_KEYS | _QAT_BIAS_OPERANDS):
            raise BadInput(f"graph doc_string: {PREFIX}qat_biases, initializer '{printable(name)}': the record "
                           f"needs exactly the keys {', '.join(sorted(_QAT_BIAS_KEYS))} (and optionally "
                           f"{', '.join(sorted(_QAT_BIAS_OPERANDS))})")
    return table


def set_qat_biases(obj, table: dict[str, dict]) -> None:
    """Replace the qat_biases record (removed when empty)."""
    _write(obj, "qat_biases", table)


QUANT_SCHEMES = ("int8", "weight_int8", "weight_int4")
QUANT_ACTIVATIONS = ("u8", "s8")


@dataclass(frozen=True)
class Quantization:
    """What the quantize pass did: `scheme` (QUANT_SCHEMES) and, for int8, the activation type (QUANT_ACTIVATIONS)."""
    scheme: str
    activations: str | None = None

    def __post_init__(self):
        int8 = self.scheme == "int8"
        if self.scheme not in QUANT_SCHEMES or \
                not (self.activations in QUANT_ACTIVATIONS if int8 else self.activations is None):
            raise ValueError(f"{self!r} is not a quantization record: scheme one of {', '.join(QUANT_SCHEMES)}; "
                             f"activations {' or '.join(QUANT_ACTIVATIONS)} for int8 only")

    @property
    def label(self) -> str:
        """'int8,u8', 'weight_int4', ...: the scheme as reports print it."""
        return f"{self.scheme},{self.activations}" if self.activations else self.scheme


def quantization(obj) -> Quantization | None:
    """The quantize pass's record, or None when the graph was not quantized by it."""
    rec = _read(obj, "quantized")
    if rec is None:
        return None
    if not (isinstance(rec, dict) and set(rec) == {"scheme", "activations"}):
        raise BadInput(f"graph doc_string: {PREFIX}quantized must be an object with the keys scheme and activations")
    try:
        return Quantization(rec["scheme"], rec["activations"])
    except ValueError:
        raise BadInput(f"graph doc_string: {PREFIX}quantized: bad record {printable(repr(rec))}; scheme one of "
                       f"{', '.join(QUANT_SCHEMES)}, activations {' or '.join(QUANT_ACTIVATIONS)} for int8 "
                       f"(else null)") from None


def set_quantization(obj, record: Quantization) -> None:
    _write(obj, "quantized", {"scheme": record.scheme, "activations": record.activations})


ADAPTER_PARTS = ("conv", "matmul", "bias", "identity")


@dataclass(frozen=True)
class AdapterTag:
    """An adapter node's pairing: it maps student tensor `student` towards teacher tensor `teacher`; `part` is the
    node's role in the adapter (ADAPTER_PARTS)."""
    student: str
    teacher: str
    part: str


def adapter_tags(obj) -> dict[str, AdapterTag]:
    """{node name: AdapterTag} of the adapter nodes insert-adapters recorded."""
    table = _read(obj, "adapters")
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise BadInput(f"graph doc_string: {PREFIX}adapters must map node names to adapter records")
    out = {}
    for node, rec in table.items():
        if not (isinstance(rec, dict) and set(rec) == {"student", "teacher", "part"}
                and all(isinstance(v, str) for v in rec.values()) and rec["part"] in ADAPTER_PARTS):
            raise BadInput(f"graph doc_string: {PREFIX}adapters, node '{printable(node)}': bad record "
                           f"{printable(repr(rec))}; write student, teacher (tensor names) and part "
                           f"({', '.join(ADAPTER_PARTS)})")
        out[node] = AdapterTag(rec["student"], rec["teacher"], rec["part"])
    return out


def set_adapter_tags(obj, tags: dict[str, AdapterTag]) -> None:
    """Replace the adapters record (removed when empty)."""
    _write(obj, "adapters", {node: {"student": t.student, "teacher": t.teacher, "part": t.part}
                             for node, t in tags.items()})


def pruned_widths(obj) -> dict[str, int]:
    """{layer name: width before the first prune-channels} (see Kinds); {} when the graph was never pruned."""
    table = _read(obj, "pruned_widths")
    if table is None:
        return {}
    if not isinstance(table, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                              for v in table.values()):
        raise BadInput(f"graph doc_string: {PREFIX}pruned_widths must map layer names to positive widths")
    return table


def set_pruned_widths(obj, table: dict[str, int]) -> None:
    """Replace the pruned_widths record (removed when empty)."""
    _write(obj, "pruned_widths", table)
