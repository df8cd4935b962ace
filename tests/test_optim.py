"""LARS, EMA and schedules."""

from __future__ import annotations

import copy
import math
import shutil
import warnings

import pytest
import torch
from torch import nn

from fastssl.models import build_backbone
from fastssl.optim import lars
from fastssl.optim.ema import ema_update_, ema_update_loop_
from fastssl.optim.lars import LARS
from fastssl.optim.schedules import cosine_tau, scaled_lr, warmup_cosine
from pipelines import native

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_cxx = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                               reason="needs a C++ compiler for the fused CPU kernel")

# Every CPU implementation; the CUDA kernel has its own gpu tests below.
CPU_IMPLS = ["loop", "foreach", pytest.param("fused_cpu", marks=needs_cxx), "auto"]


def _groups(model: nn.Module, wd: float) -> list[dict]:
    from fastssl.methods.base import SSLMethod

    return SSLMethod.param_groups(model, wd)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_lars_excluded_parameters_get_plain_sgd_momentum_update(impl):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    ref = copy.deepcopy(model)
    opt = LARS(_groups(model, 0.05), lr=0.3, momentum=0.9, eta=0.02, impl=impl)
    excluded = {id(p) for g in opt.param_groups if g["lars_exclude"] for p in g["params"]}
    assert excluded == {id(p) for p in model.parameters() if p.ndim == 1}
    sgd = torch.optim.SGD([p for p in ref.parameters() if p.ndim == 1], lr=0.3, momentum=0.9, weight_decay=0.0)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        # Identical fresh gradients for both models, so only the update rules differ.
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        sgd.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        if p.ndim == 1:
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    # The adapted weights did move, and not like SGD (trust ratio + weight decay apply to them).
    assert not torch.allclose(model[0].weight, ref[0].weight)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_lars_trust_ratio_matches_formula_on_one_tensor(impl):
    w = torch.randn(4, 3)
    g = torch.randn(4, 3)
    p = nn.Parameter(w.clone())
    p.grad = g.clone()
    lr, wd, eta = 0.5, 0.1, 0.01
    LARS([p], lr=lr, momentum=0.9, weight_decay=wd, eta=eta, impl=impl).step()
    trust = eta * w.norm() / (g.norm() + wd * w.norm())
    expected = w - lr * trust * (g + wd * w)  # first step: buffer = update
    torch.testing.assert_close(p.detach(), expected)


def _run_50_resnet18_steps(impl: str, nesterov: bool, device: str = "cpu", channels_last: bool = False) -> float:
    """50 steps of ``impl`` and of the reference loop from the same start with the same fresh random
    gradients; returns the max abs difference of the weights."""
    torch.manual_seed(0)
    model = build_backbone("resnet18", width=8, small_images=True).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    opt = LARS(_groups(model, 1e-4), lr=0.2, momentum=0.9, nesterov=nesterov, impl=impl)
    opt_l = LARS(_groups(twin, 1e-4), lr=0.2, momentum=0.9, nesterov=nesterov, impl="loop")
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            g = torch.randn(p.shape, generator=gen).to(device)
            p.grad, q.grad = g.clone(memory_format=torch.preserve_format), g.clone()
            if channels_last and g.ndim == 4:
                p.grad = p.grad.contiguous(memory_format=torch.channels_last)
        opt.step()
        opt_l.step()
    return max((p - q).abs().max().item() for p, q in zip(model.parameters(), twin.parameters(), strict=True))


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("impl", ["foreach", pytest.param("fused_cpu", marks=needs_cxx), "auto"])
def test_lars_fast_paths_match_reference_loop_over_50_steps_of_resnet18(impl, nesterov):
    assert _run_50_resnet18_steps(impl, nesterov) <= 1e-6


@needs_cxx
def test_lars_fused_cpu_matches_reference_loop_on_channels_last_weights():
    assert _run_50_resnet18_steps("fused_cpu", False, channels_last=True) <= 1e-6


@needs_cxx
def test_lars_fused_cpu_result_does_not_depend_on_the_thread_count():
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            model = nn.Linear(300, 400)  # 120K weights: several chunks, so the threads split the work
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            LARS(_groups(model, 1e-4), lr=0.5, impl="fused_cpu").step()
            results.append([p.detach().clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_lars_foreach_flag_selects_the_reference_loop_or_the_fastest_path():
    p = nn.Parameter(torch.ones(2))
    assert LARS([p], lr=0.1, foreach=False).impl == "loop"
    assert LARS([p], lr=0.1, foreach=True).impl == "auto"
    assert LARS([p], lr=0.1).impl == "auto"
    with pytest.raises(ValueError, match="impl"):
        LARS([p], lr=0.1, impl="fast")
    with pytest.raises(ValueError, match="contradicts"):
        LARS([p], lr=0.1, foreach=False, impl="fused_cpu")


def test_lars_auto_falls_back_to_foreach_with_one_warning_when_the_kernel_build_fails(monkeypatch):
    def broken():
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(native, "load_lars_cpu", broken)
    monkeypatch.setattr(lars, "_warned", set())
    used = []
    monkeypatch.setattr(lars, "_step_foreach", lambda *a, **k: used.append("foreach"))
    p = nn.Parameter(torch.ones(3, 3))
    p.grad = torch.ones(3, 3)
    opt = LARS([p], lr=0.1)
    with pytest.warns(RuntimeWarning, match="foreach"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # warned once only
    assert used == ["foreach", "foreach"]


def test_lars_auto_uses_foreach_for_tensors_the_kernels_do_not_take():
    p = nn.Parameter(torch.ones(4, 4, dtype=torch.float64))
    p.grad = torch.ones(4, 4, dtype=torch.float64)
    assert lars._resolve("auto", [p], [p.grad], [torch.zeros_like(p)]) == "foreach"
    with pytest.raises(ValueError, match="fp32 dense"):
        lars._resolve("fused_cpu", [p], [p.grad], [torch.zeros_like(p)])


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_lars_zero_norm_weight_and_zero_gradient_use_trust_one(impl):
    zero_w = nn.Parameter(torch.zeros(3, 3))
    zero_w.grad = torch.ones(3, 3)
    zero_g = nn.Parameter(torch.ones(2, 2))
    zero_g.grad = torch.zeros(2, 2)
    LARS([zero_w, zero_g], lr=0.1, momentum=0.0, weight_decay=0.5, eta=0.001, impl=impl).step()
    assert torch.isfinite(zero_w).all() and torch.isfinite(zero_g).all()
    torch.testing.assert_close(zero_w.detach(), torch.full((3, 3), -0.1))  # trust 1, d = g + wd*0
    torch.testing.assert_close(zero_g.detach(), torch.full((2, 2), 1 - 0.1 * 0.5))  # trust 1, d = 0 + wd*w


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_lars_state_dict_round_trip_resumes_identically(impl):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = LARS(_groups(model, 1e-3), lr=0.1, impl=impl)
    data = [torch.randn(8, 6) for _ in range(6)]

    def step(m, o, x):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()

    for x in data[:3]:
        step(model, opt, x)
    clone = copy.deepcopy(model)
    opt2 = LARS(_groups(clone, 1e-3), lr=0.1, impl=impl)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x in data[3:]:
        step(model, opt, x)
        step(clone, opt2, x)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)


def test_ema_foreach_matches_loop_and_copies_buffers():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    online(torch.randn(8, 4))  # move the running statistics
    target_a = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    target_b = copy.deepcopy(target_a)
    before = [p.clone() for p in target_a.parameters()]
    ema_update_(target_a, online, 0.9)
    ema_update_loop_(target_b, online, 0.9)
    for a, b, t0, o in zip(target_a.parameters(), target_b.parameters(), before, online.parameters(), strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, 0.9 * t0 + 0.1 * o)
    torch.testing.assert_close(target_a[1].running_mean, online[1].running_mean)


def test_cosine_tau_at_start_middle_and_end():
    K = 1000
    assert cosine_tau(0, K, 0.996) == pytest.approx(0.996)
    assert cosine_tau(K // 2, K, 0.996) == pytest.approx((0.996 + 1) / 2)
    assert cosine_tau(K, K, 0.996) == pytest.approx(1.0)
    assert cosine_tau(K // 4, K, 0.996) < cosine_tau(K // 2, K, 0.996)


def test_warmup_cosine_and_lr_scaling():
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)
    peak, total, warm = 1.0, 100, 10
    lrs = [warmup_cosine(s, total, warm, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    mid = 10 + (total - 1 - 10) / 2
    assert warmup_cosine(int(mid), total, warm, peak) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))


# ----------------------------------------------------------------------------------- CUDA kernel (GPU only)
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_cuda_kernel_matches_reference_loop_over_50_steps_of_resnet18(nesterov):
    # Both paths on the GPU; the kernel rounds like torch's ops, its norms are summed in another order.
    assert _run_50_resnet18_steps("cuda", nesterov, device="cuda") <= 1e-6


@pytest.mark.gpu
@gpu
def test_lars_cuda_kernel_matches_foreach_and_never_syncs():
    torch.manual_seed(0)
    model = build_backbone("resnet18", width=16, small_images=True).cuda().to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    opt = LARS(_groups(model, 1e-4), lr=0.2, momentum=0.9, impl="cuda")
    opt_f = LARS(_groups(twin, 1e-4), lr=0.2, momentum=0.9, impl="foreach")
    for step in range(10):
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            p.grad = torch.randn_like(p) if step != 3 else torch.zeros_like(p)  # one all-zero-gradient step
            q.grad = p.grad.clone(memory_format=torch.preserve_format)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt_f.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@gpu
def test_lars_auto_on_cuda_is_one_launch_for_all_groups(monkeypatch):
    calls = []
    real = lars._step_cuda
    monkeypatch.setattr(lars, "_step_cuda", lambda batch: (calls.append(len(batch)), real(batch)))
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).cuda()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    LARS(_groups(model, 1e-4), lr=0.1).step()
    assert calls == [2]  # both groups (adapted, excluded) in one call of the kernel


def test_ema_lists_are_cached_per_pair_and_follow_the_online_model():
    torch.manual_seed(0)
    target, a, b = (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(3))
    ema_update_(target, a, 0.0)  # tau 0: target becomes a copy of a
    assert torch.equal(target[0].weight, a[0].weight)
    ema_update_(target, b, 0.0)  # another online model: the cached lists must not be reused
    assert torch.equal(target[0].weight, b[0].weight)
    b[1].num_batches_tracked.fill_(7)
    with torch.no_grad():
        b[0].weight.add_(1.0)  # in-place changes of the same Parameter are seen through the cache
    ema_update_(target, b, 0.5)
    assert torch.equal(target[0].weight, b[0].weight - 0.5) and int(target[1].num_batches_tracked) == 7
    with pytest.raises(ValueError, match="parameters"):
        ema_update_(nn.Linear(3, 4), nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4)), 0.9)
