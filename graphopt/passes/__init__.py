"""Built-in passes. Importing this package registers each of them."""
from . import (cleanup, decompose_rnn, eliminate_dead_code, fold_batchnorm, fold_constants,  # noqa: F401
               infer_shapes, remove_identity)
from . import insert_adapters  # noqa: F401,E402
from . import prune_channels, sparsify  # noqa: F401,E402
from . import factorize_lowrank  # noqa: F401,E402
from . import quantize  # noqa: F401,E402
from . import lower_int8  # noqa: F401,E402
from . import conv1d_as_2d  # noqa: F401,E402
