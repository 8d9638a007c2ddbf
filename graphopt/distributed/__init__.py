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
rank 0 after every structural pass, so pruning decisions can never diverge), and trains on the same global
batches: each global batch of --batch-size examples is cut into micro-batches of --micro-batch examples, process
r computes micro-batches r, r + N, ..., and the micro-batches' gradients are exchanged and summed in micro-batch
order (graphopt.micro_batching), so N processes take bit for bit the steps one process takes with the same
--micro-batch and torch thread count. The teacher's outputs are computed (or read from the cache) per micro-batch.

Backend: NCCL when CUDA is available (each process on cuda:LOCAL_RANK, training on the GPU), else gloo on CPU;
--backend / setup(backend=...) overrides. In Python: compress(..., distributed=True) inside a torchrun-launched
process (or after torch.distributed.init_process_group).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ..errors import BadInput

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


def configure(config, info: DistInfo):
    """A DistillConfig that computes this process's micro-batches of every global batch (see
    graphopt.micro_batching: the processes then take bit for bit the steps one process takes)."""
    if config.batch_size < info.world_size:
        raise BadInput(f"batch size {config.batch_size} is smaller than the {info.world_size} processes")
    return replace(config, shard=(info.rank, info.world_size), device=info.device)


def broadcast_graph(graph, info: DistInfo):
    """Rank 0's graph in every process (so every process trains exactly the same structure and weights)."""
    if info.world_size == 1:
        return graph
    import onnx
    import torch.distributed as dist

    from ..graph import from_onnx, to_onnx
    box = [to_onnx(graph).SerializeToString() if info.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if info.rank == 0:
        return graph
    return from_onnx(onnx.ModelProto.FromString(box[0]))


def broadcast_value(value, info: DistInfo):
    """Rank 0's value (a picklable object) in every process: a decision every process must take alike."""
    if info.world_size == 1:
        return value
    import torch.distributed as dist
    box = [value if info.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    import torch.distributed as dist
    if info.world_size > 1:
        dist.barrier()
