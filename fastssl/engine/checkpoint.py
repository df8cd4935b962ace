"""Checkpoints: written atomically (temp file, fsync, rename) and loaded with ``weights_only=True``.

A checkpoint is a plain dict of tensors and Python scalars/containers only, so loading a downloaded
file never executes pickled code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from pipelines.formats import atomic_writer


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path``; a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (no pickled code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt or not ours
        raise ValueError(f"{path}: cannot be read as a fastssl checkpoint ({type(e).__name__}: {e})") from e


def rng_state() -> dict:
    """Every RNG the run draws from: Python, NumPy, torch CPU and CUDA (as tensors and plain values)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
