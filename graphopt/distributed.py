"""Several processes (one or more machines) for `graphopt compress`: torch.distributed glue.

Launch with torchrun; every process runs the same command:

    torchrun --nproc_per_node 2 -m graphopt.distributed compress MODEL --train TRAIN.npz --eval EVAL.npz \\
        --pipeline "cleanup,prune-channels{flops=0.25,params=0.18}" -o OUT.onnx
    # two machines, 4 processes each (run on both, node_rank 0 and 1):
    torchrun --nnodes 2 --node_rank R --master_addr HOST0 --master_port 29500 --nproc_per_node 4 \\
        -m graphopt.distributed compress ...

`python -m graphopt.distributed compress ...` takes the options of `graphopt compress` (plus --backend). Rank 0
writes the output file and prints the summary; the other processes stay quiet.

What runs where: every process loads the model and the data, runs the same passes (the graph is broadcast from
rank 0 after every structural pass, so pruning decisions can never diverge), and trains under torch
DistributedDataParallel: each global batch of --batch-size examples is split by rank (rows rank::world), DDP
averages the gradients, so the processes take the steps one process would take on the whole batch (equal up to
float rounding when every global batch splits evenly: the last, short batch of an epoch may not). The teacher's
outputs are computed in every process. Needs graphopt.distill's DistillConfig.shard / wrap_model / device hooks.

Backend: NCCL when CUDA is available (each process on cuda:LOCAL_RANK, training on the GPU), else gloo on CPU;
--backend / setup(backend=...) overrides. In Python: compress(..., distributed=True) inside a torchrun-launched
process (or after torch.distributed.init_process_group).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace

from .errors import BadInput

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str | None          # torch device for training (None: CPU)
    initialized_here: bool


def launched() -> bool:
    """Whether this process was started by torchrun (or has the same environment)."""
    return all(k in os.environ for k in _ENV)


def setup(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group: the one already initialized, else the torchrun environment's (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Backend: NCCL when CUDA is available, else gloo."""
    import datetime

    import torch
    import torch.distributed as dist
    if not dist.is_available():
        raise BadInput("this torch build has no torch.distributed")
    here = False
    if not dist.is_initialized():
        if not launched():
            raise BadInput("distributed training needs a process group: launch with torchrun (which sets RANK, "
                           "WORLD_SIZE, MASTER_ADDR and MASTER_PORT), e.g. `torchrun --nproc_per_node 2 -m "
                           "graphopt.distributed compress ...`")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("gloo", "nccl"):
            raise BadInput(f"distributed backend must be gloo or nccl, not '{backend}'")
        if backend == "nccl" and not torch.cuda.is_available():
            raise BadInput("the nccl backend needs CUDA GPUs; use --backend gloo on CPU")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        here = True
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if backend == "nccl" else None
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, backend, device, here)


def teardown(info: DistInfo) -> None:
    import torch.distributed as dist
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def ddp_wrapper(info: DistInfo):
    """wrap_model for DistillConfig: the student module in DistributedDataParallel."""
    def wrap(module):
        from torch.nn.parallel import DistributedDataParallel as DDP
        import inspect
        ids = [info.local_rank] if info.device and info.device.startswith("cuda") else None
        # the buffers are the graph's constants: identical everywhere, never re-sent on each forward
        params = inspect.signature(DDP.__init__).parameters
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DDP(module, device_ids=ids, **sync)
    return wrap


def configure(config, info: DistInfo):
    """A DistillConfig that trains this process's shard of every global batch under DDP."""
    if config.batch_size < info.world_size:
        raise BadInput(f"batch size {config.batch_size} is smaller than the {info.world_size} processes")
    missing = [k for k in ("shard", "wrap_model", "device") if not hasattr(config, k)]
    if missing:
        raise BadInput("graphopt.distill.DistillConfig lacks the shard/wrap_model/device hooks that distributed "
                       "training needs (this graphopt's distill.py predates them)")
    return replace(config, shard=(info.rank, info.world_size), wrap_model=ddp_wrapper(info), device=info.device)


def broadcast_graph(graph, info: DistInfo):
    """Rank 0's graph in every process (so every process trains exactly the same structure and weights)."""
    if info.world_size == 1:
        return graph
    import onnx
    import torch.distributed as dist

    from .graph import from_onnx, to_onnx
    box = [to_onnx(graph).SerializeToString() if info.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if info.rank == 0:
        return graph
    return from_onnx(onnx.ModelProto.FromString(box[0]))


def barrier(info: DistInfo) -> None:
    import torch.distributed as dist
    if info.world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# python -m graphopt.distributed compress ...
# ----------------------------------------------------------------------------------------------------------------

def _compress_main(argv: list[str]) -> int:
    import json
    from pathlib import Path

    import onnx

    from . import cli
    from .compress import compress
    from .graph import to_onnx
    from .loading import load
    from .passmanager import PassManager

    parser = cli.build_parser()
    parser.prog = "python -m graphopt.distributed"
    sub = next(a for a in parser._subparsers._group_actions if a.choices and "compress" in a.choices)
    sub.choices["compress"].set_defaults(epochs=None, lr=None)     # compress's own defaults
    args, rest = parser.parse_known_args(["compress"] + argv)
    backend = None
    if rest:
        if len(rest) == 2 and rest[0] == "--backend":
            backend = rest[1]
        elif len(rest) == 1 and rest[0].startswith("--backend="):
            backend = rest[0].split("=", 1)[1]
        else:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    info = setup(backend)
    try:
        quiet = info.rank != 0
        pm = PassManager.parse(args.pipeline)
        original = load(args.model, input_shapes=cli._shapes(args))
        train = cli._load_npz(args.train, "--train")
        ev = cli._load_npz(args.eval, "--eval") if args.eval else None
        log = None if (args.json or quiet) else cli._log
        graph, info_c = compress(original, train, pm, eval_data=ev, epochs=args.epochs, batch_size=args.batch_size,
                                 lr=args.lr, seed=args.seed, log=log, distributed=True,
                                 threads=getattr(args, "threads", None))
        if not quiet:
            dest = Path(args.output)
            tmp = dest.with_name(f".{dest.name}.tmp")
            onnx.save_model(to_onnx(graph), str(tmp))
            os.replace(tmp, dest)
            final = info_c.get("final") or {}
            rows = [("output", str(dest)), ("processes", f"{info.world_size} ({info.backend})"),
                    ("MACs ratio", f"{info_c['macs_ratio']:.3f}"), ("params ratio", f"{info_c['params_ratio']:.3f}")]
            rows += [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in final.items() if v is not None]
            if args.json:
                print(json.dumps({"output": str(dest), **info_c}, indent=2, sort_keys=True, default=str))
            else:
                print(cli._table(rows, ("compress", "")))
        barrier(info)
    finally:
        teardown(info)
    return 0


def main(argv=None) -> int:
    from .errors import GraphoptError
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] != "compress":
        print("usage: torchrun [torchrun options] -m graphopt.distributed compress MODEL --train TRAIN.npz "
              "--pipeline TEXT -o OUT.onnx [graphopt compress options] [--backend gloo|nccl]", file=sys.stderr)
        return 2
    try:
        return _compress_main(argv[1:])
    except GraphoptError as e:
        if debug:
            raise
        print(f"graphopt: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
