"""Optimizer, EMA and schedules: LARS (loop / foreach / fused CPU / CUDA), foreach EMA, lr and tau schedules."""

from fastssl.optim.ema import ema_update_, ema_update_loop_
from fastssl.optim.lars import LARS
from fastssl.optim.schedules import cosine_tau, scaled_lr, warmup_cosine

__all__ = ["LARS", "cosine_tau", "ema_update_", "ema_update_loop_", "scaled_lr", "warmup_cosine"]
