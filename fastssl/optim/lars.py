"""LARS: SGD with momentum whose step is scaled per tensor by a trust ratio.

    d     = g + wd * w
    trust = eta * ||w|| / (||g|| + wd * ||w||), or 1 where ||w|| or ||g|| is 0
    buf   = momentum * buf + trust * d
    w     = w - lr * buf                     (nesterov: w - lr * (trust * d + momentum * buf))

Parameter groups with ``lars_exclude=True`` (biases and normalization parameters, the BYOL / SwAV recipe)
get neither the trust ratio nor weight decay: a plain SGD-momentum update.

The trust ratio is computed with ``torch.where`` on tensors, never ``.item()`` or a Python branch, so a
step never forces a device-to-host sync. Two paths: ``_step_loop`` (one tensor at a time, the reference
twin) and ``_step_foreach`` (multi-tensor ops over the whole group, the default).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """LARS optimizer. ``foreach=None`` picks the multi-tensor path; ``False`` the per-tensor reference loop."""

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
        foreach: bool | None = None,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        if nesterov and momentum <= 0:
            raise ValueError("LARS: nesterov needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov,
                        lars_exclude=False)
        super().__init__(params, defaults)
        self.foreach = True if foreach is None else foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                bufs.append(state["momentum_buffer"])
            if not params:
                continue
            step = _step_foreach if self.foreach else _step_loop
            step(params, grads, bufs, lr=group["lr"], momentum=group["momentum"],
                 weight_decay=group["weight_decay"], eta=group["eta"], nesterov=group["nesterov"],
                 exclude=group["lars_exclude"])
        return loss


def _trust_ratio(w_norm: torch.Tensor, g_norm: torch.Tensor, eta: float, weight_decay: float) -> torch.Tensor:
    ratio = eta * w_norm / (g_norm + weight_decay * w_norm)
    return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


def _step_loop(params, grads, bufs, *, lr, momentum, weight_decay, eta, nesterov, exclude) -> None:
    for p, g, buf in zip(params, grads, bufs, strict=True):
        if exclude:
            d = g
        else:
            trust = _trust_ratio(p.norm(), g.norm(), eta, weight_decay)
            d = g.add(p, alpha=weight_decay).mul_(trust)
        buf.mul_(momentum).add_(d)
        update = d.add(buf, alpha=momentum) if nesterov else buf
        p.add_(update, alpha=-lr)


def _step_foreach(params, grads, bufs, *, lr, momentum, weight_decay, eta, nesterov, exclude) -> None:
    if exclude:
        d = grads
    else:
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        trust = _trust_ratio(w_norm, g_norm, eta, weight_decay)
        d = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_mul_(d, list(trust.unbind(0)))
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    update = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(params, update, alpha=-lr)

