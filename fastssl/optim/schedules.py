"""Per-step schedules: linear warm-up + cosine learning rate, cosine EMA momentum, lr scaling."""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the SSL papers: ``base_lr * global_batch / 256``."""
    return base_lr * global_batch / 256


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear from ``peak/warmup`` up to ``peak``, then cosine to ``final``.

    Step ``warmup_steps`` is the first at ``peak``; the last step ``total_steps - 1`` reaches ``final``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def cosine_tau(step: int, total_steps: int, base_tau: float, final_tau: float = 1.0) -> float:
    """BYOL's target momentum: ``1 - (1 - base_tau) (cos(pi k / K) + 1) / 2``, base_tau at k=0, final at k=K."""
    if total_steps <= 0:
        return base_tau
    progress = min(1.0, max(0.0, step / total_steps))
    return final_tau - (final_tau - base_tau) * (math.cos(math.pi * progress) + 1.0) / 2.0
