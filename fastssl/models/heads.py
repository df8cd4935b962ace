"""Projection / prediction heads, SwAV's prototypes and DINO's head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    """``Linear -> BN -> ReLU`` repeated ``n_layers - 1`` times, then ``Linear`` (BYOL / SimCLR heads).

    ``forward(x: (B, in_dim)) -> (B, out_dim)``. ``last_bn`` adds an affine-free BN at the end (MoCo v3).
    ``last_bias``: whether the output Linear has a bias (default: when no BN follows it; MoCo v3's code has
    none in any layer, its predictor without an output BN included).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, n_layers: int = 2, last_bn: bool = False,
                 last_bias: bool | None = None):
        if n_layers < 1:
            raise ValueError(f"MLP needs n_layers >= 1, got {n_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(n_layers - 1):
            layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_bn if last_bias is None else last_bias))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
        # True: the head computes in fp32 even inside a bf16/fp16 autocast region (train.head_precision=fp32)
        self.fp32 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)



class Prototypes(nn.Module):
    """SwAV's prototypes: ``n_prototypes`` trainable unit vectors c_k in the projection space.

    ``forward(z: (B, dim)) -> (B, n_prototypes)`` scores ``z @ C.T``: cosine similarities when z is unit-norm and
    the rows of C are kept unit-norm by :meth:`normalize_` (SwAV renormalizes them after every update).
    """

    def __init__(self, dim: int, n_prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_prototypes, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialization
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        """Project every prototype back onto the unit sphere, in place."""
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight)


class DINOHead(nn.Module):
    """DINO's projection head: an MLP (GELU, optional BN) to a ``bottleneck_dim`` code, L2-normalized, then a
    weight-normalized linear layer without bias to ``out_dim`` logits: ``w_k = g_k v_k / ||v_k||``, with every
    g_k fixed to 1 when ``norm_last_layer`` (the paper's choice: it stabilizes training).

    ``forward(x: (B, in_dim)) -> (B, out_dim)``; ``last_layer_parameters()`` are what DINO freezes early on.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"DINOHead needs n_layers >= 1, got {n_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(n_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_v, a=math.sqrt(5))
        self.last_g = nn.Parameter(torch.ones(out_dim), requires_grad=not norm_last_layer)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return [self.last_v, self.last_g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        weight = self.last_g[:, None] * F.normalize(self.last_v, dim=1)
        return F.linear(x, weight)
