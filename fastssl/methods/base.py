"""The base class every SSL method derives from: the plumbing, so each method file reads like its paper."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class SSLMethod(nn.Module, ABC):
    """An SSL method: a backbone plus heads and a loss.

    Override points:
      * ``forward(views) -> (loss, logs)``: views are the loader's list of (B, 3, S, S) tensors, globals
        first; ``loss`` is a scalar to minimize, ``logs`` a dict of floats/0-dim tensors to report.
      * ``on_step_end(step, total_steps)``: after the optimizer step (EMA / momentum schedules).
      * ``param_groups(weight_decay)``: groups for the optimizer; biases and norm parameters are marked
        ``lars_exclude`` (no trust ratio, no weight decay).
    State a method keeps between steps (queues, centres) lives in buffers so checkpoints carry it.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    @abstractmethod
    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """views -> (scalar loss, logs)."""

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
        forwarded together, and the output is split back into one tensor per view."""
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            out = net(torch.cat(views[start:end]))
            outputs.extend(out.chunk(end - start))
            start = end
        return outputs
