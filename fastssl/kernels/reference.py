"""Plain-PyTorch reference twins of the fused loss kernels.

Each function here is the ground truth its fused twin is tested against: small, pure, and written
to read like the formula. Accumulation is fp32 whatever the input dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _outside_autocast(fn):
    """Run ``fn`` with autocast off: the twins promise fp32 accumulation, and inside a bf16/fp16 autocast region
    (the training step's) their matmuls would otherwise run in the region's precision despite the ``.float()``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


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


@_outside_autocast
def contrastive_rows(q: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor, temperature: float,
                     self_col: torch.Tensor | None = None, extra_pos: bool = False) -> torch.Tensor:
    """The core every contrastive loss shares, per row: ``logsumexp(logits_i) - q_i.pos_i / T``.

    q, pos: (N, D) already normalized; keys: (M, D) already normalized; logits_i = q_i @ keys.T / T, with
    column ``self_col[i]`` left out when given, and the positive logit prepended when ``extra_pos``
    (MoCo v2: the positive is not among the keys). -> (N,) fp32.
    """
    q, pos, keys = q.float(), pos.float(), keys.float()
    logits = q @ keys.T / temperature
    if self_col is not None:
        logits = logits.scatter(1, self_col.long()[:, None], float("-inf"))
    pos_logit = (q * pos).sum(dim=1) / temperature
    if extra_pos:
        logits = torch.cat([pos_logit[:, None], logits], dim=1)
    return torch.logsumexp(logits, dim=1) - pos_logit


@_outside_autocast
def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float, queue: torch.Tensor | None = None,
             scale: float = 1.0) -> torch.Tensor:
    """InfoNCE as the MoCo papers write it, for one process.

    Without a queue (MoCo v3) logits are ``q @ k.T / T`` and the label of row i is i; with a queue (K, D),
    stored normalized (MoCo v2), logits are ``[q_i . k_i, q_i @ queue.T] / T`` and the label is 0.
    q, k: (N, D) any float dtype, normalized here -> scalar fp32 (mean over rows, times ``scale``).
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    if queue is None:
        logits, labels = q @ k.T, torch.arange(q.shape[0], device=q.device)
    else:
        logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.float().T], dim=1)
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return scale * F.cross_entropy(logits / temperature, labels)


@_outside_autocast
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: 2N rows, each row's positive is the other view of its image, the other 2N - 2
    rows are negatives, and the self-similarity is masked out.

    z1, z2: (N, D) any float dtype, normalized here -> scalar fp32 (mean over the 2N rows).
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, labels)


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=op)
    return x


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp in the log domain: soft assignments whose rows sum to 1.

    Alternately makes every prototype (column) carry 1/K of the mass and every sample (row) 1/B, B summed
    over ranks: the per-prototype sums are all-reduced, as SwAV does. In the log domain nothing
    overflows, whatever eps and the input dtype. scores: (B, K) any float dtype -> Q: (B, K) fp32.
    """
    log_q = scores.float() / eps
    b, k = log_q.shape
    b_total = b * _world_size()
    for _ in range(n_iters):
        # Column step: the log of each prototype's total mass over the whole (all-rank) batch.
        col_max = _all_reduce(log_q.amax(dim=0), dist.ReduceOp.MAX)
        col_max = torch.where(torch.isfinite(col_max), col_max, torch.zeros_like(col_max))
        col_sum = _all_reduce(torch.exp(log_q - col_max).sum(dim=0), dist.ReduceOp.SUM)
        log_q = log_q - (col_max + torch.log(col_sum)) - math.log(k)
        # Row step: rows are this rank's own samples, no communication.
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(b_total)
    return torch.exp(log_q + math.log(b_total))


def swav_loss(scores_per_view: list[torch.Tensor], q_per_view: list[torch.Tensor],
              temperature: float = 0.1) -> torch.Tensor:
    """SwAV's swapped prediction: the code of view a (``q_per_view[a]``, a < len(q_per_view)) is predicted
    from every other view's scores: ``-sum_k q_a log softmax(scores_v / T)``, averaged over rows, over
    the other views, then over the assigned views.

    scores_per_view: V tensors (B, K) any float dtype; q_per_view: A <= V tensors (B, K) -> scalar fp32.
    """
    n_views = len(scores_per_view)
    if n_views < 2 or not 1 <= len(q_per_view) <= n_views:
        raise ValueError(f"swav_loss needs >= 2 views and 1..{n_views} codes, got {n_views} and {len(q_per_view)}")
    log_p = [F.log_softmax(s.float() / temperature, dim=1) for s in scores_per_view]
    loss = scores_per_view[0].new_zeros((), dtype=torch.float32)
    for a, q in enumerate(q_per_view):
        q = q.float()
        loss = loss + sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(n_views) if v != a) / (n_views - 1)
    return loss / len(q_per_view)
