"""Shape binding and shape inference (onnx's own inference, with data propagation)."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .errors import BadInput, printable
from .graph import from_onnx, np_dtype, to_onnx
from .limits import MAX_INT64, human_bytes, max_tensor_bytes, nbytes


def parse_shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    """'x=1,3,224,224' -> ('x', (1, 3, 224, 224)). Raises BadInput on anything else."""
    if "=" not in text:
        raise BadInput(f"--input-shape '{text}' is malformed; write NAME=D0,D1,... (for example x=1,3,224,224)")
    name, _, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip() != "")
    except ValueError:
        raise BadInput(f"--input-shape '{text}' has a non-integer dimension; write NAME=D0,D1,... with positive integers") from None
    if not name or not shape or any(d <= 0 for d in shape):
        raise BadInput(f"--input-shape '{text}' is malformed; write NAME=D0,D1,... with positive integers")
    if nbytes(shape, 1) > MAX_INT64:
        raise BadInput(f"--input-shape '{text}' has more elements than a 64-bit integer can count; "
                       f"give the input's real shape")
    return name, shape


def tensor_bytes(t: gs.Tensor) -> int | None:
    """Bytes of a tensor whose shape is static (dtypes numpy cannot name count 8 bytes), else None."""
    shape = t.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    try:
        itemsize = np_dtype(t).itemsize
    except (TypeError, KeyError, ValueError):
        itemsize = 8
    return nbytes(shape, itemsize)


def check_tensor_sizes(graph: gs.Graph, where: str, limit: int | None = None) -> None:
    """Refuse a graph whose largest tensor of known shape (inputs, weights, inferred intermediates) would need more
    than limit bytes (default limits.max_tensor_bytes()): checked before anything runs it or folds it."""
    limit = max_tensor_bytes() if limit is None else limit
    sizes = {t.name: tensor_bytes(t) for t in graph.tensors().values()}
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if not sizes or max(sizes.values()) <= limit:
        return
    worst = graph.tensors()[max(sizes, key=sizes.get)]
    worst_bytes = sizes[worst.name]
    producer = worst.inputs[0] if worst.inputs else None
    what = (f"output '{printable(worst.name)}' of node '{printable(producer.name)}' ({producer.op})" if producer
            else f"input '{printable(worst.name)}'" if worst in graph.inputs else f"weight '{printable(worst.name)}'")
    try:
        dtype = np_dtype(worst).name
    except (TypeError, KeyError, ValueError):
        dtype = "?"
    raise BadInput(f"{where}: {what} would be {list(worst.shape)} {dtype} ({human_bytes(worst_bytes)}), more than "
                   f"the {human_bytes(limit)} one tensor may take (GRAPHOPT_MAX_TENSOR_BYTES, by default half the "
                   f"available memory); bind smaller --input-shape values or fix the model")


def _dims(vi: onnx.ValueInfoProto):
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def _static(d) -> bool:
    return isinstance(d, int) and d >= 0          # 0 is a real (empty) dimension, not a dynamic one


def bind_input_shapes(model: onnx.ModelProto, input_shapes: dict | None, require_static: bool, where: str) -> None:
    """Write static dims into the model's graph inputs in place. Names and ranks are checked."""
    input_shapes = dict(input_shapes or {})
    inits = {i.name for i in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in inits]
    names = [i.name for i in real_inputs]
    for name in input_shapes:
        if name not in names:
            raise BadInput(f"{where}: --input-shape names '{name}', which is not a graph input; inputs are: {', '.join(names)}")
    for vi in real_inputs:
        dims = _dims(vi)
        if vi.name in input_shapes:
            want = tuple(int(d) for d in input_shapes[vi.name])
            if any(d < 0 for d in want) or nbytes(want, 1) > MAX_INT64:
                raise BadInput(f"{where}: input shape {vi.name}={','.join(map(str, want))} is negative or has more "
                               f"elements than a 64-bit integer can count")
            if dims is not None and len(dims) != len(want):
                raise BadInput(f"{where}: --input-shape {vi.name} has rank {len(want)} but the input has rank {len(dims)} "
                               f"({','.join(str(d) for d in dims)})")
            if dims is not None:
                for i, (have, new) in enumerate(zip(dims, want)):
                    if _static(have) and have != new:
                        raise BadInput(f"{where}: --input-shape {vi.name}: dimension {i} is fixed to {have} in the model, not {new}")
            shp = vi.type.tensor_type.shape
            shp.ClearField("dim")
            for d in want:
                shp.dim.add().dim_value = d
        elif require_static:
            if dims is None or not all(_static(d) for d in dims):
                shown = ",".join(str(d) for d in dims) if dims is not None else "unknown rank"
                example = ",".join(str(d) if _static(d) else "N" for d in (dims or ["N"]))
                raise BadInput(f"{where}: input '{vi.name}' has dynamic shape [{shown}]; bind it with "
                               f"--input-shape {vi.name}={example} (Python: input_shapes={{'{vi.name}': (...)}})")
    if input_shapes:
        # Stale symbolic shapes elsewhere would fight the new binding: let inference recompute them.
        del model.graph.value_info[:]
        for out in model.graph.output:
            if out.type.tensor_type.HasField("shape"):
                out.type.tensor_type.ClearField("shape")


def infer_model(model: onnx.ModelProto, where: str = "model") -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # strict mode rejects some valid models (e.g. onnx's own MVN function body)
        try:
            return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False, data_prop=True)
        except Exception:
            pass
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{where}: shape inference failed: {first}") from e


def infer(graph: gs.Graph, where: str = "graph") -> gs.Graph:
    """Return a copy of the graph with every tensor's shape and dtype inferred."""
    model = to_onnx(graph)
    del model.graph.value_info[:]
    return from_onnx(infer_model(model, where))


def parse_value_arg(text: str) -> tuple[str, list]:
    """'sr=16000' -> ('sr', [16000]); 'mask=1,1,0' -> ('mask', [1, 1, 0]). Raises BadInput on anything else."""
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise BadInput(f"--input-value '{printable(text)}' is malformed; write NAME=V or NAME=V0,V1,... (for "
                       f"example sr=16000)")
    out = []
    for v in values.split(","):
        try:
            out.append(int(v) if v.strip().lstrip("+-").isdigit() else float(v))
        except ValueError:
            raise BadInput(f"--input-value '{printable(text)}': '{printable(v)}' is not a number") from None
    return name.strip(), out


def bind_input_values(model: onnx.ModelProto, values: dict | None, where: str) -> None:
    """Turn the named graph inputs into constants (initializers) with the given values, in place: a model whose
    control flow or shapes depend on an input's value (a VAD's sample rate) then folds like a static one. Each value
    must fit the input's declared shape (a scalar for a 0-d or [1] input, else exactly that many elements)."""
    import numpy as np
    from onnx import numpy_helper
    if not values:
        return
    inputs = {vi.name: vi for vi in model.graph.input}
    inits = {t.name for t in model.graph.initializer}
    for name, value in values.items():
        vi = inputs.get(name)
        if vi is None or name in inits:
            raise BadInput(f"{where}: --input-value names '{printable(name)}', which is not a graph input; inputs "
                           f"are: {', '.join(n for n in inputs if n not in inits)}")
        elem = vi.type.tensor_type.elem_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        except Exception:  # noqa: BLE001 - an input that is not a tensor
            raise BadInput(f"{where}: input '{printable(name)}' is not a tensor; it cannot be given a value") from None
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        arr = np.asarray(value, dtype=dtype).reshape(-1)
        if any(d is None for d in dims):
            shape = [len(arr)] if dims else []
            if len(dims) > 1 and len(arr) == 1:
                shape = [1] * len(dims)
        else:
            shape = dims
        if int(np.prod(shape, dtype=np.int64)) != arr.size:
            raise BadInput(f"{where}: --input-value {printable(name)} gives {arr.size} value(s) for an input of "
                           f"shape {dims}")
        model.graph.initializer.append(numpy_helper.from_array(arr.reshape(shape), name))
        keep = [vi for vi in model.graph.input if vi.name != name]
        del model.graph.input[:]
        model.graph.input.extend(keep)
