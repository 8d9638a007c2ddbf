"""Built-in passes. Importing this package registers each of them."""
from . import (cleanup, decompose_rnn, eliminate_dead_code, fold_batchnorm, fold_constants,  # noqa: F401
               infer_shapes, remove_identity)
