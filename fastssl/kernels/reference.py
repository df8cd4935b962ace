"""Plain-PyTorch reference twins of the fused loss kernels.

Each function here is the ground truth its fused twin is tested against: small, pure, and written
to read like the formula. Accumulation is fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalized_mse(p: torch.Tensor, z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """BYOL's regression loss per row: ``2 - 2 cos(p_i, z_i)``.

    p, z: (N, D) any float dtype -> (N,) fp32.
    """
    if p.shape != z.shape or p.dim() != 2:
        raise ValueError(f"normalized_mse expects two (N, D) tensors of one shape, got {tuple(p.shape)} and "
                         f"{tuple(z.shape)}")
    p = F.normalize(p.float(), dim=1, eps=eps)
    z = F.normalize(z.float(), dim=1, eps=eps)
    return 2.0 - 2.0 * (p * z).sum(dim=1)
