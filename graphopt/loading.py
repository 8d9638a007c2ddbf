"""Loading: ONNX files (checked, external data confined to the model's folder, old opsets upgraded,
dynamic dims bound, shape subgraphs folded) and PyTorch modules (through torch.export)."""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper

from .errors import BadInput, UnsupportedModel
from .folding import fold
from .graph import from_onnx
from .shapes import bind_input_shapes, infer_model

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
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: file is empty")
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
    for t in tensors:
        info = external_data_helper.ExternalDataInfo(t)
        loc = info.location
        target = (base / loc).resolve()
        if os.path.isabs(loc) or (target != base and base not in target.parents):
            raise BadInput(f"{path}: tensor '{t.name}' stores its data at '{loc}', outside the model's folder; "
                           f"external data must live next to the model")
        if not target.is_file():
            raise BadInput(f"{path}: tensor '{t.name}' needs external data file '{loc}', which does not exist")
        size = target.stat().st_size
        offset = int(info.offset or 0)
        length = int(info.length or 0)
        if offset > size or (length and offset + length > size):
            raise BadInput(f"{path}: external data for tensor '{t.name}' in '{loc}' is truncated")
    if tensors:
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as e:
            raise BadInput(f"{path}: cannot load external data ({_first_line(e)})") from None


def _check_domains(model: onnx.ModelProto, where: str) -> None:
    bad = [(n.name or "?", n.op_type, n.domain) for n in model.graph.node if n.domain not in STANDARD_DOMAINS]
    if bad:
        listed = ", ".join(f"'{name}' ({op}, domain '{dom}')" for name, op, dom in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise UnsupportedModel(f"{where}: {len(bad)} node(s) use an operator domain graphopt does not know: {listed}{more}; "
                               f"export the model with standard ONNX ops only")


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS:
            return imp.version
    return 0


def prepare_model(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """Inline local functions, check domains and validity, upgrade old opsets."""
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
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise BadInput(f"{where}: invalid ONNX model: {_first_line(e)}") from None
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


def load(source, input_shapes: dict | None = None, require_static: bool = True, fold_constants: bool = True) -> gs.Graph:
    """Load an ONNX file (path) or ModelProto into graphopt's IR.

    input_shapes binds dynamic dimensions ({"x": (1, 3, 224, 224)}). With require_static (the default) every
    input must end up static; shapes are then inferred and shape subgraphs folded so TVM sees a static graph."""
    if isinstance(source, onnx.ModelProto):
        model, where = source, "model"
        model = onnx.ModelProto.FromString(model.SerializeToString())
    else:
        where = str(source)
        model = read_model(source)
    model = prepare_model(model, where)
    bind_input_shapes(model, input_shapes, require_static, where)
    model = infer_model(model, where)
    graph = from_onnx(model)
    if fold_constants:
        unfolded = model
        graph, changed = fold(graph)
        if changed:
            _check_folding(unfolded, graph, where)
    graph.name = graph.name or "graph"
    graph.source = where
    return graph


def _check_folding(unfolded: onnx.ModelProto, folded: gs.Graph, where: str) -> None:
    """Folding is evaluated by onnx-graphsurgeon: check its result against onnxruntime on the unfolded model, as
    every exact pass is checked. Skipped when onnxruntime cannot run the unfolded model on seeded inputs."""
    from . import ort, verify
    from .errors import CheckFailed
    from .graph import to_onnx
    feeds = verify.seeded_inputs(folded)
    try:
        ref = ort.run(unfolded, feeds)
    except Exception:
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
