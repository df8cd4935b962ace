"""torchrun integration: process group from the environment (NCCL on CUDA, gloo on CPU), the small
collectives the trainer agrees through, and the stop signals (SIGTERM, SIGINT, SIGUSR1) every rank acts on together.
Under srun without torchrun, the ranks come from SLURM's variables (engine/slurm_job.py)."""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastssl.engine import slurm_job


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (a single process without it).

    device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``. A task that srun started, without
    torchrun's variables, gets them from SLURM's first (``slurm_job.rank_env``).
    """
    slurm_job.export_rank_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        # A cluster that binds one GPU per task shows each task only its own: device 0 for every local rank.
        index = local_rank % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        else:
            # torchrun keeps its store across restarts (--max-restarts): the previous attempt's keys, such as
            # gloo's peer addresses, would send the restarted ranks to dead processes. One prefix per attempt.
            from torch.distributed.rendezvous import rendezvous

            store, _, _ = next(rendezvous("env://", rank=rank, world_size=world_size))
            store = dist.PrefixStore(f"fastssl/attempt_{attempt}/", store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        global _wait_group
        _wait_group = dist.new_group(backend="gloo", timeout=main_wait_timeout())
    return DistInfo(rank, world_size, local_rank, dev)


# Rank 0 alone may work for a long time while the other ranks wait: the kNN evaluation over the whole dataset
# (tens of minutes on ImageNet), a checkpoint written to a slow file system. They wait in a gloo group of their
# own, with a long timeout, not in an NCCL barrier: NCCL's watchdog aborts a collective after 10 minutes.
_wait_group: Any = None


def main_wait_timeout() -> datetime.timedelta:
    """How long the other ranks wait for rank 0's own work: FASTSSL_MAIN_WAIT_HOURS (default 6)."""
    raw = os.environ.get("FASTSSL_MAIN_WAIT_HOURS", "6")
    try:
        hours = float(raw)
    except ValueError:
        raise ValueError(f"FASTSSL_MAIN_WAIT_HOURS must be a number of hours, got {raw!r}") from None
    if not hours > 0:
        raise ValueError(f"FASTSSL_MAIN_WAIT_HOURS must be > 0, got {raw!r}")
    return datetime.timedelta(hours=hours)


def wait_for_main() -> None:
    """A barrier after work rank 0 does alone (see ``main_wait_timeout``); a plain barrier where the process
    group was set up by someone else."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=_wait_group)


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank, sent after work rank 0 did alone (see ``main_wait_timeout``): a barrier
    that also carries its outcome, such as a checkpoint that did not fit."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_wait_group)
    return box[0]


def shutdown() -> None:
    global _wait_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _wait_group = None


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if not _initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def max_across_ranks(values: torch.Tensor) -> list[float]:
    """Elementwise maximum of ``values`` (a small 1-D tensor on the training device) over the ranks, on the
    host: the flags every rank must agree on (one all-reduce, one device-to-host copy)."""
    if _initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()


class StopSignals:
    """SIGTERM / SIGINT / SIGUSR1 (SLURM's usual warning before the time limit) -> a request to stop after the
    current step; the trainer all-reduces ``signum`` so every rank stops at the same step, saves, and exits.

    A second signal exits at once (status 128 + signal number), without a checkpoint. A repeat of the same
    signal within ``repeat_window_s`` of the first counts as the same request: a scheduler (scancel, a
    preemption) may signal every process of a job while torchrun forwards its own copy to its workers.
    Handlers are only installed from the main thread (Python's rule); ``restore()`` puts the previous ones back.

    Once the checkpoint is written, ``finish(message)`` keeps the handlers until the process ends: a signal that
    arrives while it exits (torchrun sends SIGTERM to every worker as soon as one has exited; SLURM signals a job
    it requeues) then ends it at once with the stop's status (128 + the first signal, or ``exit_status``),
    printing ``message`` if ``report()`` has not yet.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, announce: bool = True, repeat_window_s: float = 1.0):
        self.signum: int | None = None
        self.announce = announce  # print what happens (rank 0), so a job prints it once
        self.repeat_window_s = repeat_window_s
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}
        self._finished = False
        self._message = ""
        self._exit_status: int | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def finish(self, message: str = "", exit_status: int | None = None) -> None:
        """The stop is done (checkpoint written): from now on any signal exits with ``exit_status`` (default
        128 + ``signum``)."""
        self._message, self._finished, self._exit_status = message, True, exit_status

    @property
    def finished(self) -> bool:
        return self._finished

    def ignore_late_signals(self) -> None:
        """Just before the process exits after a finished stop: ignore further signals. Python's finalization
        puts the default action back wherever a Python handler is set, and a late signal (torchrun's, once a
        peer has exited) would then kill the exiting rank with -SIGTERM instead of the stop's status; an
        ignored signal stays ignored through finalization."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()

    def report(self) -> None:
        """Print the ``finish`` message once (whichever comes first: the normal exit or a late signal)."""
        message, self._message = self._message, ""
        if message:
            sys.stderr.write(message)
            sys.stderr.flush()

    def _handle(self, signum: int, frame) -> None:
        if self._finished:
            self.report()
            os._exit(self._exit_status if self._exit_status is not None else 128 + (self.signum or signum))
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if self.announce:
                sys.stderr.write(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then "
                                 f"stopping (signal again to stop at once, without a checkpoint)\n")
                sys.stderr.flush()
            return
        if signum == self.signum and now - self._first_at < self.repeat_window_s:
            return
        sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now, without a checkpoint\n")
        sys.stderr.flush()
        os._exit(128 + signum)


def weight_digests(module: torch.nn.Module) -> list[str]:
    """sha256 of ``module``'s parameters on every rank (rank order); equal digests mean the ranks hold
    bit-identical weights, the DDP invariant. Buffers are left out: BatchNorm running statistics see each
    rank's own batches after DDP's last broadcast, and checkpoints keep rank 0's."""
    h = hashlib.sha256()
    for name, t in module.named_parameters():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return [str(d) for d in all_gather_objects(h.hexdigest())]
