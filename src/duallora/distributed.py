"""Multi-process training with PyTorch's own engine (``torchrun``, ``torch.distributed``, DDP).

``torchrun --nproc_per_node=N -m duallora run ...`` starts N processes; each learns on its shard of
every batch (gradients averaged by :class:`~torch.nn.parallel.DistributedDataParallel`), statistics
for the memory and the task signatures are summed across processes (:func:`all_reduce_sum_`) before
any eigendecomposition, evaluation counts are summed, and only rank 0 writes outputs.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) every helper here is a no-op.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def requested() -> bool:
    """True when started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True in the process that writes outputs (rank 0, or the only process)."""
    return rank() == 0


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on the CPU, nccl on CUDA); idempotent."""
    if not requested() or is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)


def local_device(device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA run under torchrun, else ``device`` unchanged."""
    if device.type == "cuda" and requested():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _all_reduce_(tensor: torch.Tensor, op: "dist.ReduceOp.RedOpType") -> torch.Tensor:
    if not is_initialized():
        return tensor
    backend = dist.get_backend()
    if backend == "nccl" and tensor.device.type != "cuda":
        tmp = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(tmp, op=op)
        tensor.copy_(tmp.cpu())
    else:
        dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place (any device/dtype the backend accepts)."""
    return _all_reduce_(tensor, dist.ReduceOp.SUM)


def all_reduce_min_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum of ``tensor`` over all processes, in place."""
    return _all_reduce_(tensor, dist.ReduceOp.MIN)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shard(indices: Sequence[int]) -> list[int]:
    """This process's share of ``indices`` (every world_size-th item, no padding, no duplicates)."""
    return list(indices)[rank():: world_size()]


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of the single-process order, each split across processes.

    Each epoch draws ``torch.randperm(n, generator)`` exactly as a shuffled single-process
    ``DataLoader`` with the same generator does, cuts it into global batches of ``batch_size`` and
    yields this process's slice ``batch[rank::world_size]`` of each. With DDP averaging gradients, N
    processes take (up to float summation order) the same steps as one process.

    Args:
        n: dataset size.
        batch_size: global batch size.
        generator: seeded generator (consumed one permutation per epoch).
        shuffle: False keeps the natural order.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True) -> None:
        self.n, self.batch_size, self.generator, self.shuffle = n, batch_size, generator, shuffle
        self.rank, self.world = rank(), world_size()

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            # a DataLoader given a generator first draws its workers' base seed from it
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(self.n, generator=self.generator).tolist() if self.shuffle else list(range(self.n))
        for start in range(0, self.n, self.batch_size):
            part = order[start: start + self.batch_size][self.rank:: self.world]
            if part:
                yield part
        if self.shuffle:
            # torch's RandomSampler draws one more (empty-sliced) permutation at the end of each epoch;
            # drawing it too keeps the order identical to a shuffled single-process DataLoader
            torch.randperm(self.n, generator=self.generator)

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size
