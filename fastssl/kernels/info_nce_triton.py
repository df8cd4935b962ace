"""Streaming contrastive cross-entropy: ``logsumexp_j(q_i . key_j / T) - q_i . pos_i / T`` per row, without
ever holding the N x M logits in memory.

Forward, one program per block of query rows walks over blocks of keys keeping a running max and a
running sum of exponentials (online logsumexp), and saves only the per-row logsumexp. Backward
recomputes each logits tile from q, the keys and that logsumexp, as flash attention does: one kernel
for dq (program per query block, loop over keys) and one for dkeys (program per key block, loop over
queries), so neither direction needs atomics. With ``s_ij = q_i . key_j / T``, ``p_ij = exp(s_ij - lse_i)``
and g_i the incoming gradient of row i:

    dq_i = g_i / T (sum_j p_ij key_j + c_i pos_i),  dkey_j = sum_i g_i / T p_ij q_i,  dpos_i = g_i / T c_i q_i
    c_i = p_i,pos - 1 when the positive is an extra logit (MoCo v2 with a queue), else -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_DIM = 512  # q and key blocks hold a whole row; wider embeddings go to the twin


@triton.jit
def _fwd_kernel(q_ptr, pos_ptr, k_ptr, self_ptr, loss_ptr, lse_ptr, posl_ptr, n_rows, n_keys, dim, inv_t,
                HAS_SELF: tl.constexpr, EXTRA_POS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    dcols = tl.arange(0, BLOCK_D)
    d_ok = dcols < dim
    qmask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + rows[:, None] * dim + dcols[None, :], mask=qmask, other=0.0)
    pos = tl.load(pos_ptr + rows[:, None] * dim + dcols[None, :], mask=qmask, other=0.0)
    pos_logit = tl.sum(q.to(tl.float32) * pos.to(tl.float32), axis=1) * inv_t
    if DOT_F32:  # Triton's interpreter gets bf16 dots wrong: compute them in fp32 there
        q = q.to(tl.float32)
    if HAS_SELF:
        self_col = tl.load(self_ptr + rows, mask=row_ok, other=-1)
    if EXTRA_POS:
        m_i = pos_logit
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, n_keys, BLOCK_N):
        kcols = n0 + tl.arange(0, BLOCK_N)
        k_ok = kcols < n_keys
        kt = tl.load(k_ptr + kcols[None, :] * dim + dcols[:, None], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * inv_t
        valid = k_ok[None, :]
        if HAS_SELF:
            valid = valid & (kcols[None, :] != self_col[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    tl.store(loss_ptr + rows, lse - pos_logit, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(posl_ptr + rows, pos_logit, mask=row_ok)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, self_ptr, lse_ptr, w_ptr, dq_ptr, n_rows, n_keys, dim, inv_t,
               HAS_SELF: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    dcols = tl.arange(0, BLOCK_D)
    d_ok = dcols < dim
    qmask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + rows[:, None] * dim + dcols[None, :], mask=qmask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)  # g_i / T
    if HAS_SELF:
        self_col = tl.load(self_ptr + rows, mask=row_ok, other=-1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n_keys, BLOCK_N):
        kcols = n0 + tl.arange(0, BLOCK_N)
        k_ok = kcols < n_keys
        k = tl.load(k_ptr + kcols[:, None] * dim + dcols[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * inv_t
        valid = row_ok[:, None] & k_ok[None, :]
        if HAS_SELF:
            valid = valid & (kcols[None, :] != self_col[:, None])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0) * w[:, None]
        acc += tl.dot(p.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dq_ptr + rows[:, None] * dim + dcols[None, :], acc, mask=qmask)


@triton.jit
def _dk_kernel(q_ptr, k_ptr, self_ptr, lse_ptr, w_ptr, dk_ptr, n_rows, n_keys, dim, inv_t,
               HAS_SELF: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    kcols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = kcols < n_keys
    dcols = tl.arange(0, BLOCK_D)
    d_ok = dcols < dim
    kmask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + kcols[:, None] * dim + dcols[None, :], mask=kmask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, n_rows, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        q = tl.load(q_ptr + rows[:, None] * dim + dcols[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * inv_t  # (keys, rows)
        valid = k_ok[:, None] & row_ok[None, :]
        if HAS_SELF:
            self_col = tl.load(self_ptr + rows, mask=row_ok, other=-1)
            valid = valid & (kcols[:, None] != self_col[None, :])
        pt = tl.where(valid, tl.exp(st - lse[None, :]), 0.0) * w[None, :]
        acc += tl.dot(pt.to(q.dtype), q, input_precision=PRECISION)
    tl.store(dk_ptr + kcols[:, None] * dim + dcols[None, :], acc, mask=kmask)


# Triton chose interpreted or compiled when the kernels above were decorated (TRITON_INTERPRET at import).
INTERPRETED = not isinstance(_dk_kernel, triton.runtime.JITFunction)


def _config(dtype: torch.dtype, dim: int) -> dict:
    # A whole row lives in registers (q tile, and the fp32 dq/dkeys accumulator): narrower tiles and
    # more warps as D grows. fp32 dots are "ieee": tf32 would cost 1e-3 relative error on the logits.
    block_d = triton.next_power_of_2(max(dim, 16))
    block_m, block_n, warps = {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 64, 4),
                               256: (64, 32, 8)}.get(block_d, (32, 32, 8))
    return dict(DOT_F32=dtype == torch.bfloat16 and INTERPRETED,
                PRECISION="ieee" if dtype == torch.float32 else "tf32",
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)


class _ContrastiveRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, pos, keys, self_col, inv_t: float, extra_pos: bool):
        n, dim = q.shape
        cfg = _config(q.dtype, dim)
        loss, lse, pos_logit = (torch.empty(n, dtype=torch.float32, device=q.device) for _ in range(3))
        has_self = self_col is not None
        self_arg = self_col if has_self else lse
        _fwd_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](
            q, pos, keys, self_arg, loss, lse, pos_logit, n, keys.shape[0], dim, inv_t,
            HAS_SELF=has_self, EXTRA_POS=extra_pos, **cfg)
        ctx.save_for_backward(q, pos, keys, self_col, lse, pos_logit)
        ctx.inv_t, ctx.extra_pos = inv_t, extra_pos
        return loss

    @staticmethod
    def backward(ctx, grad):
        q, pos, keys, self_col, lse, pos_logit = ctx.saved_tensors
        need_q, need_pos, need_keys = ctx.needs_input_grad[:3]
        n, dim = q.shape
        cfg = _config(q.dtype, dim)
        has_self = self_col is not None
        self_arg = self_col if has_self else lse
        w = (grad.float() * ctx.inv_t).contiguous()
        c = torch.exp(pos_logit - lse) - 1.0 if ctx.extra_pos else torch.full_like(lse, -1.0)
        dq = dpos = dkeys = None
        if need_q:
            dq = torch.empty(n, dim, dtype=torch.float32, device=q.device)
            _dq_kernel[(triton.cdiv(n, cfg["BLOCK_M"]),)](q, keys, self_arg, lse, w, dq, n, keys.shape[0], dim,
                                                          ctx.inv_t, HAS_SELF=has_self, **cfg)
            dq = (dq + (w * c)[:, None] * pos.float()).to(q.dtype)
        if need_pos:
            dpos = ((w * c)[:, None] * q.float()).to(pos.dtype)
        if need_keys:
            dkeys = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
            _dk_kernel[(triton.cdiv(keys.shape[0], cfg["BLOCK_N"]),)](
                q, keys, self_arg, lse, w, dkeys, n, keys.shape[0], dim, ctx.inv_t, HAS_SELF=has_self, **cfg)
            dkeys = dkeys.to(keys.dtype)
        return dq, dpos, dkeys, None, None, None


def contrastive_rows(q: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor, temperature: float,
                     self_col: torch.Tensor | None = None, extra_pos: bool = False) -> torch.Tensor:
    """Fused twin of :func:`fastssl.kernels.reference.contrastive_rows`.

    q, pos: (N, D), keys: (M, D), one dtype (fp32/bf16/fp16), already normalized; self_col: (N,) int
    column of keys to leave out per row -> (N,) fp32.
    """
    if q.shape[1] > MAX_DIM:
        from fastssl.kernels import reference

        return reference.contrastive_rows(q, pos, keys, temperature, self_col, extra_pos)
    dtype = q.dtype
    q, pos, keys = (t.to(dtype).contiguous() for t in (q, pos, keys))
    if self_col is not None:
        self_col = self_col.to(device=q.device, dtype=torch.int32).contiguous()
    return _ContrastiveRows.apply(q, pos, keys, self_col, 1.0 / temperature, extra_pos)
