"""Many processes, one artifact: `torchrun --nproc_per_node N epts compress ...`.

The calibration windows are sharded over the ranks so that every optimiser step's global batch
(`EPTSConfig.batch_size` windows) is split evenly between them; adapter gradients, losses and the
input-norm statistics are all-reduced (torch.distributed collectives: gloo on the CPU, nccl on
CUDA), so N processes take the steps one process takes with the same global batch, up to the order
of floating-point sums. Rank 0 alone writes checkpoints and the artifact. In one process (no
torchrun) every function here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1); else nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard(n: int, batch_size: int) -> torch.Tensor:
    """Indices of this rank's windows among `n`: of every global batch of `batch_size` windows, the
    rank's contiguous share. Raises ValueError unless the batches split evenly over the ranks."""
    world = world_size()
    if world == 1:
        return torch.arange(n)
    if batch_size % world or n % batch_size:
        raise ValueError(f"{world} processes need --batch-size ({batch_size}) to be a multiple of {world} and "
                         f"--nsamples ({n}) a multiple of --batch-size")
    local = batch_size // world
    starts = torch.arange(0, n, batch_size) + rank() * local
    return (starts.unsqueeze(1) + torch.arange(local)).flatten()


def mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the mean of `tensor` over the ranks."""
    if world_size() > 1:
        dist.all_reduce(tensor)
        tensor.div_(world_size())
    return tensor


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum of `tensor` over the ranks."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def reduce_to_(tensor: torch.Tensor, dst: int) -> torch.Tensor:
    """In place: the sum of `tensor` over the ranks, on rank `dst` only (elsewhere undefined)."""
    if world_size() > 1:
        dist.reduce(tensor, dst)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """In place: rank `src`'s `tensor` on every rank."""
    if world_size() > 1:
        dist.broadcast(tensor, src)
    return tensor


def mean_grads_(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients over the ranks, in one collective (as DDP's bucket does). Parameters
    without a gradient (groups a step did not train) are skipped: every rank draws the same schedule."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = mean_(torch.cat([g.flatten() for g in grads]))
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def gather(local: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """The whole (n, ...) tensor from every rank's rows `local` at positions `index` (see `shard`)."""
    if world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world_size())]
    indices = [torch.empty_like(index) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous())
    dist.all_gather(indices, index)
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for part, idx in zip(parts, indices):
        out[idx] = part
    return out
