"""SimCLR (Chen et al., 2020): two augmented views of each image are pulled together and pushed away from
every other view in the (global) batch.

    h = f(x),  z = g(h)                      (g: 2-layer MLP projector, 2048 -> 128 on ResNet-50)
    l(i, j) = -log  exp(cos(z_i, z_j) / T) / sum_{k != i} exp(cos(z_i, z_k) / T)      over the 2N views
    loss    = mean of l over all 2N rows (NT-Xent)

With several ranks the 2N rows of every rank are the negatives of every row ("global" negatives, as the
paper's TPU implementation); the NT-Xent kernel gathers them with their gradient, so a run on W ranks
equals one process with the whole batch. Batch statistics: the trainer turns BatchNorm into SyncBatchNorm
on multi-GPU runs, the paper's global BN, pooled over both views (its code concatenates them:
one forward). Recipe: LARS, lr 0.3 x batch / 256, wd 1e-6, T = 0.1.
"""

from __future__ import annotations

import torch
from torch import nn

from fastssl.kernels import nt_xent
from fastssl.methods.base import SSLMethod
from fastssl.models import MLP


class SimCLR(SSLMethod):
    def __init__(self, backbone: nn.Module, feat_dim: int, proj_hidden: int = 2048, proj_dim: int = 128,
                 temperature: float = 0.1):
        super().__init__(backbone)
        if temperature <= 0:
            raise ValueError(f"SimCLR temperature must be > 0, got {temperature}")
        self.projector = MLP(feat_dim, proj_hidden, proj_dim)
        self.temperature = temperature

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        z1, z2 = self.forward_by_resolution(self._project, views[:2])  # SimCLR uses the two global views
        loss = nt_xent(z1, z2, self.temperature)
        return loss, {"loss": loss.detach()}
