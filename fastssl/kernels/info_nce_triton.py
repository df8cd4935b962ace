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

With fewer row blocks than the GPU has SMs, the forward and dq kernels also split the keys (split-K): a
program per (row block, part of the keys), the parts' logsumexps merged by one logsumexp (the positive joins
there), the parts of dq summed (``key_splits``). Each kernel launches with the first of ``_configs`` whose
shared memory the GPU holds (Triton refuses the others at launch).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

MAX_DIM = 512  # q and key blocks hold a whole row; wider embeddings go to the twin


@triton.jit
def _fwd_kernel(q_ptr, pos_ptr, k_ptr, self_ptr, lse_ptr, posl_ptr, n_rows, n_keys, keys_per_split, dim, inv_t,
                HAS_SELF: tl.constexpr, EXTRA_POS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (i, s): query rows of block i against keys [s * keys_per_split, (s + 1) * keys_per_split); it
    # writes that part's logsumexp to row s of lse (S, N), and part 0 the positive logits.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    k_lo = split * keys_per_split
    k_hi = tl.minimum(k_lo + keys_per_split, n_keys)
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
    if EXTRA_POS:  # one part only (with several, the positive joins when the parts are merged)
        m_i = pos_logit
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        kcols = n0 + tl.arange(0, BLOCK_N)
        k_ok = kcols < k_hi
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
    lse = m_i + tl.log(l_i)  # -inf for a part with no valid key: it drops out of the merge
    tl.store(lse_ptr + split * n_rows + rows, lse, mask=row_ok)
    tl.store(posl_ptr + rows, pos_logit, mask=row_ok & (split == 0))


@triton.jit
def _dq_kernel(q_ptr, k_ptr, self_ptr, lse_ptr, w_ptr, dq_ptr, n_rows, n_keys, keys_per_split, dim, inv_t,
               HAS_SELF: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (i, s): the part of dq of row block i that keys [s * keys_per_split, ...) give, into dq[s] (S, N, D).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    k_lo = split * keys_per_split
    k_hi = tl.minimum(k_lo + keys_per_split, n_keys)
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
    for n0 in range(k_lo, k_hi, BLOCK_N):
        kcols = n0 + tl.arange(0, BLOCK_N)
        k_ok = kcols < k_hi
        k = tl.load(k_ptr + kcols[:, None] * dim + dcols[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * inv_t
        valid = row_ok[:, None] & k_ok[None, :]
        if HAS_SELF:
            valid = valid & (kcols[None, :] != self_col[:, None])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0) * w[:, None]
        acc += tl.dot(p.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dq_ptr + split * n_rows * dim + rows[:, None] * dim + dcols[None, :], acc, mask=qmask)


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


def _configs(dtype: torch.dtype, dim: int) -> list[dict]:
    """Launch configurations in the order they are tried: ``_config``, then the same with 2 pipelining stages,
    then 16 x 16 tiles in one stage.

    Shared memory per block, fp32 with 256 < D <= 512 (BLOCK_D 512), compiled for sm_90 here (no GPU needed) by
    Triton 3.6 (the H200 node's) and 3.8: 192-197 KiB for the default 3 stages (fits an H100/H200's 227 KiB, not
    an A100's 163 KiB), 128-132 KiB for 2 stages; fp32 D = 256: 128-170 KiB. The last one fits the 99 KiB of
    sm_86/89 GPUs (tests/test_kernels_triton.py compiles them)."""
    base = _config(dtype, dim)
    small = {**base, "BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    return [base, {**base, "num_stages": 2}, small]


# (kernel, device, dtype, D) -> index in _configs of the first configuration that launched there.
_FITS: dict[tuple, int] = {}


def _fitting(name: str, device: torch.device, dtype: torch.dtype, dim: int, launch):
    """``launch(cfg)`` with the first of ``_configs`` that fits the device, remembered for the next calls.

    Triton checks a kernel's shared memory against the device's when it launches it, before anything runs, and
    raises ``OutOfResources``: the next, smaller configuration is then tried. Returns what ``launch`` returns.
    """
    key = (name, str(device), dtype, dim)
    configs = _configs(dtype, dim)
    error = None
    for i in range(_FITS.get(key, 0), len(configs)):
        try:
            result = launch(configs[i])
        except OutOfResources as e:
            error = e
            continue
        _FITS[key] = i
        return result
    raise RuntimeError(f"fastssl InfoNCE kernel {name} (D={dim}, {dtype}): no configuration fits this GPU's "
                       f"shared memory ({error}); set FASTSSL_KERNELS=reference") from error


# Split-K: with fewer row blocks than SMs (MoCo v2's bench shape: N = 4,096 rows in blocks of 64 = 64 programs on
# a 132-SM H100) the forward and dq kernels also cut the keys into parts, one program per (row block, part); the
# parts' logsumexps are merged with one logsumexp over the parts, the dq parts summed.
PROGRAMS_PER_SM = 2  # enough programs to hide one program's memory waits behind another's
MIN_BLOCKS_PER_PART = 8  # key blocks a part keeps at least: the merge must stay cheap beside the work it splits


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def key_splits(n_rows: int, n_keys: int, block_m: int, block_n: int, sms: int) -> int:
    """Parts to cut the keys into so that row blocks x parts reach ``PROGRAMS_PER_SM`` programs per SM, each part
    keeping at least ``MIN_BLOCKS_PER_PART`` key blocks; 1 when the row blocks alone fill the GPU."""
    row_blocks = triton.cdiv(n_rows, block_m)
    if row_blocks >= PROGRAMS_PER_SM * sms:
        return 1
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, row_blocks)
    return max(1, min(wanted, triton.cdiv(n_keys, block_n) // MIN_BLOCKS_PER_PART))


def _keys_per_split(n_keys: int, splits: int, block_n: int) -> int:
    """Keys per part, a whole number of key blocks, so that ``splits`` parts cover ``n_keys``."""
    return triton.cdiv(triton.cdiv(n_keys, splits), block_n) * block_n


class _ContrastiveRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, pos, keys, self_col, inv_t: float, extra_pos: bool, splits: int | None):
        n, dim = q.shape
        n_keys = keys.shape[0]
        pos_logit = torch.empty(n, dtype=torch.float32, device=q.device)
        has_self = self_col is not None
        self_arg = self_col if has_self else pos_logit

        def launch(cfg):
            parts_wanted = splits or key_splits(n, n_keys, cfg["BLOCK_M"], cfg["BLOCK_N"], _sm_count(q.device))
            per_split = _keys_per_split(n_keys, parts_wanted, cfg["BLOCK_N"])
            n_parts = max(1, triton.cdiv(n_keys, per_split))  # no empty part
            parts = torch.empty(n_parts, n, dtype=torch.float32, device=q.device)
            _fwd_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), n_parts)](
                q, pos, keys, self_arg, parts, pos_logit, n, n_keys, per_split, dim, inv_t,
                HAS_SELF=has_self, EXTRA_POS=extra_pos and n_parts == 1, **cfg)
            return parts, per_split

        parts, per_split = _fitting("fwd", q.device, q.dtype, dim, launch)
        splits = len(parts)
        if splits == 1:
            lse = parts[0]
        else:
            lse = torch.logsumexp(torch.cat([parts, pos_logit[None]]) if extra_pos else parts, dim=0)
        ctx.save_for_backward(q, pos, keys, self_col, lse, pos_logit)
        ctx.inv_t, ctx.extra_pos, ctx.splits, ctx.per_split = inv_t, extra_pos, splits, per_split
        return lse - pos_logit

    @staticmethod
    def backward(ctx, grad):
        q, pos, keys, self_col, lse, pos_logit = ctx.saved_tensors
        need_q, need_pos, need_keys = ctx.needs_input_grad[:3]
        n, dim = q.shape
        n_keys = keys.shape[0]
        has_self = self_col is not None
        self_arg = self_col if has_self else lse
        w = (grad.float() * ctx.inv_t).contiguous()
        c = torch.exp(pos_logit - lse) - 1.0 if ctx.extra_pos else torch.full_like(lse, -1.0)
        dq = dpos = dkeys = None
        if need_q:
            parts = torch.empty(ctx.splits, n, dim, dtype=torch.float32, device=q.device)
            _fitting("dq", q.device, q.dtype, dim, lambda cfg: _dq_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), ctx.splits)](
                q, keys, self_arg, lse, w, parts, n, n_keys, ctx.per_split, dim, ctx.inv_t, HAS_SELF=has_self, **cfg))
            dq = parts[0] if ctx.splits == 1 else parts.sum(0)
            dq = (dq + (w * c)[:, None] * pos.float()).to(q.dtype)
        if need_pos:
            dpos = ((w * c)[:, None] * q.float()).to(pos.dtype)
        if need_keys:
            dkeys = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
            _fitting("dk", q.device, q.dtype, dim, lambda cfg: _dk_kernel[(triton.cdiv(n_keys, cfg["BLOCK_N"]),)](
                q, keys, self_arg, lse, w, dkeys, n, n_keys, dim, ctx.inv_t, HAS_SELF=has_self, **cfg))
            dkeys = dkeys.to(keys.dtype)
        return dq, dpos, dkeys, None, None, None, None


def contrastive_rows(q: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor, temperature: float,
                     self_col: torch.Tensor | None = None, extra_pos: bool = False,
                     splits: int | None = None) -> torch.Tensor:
    """Fused twin of :func:`fastssl.kernels.reference.contrastive_rows`.

    q, pos: (N, D), keys: (M, D), one dtype (fp32/bf16/fp16), already normalized; self_col: (N,) int
    column of keys to leave out per row -> (N,) fp32. ``splits``: parts the keys are cut into (split-K; default
    ``key_splits`` for this GPU's SM count).
    """
    if q.shape[1] > MAX_DIM:
        from fastssl.kernels import reference

        return reference.contrastive_rows(q, pos, keys, temperature, self_col, extra_pos)
    dtype = q.dtype
    q, pos, keys = (t.to(dtype).contiguous() for t in (q, pos, keys))
    if self_col is not None:
        self_col = self_col.to(device=q.device, dtype=torch.int32).contiguous()
    return _ContrastiveRows.apply(q, pos, keys, self_col, 1.0 / temperature, extra_pos, splits)
