"""Loss kernels: one public function per op, the entry point every method calls.

The DESIGN contract: CUDA inputs with Triton go to a fused kernel, anything else to the plain-torch
twin in :mod:`fastssl.kernels.reference`, and ``FASTSSL_KERNELS=reference|triton`` forces a choice.
Forcing ``triton`` on CPU tensors runs Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set
before the kernel modules are first imported (Triton decides at ``@triton.jit`` time); the Triton
modules are therefore imported lazily, on the first call that needs them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch
import torch.nn.functional as F

from fastssl.kernels import reference
from fastssl.kernels.gather import all_gather_with_grad, rank_and_world_size

__all__ = ["all_gather_with_grad", "info_nce", "normalized_mse", "nt_xent", "sinkhorn", "swav_loss", "use_triton"]

_MODES = ("auto", "reference", "triton")


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` runs its Triton kernel under the current ``FASTSSL_KERNELS`` mode. Inside a
    ``torch.compile``d step the twin runs: the compiler fuses it with its neighbours (into Triton code on CUDA)."""
    if torch.compiler.is_compiling():
        return False
    mode = os.environ.get("FASTSSL_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"FASTSSL_KERNELS must be one of {', '.join(_MODES)}, got {mode!r}")
    if mode == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    have_triton = _have_triton()
    if mode == "auto":
        return on_cuda and have_triton
    if not have_triton:
        raise RuntimeError("FASTSSL_KERNELS=triton but triton is not installed")
    if not on_cuda and not _interpreting():
        raise RuntimeError("FASTSSL_KERNELS=triton needs CUDA tensors, or TRITON_INTERPRET=1 (set before fastssl's "
                           "Triton kernels are first imported) to run them on CPU under Triton's interpreter")
    return True


def _kernel(name: str, *tensors: torch.Tensor) -> ModuleType:
    # Named *_triton so importing one never shadows the public function of the same name in this package.
    module = importlib.import_module(f"fastssl.kernels.{name}")
    if not all(t.is_cuda for t in tensors) and not module.INTERPRETED:
        raise RuntimeError(f"fastssl.kernels.{name} was imported before TRITON_INTERPRET=1 was set, so its kernels "
                           "are compiled for CUDA and cannot take CPU tensors; set it before the first kernel call")
    return module


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ``2 - 2 cos(p_i, z_i)`` per row. p, z: (N, D) float -> (N,) fp32."""
    if p.shape != z.shape or p.dim() != 2:
        raise ValueError(f"normalized_mse expects two (N, D) tensors of one shape, got {tuple(p.shape)} and "
                         f"{tuple(z.shape)}")
    if use_triton(p, z):
        return _kernel("normalized_mse_triton", p, z).normalized_mse(p, z)
    return reference.normalized_mse(p, z)


def _contrastive_rows(q, pos, keys, temperature, self_col=None, extra_pos=False) -> torch.Tensor:
    if use_triton(q, pos, keys):
        return _kernel("info_nce_triton", q, pos, keys).contrastive_rows(q, pos, keys, temperature, self_col, extra_pos)
    return reference.contrastive_rows(q, pos, keys, temperature, self_col, extra_pos)


def _unit(x: torch.Tensor) -> torch.Tensor:
    # Normalize in fp32, keep the input dtype so the kernel's dots run on bf16/fp16 tensor cores.
    return F.normalize(x.float(), dim=1).to(x.dtype)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float, queue: torch.Tensor | None = None,
             scale: float = 1.0, gather: bool = True) -> torch.Tensor:
    """MoCo's InfoNCE; the positive of row i is k[i]; q and k are normalized here.

    Without a queue (MoCo v3) the negatives are the other keys, gathered from every rank (with gradient)
    when a process group is up and ``gather``; with a queue (K, D), stored normalized (MoCo v2), the
    negatives are the queue rows only. The N x K logits are never materialized by the fused kernel.
    q, k: (N, D) any float dtype; queue: (K, D) -> scalar fp32, mean over this rank's rows times ``scale``.
    """
    if q.shape != k.shape or q.dim() != 2:
        raise ValueError(f"info_nce expects q and k of one (N, D) shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    qn, kn = _unit(q), _unit(k)
    if queue is not None:
        if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(f"info_nce expects a (K, {q.shape[1]}) queue, got {tuple(queue.shape)}")
        rows = _contrastive_rows(qn, kn, queue.detach().to(qn.dtype), temperature, extra_pos=True)
    else:
        keys = all_gather_with_grad(kn) if gather else kn
        rows = _contrastive_rows(qn, kn, keys, temperature)
    return scale * rows.mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent on the InfoNCE kernel: each of the 2N rows has the other view of its image as
    positive and every other row (of every rank, when a process group is up and ``gather``) as negative;
    the self-similarity is masked. z1, z2: (N, D) any float dtype -> scalar fp32 (mean over the 2N rows)."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two (N, D) tensors of one shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    n = z1.shape[0]
    u1, u2 = _unit(z1), _unit(z2)
    rank, world = rank_and_world_size() if gather else (0, 1)
    keys = torch.cat([all_gather_with_grad(u1), all_gather_with_grad(u2)]) if world > 1 else torch.cat([u1, u2])
    # Row i of view v sits at column v * world * n + rank * n + i of the gathered keys.
    local = torch.arange(n, device=z1.device) + rank * n
    self_col = torch.cat([local, local + world * n]).to(torch.int32)
    q = torch.cat([u1, u2])
    return _contrastive_rows(q, torch.cat([u2, u1]), keys, temperature, self_col=self_col).mean()


def sinkhorn(scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp, log domain: scores (B, K) any float dtype -> Q (B, K) fp32, rows summing to 1.

    The fused path runs the whole iteration loop in one launch when the tile fits on chip (one rank), else
    a column/row kernel pair per iteration, with the per-prototype sums all-reduced across ranks between them.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn expects (B, K) scores, got {tuple(scores.shape)}")
    if use_triton(scores):
        return _kernel("sinkhorn_triton", scores).sinkhorn(scores, eps, n_iters)
    return reference.sinkhorn(scores, eps, n_iters)


def swav_loss(scores_per_view: list[torch.Tensor], q_per_view: list[torch.Tensor],
              temperature: float = 0.1) -> torch.Tensor:
    """SwAV's swapped-prediction cross-entropy (see :func:`fastssl.kernels.reference.swav_loss`): a few
    (B, K) log-softmaxes, which torch already runs at memory speed, so there is no separate kernel."""
    return reference.swav_loss(scores_per_view, q_per_view, temperature)
