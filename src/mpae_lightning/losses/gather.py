"""Autograd-aware gathering across DDP processes, for the mini-groups that span them.

A mini-group larger than a process's batch is cut from the global batch, so the presence loss
needs the part peaks of images held by other processes. :func:`gather_with_grad` concatenates
every process's tensor in rank order (the global batch's order) and keeps the graph: the gradient
of a peak used on another process flows back to the image it came from.

Every process computes the loss of the whole gathered group and backpropagates it, so the
gradient reaching a process's own rows is the *sum* over processes of the gradients each
computed for those rows (an all-reduce, then this process's slice). DDP then averages over the R
processes, and the two factors cancel: the averaged gradient is the gradient of the group loss
computed once on one process.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["distributed_world", "gather_with_grad"]


def distributed_world(group: Any = None) -> int:
    """The number of processes in ``group`` (default: the world), 1 when not running distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; all-reduce (sum) of the incoming gradient then this rank's slice backward."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        tensor = tensor.contiguous()
        sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device), group=group)
        if len({int(s) for s in sizes}) != 1:
            raise ValueError(
                f"a mini-group spans processes, but their training batches differ in size ({[int(s) for s in sizes]}); "
                "every process needs the same batch size (MiniGroupBatchSampler gives that)"
            )
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor, group=group)
        ctx.group, ctx.rank, ctx.rows = group, rank, tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def gather_with_grad(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Every process's ``tensor`` (same shape on all) concatenated along dim 0 in rank order, with gradients.

    Args:
        tensor: (B, ...) rows of this process; B must be the same on every process of ``group``.
        group: the process group (default: the world). Outside a distributed run, ``tensor`` itself.

    Raises:
        ValueError: the processes hold different numbers of rows (checked with one small
            all-gather, on every process alike, so none is left waiting).
    """
    if distributed_world(group) == 1:
        return tensor
    return _GatherWithGrad.apply(tensor, group)
