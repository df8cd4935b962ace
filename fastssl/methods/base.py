"""The base class every SSL method derives from: the plumbing, so each method file reads like its paper."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from fastssl.models.norm import view_norms, views_per_batch


class SSLMethod(nn.Module, ABC):
    """An SSL method: a backbone plus heads and a loss.

    Override points (the trainer calls them in this order):
      * ``on_train_start(steps_per_epoch, total_steps)``: once, before the first step (also after a resume);
        the default stores both as attributes for schedules measured in epochs.
      * ``on_epoch_start(epoch)``: before the first step of each epoch, and for the current epoch after a
        resume mid-epoch (state switched on by epoch, e.g. SwAV's prototype freeze or queue).
      * ``forward(views) -> (loss, logs)``: views are the loader's list of (B, 3, S, S) tensors, globals
        first; ``loss`` is a scalar to minimize, ``logs`` a dict of floats/0-dim tensors to report.
      * ``on_before_optimizer_step(step)``: after backward, before the optimizer (gradient surgery such as
        cancelling the prototypes' gradient); gradients may still carry the fp16 loss scale.
      * ``on_step_end(step, total_steps)``: after the optimizer step (EMA / momentum schedules).
      * ``param_groups(weight_decay)``: groups for the optimizer; biases and norm parameters are marked
        ``lars_exclude`` (no trust ratio, no weight decay).
    State a method keeps between steps (queues, centres) lives in buffers so checkpoints carry it; keep it
    global (the same on every rank, not a per-rank shard) so a run resumes on a different number of GPUs.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.steps_per_epoch = 1
        self.total_steps = 1

    @abstractmethod
    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """views -> (scalar loss, logs)."""

    def on_train_start(self, steps_per_epoch: int, total_steps: int) -> None:
        """Called once before training (and after a resume) with the run's length."""
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch's first step (and for the current epoch after a resume); default: nothing."""

    def on_before_optimizer_step(self, step: int) -> None:
        """Called between backward and the optimizer step; the default does nothing."""

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step; the default does nothing."""

    def param_groups(self, weight_decay: float) -> list[dict]:
        adapted, excluded = [], []
        for _, p in self.named_parameters():
            if p.requires_grad:
                (excluded if p.ndim <= 1 else adapted).append(p)
        groups = [{"params": adapted, "weight_decay": weight_decay, "lars_exclude": False}]
        if excluded:
            groups.append({"params": excluded, "weight_decay": 0.0, "lars_exclude": True})
        return groups

    @staticmethod
    def forward_by_resolution(net: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run ``net`` once per resolution: consecutive views of one size are concatenated along the batch,
        forwarded together, and the output is split back into one tensor per view. BatchNorm statistics are
        pooled over the concatenated views (SimCLR, SwAV, DINO: as their papers' code)."""
        outputs: list[torch.Tensor] = []
        for group in resolution_groups(views):
            outputs.extend(net(torch.cat(group)).chunk(len(group)))
        return outputs

    def forward_per_view(self, net: Callable[[torch.Tensor], torch.Tensor],
                         views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Like ``forward_by_resolution`` (one forward per resolution), but every per-view BatchNorm of this method
        (``fastssl.models.norm``) normalizes each view with its own statistics, as one forward per view would
        (BYOL, MoCo v3, Barlow Twins, VICReg: as their papers' code). Outputs, gradients and running statistics
        equal those of separate per-view forwards."""
        norms = view_norms(self)
        outputs: list[torch.Tensor] = []
        for group in resolution_groups(views):
            with views_per_batch(norms, len(group)):
                out = net(torch.cat(group)) if len(group) > 1 else net(group[0])
            outputs.extend(out.chunk(len(group)))
        return outputs


def resolution_groups(views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``views`` cut into runs of consecutive views of the same spatial size."""
    groups: list[list[torch.Tensor]] = []
    for v in views:
        if groups and groups[-1][0].shape[-2:] == v.shape[-2:]:
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups
