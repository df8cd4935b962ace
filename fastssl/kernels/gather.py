"""All-gather that keeps the gradient: contrastive keys from every rank, with each rank's slice getting
the gradient of every rank's loss.

``dist.all_gather`` returns tensors outside the graph, so a loss built on them sends no gradient back to
the other ranks' keys. Backward here all-reduces (sums) the incoming gradient of the whole gathered
tensor and keeps this rank's slice: rank r then holds d(sum of all ranks' losses)/d(its keys), which
DDP's gradient averaging turns into the gradient of the mean loss, the same as one process with the
whole batch. (Keeping only the local slice of the local gradient, without the sum, drops every other
rank's contribution.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world_size()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (N, ...) of every rank in rank order -> (world * N, ...); identity without a
    multi-rank process group. Every rank must pass the same N."""
    if rank_and_world_size()[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x)
