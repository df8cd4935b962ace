"""BYOL (Grill et al., 2020): an online network predicts a slowly moving target network's projection
of another view of the same image.

    online:  y = f(x), z = g(y), p = q(z)          target:  z' = g'(f'(x))   (EMA of f, g; no gradient)
    loss  =  (2 - 2 cos(p(v1), z'(v2))) + (2 - 2 cos(p(v2), z'(v1))),   averaged over the batch
    tau   =  1 - (1 - tau_base) (cos(pi k / K) + 1) / 2

BatchNorm statistics: per view (the paper's code forwards each view on its own), kept inside one batched
forward by ``forward_per_view``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastssl.kernels import normalized_mse
from fastssl.methods.base import SSLMethod
from fastssl.models import MLP
from fastssl.models.norm import per_view_batchnorm
from fastssl.optim.ema import ema_update_
from fastssl.optim.schedules import cosine_tau


class BYOL(SSLMethod):
    def __init__(self, backbone: nn.Module, feat_dim: int, proj_hidden: int = 4096, proj_dim: int = 256,
                 pred_hidden: int = 4096, base_tau: float = 0.996):
        super().__init__(backbone)
        self.projector = MLP(feat_dim, proj_hidden, proj_dim)
        self.predictor = MLP(proj_dim, pred_hidden, proj_dim)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.base_tau = base_tau
        self.register_buffer("tau", torch.tensor(base_tau, dtype=torch.float64))
        per_view_batchnorm(self)

    def _online(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x))

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        v1, v2 = views[0], views[1]  # BYOL uses the two global views
        # One batched forward whose BatchNorms normalize each view with its own statistics, as the paper's
        # one-forward-per-view code. Pooled statistics (a plain concatenated forward) learned slower: after 1 epoch
        # on Fashion-MNIST 74.7 % kNN vs 77.4 % per view, the independent BYOL 78.6 % (BENCHMARKS.md, issue 18).
        p1, p2 = self.forward_per_view(self._online, [v1, v2])
        with torch.no_grad():
            z1, z2 = self.forward_per_view(self._target, [v1, v2])
        loss = (normalized_mse(p1, z2) + normalized_mse(p2, z1)).mean()
        return loss, {"loss": loss.detach(), "tau": self.tau}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA of the online backbone and projector into the target, with the tau of step ``step``."""
        tau = cosine_tau(step, total_steps, self.base_tau)
        ema_update_(self.target_backbone, self.backbone, tau)
        ema_update_(self.target_projector, self.projector, tau)
        self.tau.fill_(tau)
