"""MoCo v2 (Chen, Fan, Girshick & He, 2020; MoCo: He et al., 2019): a query encoder learns to pick the key
of its own image, computed by a slowly moving momentum encoder, out of a long queue of older keys.

    q = g(f(x1)),  k = g'(f'(x2))  (f', g': momentum copies, no gradient; g: 2-layer MLP, no BN, 2048 -> 128)
    loss = -log  exp(q.k / T) / (exp(q.k / T) + sum_{n in queue} exp(q.n / T))      q, k, n normalized, T = 0.2
    after each step:  theta' <- m theta' + (1 - m) theta  (m = 0.999);  enqueue k, dequeue the oldest keys

The queue holds K = 65,536 normalized keys in one buffer that is the same on every rank: each step
enqueues the keys of the whole global batch (all-gathered). Checkpoints therefore carry the complete
queue and its pointer, and a run resumes on any number of GPUs with the same queue.

Batch statistics: Shuffle-BN, not SyncBN. The queue's negatives come from earlier batches, while the
query and its positive key come from the current one; BatchNorm statistics computed over the images of
the current batch mark both with a batch "fingerprint" that tells the positive apart from every queued
negative, and the encoder learns that shortcut instead of the images (MoCo section 3.3). SyncBN does not
remove the fingerprint, it only computes it over the global batch. Shuffle-BN does: the key images are
permuted across ranks before the key encoder, so each key is normalized with the statistics of a different
random subset of images than its query, and the keys are un-permuted afterwards. So this method asks the
trainer not to convert its BatchNorms to SyncBatchNorm (``sync_batchnorm = False``). The shuffle needs only
all-gather and broadcast, so it runs on gloo (CPU) as on NCCL.

On one process there is no other rank to shuffle with, and the key encoder would see the same batch as the
query encoder: the fingerprint stays (on Fashion-MNIST at width 8, 5 epochs, three seeds, the parity runs gained
1.1-1.5 kNN points more with the shuffle below than without; BENCHMARKS.md, issue 26).
``bn_splits = G`` splits each rank's batch into G equal parts that BatchNorm normalizes apart (in the query and
the key encoder alike, as G GPUs would, through ``fastssl.models.norm``'s per-chunk BatchNorm), and the key
images are shuffled across all W x G parts. So one process with G = 8 trains as MoCo's 8 GPUs did; the recipes
size G so that a part holds ~32 images, the paper's per-GPU batch. With W x G = 1 a warning says that
Shuffle-BN is off.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastssl.kernels import all_gather_with_grad, info_nce
from fastssl.kernels.gather import rank_and_world_size
from fastssl.methods.base import SSLMethod
from fastssl.models.norm import per_view_batchnorm, view_norms, views_per_batch
from fastssl.optim.ema import ema_update_


class MoCoV2(SSLMethod):
    sync_batchnorm = False  # Shuffle-BN instead (module docstring)

    def __init__(self, backbone: nn.Module, feat_dim: int, proj_hidden: int = 2048, proj_dim: int = 128,
                 queue_size: int = 65536, temperature: float = 0.2, momentum: float = 0.999, bn_splits: int = 1):
        super().__init__(backbone)
        if queue_size < 1 or temperature <= 0 or not 0.0 <= momentum <= 1.0 or bn_splits < 1:
            raise ValueError(f"MoCo v2: need queue_size >= 1, temperature > 0, momentum in [0, 1] and bn_splits >= 1; "
                             f"got {queue_size}, {temperature}, {momentum}, {bn_splits}")
        self.projector = nn.Sequential(nn.Linear(feat_dim, proj_hidden), nn.ReLU(inplace=True),
                                       nn.Linear(proj_hidden, proj_dim))
        self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.temperature, self.momentum = temperature, momentum
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._new_keys: torch.Tensor | None = None  # this step's global keys, enqueued in on_step_end
        self.bn_splits = bn_splits
        if bn_splits > 1:  # the parts of a batch normalized apart (module docstring); the projector has no BN
            per_view_batchnorm(self.backbone)
            per_view_batchnorm(self.key_backbone)
        self._warned = False

    def _split_bn(self, norms, n: int):
        """Within the block, ``norms`` normalize each of ``bn_splits`` equal parts of a batch of ``n`` apart."""
        if n % self.bn_splits:
            raise ValueError(f"MoCo v2: a batch of {n} images per rank does not split into method.bn_splits="
                             f"{self.bn_splits} equal parts; make train.batch_size / world size a multiple of it")
        return views_per_batch(norms, self.bn_splits)

    def _key_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_projector(self.key_backbone(x)).float()

    @torch.no_grad()
    def _shuffled_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of this rank's images ``x`` (n, 3, S, S) with Shuffle-BN -> (this rank's keys (n, D), the
        global batch's keys (W n, D) in rank order), fp32."""
        rank, world = rank_and_world_size()
        n = x.shape[0]
        if world * self.bn_splits == 1:
            k = self._key_encoder(x)
            return k, k
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        x_all = all_gather_with_grad(x) if world > 1 else x  # no_grad here: a plain all-gather
        perm = torch.randperm(world * n, device=x.device)  # every rank draws, so RNG streams stay in step
        if world > 1:
            dist.broadcast(perm, src=0)
        mine = x_all[perm[rank * n:(rank + 1) * n]]
        if channels_last:
            mine = mine.contiguous(memory_format=torch.channels_last)
        with self._split_bn(view_norms(self.key_backbone), n):
            k_mine = self._key_encoder(mine)
        k_perm = all_gather_with_grad(k_mine) if world > 1 else k_mine  # row j is the key of image perm[j]
        k_all = torch.empty_like(k_perm)
        k_all[perm] = k_perm  # un-shuffle
        return k_all[rank * n:(rank + 1) * n], k_all

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x1, x2 = views[0], views[1]  # query from the first view, key from the second, as in the paper
        with self._split_bn(view_norms(self.backbone), x1.shape[0]):
            q = self.projector(self.backbone(x1))
        k, k_all = self._shuffled_keys(x2)
        loss = info_nce(q, k, self.temperature, queue=self.queue)
        self._new_keys = F.normalize(k_all, dim=1)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (M, D) over the oldest entries of the ring buffer and advance the pointer."""
        size = self.queue.shape[0]
        keys = keys[-size:]
        rows = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[rows] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """Momentum update of the key encoder, then enqueue this step's keys (Algorithm 1 of MoCo)."""
        if self.bn_splits == 1 and not self._warned and rank_and_world_size()[1] == 1:
            self._warned = True
            warnings.warn("MoCo v2 on one process with method.bn_splits=1: Shuffle-BN has no other part of the batch "
                          "to shuffle the keys into, so BatchNorm statistics tell the positive key apart (MoCo "
                          "sec. 3.3) and the encoder learns less; set method.bn_splits so that a part holds ~32 "
                          "images (e.g. 4 for a batch of 128)", stacklevel=3)
        ema_update_(self.key_backbone, self.backbone, self.momentum)
        ema_update_(self.key_projector, self.projector, self.momentum)
        if self._new_keys is not None:
            self._enqueue(self._new_keys)
            self._new_keys = None
