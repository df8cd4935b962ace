"""SwAV (Caron et al., 2020): Swapping Assignments between multiple Views. Embeddings of crops of one image
are scored against K learnable prototypes; the code (soft cluster assignment) of each global crop is predicted
from the scores of every other crop.

    z   = normalize(g(f(x)))                     for the 2 global crops and the V local crops
    s   = z @ C.T                                C: K prototypes, kept unit-norm
    q_a = Sinkhorn(s_a / eps)  (global crops a = 1, 2; no gradient; equal share of the batch per prototype)
    loss = mean_a  mean_{v != a}  -sum_k q_a log softmax(s_v / T)          T = 0.1, eps = 0.05, 3 iterations

For small batches a queue of past global embeddings joins the Sinkhorn problem (not the loss), so that the
equipartition is over enough samples. The prototypes are frozen during the first epoch.
BatchNorm statistics: pooled per resolution (the paper's code concatenates same-size crops into one forward:
the 2 global crops share statistics, the V local crops theirs), ``forward_by_resolution``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastssl.kernels import all_gather_with_grad, sinkhorn, swav_loss
from fastssl.kernels.gather import rank_and_world_size
from fastssl.methods.base import SSLMethod
from fastssl.models import MLP, Prototypes

N_ASSIGNED = 2  # codes are computed for the two global crops (the paper's crops_for_assign = [0, 1])


class SwAV(SSLMethod):
    """``queue_length``: global number of past embeddings per global crop (0: no queue); it fills from epoch
    ``queue_start_epoch`` and joins Sinkhorn once full. The queue is one buffer of the same content on every rank
    (each rank feeds its 1/world slice to the distributed Sinkhorn), so checkpoints carry it and a run resumes on
    another number of ranks. ``freeze_prototypes_epochs`` may be fractional (the paper freezes 313 iterations).
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, proj_hidden: int = 2048, proj_dim: int = 128,
                 n_prototypes: int = 3000, temperature: float = 0.1, sinkhorn_eps: float = 0.05,
                 sinkhorn_iters: int = 3, freeze_prototypes_epochs: float = 1.0, queue_length: int = 0,
                 queue_start_epoch: int = 15):
        super().__init__(backbone)
        if queue_length < 0 or n_prototypes < 1:
            raise ValueError(f"SwAV: queue_length={queue_length} must be >= 0 and n_prototypes={n_prototypes} >= 1")
        self.projector = MLP(feat_dim, proj_hidden, proj_dim)
        self.prototypes = Prototypes(proj_dim, n_prototypes)
        self.temperature = temperature
        self.sinkhorn_eps, self.sinkhorn_iters = sinkhorn_eps, sinkhorn_iters
        self.freeze_prototypes_epochs = freeze_prototypes_epochs
        self.queue_start_epoch = queue_start_epoch
        self.register_buffer("queue", torch.zeros(N_ASSIGNED, queue_length, proj_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # valid rows, newest first
        self._filled = 0  # host copy of queue_filled: no device sync per step
        # Whether the queue is full, apart from the count: a compiled forward specializes on the attributes it reads,
        # and a bool changes once (one recompilation when the queue joins Sinkhorn), the count at every step.
        self._full = False
        self._queue_filling = False
        self._pending: list[torch.Tensor] | None = None  # this step's global embeddings, queued after the update
        self.register_load_state_dict_post_hook(_after_load)

    # ------------------------------------------------------------------------------------------ step
    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        if len(views) < N_ASSIGNED:
            raise ValueError(f"SwAV needs at least {N_ASSIGNED} views (the global crops first), got {len(views)}")
        feats = self.forward_by_resolution(self.backbone, views)
        z = F.normalize(self.projector(torch.cat(feats)), dim=1)  # one projector pass over every crop
        scores = self.prototypes(z)
        z_views, scores_views = z.chunk(len(views)), scores.chunk(len(views))
        codes = [self._codes(scores_views[a].detach(), a) for a in range(N_ASSIGNED)]
        loss = swav_loss(list(scores_views), codes, self.temperature)
        if self.training and self._queue_filling:  # enqueued in on_step_end: a skipped (non-finite) step never is
            self._pending = [z_views[a].detach() for a in range(N_ASSIGNED)]
        return loss, {"loss": loss.detach(), "queue_used": float(self._queue_full())}

    def _queue_full(self) -> bool:
        return self._full

    @torch.no_grad()
    def _codes(self, scores: torch.Tensor, a: int) -> torch.Tensor:
        """Sinkhorn codes of global crop ``a`` (B, K), over this step's batch plus, once full, the queue."""
        if not self._queue_full():
            return sinkhorn(scores, self.sinkhorn_eps, self.sinkhorn_iters)
        rank, world = rank_and_world_size()
        length = self.queue.shape[1]
        if length % world:
            raise ValueError(f"method.queue_length={length} must be divisible by the world size {world}")
        share = length // world  # this rank's slice: the ranks together cover the whole queue once
        past = self.prototypes(self.queue[a, rank * share:(rank + 1) * share])
        q = sinkhorn(torch.cat([past.to(scores.dtype), scores]), self.sinkhorn_eps, self.sinkhorn_iters)
        return q[-scores.shape[0]:]

    @torch.no_grad()
    def _enqueue(self, z_assigned: list[torch.Tensor]) -> None:
        """Push the global embeddings of the whole (all-rank) batch in front of the queue, oldest rows out."""
        new = torch.stack([all_gather_with_grad(z) for z in z_assigned]).to(self.queue.dtype)
        length = self.queue.shape[1]
        self.queue.copy_(torch.cat([new, self.queue], dim=1)[:, :length])
        self._filled = min(self._filled + new.shape[1], length)
        self.queue_filled.fill_(self._filled)
        self._full = self._filled == length

    # ----------------------------------------------------------------------------------------- hooks
    def _prototypes_frozen(self, step: int) -> bool:
        return step < self.freeze_prototypes_epochs * self.steps_per_epoch

    def on_epoch_start(self, epoch: int) -> None:
        self._queue_filling = self.queue.shape[1] > 0 and epoch >= self.queue_start_epoch

    def on_before_optimizer_step(self, step: int) -> None:
        """Frozen prototypes get no gradient at all, so the optimizer leaves them alone (no decay, no momentum)."""
        if self._prototypes_frozen(step):
            self.prototypes.weight.grad = None

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Back onto the unit sphere after the update (frozen prototypes were not updated: nothing to do)."""
        if not self._prototypes_frozen(step):
            self.prototypes.normalize_()
        if self._pending is not None:
            self._enqueue(self._pending)
            self._pending = None


def _after_load(module: SwAV, _incompatible_keys) -> None:
    module._filled = int(module.queue_filled)  # the one device read, after a checkpoint load
    module._full = module.queue.shape[1] > 0 and module._filled == module.queue.shape[1]
