"""The torchrun process group of the evaluations.

An evaluation may join a group in a process that already had one: ``train.py eval.after=[...]`` evaluates in the
ranks that just trained, and fastssl-eval runs several protocols one after the other. Under torchrun the ranks meet
in the agent's key-value store, which outlives a destroyed group: a second group under the same keys would send
the ranks to the first group's (gone) peers. Each group joined here gets keys of its own (a prefix with the
torchrun attempt and a count that every rank advances alike), and its own gloo group for the waits while rank 0
works alone (the kNN, a checkpoint), with a long timeout: an NCCL barrier would time out on ImageNet.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from fastssl.engine import distributed

_joined = 0  # groups this process joined here: the same count on every rank (they run the same evaluations)
_wait_group = None


def join(device: str = "auto") -> distributed.DistInfo:
    """This process's rank, world size and device; joins torchrun's group (WORLD_SIZE > 1) unless already in one."""
    global _joined, _wait_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        from torch.distributed.rendezvous import rendezvous

        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        store, rank, _ = next(rendezvous("env://", rank=int(os.environ["RANK"]), world_size=world))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"fastssl/eval/attempt_{attempt}/group_{_joined}/", store)
        _joined += 1
        dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world)
        _wait_group = dist.new_group(backend="gloo", timeout=distributed.main_wait_timeout())
    return distributed.init_distributed(device)  # in a group now (or alone): the rank's description


def wait_for_main() -> None:
    """A barrier after work rank 0 does alone (in the gloo group with the long timeout when this module made the
    group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=_wait_group)


def leave() -> None:
    """Leave the group (if any)."""
    global _wait_group
    distributed.shutdown()
    _wait_group = None
