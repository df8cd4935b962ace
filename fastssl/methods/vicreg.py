"""VICReg (Bardes et al., 2022): Variance-Invariance-Covariance Regularization of the embeddings of two views.

    z, z' = h(f(x)), h(f(x'))                  expander 8192-8192-8192
    s(z, z') = mean_b ||z_b - z'_b||^2 / D                                     invariance (mean squared error)
    v(z)     = mean_j max(0, 1 - sqrt(Var(z_.j) + 1e-4))                       variance, per dimension
    c(z)     = sum_{i != j} Cov(z)_ij^2 / D                                     covariance
    loss = 25 s(z, z') + 25 (v(z) + v(z')) / 2 + 1 (c(z) + c(z'))
Variance and covariance are statistics of the whole batch: the embeddings of every rank are gathered for them.
BatchNorm statistics: per view (the paper's code forwards each view on its own), kept inside one batched forward by
``forward_per_view``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastssl.kernels import all_gather_with_grad
from fastssl.methods.base import SSLMethod
from fastssl.models import MLP
from fastssl.models.norm import per_view_batchnorm


def variance_term(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Hinge on each dimension's standard deviation (unbiased) at 1. z: (N, D) -> scalar fp32."""
    std = torch.sqrt(z.float().var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """Sum of the squared off-diagonal covariances (unbiased), divided by D. z: (N, D) -> scalar fp32."""
    n, d = z.shape
    z = z.float() - z.float().mean(dim=0)
    with torch.autocast(z.device.type, enabled=False):  # the covariances in fp32, also under AMP
        cov = z.T @ z / (n - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, gather: bool = True) -> tuple[torch.Tensor, dict]:
    """The VICReg objective. z1, z2: (N, D) any float dtype, this rank's rows -> (scalar fp32, its three terms).

    The invariance term is a mean over this rank's rows (DDP's gradient average makes it the global mean);
    with ``gather`` and a process group, variance and covariance see every rank's rows (with gradient)."""
    invariance = F.mse_loss(z1.float(), z2.float())
    if gather:
        z1, z2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
    variance = (variance_term(z1) + variance_term(z2)) / 2
    covariance = covariance_term(z1) + covariance_term(z2)
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, {"invariance": invariance.detach(), "variance": variance.detach(), "covariance": covariance.detach()}


class VICReg(SSLMethod):
    def __init__(self, backbone: nn.Module, feat_dim: int, proj_hidden: int = 8192, proj_dim: int = 8192,
                 proj_layers: int = 3, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0):
        super().__init__(backbone)
        self.expander = MLP(feat_dim, proj_hidden, proj_dim, n_layers=proj_layers)
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff
        per_view_batchnorm(self)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.expander(self.backbone(x))

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        # The two global views in one batched forward, every BatchNorm per view (the paper's code: a forward each)
        z1, z2 = self.forward_per_view(self._embed, views[:2])
        loss, terms = vicreg_loss(z1, z2, self.sim_coeff, self.std_coeff, self.cov_coeff)
        return loss, {"loss": loss.detach(), **terms}
