"""Projection / prediction heads."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """``Linear -> BN -> ReLU`` repeated ``n_layers - 1`` times, then ``Linear`` (BYOL / SimCLR heads).

    ``forward(x: (B, in_dim)) -> (B, out_dim)``. ``last_bn`` adds an affine-free BN at the end (MoCo v3).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, n_layers: int = 2, last_bn: bool = False):
        if n_layers < 1:
            raise ValueError(f"MLP needs n_layers >= 1, got {n_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(n_layers - 1):
            layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)

