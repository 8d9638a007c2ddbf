"""Loading: ONNX files (checked, external data confined to the model's folder, old opsets upgraded,
dynamic dims bound, shape subgraphs folded) and PyTorch modules (through torch.export)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, numpy_helper

from .errors import BadInput, UnsupportedModel, printable, reraise_if_strict
from .control_flow import refuse_unshaped_loops
from .folding import fold
from .graph import from_onnx, name_nodes
from .limits import MAX_PROTOBUF_BYTES, human_bytes, max_tensor_bytes, nbytes
from .shapes import bind_input_shapes, bind_input_values, check_tensor_sizes, infer_model

MIN_OPSET = 11          # older models are upgraded to UPGRADE_OPSET with onnx's version converter
UPGRADE_OPSET = 13
STANDARD_DOMAINS = ("", "ai.onnx")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and sanity-check an ONNX file, loading external data only from inside the model's folder."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir():
        raise BadInput(f"{path}: is a folder, not an ONNX file")
    size = path.stat().st_size
    if size == 0:
        raise BadInput(f"{path}: file is empty")
    if size > MAX_PROTOBUF_BYTES:
        raise BadInput(f"{path}: is {human_bytes(size)}, more than an ONNX file can hold (protobuf stops at 2 GB); "
                       f"a model this large keeps its weights in external data files "
                       f"(onnx.save_model(model, path, save_as_external_data=True))")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:
        raise BadInput(f"{path}: not a readable ONNX model ({_first_line(e)}); is the file truncated or not ONNX?") from None
    if not model.HasField("graph") or len(model.graph.output) == 0 or not model.opset_import:
        raise BadInput(f"{path}: not an ONNX model (no graph, outputs or opset); is the file truncated or not ONNX?")
    _load_external_data(model, path)
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    base = path.resolve().parent
    tensors = [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]
    limit = max_tensor_bytes()
    for t in tensors:
        loc, offset, length = _external_data_entry(t, path)
        target = (base / loc).resolve()
        if os.path.isabs(loc) or (target != base and base not in target.parents):
            raise BadInput(f"{path}: tensor '{printable(t.name)}' stores its data at '{printable(loc)}', outside the "
                           f"model's folder; external data must live next to the model")
        if not target.is_file():
            raise BadInput(f"{path}: tensor '{printable(t.name)}' needs external data file '{printable(loc)}', "
                           f"which does not exist")
        size = target.stat().st_size
        if offset > size or (length and offset + length > size):
            raise BadInput(f"{path}: external data for tensor '{printable(t.name)}' in '{printable(loc)}' is truncated")
        if (length or size - offset) > limit:
            raise BadInput(f"{path}: external data for tensor '{printable(t.name)}' is "
                           f"{human_bytes(length or size - offset)}, more than the {human_bytes(limit)} one tensor "
                           f"may take (GRAPHOPT_MAX_TENSOR_BYTES)")
    if tensors:
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as e:
            raise BadInput(f"{path}: cannot load external data ({_first_line(e)})") from None


def _external_data_entry(t: onnx.TensorProto, path: Path) -> tuple[str, int, int]:
    """(location, offset, length; 0: to the end) of a tensor's external data, each checked."""
    entries = {e.key: e.value for e in t.external_data}
    loc = entries.get("location", "")
    if not loc or not loc.isprintable():
        raise BadInput(f"{path}: tensor '{printable(t.name)}' has an invalid external data location "
                       f"'{printable(loc)}' (empty, or with control characters)")
    numbers = []
    for key in ("offset", "length"):
        text = entries.get(key, "") or "0"
        if not (text.isascii() and text.isdigit()):
            raise BadInput(f"{path}: tensor '{printable(t.name)}' has external data {key} '{printable(text)}'; "
                           f"it must be a non-negative integer")
        numbers.append(int(text))
    return loc, numbers[0], numbers[1]


def _check_domains(model: onnx.ModelProto, where: str) -> None:
    bad = [(n.name or "?", n.op_type, n.domain) for n in model.graph.node if n.domain not in STANDARD_DOMAINS]
    if bad:
        listed = ", ".join(f"'{printable(name)}' ({printable(op)}, domain '{printable(dom)}')"
                           for name, op, dom in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise UnsupportedModel(f"{where}: {len(bad)} node(s) use an operator domain graphopt does not know: {listed}{more}; "
                               f"export the model with standard ONNX ops only")


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS:
            return imp.version
    return 0


def _one_line(e: Exception, limit: int = 400) -> str:
    """The whole message of e on one line (onnx.checker puts the node's name on its second line)."""
    return printable(" ".join(str(e).split()) or type(e).__name__, limit)


def _densify_sparse_initializers(model: onnx.ModelProto, where: str) -> None:
    """Sparse initializers become dense ones (onnx-graphsurgeon, the passes and TVM read dense initializers
    only), each at most limits.max_tensor_bytes() once dense."""
    graph, limit = model.graph, max_tensor_bytes()
    for sp in graph.sparse_initializer:
        name, dims = sp.values.name, tuple(int(d) for d in sp.dims)
        try:
            values = numpy_helper.to_array(sp.values).reshape(-1)
            indices = numpy_helper.to_array(sp.indices).astype(np.int64)
            size = nbytes(dims, values.dtype.itemsize)
            if size > limit:
                raise BadInput(f"{where}: sparse initializer '{printable(name)}' would be {list(dims)} "
                               f"({human_bytes(size)}) once dense, more than the {human_bytes(limit)} one tensor may "
                               f"take (GRAPHOPT_MAX_TENSOR_BYTES)")
            flat = indices.reshape(-1) if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), dims)
            if len(flat) != len(values) or (len(flat) and (flat.min() < 0 or flat.max() >= math.prod(dims))):
                raise ValueError("indices do not match the values or lie outside the shape")
            dense = np.zeros(math.prod(dims), dtype=values.dtype)
            dense[flat] = values
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - malformed values, indices or dims
            raise BadInput(f"{where}: sparse initializer '{printable(name)}' is malformed "
                           f"({_one_line(e, 160)})") from None
        graph.initializer.append(numpy_helper.from_array(dense.reshape(dims), name))
    del graph.sparse_initializer[:]


def _check_topology(graph: onnx.GraphProto, where: str) -> None:
    """Refuse, naming the node and op, a node reading a tensor that nothing before it produces: a cycle, nodes out
    of order, or a missing initializer (onnx.checker's message for these ends before the node's name)."""
    known = {"", *(i.name for i in graph.input), *(i.name for i in graph.initializer)}
    producer = {out: n for n in graph.node for out in n.output}
    for index, node in enumerate(graph.node):
        label = f"node '{printable(node.name)}' ({node.op_type})" if node.name else f"node #{index} ({node.op_type})"
        for name in node.input:
            if name in known:
                continue
            if name in producer:
                later = producer[name]
                raise BadInput(f"{where}: {label} reads '{printable(name)}', which only the later node "
                               f"'{printable(later.name)}' ({later.op_type}) produces: the graph has a cycle or its "
                               f"nodes are not in topological order")
            raise BadInput(f"{where}: {label} reads '{printable(name)}', which no graph input, initializer or node "
                           f"produces (a missing initializer?)")
        known.update(node.output)


#: element types of graph inputs and outputs graphopt can feed and compare: onnxruntime's CPU kernels, numpy and
#: TVM all have them
IO_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                      onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                      onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
                      onnx.TensorProto.UINT64, onnx.TensorProto.BOOL})


def _check_io_types(graph: onnx.GraphProto, where: str) -> None:
    """Refuse graph inputs and outputs graphopt cannot feed or compare: bfloat16, float8, int4, strings,
    sequences, maps (an output without a declared type is left to shape inference)."""
    inits = {i.name for i in graph.initializer}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for vi in values:
            which = vi.type.WhichOneof("value")
            elem = vi.type.tensor_type.elem_type if which == "tensor_type" else None
            untyped_output = kind == "output" and which in (None, "tensor_type") and not elem
            if vi.name in inits or elem in IO_TYPES or untyped_output:
                continue
            what = onnx.TensorProto.DataType.Name(elem) if which == "tensor_type" else (which or "untyped")
            raise UnsupportedModel(f"{where}: {kind} '{printable(vi.name)}' is {what}; graphopt takes float32, "
                                   f"float16, float64, integer and bool tensors (onnxruntime, its reference, has no "
                                   f"CPU kernels for the others): export the model with float32 inputs and outputs")


def _check_text(model: onnx.ModelProto, where: str) -> None:
    """ONNX strings must be UTF-8; protobuf hands invalid ones back as bytes, which nothing downstream can use."""
    g = model.graph
    named = [("graph input", v.name) for v in g.input] + [("graph output", v.name) for v in g.output] + \
            [("initializer", t.name) for t in g.initializer] + [("value_info", v.name) for v in g.value_info]
    for i, node in enumerate(g.node):
        named += [(f"node #{i}", node.name), (f"node #{i}'s op", node.op_type), (f"node #{i}'s domain", node.domain)]
        named += [(f"an input of node #{i}", t) for t in node.input] + \
                 [(f"an output of node #{i}", t) for t in node.output]
    for what, text in named:
        if isinstance(text, bytes):
            raise BadInput(f"{where}: the name of {what} is not UTF-8 text ({printable(repr(text), 60)}); the file "
                           f"is corrupt or was not written by an ONNX exporter")


def prepare_model(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """Inline local functions, check domains and validity, upgrade old opsets."""
    _check_text(model, where)
    if len(model.functions):
        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as e:
            raise BadInput(f"{where}: cannot inline the model's local functions ({_first_line(e)})") from None
    _check_domains(model, where)
    opset = _opset(model)
    if opset == 0:
        raise BadInput(f"{where}: the model imports no standard ONNX opset")
    if opset > onnx.defs.onnx_opset_version():
        raise BadInput(f"{where}: opset {opset} is newer than this onnx ({onnx.defs.onnx_opset_version()}); upgrade onnx")
    _densify_sparse_initializers(model, where)
    _check_topology(model.graph, where)
    _check_io_types(model.graph, where)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise BadInput(f"{where}: invalid ONNX model: {_one_line(e)}") from None
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, UPGRADE_OPSET)
        except Exception as e:
            raise BadInput(f"{where}: opset {opset} could not be upgraded to {UPGRADE_OPSET} ({_first_line(e)})") from None
    # Initializers listed as graph inputs (old exporters) are weights, not inputs.
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)
    return model


def load(source, input_shapes: dict | None = None, require_static: bool = True, fold_constants: bool = True,
         input_values: dict | None = None) -> gs.Graph:
    """Load an ONNX file (path) or ModelProto into graphopt's IR.

    input_shapes binds dynamic dimensions ({"x": (1, 3, 224, 224)}). With require_static (the default) every
    input must end up static; shapes are then inferred and shape subgraphs folded so TVM sees a static graph.
    input_values turns inputs into constants ({"sr": 16000}): the model is then specialized for that value (a
    VAD's `If` on its sample rate folds away).
    Every node gets a unique name (graph.name_nodes)."""
    if isinstance(source, onnx.ModelProto):
        model, where = source, "model"
        model = onnx.ModelProto.FromString(model.SerializeToString())
    else:
        where = str(source)
        model = read_model(source)
    model = prepare_model(model, where)
    name_nodes(model.graph)
    bind_input_values(model, input_values, where)
    bind_input_shapes(model, input_shapes, require_static, where)
    model = infer_model(model, where)
    graph = from_onnx(model)
    check_tensor_sizes(graph, where)              # before folding or any run allocates them
    if fold_constants:
        unfolded = model
        graph, changed = fold(graph)
        if changed:
            check_tensor_sizes(graph, where)      # folding can make more shapes known
            _check_folding(unfolded, graph, where)
    if require_static:
        refuse_unshaped_loops(graph, where)
    graph.name = graph.name or "graph"
    graph.source = where
    return graph


def _check_folding(unfolded: onnx.ModelProto, folded: gs.Graph, where: str) -> None:
    """Folding is evaluated by onnx-graphsurgeon: check its result against onnxruntime on the unfolded model, as
    every exact pass is checked. Skipped when the inputs are dynamic (no seeded inputs to make: `inspect` loads
    such graphs) or onnxruntime cannot run the unfolded model on seeded inputs."""
    from . import ort, verify
    from .errors import CheckFailed
    from .graph import input_specs, to_onnx
    if any(not isinstance(d, int) or d < 0 for _, shape, _ in input_specs(folded) for d in shape):
        return
    feeds = verify.seeded_inputs(folded)
    try:
        ref = ort.run(unfolded, feeds)
    except Exception as e:
        reraise_if_strict(e)
        return
    got = ort.run(to_onnx(folded), feeds)
    ok, err, name = verify.compare(ref, {a: got[b] for a, b in zip(ref, got)}, verify.EXACT_RTOL, verify.EXACT_ATOL,
                                   scale_atol=True)
    if not ok:
        raise CheckFailed(f"{where}: constant folding changed output '{name}' (max abs error {err:.3g}); "
                          f"please report this model")


def from_torch(module, example_inputs, input_names=None, output_names=None, opset: int = 18,
               input_shapes: dict | None = None) -> gs.Graph:
    """Export a torch.nn.Module through torch.export (torch.onnx's dynamo exporter) and load it."""
    import torch

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if input_names is None:
        input_names = ["x"] if len(example_inputs) == 1 else [f"x{i}" for i in range(len(example_inputs))]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            program = torch.onnx.export(module, example_inputs, input_names=list(input_names),
                                        output_names=list(output_names) if output_names else None,
                                        dynamo=True, opset_version=opset, verbose=False, optimize=True)
    except Exception as e:
        raise UnsupportedModel(f"torch export of {type(module).__name__} failed: {_first_line(e)}") from None
    finally:
        module.train(was_training)
    model = program.model_proto
    return load(model, input_shapes=input_shapes)


def load_checkpoint(module, path: str | os.PathLike):
    """Load a PyTorch checkpoint into module and return it. The file is read with torch.load(weights_only=True):
    tensors and plain containers only, never pickled code (a checkpoint that holds a whole pickled model or other
    Python objects is refused: save model.state_dict() instead). Accepts a state_dict, or a dict holding one under
    "state_dict" or "model" (the usual training-script layouts); keys must match the module's exactly."""
    import pickle

    import torch
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such checkpoint file")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BadInput(f"{path}: the checkpoint holds Python objects, not only tensors; graphopt loads checkpoints "
                       f"with weights_only=True: save model.state_dict() ({_first_line(e)[:120]})") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise BadInput(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)[:160]})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict) and all(isinstance(v, torch.Tensor) for v in state[key].values()):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or shapes:
        what = (f"missing {', '.join(missing[:3])}" if missing else
                f"unexpected {', '.join(extra[:3])}" if extra else
                f"shape of {shapes[0]} is {list(state[shapes[0]].shape)}, the module has {list(own[shapes[0]].shape)}")
        raise BadInput(f"{path}: checkpoint does not fit {type(module).__name__}: {what}")
    module.load_state_dict(state, strict=True)
    return module


def load_torch_model(builder: str, base: Path, checkpoint: str | None, input_shapes: dict, where: str) -> gs.Graph:
    """A PyTorch model named by "FILE.py:FUNCTION" (FILE relative to base; FUNCTION() returns the nn.Module), its
    checkpoint (load_checkpoint) and the input shapes (float32 example inputs, in the given order), exported with
    from_torch. For build pipelines whose model is PyTorch code plus trained weights."""
    import importlib.util
    file, _, func = builder.rpartition(":")
    if not file or not func or not file.endswith(".py"):
        raise BadInput(f"{where}: [model].module must be \"FILE.py:FUNCTION\", got {builder!r}")
    path = (base / file).resolve()
    if not path.is_file():
        raise BadInput(f"{where}: [model].module file {path} does not exist")
    if not input_shapes:
        raise BadInput(f"{where}: a PyTorch [model] needs input_shapes (NAME = [D0, D1, ...]) for its example inputs")
    spec = importlib.util.spec_from_file_location(f"graphopt_user_model_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        fn = getattr(mod, func)
    except AttributeError:
        raise BadInput(f"{where}: {path} has no function '{func}'") from None
    except Exception as e:  # noqa: BLE001 - the user's file failed to import
        raise BadInput(f"{where}: importing {path} failed: {_first_line(e)}") from None
    module = fn()
    import torch
    if not isinstance(module, torch.nn.Module):
        raise BadInput(f"{where}: {builder} returned {type(module).__name__}, not a torch.nn.Module")
    if checkpoint:
        load_checkpoint(module, base / checkpoint)
    examples = tuple(torch.zeros(tuple(s), dtype=torch.float32) for s in input_shapes.values())
    return from_torch(module, examples, input_names=list(input_shapes))
