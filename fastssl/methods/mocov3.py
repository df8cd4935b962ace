"""MoCo v3 (Chen, Xie & He, 2021): MoCo without a queue. The keys are the momentum encoder's projections of
the other view of every image in the (global) batch; the query goes through an extra predictor.

    q = h(g(f(x))),  k = g'(f'(x))     (f', g': momentum copies of backbone and projector, no gradient)
    ctr(q, k) = -log  exp(q_i.k_i / T) / sum_j exp(q_i.k_j / T)  * 2T     (q, k normalized, j over all ranks)
    loss = ctr(q1, k2) + ctr(q2, k1)                                     (T = 0.2)
    m    = 1 - (1 - m0) (cos(pi k / K) + 1) / 2                           (m0 = 0.99 -> 1, cosine in steps)

Heads: a 3-layer projector g and a 2-layer predictor h, 4096 hidden and 256 out, BN after every layer
including the output ones (the last BN without affine). The authors' released ResNet-50 setting uses a
2-layer projector and no output BN in the predictor (``proj_layers=2, pred_last_bn=False``). The trainer
uses SyncBN on multi-GPU runs, per view (the paper's code forwards each view on its own;
``forward_per_view`` keeps that inside one batched forward, each view's statistics global across GPUs); with
no queue the negatives come from the same batch as the positive, so batch statistics leak nothing (unlike MoCo
v2, see its Shuffle-BN).

For ViTs the paper's stability fix is on by default (``frozen_patch_embed``): the patch projection stays
at its random initialization and is never trained. Recipes: ResNet-50 with LARS; ViT-S/16 and ViT-B/16
with AdamW (betas 0.9, 0.95, wd 0.1), lr 1.5e-4 x batch / 256, 40 warm-up epochs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastssl.kernels import info_nce
from fastssl.methods.base import SSLMethod
from fastssl.models import MLP
from fastssl.models.norm import per_view_batchnorm
from fastssl.optim.ema import ema_update_
from fastssl.optim.schedules import cosine_tau


class MoCoV3(SSLMethod):
    def __init__(self, backbone: nn.Module, feat_dim: int, proj_hidden: int = 4096, proj_dim: int = 256,
                 pred_hidden: int = 4096, proj_layers: int = 3, pred_last_bn: bool = True, temperature: float = 0.2,
                 base_tau: float = 0.99, frozen_patch_embed: bool = True):
        super().__init__(backbone)
        if temperature <= 0:
            raise ValueError(f"MoCo v3 temperature must be > 0, got {temperature}")
        if frozen_patch_embed and hasattr(backbone, "freeze_patch_embed"):  # ViTs only
            backbone.freeze_patch_embed()
        self.projector = MLP(feat_dim, proj_hidden, proj_dim, n_layers=proj_layers, last_bn=True)
        # No Linear of either MLP has a bias in the authors' code (a BN follows every hidden one; the predictor's
        # output has none either way)
        self.predictor = MLP(proj_dim, pred_hidden, proj_dim, n_layers=2, last_bn=pred_last_bn, last_bias=False)
        self.momentum_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.temperature, self.base_tau = temperature, base_tau
        self.register_buffer("tau", torch.tensor(base_tau, dtype=torch.float64))
        per_view_batchnorm(self)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return self.momentum_projector(self.momentum_backbone(x))

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        q1, q2 = self.forward_per_view(self._query, views[:2])
        with torch.no_grad():
            k1, k2 = self.forward_per_view(self._key, views[:2])
        t = self.temperature
        loss = info_nce(q1, k2, t, scale=2 * t) + info_nce(q2, k1, t, scale=2 * t)
        return loss, {"loss": loss.detach(), "tau": self.tau}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """Momentum update of the key encoder with the cosine-scheduled m of step ``step``."""
        tau = cosine_tau(step, total_steps, self.base_tau)
        ema_update_(self.momentum_backbone, self.backbone, tau)
        ema_update_(self.momentum_projector, self.projector, tau)
        self.tau.fill_(tau)
