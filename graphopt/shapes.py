"""Shape binding and shape inference (onnx's own inference, with data propagation)."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .errors import BadInput
from .graph import from_onnx, to_onnx


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
    return name, shape


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
