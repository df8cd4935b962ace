"""BatchNorm that normalizes each view of a concatenated batch with that view's own statistics.

BYOL, MoCo v3, Barlow Twins and VICReg run their networks once per view in the papers' code, so every BatchNorm
sees one view at a time. Concatenating the views into one forward is faster (larger GEMMs, half the kernel
launches) but pools their statistics, which changes the method (BYOL lost 2.7 kNN points here after one epoch).
``ViewBatchNorm1d/2d`` keep both: the batch is one tensor, and in training each of its ``views`` equal chunks
is normalized by its own mean and variance, the running statistics updated once per chunk in order, exactly as
``views`` separate forwards leave them. With ``views == 1`` (the default) and in eval mode it is plain BatchNorm.

Across ranks (``sync_group`` set, the SyncBatchNorm case on multi-GPU runs) each view is normalized by its own
*global* statistics: one differentiable all-reduce carries every chunk's sums.

    x: (views * B, C) or (views * B, C, L) for the 1d class, (views * B, C, H, W) for the 2d class;
       any float dtype and memory format -> the same shape, dtype and memory format.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _ViewBatchNorm(_BatchNorm):
    views: int = 1  # chunks of the batch normalized apart (set through ``views_per_batch``)
    sync_group: object = None  # None: this process's statistics; else a process group (or WORLD) to all-reduce over

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or (self.views == 1 and self.sync_group is None):
            return super().forward(x)
        if x.shape[0] % self.views:
            raise ValueError(f"{type(self).__name__}: a batch of {x.shape[0]} does not split into {self.views} "
                             "equal views")
        if self.sync_group is not None:
            return self._forward_synced(x)
        outs = [F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias, True,
                             self._next_momentum(), self.eps) for chunk in x.chunk(self.views)]
        return torch.cat(outs)

    def _next_momentum(self) -> float:
        """The running statistics' update factor for the next chunk, counting it as one batch (as one forward)."""
        if not self.track_running_stats:
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _forward_synced(self, x: torch.Tensor) -> torch.Tensor:
        """Each chunk normalized by its statistics over every rank of ``sync_group`` (one all-reduce of the
        per-chunk sums, differentiable, so the gradient is that of the global per-view BatchNorm)."""
        views, channels = self.views, x.shape[1]
        grouped = x.reshape(views, x.shape[0] // views, channels, -1)  # (V, b, C, spatial); no copy when contiguous
        xf = grouped.float()
        local_n = xf.shape[1] * xf.shape[3]
        sums = torch.cat([xf.sum(dim=(1, 3)), xf.square().sum(dim=(1, 3))])  # (2V, C)
        counts = torch.full((1, channels), float(local_n), device=x.device)
        group = self.sync_group if self.sync_group is not True else torch.distributed.group.WORLD
        total = _AllReduceSum.apply(torch.cat([sums, counts]), group)
        n = total[-1, 0]
        mean = total[:views] / n
        var = (total[views:2 * views] / n - mean.square()).clamp_min(0.0)  # biased, as BatchNorm normalizes
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                for v in range(views):
                    m = self._next_momentum()
                    self.running_mean.mul_(1 - m).add_(mean[v], alpha=m)
                    self.running_var.mul_(1 - m).add_(unbiased[v], alpha=m)
        scale = torch.rsqrt(var + self.eps)  # (V, C)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        out = (xf * scale[:, None, :, None] + shift[:, None, :, None]).to(x.dtype).reshape(x.shape)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group``; the gradient of every rank's input is the sum of all ranks' output
    gradients (each rank's loss depends on every rank's contribution)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: object) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class ViewBatchNorm1d(_ViewBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (and an instance of it) with per-view statistics in training (module docstring)."""


class ViewBatchNorm2d(_ViewBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (and an instance of it) with per-view statistics in training (module docstring)."""


def per_view_batchnorm(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm1d``/``BatchNorm2d`` of ``module`` replaced by its per-view twin, parameters and running
    statistics kept (the state_dict keys do not change, so checkpoints load either way). Returns ``module``
    itself when it is not a BatchNorm, else the new layer."""
    kinds = {nn.BatchNorm1d: ViewBatchNorm1d, nn.BatchNorm2d: ViewBatchNorm2d}
    if type(module) in kinds:
        new = kinds[type(module)](module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, device=_device_of(module))
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        for mine, theirs in zip(new.parameters(), module.parameters(), strict=True):
            mine.requires_grad_(theirs.requires_grad)  # a frozen target's layers stay frozen
        return new
    for name, child in module.named_children():
        replaced = per_view_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def _device_of(module: nn.Module) -> torch.device | None:
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        return t.device
    return None


def view_norms(module: nn.Module) -> list[_ViewBatchNorm]:
    """The per-view BatchNorms inside ``module``."""
    return [m for m in module.modules() if isinstance(m, _ViewBatchNorm)]


@contextlib.contextmanager
def views_per_batch(norms: list[_ViewBatchNorm], views: int) -> Iterator[None]:
    """Within the block, ``norms`` treat each batch as ``views`` equal chunks (one per view), then 1 again."""
    for m in norms:
        m.views = views
    try:
        yield
    finally:
        for m in norms:
            m.views = 1


def sync_batchnorm(module: nn.Module, group: object = True) -> nn.Module:
    """The multi-GPU conversion: plain BatchNorms become ``nn.SyncBatchNorm`` (over ``group``; True: the whole
    world), per-view ones all-reduce their per-view statistics over ``group`` themselves. Returns the module
    (or its replacement when ``module`` is itself a plain BatchNorm)."""
    for m in view_norms(module):
        m.sync_group = group
    return _plain_to_sync(module, None if group is True else group)


def _plain_to_sync(module: nn.Module, pg: object) -> nn.Module:
    if isinstance(module, _ViewBatchNorm):
        return module
    if isinstance(module, _BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, pg)
    for name, child in module.named_children():
        replaced = _plain_to_sync(child, pg)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
