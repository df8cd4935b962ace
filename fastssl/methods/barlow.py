"""Barlow Twins (Zbontar et al., 2021): make the cross-correlation matrix of the embeddings of two views,
standardized over the batch, close to the identity: invariance on the diagonal, redundancy reduction off it.

    z^A, z^B = g(f(x^A)), g(f(x^B))           projector 8192-8192-8192; each standardized over the batch
    C_ij  = sum_b z^A_bi z^B_bj / N             N: the global batch (every rank's rows)
    loss  = sum_i (1 - C_ii)^2  +  lambda sum_i sum_{j != i} C_ij^2                 lambda = 0.0051

BatchNorm statistics: per view (the paper's code forwards each view on its own), kept inside one batched forward by
``forward_per_view``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastssl.kernels import all_gather_with_grad
from fastssl.methods.base import SSLMethod
from fastssl.models import MLP
from fastssl.models.norm import per_view_batchnorm


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each column to zero mean and unit (biased) variance over the rows, as an affine-free BatchNorm does.
    z: (N, D) any float -> (N, D) fp32."""
    z = z.float()
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """The Barlow Twins objective on one batch. z1, z2: (N, D) any float dtype -> scalar fp32."""
    n = z1.shape[0]
    with torch.autocast(z1.device.type, enabled=False):  # the correlations in fp32, also under AMP
        c = standardize(z1).T @ standardize(z2) / n
    on_diag = torch.diagonal(c)
    return (1.0 - on_diag).pow(2).sum() + lambd * (c.pow(2).sum() - on_diag.pow(2).sum())


class BarlowTwins(SSLMethod):
    def __init__(self, backbone: nn.Module, feat_dim: int, proj_hidden: int = 8192, proj_dim: int = 8192,
                 proj_layers: int = 3, lambd: float = 0.0051):
        super().__init__(backbone)
        self.projector = MLP(feat_dim, proj_hidden, proj_dim, n_layers=proj_layers)
        self.lambd = lambd
        per_view_batchnorm(self)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        # The two global views in one batched forward, every BatchNorm per view (the paper's code: a forward each)
        z1, z2 = self.forward_per_view(self._embed, views[:2])
        # The whole batch of every rank: every rank computes the same global loss, and the gather's backward
        # routes each rank its rows' share, so DDP's average is the gradient of the one-process loss.
        loss = barlow_twins_loss(all_gather_with_grad(z1), all_gather_with_grad(z2), self.lambd)
        return loss, {"loss": loss.detach()}
