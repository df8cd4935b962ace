"""The model's memory format per device, chosen by measurement (``train.channels_last=auto``).

Channels-last is the layout GPU tensor cores want, and on CPUs it depends on the kernels: on a 2-core Intel Xeon
with AMX-BF16 the demo's BYOL step ran 1.7x slower channels-last than NCHW, on a 2-core AMD EPYC (AVX-512 BF16)
channels-last was the faster one (BENCHMARKS.md, "Memory format and compile"). So ``auto`` means:

* CUDA: channels-last (tensor cores; ``scripts/gpu_check.py`` measures both);
* CPU: a short forward + backward of a copy of the run's model on synthetic views of the run's sizes, batch and
  precision, in both layouts, alternating, median of a few steps. The answer is cached per (CPU model, torch
  version, threads, model, views, batch, precision) in ``~/.cache/fastssl/memory_format.json``
  (``$FASTSSL_CACHE_DIR`` overrides the folder), so later runs decide instantly. Rank 0 measures, the other ranks
  take its answer (a measurement runs on every rank together: a method's forward may need all of them).

The run's own model, loader, RNG streams and BatchNorm statistics are not touched by the measurement.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fastssl.engine import distributed
from pipelines import progress
from pipelines.formats import atomic_write_bytes
from pipelines.native import cpu_model

AUTO = "auto"


def cache_dir() -> Path:
    """fastssl's per-user cache folder: ``$FASTSSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastssl``, else
    ``~/.cache/fastssl``."""
    env = os.environ.get("FASTSSL_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastssl"


def time_step(model: nn.Module, views: list[torch.Tensor], amp_dtype: torch.dtype | None, steps: int,
              device: torch.device) -> list[float]:
    """Seconds of ``steps`` forward + backward passes of ``model(views) -> (loss, logs)``."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _ = model(views)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def measure(method: nn.Module, view_sizes: list[int], batch: int, amp_dtype: torch.dtype | None,
            device: torch.device, steps: int = 3) -> dict[str, float]:
    """Median seconds per forward + backward step of a copy of ``method`` channels-last and NCHW.

    One warm-up step per layout, then ``steps`` timed steps each, alternating the layouts so that a change in the
    machine's load hits both alike. ``method`` itself, the global RNG streams and its statistics are untouched."""
    cpu_rng = torch.get_rng_state()
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(batch, 3, s, s, generator=gen).to(device) for s in view_sizes]
    models, inputs = {}, {}
    for name, fmt in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
        models[name] = copy.deepcopy(method).to(memory_format=fmt).train()
        inputs[name] = [v.contiguous(memory_format=fmt) for v in base]
        time_step(models[name], inputs[name], amp_dtype, 1, device)  # warm-up: first-call allocations, kernels
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps):
        for name in models:
            times[name] += time_step(models[name], inputs[name], amp_dtype, 1, device)
    torch.set_rng_state(cpu_rng)
    return {name: statistics.median(t) for name, t in times.items()}


def choose_channels_last(setting: object, method: nn.Module, view_sizes: list[int], batch: int,
                         amp_dtype: torch.dtype | None, device: torch.device, describe: dict,
                         is_main: bool = True, measure_fn: Callable[..., dict[str, float]] | None = None) -> bool:
    """Whether the run's model (and so its views) is channels-last. ``setting``: True, False or "auto" (module
    docstring). ``describe``: what identifies the model for the cache (backbone, width, method...). Collective
    under torchrun: every rank calls it, rank 0 decides. ``measure_fn``: ``measure`` unless given (tests)."""
    if setting != AUTO:
        return bool(setting)
    if device.type != "cpu":
        return True
    key = json.dumps({"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "views": view_sizes, "batch": batch, "precision": str(amp_dtype), **describe}, sort_keys=True)
    path = cache_dir() / "memory_format.json"
    # Rank 0's cache decides; a measurement runs on every rank at once, because a method's forward may hold
    # collectives (gathered keys, Shuffle-BN) that need every rank; rank 0's timings decide.
    decision = distributed.broadcast_object(_read_json(path).get(key) if is_main else None)
    if decision is None:
        if is_main:
            progress.write("train.channels_last=auto: timing the model channels-last and NCHW on this CPU "
                           "(once per model and CPU; cached)...")
        ms = {k: 1000 * v for k, v in (measure_fn or measure)(method, view_sizes, batch, amp_dtype, device).items()}
        decision = distributed.broadcast_object({"channels_last": ms["channels_last"] <= ms["contiguous"], "ms": ms})
        if is_main:
            known = _read_json(path)
            known[key] = decision
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, (json.dumps(known, indent=1) + "\n").encode())
            except OSError as exc:  # a read-only home: decide again next time
                progress.write(f"warning: could not cache the memory-format choice in {path}: {exc}")
    if is_main:
        ms = decision["ms"]
        chosen = "channels-last" if decision["channels_last"] else "NCHW (contiguous)"
        progress.write(f"memory format: {chosen} (forward + backward on {cpu_model()}: channels-last "
                       f"{ms['channels_last']:.0f} ms, NCHW {ms['contiguous']:.0f} ms; train.channels_last="
                       "true|false overrides)")
    return bool(decision["channels_last"])


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
