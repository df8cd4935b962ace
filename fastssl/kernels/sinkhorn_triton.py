"""SwAV's Sinkhorn-Knopp, the whole iteration loop in one launch, in the log domain.

The assignment is kept factored as ``log Q_bk = S_bk / eps + u_b + v_k``, so an iteration only updates
the two vectors:

    column step  v_k = -log K - logsumexp_b(S_bk / eps + u_b)      (every prototype gets 1/K of the mass)
    row step     u_b = -log B - logsumexp_k(S_bk / eps + v_k)      (every sample gets 1/B)

and Q = exp(S / eps + u + v + log B) at the end (rows sum to 1). Nothing is exponentiated before its
max is subtracted, so eps = 0.05 with fp16/bf16 scores cannot overflow. One program streams tiles of S
(read from L2 after the first pass) and keeps u and v in a small scratch buffer; the scores matrix of
one rank (B x K, e.g. 256 x 3000) is a few MB, so a single program beats a launch per step.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _sinkhorn_kernel(s_ptr, q_ptr, u_ptr, v_ptr, n_b, n_k, stride_s, inv_eps, log_b, log_k, n_iters,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    for _ in range(n_iters):
        for k0 in range(0, n_k, BLOCK_K):
            kc = k0 + tl.arange(0, BLOCK_K)
            k_ok = kc < n_k
            m = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
            total = tl.zeros([BLOCK_K], dtype=tl.float32)
            for b0 in range(0, n_b, BLOCK_B):
                rb = b0 + tl.arange(0, BLOCK_B)
                b_ok = rb < n_b
                mask = b_ok[:, None] & k_ok[None, :]
                s = tl.load(s_ptr + rb[:, None] * stride_s + kc[None, :], mask=mask, other=0.0).to(tl.float32)
                u = tl.load(u_ptr + rb, mask=b_ok, other=0.0)
                x = tl.where(mask, s * inv_eps + u[:, None], float("-inf"))
                m_new = tl.maximum(m, tl.max(x, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[None, :]), axis=0)
                m = m_new
            tl.store(v_ptr + kc, -(m + tl.log(tl.where(k_ok, total, 1.0))) - log_k, mask=k_ok)
        tl.debug_barrier()  # every thread's v is written before any thread reads it
        for b0 in range(0, n_b, BLOCK_B):
            rb = b0 + tl.arange(0, BLOCK_B)
            b_ok = rb < n_b
            m = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
            total = tl.zeros([BLOCK_B], dtype=tl.float32)
            for k0 in range(0, n_k, BLOCK_K):
                kc = k0 + tl.arange(0, BLOCK_K)
                k_ok = kc < n_k
                mask = b_ok[:, None] & k_ok[None, :]
                s = tl.load(s_ptr + rb[:, None] * stride_s + kc[None, :], mask=mask, other=0.0).to(tl.float32)
                v = tl.load(v_ptr + kc, mask=k_ok, other=0.0)
                x = tl.where(mask, s * inv_eps + v[None, :], float("-inf"))
                m_new = tl.maximum(m, tl.max(x, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
                m = m_new
            tl.store(u_ptr + rb, -(m + tl.log(tl.where(b_ok, total, 1.0))) - log_b, mask=b_ok)
        tl.debug_barrier()
    for b0 in range(0, n_b, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        b_ok = rb < n_b
        u = tl.load(u_ptr + rb, mask=b_ok, other=0.0)
        for k0 in range(0, n_k, BLOCK_K):
            kc = k0 + tl.arange(0, BLOCK_K)
            k_ok = kc < n_k
            mask = b_ok[:, None] & k_ok[None, :]
            s = tl.load(s_ptr + rb[:, None] * stride_s + kc[None, :], mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + kc, mask=k_ok, other=0.0)
            x = tl.where(mask, s * inv_eps + u[:, None] + v[None, :] + log_b, float("-inf"))
            tl.store(q_ptr + rb[:, None] * n_k + kc[None, :], tl.exp(x), mask=mask)


# Triton chose interpreted or compiled when the kernels above were decorated (TRITON_INTERPRET at import).
INTERPRETED = not isinstance(_sinkhorn_kernel, triton.runtime.JITFunction)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """Fused twin of :func:`fastssl.kernels.reference.sinkhorn` for one rank.

    scores: (B, K) fp32/bf16/fp16 -> Q: (B, K) fp32, rows summing to 1.
    """
    scores = scores if scores.stride(1) == 1 else scores.contiguous()
    n_b, n_k = scores.shape
    q = torch.empty(n_b, n_k, dtype=torch.float32, device=scores.device)
    u = torch.zeros(n_b, dtype=torch.float32, device=scores.device)
    v = torch.empty(n_k, dtype=torch.float32, device=scores.device)
    _sinkhorn_kernel[(1,)](scores, q, u, v, n_b, n_k, scores.stride(0), 1.0 / eps, math.log(n_b), math.log(n_k),
                           n_iters, BLOCK_B=32, BLOCK_K=128, num_warps=8)
    return q
