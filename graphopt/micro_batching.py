"""How a training step's global batch is cut into micro-batches, shared over processes, and how the micro-batches'
gradients are summed, so that a run on N processes takes exactly the steps a run on 1 process takes.

Why this exists: float addition is not associative, so "the same gradient" summed in another order differs in the
last bits, and training amplifies such differences chaotically (distilling the digits CNN, a 1e-6 relative change
of the starting weights changed the final logits by 20% of their scale). Averaging shard gradients with an
all-reduce (DistributedDataParallel) sums in a different order than one process does, and on some CPUs (oneDNN
picks kernels by batch size) even an example's activations differ between a batch of 64 and a shard of 32; 2
processes then ended 2% of the logit scale away from 1 on an Intel Xeon.

The scheme, identical for any number of processes:
* every global batch is cut into micro-batches of at most `micro_batch` examples (micro_batches: a constant size,
  so every example goes through kernels of the same batch size whatever the number of processes);
* process r computes micro-batches r, r + N, r + 2N, ... (owned); each micro-batch's loss is its mean times its
  share of the global batch, so its gradient is its exact contribution;
* the per-micro-batch gradients (and loss terms, feature normalizers) are exchanged in slots: a tensor with one
  row per micro-batch, each row written by the one process that computed it and zero in the others, summed with
  an all-reduce. Adding zeros is exact, so every process then holds every micro-batch's gradient bit for bit;
* the gradient is the sum of the rows in micro-batch order, which is what autograd's accumulation computes in one
  process that runs the micro-batches in order.
"""
from __future__ import annotations

import torch

#: examples per forward/backward pass unless told otherwise: a constant, never "the whole batch", so every example
#: sees kernels of the same batch size however the global batch is shared over processes
DEFAULT_MICRO_BATCH = 32


def micro_batches(n: int, micro_batch: int | None) -> list[tuple[int, int]]:
    """[(begin, end)] row ranges cutting a batch of n examples into the fewest micro-batches of at most
    micro_batch examples, as equal as possible (no micro-batch of one example trailing a large one)."""
    if n <= 0:
        return []
    m = n if micro_batch is None else max(1, int(micro_batch))
    k = -(-n // m)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def owned(n_micro: int, rank: int, world: int) -> list[int]:
    """The micro-batches process `rank` of `world` computes."""
    return list(range(rank, n_micro, world))


class SlotSum:
    """Values computed per micro-batch by different processes, made identical everywhere: put(j, tensor) for the
    micro-batches this process owns, then gather() -> [value of micro-batch 0, 1, ...] (exact copies) on every
    process. With one process it only collects."""

    def __init__(self, n_micro: int, world: int):
        self.n, self.world = n_micro, world
        self.rows: dict[int, torch.Tensor] = {}

    def put(self, j: int, value: torch.Tensor) -> None:
        self.rows[j] = value.detach().reshape(-1)

    def gather(self, like: torch.Tensor | None = None) -> list[torch.Tensor]:
        if self.world == 1:
            return [self.rows[j] for j in range(self.n)]
        ref = like if like is not None else next(iter(self.rows.values()))
        slots = torch.zeros((self.n, ref.numel()), dtype=ref.dtype, device=ref.device)
        for j, v in self.rows.items():
            slots[j] = v
        torch.distributed.all_reduce(slots)          # each row has one non-zero contributor: exact
        return list(slots)


def ordered_sum(values: list[torch.Tensor]) -> torch.Tensor:
    """values[0] + values[1] + ... left to right (the order autograd accumulates micro-batches in)."""
    acc = values[0].clone()
    for v in values[1:]:
        acc += v
    return acc


def reduce_gradients(params: list[torch.Tensor], grads_per_micro: dict[int, list[torch.Tensor | None]],
                     n_micro: int, world: int) -> None:
    """Set every parameter's .grad to the sum, in micro-batch order, of the micro-batches' gradients, computed by
    whichever process owned each (see the module docstring). A parameter no micro-batch reached keeps grad None,
    as autograd leaves it."""
    sizes = [p.numel() for p in params]
    flat = SlotSum(n_micro, world)
    reached = SlotSum(n_micro, world)
    template = params[0].detach()
    for j, grads in grads_per_micro.items():
        flat.put(j, torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params)]))
        reached.put(j, torch.tensor([g is not None for g in grads], dtype=template.dtype, device=template.device))
    rows = flat.gather(torch.zeros(sum(sizes), dtype=template.dtype, device=template.device))
    hit = ordered_sum(reached.gather(torch.zeros(len(params), dtype=template.dtype, device=template.device)))
    total = ordered_sum(rows)
    offset = 0
    for p, size, h in zip(params, sizes, hit.tolist()):
        p.grad = total[offset:offset + size].view_as(p).clone() if h else None
        offset += size
