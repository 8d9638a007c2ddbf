"""graphopt: a model-graph compiler. ONNX or PyTorch in, verified pass pipeline, TVM-compiled artifact out."""
from .version import __version__  # noqa: E402
from .errors import BadInput, CheckFailed, GraphoptError, UnsupportedModel  # noqa: E402
from .loading import from_torch, load  # noqa: E402
from .passmanager import Option, Pass, PassContext, PassManager, PassResult, register  # noqa: E402
from .artifact import Artifact  # noqa: E402
from .api import bench, compile, run  # noqa: E402
from .graph import to_onnx  # noqa: E402

__all__ = ["load", "from_torch", "PassManager", "Pass", "PassContext", "PassResult", "Option", "register",
           "compile", "run", "bench", "Artifact", "to_onnx", "GraphoptError", "BadInput", "CheckFailed",
           "UnsupportedModel"]
