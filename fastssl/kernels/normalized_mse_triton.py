"""BYOL's ``2 - 2 cos(p_i, z_i)`` in one pass over p and z forward and one pass backward.

Forward reads each row once and keeps three fp32 sums (|p|^2, |z|^2, p.z); backward reuses them, so
neither direction writes a normalized copy of p or z. With ``np = max(|p|, eps)`` (F.normalize's
clamp) and ``c = p.z / (np nz)``:

    d loss / d p = -2 g (z / (np nz) - c p / np^2)      (the second term only where |p| > eps)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS = 1e-12


@triton.jit
def _fwd_kernel(p_ptr, z_ptr, loss_ptr, stats_ptr, n_rows, dim, stride_p, stride_z, eps,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    pp = tl.zeros([BLOCK_N], dtype=tl.float32)
    zz = tl.zeros([BLOCK_N], dtype=tl.float32)
    pz = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < dim)[None, :]
        p = tl.load(p_ptr + rows[:, None] * stride_p + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        pp += tl.sum(p * p, axis=1)
        zz += tl.sum(z * z, axis=1)
        pz += tl.sum(p * z, axis=1)
    inv_np = 1.0 / tl.maximum(tl.sqrt(pp), eps)
    inv_nz = 1.0 / tl.maximum(tl.sqrt(zz), eps)
    tl.store(loss_ptr + rows, 2.0 - 2.0 * pz * inv_np * inv_nz, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 0, pp, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 1, zz, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 2, pz, mask=row_ok)


@triton.jit
def _bwd_kernel(p_ptr, z_ptr, g_ptr, stats_ptr, dp_ptr, dz_ptr, n_rows, dim, stride_p, stride_z, eps,
                NEED_DP: tl.constexpr, NEED_DZ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    pp = tl.load(stats_ptr + rows * 3 + 0, mask=row_ok, other=1.0)
    zz = tl.load(stats_ptr + rows * 3 + 1, mask=row_ok, other=1.0)
    pz = tl.load(stats_ptr + rows * 3 + 2, mask=row_ok, other=0.0)
    norm_p, norm_z = tl.sqrt(pp), tl.sqrt(zz)
    inv_np = 1.0 / tl.maximum(norm_p, eps)
    inv_nz = 1.0 / tl.maximum(norm_z, eps)
    cos = pz * inv_np * inv_nz
    # Below the clamp the norm is the constant eps and contributes no gradient.
    self_p = tl.where(norm_p > eps, cos * inv_np * inv_np, 0.0)
    self_z = tl.where(norm_z > eps, cos * inv_nz * inv_nz, 0.0)
    cross = -2.0 * g * inv_np * inv_nz
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < dim)[None, :]
        p = tl.load(p_ptr + rows[:, None] * stride_p + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_DP:
            dp = cross[:, None] * z + (2.0 * g * self_p)[:, None] * p
            tl.store(dp_ptr + rows[:, None] * dim + cols[None, :], dp.to(dp_ptr.dtype.element_ty), mask=mask)
        if NEED_DZ:
            dz = cross[:, None] * p + (2.0 * g * self_z)[:, None] * z
            tl.store(dz_ptr + rows[:, None] * dim + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


# Triton chose interpreted or compiled when the kernels above were decorated (TRITON_INTERPRET at import).
INTERPRETED = not isinstance(_bwd_kernel, triton.runtime.JITFunction)


def _blocks(dim: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(max(dim, 16)), 256)
    return max(4096 // block_d, 1), block_d


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


class _NormalizedMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        p, z = _rows_contiguous(p), _rows_contiguous(z)
        n, dim = p.shape
        loss = torch.empty(n, dtype=torch.float32, device=p.device)
        stats = torch.empty(n, 3, dtype=torch.float32, device=p.device)
        block_n, block_d = _blocks(dim)
        _fwd_kernel[(triton.cdiv(n, block_n),)](p, z, loss, stats, n, dim, p.stride(0), z.stride(0), EPS,
                                                BLOCK_N=block_n, BLOCK_D=block_d)
        ctx.save_for_backward(p, z, stats)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, z, stats = ctx.saved_tensors
        need_dp, need_dz = ctx.needs_input_grad
        n, dim = p.shape
        dp = torch.empty(n, dim, dtype=p.dtype, device=p.device) if need_dp else None
        dz = torch.empty(n, dim, dtype=z.dtype, device=z.device) if need_dz else None
        block_n, block_d = _blocks(dim)
        _bwd_kernel[(triton.cdiv(n, block_n),)](
            p, z, grad.contiguous(), stats, dp if need_dp else p, dz if need_dz else z, n, dim,
            p.stride(0), z.stride(0), EPS, NEED_DP=need_dp, NEED_DZ=need_dz, BLOCK_N=block_n, BLOCK_D=block_d)
        return dp, dz


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Fused ``2 - 2 cos(p_i, z_i)``. p, z: (N, D) fp32/bf16/fp16, same shape -> (N,) fp32."""
    return _NormalizedMSE.apply(p, z)
