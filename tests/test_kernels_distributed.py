"""Across 2 gloo ranks (CPU; reference twins, and the Triton kernels under the interpreter), the
contrastive losses with gathered keys and the distributed Sinkhorn equal one process holding the whole
batch: losses, assignments and gradients.

Each rank's loss is the mean over its own rows and DDP averages gradients over ranks, so rank r's
gradient divided by the world size must equal the single-process gradient of its rows.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastssl import kernels

WORLD, N, D, T = 2, 5, 12, 0.2


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * N, D, generator=g), torch.randn(WORLD * N, D, generator=g), \
        torch.randn(WORLD * N, 7, generator=g)


def _losses_and_grads(q, k):
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    out = {}
    for name, fn in (("info_nce", lambda: kernels.info_nce(q, k, T)), ("nt_xent", lambda: kernels.nt_xent(q, k, T))):
        q.grad = k.grad = None
        loss = fn()
        loss.backward()
        out[name] = (loss.detach(), q.grad.clone(), k.grad.clone())
    return out


def _rank(rank: int, init_file: str, out_dir: str, mode: str) -> None:
    os.environ["FASTSSL_KERNELS"] = mode
    if mode == "triton":  # before the lazily imported Triton modules are loaded in this fresh process
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        q, k, scores = _inputs()
        mine = slice(rank * N, (rank + 1) * N)
        result = _losses_and_grads(q[mine], k[mine])
        result["sinkhorn"] = kernels.sinkhorn(scores[mine], eps=0.05, n_iters=3)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_two_ranks_with_gathered_keys_equal_one_process(tmp_path, monkeypatch, mode):
    if mode == "triton":
        pytest.importorskip("triton")
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path), mode), nprocs=WORLD, join=True)
    monkeypatch.setenv("FASTSSL_KERNELS", "reference")
    q, k, scores = _inputs()
    whole = _losses_and_grads(q, k)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in ("info_nce", "nt_xent"):
        loss, dq, dk = whole[name]
        torch.testing.assert_close(sum(r[name][0] for r in ranks) / WORLD, loss)
        torch.testing.assert_close(torch.cat([r[name][1] for r in ranks]) / WORLD, dq)
        torch.testing.assert_close(torch.cat([r[name][2] for r in ranks]) / WORLD, dk)
    q_whole = kernels.sinkhorn(scores, eps=0.05, n_iters=3)
    torch.testing.assert_close(torch.cat([r["sinkhorn"] for r in ranks]), q_whole)


def test_gather_without_process_group_is_identity():
    x = torch.randn(3, 2)
    assert kernels.all_gather_with_grad(x) is x


def test_rank_and_world_size_without_group():
    from fastssl.kernels.gather import rank_and_world_size

    assert rank_and_world_size() == (0, 1)
