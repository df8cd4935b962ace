"""Per-view BatchNorm inside one batched forward (fastssl.models.norm): outputs, gradients and running statistics
equal separate per-view forwards, in train and eval mode, per process and with statistics synced over ranks."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastssl.config import load_config
from fastssl.engine.trainer import build_model
from fastssl.methods.base import SSLMethod
from fastssl.models.norm import ViewBatchNorm2d, per_view_batchnorm, sync_batchnorm, view_norms, views_per_batch


def _net() -> nn.Module:
    """Conv + BN2d, then a head with BN1d (affine and affine-free): every kind of BatchNorm the models use."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 10, bias=False), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 4), nn.BatchNorm1d(4, affine=False))


def _randomize(net: nn.Module, seed: int) -> None:
    """Non-trivial affine parameters and running statistics, so an error in any of them shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(1 + torch.rand(m.running_var.shape, generator=gen))


def _views(n_views: int, batch: int, seed: int, channels_last: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Views with different means and scales: pooled statistics would differ clearly from per-view ones.
    views = [(i + 1.5) * torch.randn(batch, 3, 8, 8, generator=gen) + 2.0 * i for i in range(n_views)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [v.contiguous(memory_format=fmt).requires_grad_(True) for v in views]


def _state(net: nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batched_forward_equals_one_forward_per_view(channels_last, n_views, momentum):
    torch.manual_seed(0)
    plain = _net()
    for m in plain.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    _randomize(plain, 1)
    grouped = per_view_batchnorm(copy.deepcopy(plain))
    assert len(view_norms(grouped)) == 3 and not any(type(m) is nn.BatchNorm2d for m in grouped.modules())
    if channels_last:
        plain, grouped = plain.to(memory_format=torch.channels_last), grouped.to(memory_format=torch.channels_last)
    views_a, views_b = _views(n_views, 16, 2, channels_last), _views(n_views, 16, 2, channels_last)

    outs_a = [plain(v) for v in views_a]  # the reference: one forward per view
    with views_per_batch(view_norms(grouped), n_views):
        outs_b = grouped(torch.cat(views_b)).chunk(n_views)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(3 + i)) for i, o in enumerate(outs_a)]
    sum((o * w).sum() for o, w in zip(outs_a, weights, strict=True)).backward()
    sum((o * w).sum() for o, w in zip(outs_b, weights, strict=True)).backward()

    for a, b in zip(outs_a, outs_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(views_a, views_b, strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)
    for (_name, pa), pb in zip(plain.named_parameters(), grouped.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-4)
    sa, sb = _state(plain), _state(grouped)
    assert sa.keys() == sb.keys()  # checkpoints load either way
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=1e-6, msg=k)  # running stats, num_batches_tracked

    # The pooled forward (plain BN over the concatenated views) is measurably different: the test can fail.
    pooled = copy.deepcopy(plain)
    assert not torch.allclose(pooled(torch.cat(views_a)).chunk(n_views)[0], outs_a[0], atol=1e-3)

    # Eval mode: running statistics, the same whatever the grouping.
    plain.eval(), grouped.eval()
    x = torch.cat(_views(n_views, 8, 5, channels_last)).detach()
    with views_per_batch(view_norms(grouped), n_views):
        torch.testing.assert_close(grouped(x), plain(x))
    assert all(m.views == 1 for m in view_norms(grouped))  # the context puts the plain behaviour back


def test_per_view_norm_is_still_a_batchnorm_and_refuses_uneven_batches():
    bn = per_view_batchnorm(nn.BatchNorm2d(4))
    assert isinstance(bn, ViewBatchNorm2d) and isinstance(bn, nn.BatchNorm2d)  # isinstance checks elsewhere hold
    with views_per_batch([bn], 2), pytest.raises(ValueError, match="does not split into 2 equal views"):
        bn(torch.randn(5, 4, 3, 3))


def test_bf16_autocast_matches_per_view_forwards():
    torch.manual_seed(0)
    plain = _net()
    _randomize(plain, 4)
    grouped = per_view_batchnorm(copy.deepcopy(plain))
    views = [v.detach() for v in _views(2, 16, 6)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = [plain(v) for v in views]
        with views_per_batch(view_norms(grouped), 2):
            out = grouped(torch.cat(views)).chunk(2)
    for a, b in zip(ref, out, strict=True):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", ["byol", "mocov3", "barlow", "vicreg"])
def test_per_view_methods_equal_their_one_forward_per_view_form(method, monkeypatch):
    """Each per-view method's loss and gradients with the batched forward equal the same method run one forward per
    view (forward_per_view replaced by a loop over the views)."""
    heads = {"barlow": ["method.proj_hidden=64", "method.proj_dim=64"],
             "vicreg": ["method.proj_hidden=64", "method.proj_dim=64"]}.get(method, [])
    cfg = load_config(f"{method}_resnet18_fmnist", ["model.width=4", *heads])
    torch.manual_seed(0)
    batched = build_model(cfg)
    assert view_norms(batched), f"{method} has no per-view BatchNorm"
    looped = copy.deepcopy(batched)
    gen = torch.Generator().manual_seed(7)
    views = [torch.randn(16, 3, 16, 16, generator=gen) * (1 + i) + i for i in range(2)]

    loss_a, _ = batched(views)
    monkeypatch.setattr(SSLMethod, "forward_per_view", lambda self, net, vs: [net(v) for v in vs])
    loss_b, _ = looped(views)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    for (name, pa), pb in zip(batched.named_parameters(), looped.parameters(), strict=True):
        if pa.grad is not None or pb.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, ba), bb in zip(batched.named_buffers(), looped.buffers(), strict=True):
        torch.testing.assert_close(ba, bb, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synced_rank(rank: int, world: int, port: int, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = _net()
        _randomize(net, 1)
        net = sync_batchnorm(per_view_batchnorm(net))
        views = _views(2, 16, 2)  # the global batch of each view; this rank takes its half
        mine = [v.detach()[rank * 8:(rank + 1) * 8].clone().requires_grad_(True) for v in views]
        with views_per_batch(view_norms(net), 2):
            outs = net(torch.cat(mine)).chunk(2)
        weights = [torch.randn(16, 4, generator=torch.Generator().manual_seed(3 + i)) for i in range(2)]
        # The global objective is the sum over ranks; each rank's share uses its rows of the weights.
        sum((o * w[rank * 8:(rank + 1) * 8]).sum() for o, w in zip(outs, weights, strict=True)).backward()
        for p in net.parameters():  # what DDP would do: sum the ranks' parameter gradients
            dist.all_reduce(p.grad)
        result[rank] = {"outs": [o.detach() for o in outs], "input_grads": [m.grad for m in mine],
                        "param_grads": [p.grad for p in net.parameters()], "state": _state(net)}
    finally:
        dist.destroy_process_group()


def test_synced_per_view_statistics_over_two_ranks_equal_one_process_per_view():
    """Two gloo ranks, each holding half of every view: outputs, gradients and running statistics equal one process
    forwarding each whole view on its own through plain BatchNorm (the global per-view statistics)."""
    result = mp.Manager().dict()
    mp.spawn(_synced_rank, args=(2, _free_port(), result), nprocs=2, join=True)

    torch.manual_seed(0)
    ref = _net()
    _randomize(ref, 1)
    views = _views(2, 16, 2)
    outs = [ref(v) for v in views]
    weights = [torch.randn(16, 4, generator=torch.Generator().manual_seed(3 + i)) for i in range(2)]
    sum((o * w).sum() for o, w in zip(outs, weights, strict=True)).backward()
    for rank in range(2):
        got = result[rank]
        rows = slice(rank * 8, (rank + 1) * 8)
        for v in range(2):
            torch.testing.assert_close(got["outs"][v], outs[v][rows].detach(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got["input_grads"][v], views[v].grad[rows], rtol=1e-4, atol=1e-5)
        for (name, p), g in zip(ref.named_parameters(), got["param_grads"], strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        for k, v in _state(ref).items():
            torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
