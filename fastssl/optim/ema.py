"""Exponential moving average of a whole model with foreach ops (one pass over memory, no Python math loop).

Buffers (BatchNorm running statistics, counters) are copied from the online model rather than averaged:
the target network of BYOL/MoCo runs in train mode and normalizes with batch statistics, so its running
statistics only matter for evaluation, where the online model's are the better estimate.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """``target <- tau * target + (1 - tau) * online`` over parameters; buffers are copied.

    ``target`` and ``online`` must have the same architecture (parameters in the same order).
    """
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError(f"EMA target has {len(t_params)} parameters, online has {len(o_params)}")
    if t_params:
        # lerp(t, o, w) = t + w (o - t) = (1 - w) t + w o, so w = 1 - tau.
        torch._foreach_lerp_(t_params, o_params, 1.0 - tau)
    t_bufs = [b for b in target.buffers()]
    o_bufs = [b for b in online.buffers()]
    if t_bufs:
        torch._foreach_copy_(t_bufs, o_bufs)


@torch.no_grad()
def ema_update_loop_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Reference twin of :func:`ema_update_`: one parameter at a time."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(tau).add_(o.detach(), alpha=1.0 - tau)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)
