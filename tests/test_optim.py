"""LARS, EMA and schedules."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fastssl.models import build_backbone
from fastssl.optim.ema import ema_update_, ema_update_loop_
from fastssl.optim.lars import LARS
from fastssl.optim.schedules import cosine_tau, scaled_lr, warmup_cosine


def _groups(model: nn.Module, wd: float) -> list[dict]:
    from fastssl.methods.base import SSLMethod

    return SSLMethod.param_groups(model, wd)


def test_lars_excluded_parameters_get_plain_sgd_momentum_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    ref = copy.deepcopy(model)
    opt = LARS(_groups(model, 0.05), lr=0.3, momentum=0.9, eta=0.02)
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


def test_lars_trust_ratio_matches_formula_on_one_tensor():
    w = torch.randn(4, 3)
    g = torch.randn(4, 3)
    p = nn.Parameter(w.clone())
    p.grad = g.clone()
    lr, wd, eta = 0.5, 0.1, 0.01
    LARS([p], lr=lr, momentum=0.9, weight_decay=wd, eta=eta).step()
    trust = eta * w.norm() / (g.norm() + wd * w.norm())
    expected = w - lr * trust * (g + wd * w)  # first step: buffer = update
    torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_foreach_matches_reference_loop_over_50_steps_of_resnet18(nesterov):
    torch.manual_seed(0)
    model = build_backbone("resnet18", width=8, small_images=True)
    twin = copy.deepcopy(model)
    opt_f = LARS(_groups(model, 1e-4), lr=0.2, momentum=0.9, nesterov=nesterov, foreach=True)
    opt_l = LARS(_groups(twin, 1e-4), lr=0.2, momentum=0.9, nesterov=nesterov, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        # The same gradients for both (fresh random each step), so only the update rule is compared.
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt_f.step()
        opt_l.step()
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), twin.parameters(), strict=True))
    assert diff <= 1e-6


@pytest.mark.parametrize("foreach", [True, False])
def test_lars_zero_norm_weight_and_zero_gradient_use_trust_one(foreach):
    zero_w = nn.Parameter(torch.zeros(3, 3))
    zero_w.grad = torch.ones(3, 3)
    zero_g = nn.Parameter(torch.ones(2, 2))
    zero_g.grad = torch.zeros(2, 2)
    LARS([zero_w, zero_g], lr=0.1, momentum=0.0, weight_decay=0.5, eta=0.001, foreach=foreach).step()
    assert torch.isfinite(zero_w).all() and torch.isfinite(zero_g).all()
    torch.testing.assert_close(zero_w.detach(), torch.full((3, 3), -0.1))  # trust 1, d = g + wd*0
    torch.testing.assert_close(zero_g.detach(), torch.full((2, 2), 1 - 0.1 * 0.5))  # trust 1, d = 0 + wd*w


def test_lars_state_dict_round_trip_resumes_identically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = LARS(_groups(model, 1e-3), lr=0.1)
    data = [torch.randn(8, 6) for _ in range(6)]

    def step(m, o, x):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()

    for x in data[:3]:
        step(model, opt, x)
    clone = copy.deepcopy(model)
    opt2 = LARS(_groups(clone, 1e-3), lr=0.1)
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
