"""DINO (Caron et al., 2021): self-DIstillation with NO labels. A student matches, on every crop, the sharpened
and centred output distribution of a momentum teacher that sees only the global crops.

    student:  P_s(x) = softmax(h(f(x)) / T_s)                       all 2 + V crops, T_s = 0.1
    teacher:  P_t(x) = softmax((h'(f'(x)) - c) / T_t)               the 2 global crops, no gradient
    loss  =  mean over pairs (global a, crop v != a) of  -sum_k P_t(x_a) log P_s(x_v),  averaged over the batch
    c    <-  m c + (1 - m) mean over the global batch of h'(f'(x_a))            m = 0.9 (centring)
    T_t:  0.04 -> 0.07 linearly over the first 30 epochs (sharpening); f', h' = EMA of f, h, tau 0.996 -> 1 (cosine)

Centring keeps one dimension from dominating, sharpening keeps the output from going uniform: together they
avoid collapse without a predictor or negatives.
BatchNorm statistics (ResNet backbones): pooled per resolution, as the paper's multi-crop wrapper concatenates
same-size crops into one forward (``forward_by_resolution``).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastssl.kernels.gather import rank_and_world_size
from fastssl.methods.base import SSLMethod
from fastssl.models import DINOHead
from fastssl.optim.ema import ema_update_
from fastssl.optim.schedules import cosine_tau

N_GLOBAL = 2  # the teacher's crops: the two global views, first in the loader's list


def dino_loss(student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Cross-entropy between the centred, sharpened teacher distribution of each global crop a and the student
    distribution of every other crop v != a, averaged over the (a, v) pairs and over the rows.

    student_out: V tensors (B, K) any float dtype (globals first); teacher_out: A <= V tensors (B, K);
    center: (1, K) -> scalar fp32.
    """
    log_p = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_out]
    targets = [F.softmax((t.float() - center) / teacher_temp, dim=-1) for t in teacher_out]
    terms = [-(q * log_p[v]).sum(dim=-1).mean() for a, q in enumerate(targets)
             for v in range(len(log_p)) if v != a]
    return torch.stack(terms).mean()


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """The teacher temperature of ``epoch``: linear from ``warmup_temp`` (epoch 0) to ``temp`` (epoch
    ``warmup_epochs - 1``), then constant."""
    if epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * epoch / max(warmup_epochs - 1, 1)


class DINO(SSLMethod):
    """``freeze_last_layer_epochs`` (fractional allowed): the head's last layer gets no update at first, as in
    the paper's code; ``clip_grad`` > 0 clips each parameter's gradient norm (meant for bf16/fp32: under fp16 the
    gradients still carry the loss scale when the hook runs)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, use_bn_in_head: bool = False, norm_last_layer: bool = True,
                 student_temp: float = 0.1, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, center_momentum: float = 0.9, base_tau: float = 0.996,
                 freeze_last_layer_epochs: float = 1.0, clip_grad: float = 0.0):
        super().__init__(backbone)
        self.head = DINOHead(feat_dim, out_dim, hidden_dim, bottleneck_dim, use_bn=use_bn_in_head,
                             norm_last_layer=norm_last_layer)
        self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.student_temp = student_temp
        self.final_teacher_temp, self.warmup_teacher_temp = teacher_temp, warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp = warmup_teacher_temp if warmup_teacher_temp_epochs > 0 else teacher_temp
        self.center_momentum = center_momentum
        self.base_tau = base_tau
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.clip_grad = clip_grad
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("tau", torch.tensor(base_tau, dtype=torch.float64))

    def _student(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = self.forward_by_resolution(self.backbone, views)
        return list(self.head(torch.cat(feats)).chunk(len(views)))  # one head pass over every crop

    @torch.no_grad()
    def _teacher(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = self.forward_by_resolution(self.teacher_backbone, views)
        return list(self.teacher_head(torch.cat(feats)).chunk(len(views)))

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        if len(views) < N_GLOBAL:
            raise ValueError(f"DINO needs at least {N_GLOBAL} views (the global crops first), got {len(views)}")
        student_out = self._student(views)
        teacher_out = self._teacher(views[:N_GLOBAL])
        loss = dino_loss(student_out, teacher_out, self.center, self.student_temp, self.teacher_temp)
        if self.training:
            self._update_center(teacher_out)
        return loss, {"loss": loss.detach(), "teacher_temp": self.teacher_temp, "tau": self.tau}

    @torch.no_grad()
    def _update_center(self, teacher_out: list[torch.Tensor]) -> None:
        """EMA of the teacher's mean output over the global batch (sums all-reduced over ranks)."""
        total = torch.cat(teacher_out).float().sum(dim=0, keepdim=True)
        count = sum(t.shape[0] for t in teacher_out)
        world = rank_and_world_size()[1]
        if world > 1:
            dist.all_reduce(total)
        self.center.mul_(self.center_momentum).add_(total / (count * world), alpha=1.0 - self.center_momentum)

    # ----------------------------------------------------------------------------------------- hooks
    def on_epoch_start(self, epoch: int) -> None:
        self.teacher_temp = teacher_temperature(epoch, self.warmup_teacher_temp, self.final_teacher_temp,
                                                self.warmup_teacher_temp_epochs)

    @torch.no_grad()
    def on_before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_last_layer_epochs * self.steps_per_epoch:
            for p in self.head.last_layer_parameters():
                p.grad = None
        if self.clip_grad > 0:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                # min(1, clip / norm) per parameter, computed on the device: no host sync.
                scales = [torch.clamp(self.clip_grad / (n + 1e-6), max=1.0) for n in norms]
                torch._foreach_mul_(grads, scales)

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA of the student into the teacher, with the momentum of step ``step``."""
        tau = cosine_tau(step, total_steps, self.base_tau)
        ema_update_(self.teacher_backbone, self.backbone, tau)
        ema_update_(self.teacher_head, self.head, tau)
        self.tau.fill_(tau)
