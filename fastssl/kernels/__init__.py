"""Loss kernels: one public function per op, the entry point every method calls.

The DESIGN contract: CUDA inputs with Triton go to a fused kernel, anything else to the plain-torch
twin in :mod:`fastssl.kernels.reference`, and ``FASTSSL_KERNELS=reference|triton`` forces a choice.
The fused kernels arrive with their own issue; today every op is served by its twin, so methods
already call through this module and pick the kernels up without a change.
"""

from __future__ import annotations

import torch

from fastssl.kernels import reference

__all__ = ["normalized_mse"]


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ``2 - 2 cos(p_i, z_i)`` per row. p, z: (N, D) float -> (N,) fp32."""
    return reference.normalized_mse(p, z)
