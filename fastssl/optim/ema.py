"""Exponential moving average of a whole model with foreach ops (one pass over memory, no Python math loop).

Buffers (BatchNorm running statistics, counters) are copied from the online model rather than averaged:
the target network of BYOL/MoCo runs in train mode and normalizes with batch statistics, so its running
statistics only matter for evaluation, where the online model's are the better estimate.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

# target module -> (online module, target params, online params, (target float buffers, online float buffers),
# (target other buffers, online other buffers)). Walking a ResNet-50's modules for its 161 parameters and
# 159 buffers costs more host time than the update itself on a GPU, so the lists are built once per pair.
_LISTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lists(target: nn.Module, online: nn.Module) -> tuple:
    hit = _LISTS.get(target)
    if hit is not None and hit[0]() is online:
        return hit[1:]
    t_params, o_params = list(target.parameters()), list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError(f"EMA target has {len(t_params)} parameters, online has {len(o_params)}")
    t_bufs, o_bufs = list(target.buffers()), list(online.buffers())
    if len(t_bufs) != len(o_bufs):
        raise ValueError(f"EMA target has {len(t_bufs)} buffers, online has {len(o_bufs)}")
    floats = [i for i, b in enumerate(t_bufs) if b.is_floating_point()]
    others = [i for i, b in enumerate(t_bufs) if not b.is_floating_point()]
    lists = (t_params, o_params, ([t_bufs[i] for i in floats], [o_bufs[i] for i in floats]),
             ([t_bufs[i] for i in others], [o_bufs[i] for i in others]))
    _LISTS[target] = (weakref.ref(online), *lists)
    return lists


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """``target <- tau * target + (1 - tau) * online`` over parameters; buffers are copied.

    ``target`` and ``online`` must have the same architecture (parameters in the same order). The tensor
    lists of a (target, online) pair are cached: adding or removing parameters after the first call is not
    seen (moving the modules with ``.to()`` or loading a state dict is: the Parameter objects stay).
    """
    t_params, o_params, (t_float, o_float), (t_other, o_other) = _lists(target, online)
    if t_params:
        # lerp(t, o, w) = t + w (o - t) = (1 - w) t + w o, so w = 1 - tau.
        torch._foreach_lerp_(t_params, o_params, 1.0 - tau)
    if t_float:
        torch._foreach_copy_(t_float, o_float)
    if t_other:  # integer counters (BatchNorm's num_batches_tracked): a list of their own keeps each list one dtype
        torch._foreach_copy_(t_other, o_other)


@torch.no_grad()
def ema_update_loop_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Reference twin of :func:`ema_update_`: one parameter at a time."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(tau).add_(o.detach(), alpha=1.0 - tau)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)
