"""SwAV's Sinkhorn-Knopp in the log domain, fused.

The assignment is kept factored as ``log Q_bk = S_bk / eps + u_b + v_k``, so an iteration only updates
the two vectors:

    column step  v_k = -log K - logsumexp_b(S_bk / eps + u_b)      (every prototype gets 1/K of the mass)
    row step     u_b = -log B - logsumexp_k(S_bk / eps + v_k)      (every sample gets 1/B; B over all ranks)

and Q = exp(S / eps + u + v + log B) at the end (rows sum to 1). Nothing is exponentiated before its
max is subtracted, so eps = 0.05 with fp16/bf16 scores cannot overflow.

Two paths:
  * on chip (B x K <= ``ON_CHIP_MAX`` elements, one rank): ONE program loads the whole score tile into
    registers once, runs every iteration there, and writes Q: one launch, one read, one write.
  * streaming (larger, or several ranks): per iteration a column kernel (a grid of column blocks x
    row splits, each an online logsumexp over its rows), a tiny combine of the splits, and a row kernel
    (row blocks, online logsumexp over K); the column maxima and sums are all-reduced between the two
    on several ranks, as SwAV all-reduces its per-prototype sums. The scores are re-read from L2/HBM
    each pass; 3 iterations at B=4096, K=3000 are 7 passes over 49 MB (fp32).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

ON_CHIP_MAX = 16384  # elements of the (padded) B x K tile one program keeps in registers
COLUMN_BLOCKS = (128, 64, 32)  # column-block widths tried in order by the streaming path
MIN_PROGRAMS = 96  # column blocks that keep an H100's 132 SMs busy without splitting the rows


@triton.jit
def _on_chip_kernel(s_ptr, q_ptr, n_b, n_k, stride_s, inv_eps, log_b, log_k, n_iters,
                    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    rb = tl.arange(0, BLOCK_B)
    kc = tl.arange(0, BLOCK_K)
    b_ok = rb < n_b
    k_ok = kc < n_k
    mask = b_ok[:, None] & k_ok[None, :]
    s = tl.load(s_ptr + rb[:, None] * stride_s + kc[None, :], mask=mask, other=0.0).to(tl.float32) * inv_eps
    s = tl.where(mask, s, float("-inf"))
    u = tl.zeros([BLOCK_B], dtype=tl.float32)
    v = tl.zeros([BLOCK_K], dtype=tl.float32)
    for _ in range(n_iters):
        x = s + u[:, None]
        m = tl.max(x, axis=0)
        m = tl.where(k_ok, m, 0.0)
        v = -(m + tl.log(tl.where(k_ok, tl.sum(tl.exp(x - m[None, :]), axis=0), 1.0))) - log_k
        v = tl.where(k_ok, v, 0.0)
        x = s + v[None, :]
        m = tl.max(x, axis=1)
        m = tl.where(b_ok, m, 0.0)
        u = -(m + tl.log(tl.where(b_ok, tl.sum(tl.exp(x - m[:, None]), axis=1), 1.0))) - log_b
        u = tl.where(b_ok, u, 0.0)
    q = tl.exp(s + u[:, None] + v[None, :] + log_b)
    tl.store(q_ptr + rb[:, None] * n_k + kc[None, :], q, mask=mask)


@triton.jit
def _column_kernel(s_ptr, u_ptr, pm_ptr, ps_ptr, n_b, n_k, stride_s, inv_eps, rows_per_split,
                   BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial column logsumexp of S/eps + u over one split of the rows: (max, sum of exp(x - max))."""
    kc = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    k_ok = kc < n_k
    m = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    b_start = split * rows_per_split
    b_end = tl.minimum(b_start + rows_per_split, n_b)
    for b0 in range(b_start, b_end, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        b_ok = rb < b_end
        mask = b_ok[:, None] & k_ok[None, :]
        s = tl.load(s_ptr + rb[:, None] * stride_s + kc[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + rb, mask=b_ok, other=0.0)
        x = tl.where(mask, s * inv_eps + u[:, None], float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[None, :]), axis=0)
        m = m_new
    tl.store(pm_ptr + split * n_k + kc, m, mask=k_ok)
    tl.store(ps_ptr + split * n_k + kc, total, mask=k_ok)


@triton.jit
def _combine_kernel(pm_ptr, ps_ptr, m_ptr, t_ptr, n_k, n_split, BLOCK_K: tl.constexpr):
    """Merge the row splits' (max, sum) of each column."""
    kc = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kc < n_k
    m = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    for i in range(n_split):
        m = tl.maximum(m, tl.load(pm_ptr + i * n_k + kc, mask=k_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in range(n_split):
        pm = tl.load(pm_ptr + i * n_k + kc, mask=k_ok, other=float("-inf"))
        total += tl.load(ps_ptr + i * n_k + kc, mask=k_ok, other=0.0) * tl.exp(pm - m_safe)
    tl.store(m_ptr + kc, m_safe, mask=k_ok)
    tl.store(t_ptr + kc, total, mask=k_ok)


@triton.jit
def _row_kernel(s_ptr, m_ptr, t_ptr, u_ptr, n_b, n_k, stride_s, inv_eps, log_b, log_k,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """u_b = -log B - logsumexp_k(S_bk/eps + v_k), with v_k = -log K - (m_k + log t_k) from the column pass."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = rb < n_b
    m = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        k_ok = kc < n_k
        mask = b_ok[:, None] & k_ok[None, :]
        s = tl.load(s_ptr + rb[:, None] * stride_s + kc[None, :], mask=mask, other=0.0).to(tl.float32)
        cm = tl.load(m_ptr + kc, mask=k_ok, other=0.0)
        ct = tl.load(t_ptr + kc, mask=k_ok, other=1.0)
        v = -(cm + tl.log(ct)) - log_k
        x = tl.where(mask, s * inv_eps + v[None, :], float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    tl.store(u_ptr + rb, -(m + tl.log(tl.where(b_ok, total, 1.0))) - log_b, mask=b_ok)


@triton.jit
def _assign_kernel(s_ptr, u_ptr, m_ptr, t_ptr, q_ptr, n_b, n_k, stride_s, inv_eps, log_b, log_k,
                   BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Q = exp(S/eps + u + v + log B) (v from the last column pass)."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    kc = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    b_ok = rb < n_b
    k_ok = kc < n_k
    mask = b_ok[:, None] & k_ok[None, :]
    s = tl.load(s_ptr + rb[:, None] * stride_s + kc[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rb, mask=b_ok, other=0.0)
    cm = tl.load(m_ptr + kc, mask=k_ok, other=0.0)
    ct = tl.load(t_ptr + kc, mask=k_ok, other=1.0)
    v = -(cm + tl.log(ct)) - log_k
    tl.store(q_ptr + rb[:, None] * n_k + kc[None, :], tl.exp(s * inv_eps + u[:, None] + v[None, :] + log_b),
             mask=mask)


# Triton chose interpreted or compiled when the kernels above were decorated (TRITON_INTERPRET at import).
INTERPRETED = not isinstance(_row_kernel, triton.runtime.JITFunction)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def fits_on_chip(n_b: int, n_k: int) -> bool:
    """Whether the (padded) score tile is small enough for the one-program path."""
    return triton.next_power_of_2(n_b) * triton.next_power_of_2(n_k) <= ON_CHIP_MAX


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3, path: str = "auto") -> torch.Tensor:
    """Fused twin of :func:`fastssl.kernels.reference.sinkhorn` (rows of Q sum to 1; under a process group
    the column sums span every rank's rows, as the twin's).

    scores: (B, K) fp32/bf16/fp16 -> Q: (B, K) fp32. ``path``: auto | on_chip | streaming (tests force one).
    """
    scores = scores if scores.stride(1) == 1 else scores.contiguous()
    n_b, n_k = scores.shape
    world = _world_size()
    if path not in ("auto", "on_chip", "streaming"):
        raise ValueError(f"path must be auto, on_chip or streaming, got {path!r}")
    if path == "on_chip" and (world > 1 or not fits_on_chip(n_b, n_k)):
        raise ValueError(f"the on-chip path needs one rank and B*K <= {ON_CHIP_MAX} (padded), got {n_b}x{n_k}")
    q = torch.empty(n_b, n_k, dtype=torch.float32, device=scores.device)
    log_b_total, log_k = math.log(n_b * world), math.log(n_k)
    if path == "on_chip" or (path == "auto" and world == 1 and fits_on_chip(n_b, n_k)):
        block_b, block_k = triton.next_power_of_2(n_b), triton.next_power_of_2(n_k)
        _on_chip_kernel[(1,)](scores, q, n_b, n_k, scores.stride(0), 1.0 / eps, log_b_total, log_k, n_iters,
                              BLOCK_B=block_b, BLOCK_K=block_k, num_warps=8 if block_b * block_k > 4096 else 4)
        return q

    # Column pass: enough programs to fill the GPU. Narrower column blocks first (K=3000: 94 blocks of 32,
    # one launch per pass); only when K is too small for that, split the rows and merge the splits after.
    block_b_col = 32
    for block_k_col in COLUMN_BLOCKS:
        n_col_blocks = triton.cdiv(n_k, block_k_col)
        if n_col_blocks >= MIN_PROGRAMS:
            break
    n_split = 1 if n_col_blocks >= MIN_PROGRAMS else \
        max(1, min(triton.cdiv(n_b, 4 * block_b_col), triton.cdiv(4 * MIN_PROGRAMS, n_col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(n_b, n_split), block_b_col) * block_b_col
    n_split = triton.cdiv(n_b, rows_per_split)
    dev = scores.device
    u = torch.zeros(n_b, dtype=torch.float32, device=dev)
    pm = torch.empty(n_split, n_k, dtype=torch.float32, device=dev)
    ps = torch.empty(n_split, n_k, dtype=torch.float32, device=dev)
    if n_split == 1:  # the column kernel's output is already final
        col_max, col_sum = pm[0], ps[0]
    else:
        col_max = torch.empty(n_k, dtype=torch.float32, device=dev)
        col_sum = torch.empty(n_k, dtype=torch.float32, device=dev)
    block_b_row, block_k_row = 16, 128
    for _ in range(n_iters):
        _column_kernel[(n_col_blocks, n_split)](scores, u, pm, ps, n_b, n_k, scores.stride(0), 1.0 / eps,
                                                rows_per_split, BLOCK_B=block_b_col, BLOCK_K=block_k_col)
        if n_split > 1:
            _combine_kernel[(triton.cdiv(n_k, 1024),)](pm, ps, col_max, col_sum, n_k, n_split, BLOCK_K=1024)
        if world > 1:  # every rank's rows: rescale the local sums to the global maximum, then add them up
            global_max = col_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX)
            col_sum.mul_(torch.exp(col_max - global_max))
            dist.all_reduce(col_sum, op=dist.ReduceOp.SUM)
            col_max.copy_(global_max)
        _row_kernel[(triton.cdiv(n_b, block_b_row),)](scores, col_max, col_sum, u, n_b, n_k, scores.stride(0),
                                                      1.0 / eps, log_b_total, log_k,
                                                      BLOCK_B=block_b_row, BLOCK_K=block_k_row)
    if n_iters == 0:  # Q from the scores alone: v = 0 wherever the column pass never ran
        col_max.zero_()
        col_sum.fill_(1.0 / n_k)
    _assign_kernel[(triton.cdiv(n_b, 32), triton.cdiv(n_k, 128))](
        scores, u, col_max, col_sum, q, n_b, n_k, scores.stride(0), 1.0 / eps, log_b_total, log_k,
        BLOCK_B=32, BLOCK_K=128)
    return q
