"""BYOL: the loss formula, the target network and the one-forward-per-resolution helper."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastssl.kernels import normalized_mse
from fastssl.kernels.reference import normalized_mse as normalized_mse_ref
from fastssl.methods import build_method
from fastssl.methods.base import SSLMethod
from fastssl.models import build_backbone


def test_normalized_mse_equals_2_minus_2cos_on_hand_made_vectors():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [2.0, 0.0]])
    z = torch.tensor([[0.0, 5.0], [2.0, 2.0], [-3.0, -4.0], [1.0, 1.0]])
    # cos: 0 (orthogonal), 1 (parallel), -1 (opposite), 1/sqrt(2)
    expected = torch.tensor([2.0, 0.0, 4.0, 2.0 - 2.0 / math.sqrt(2.0)])
    torch.testing.assert_close(normalized_mse_ref(p, z), expected)
    torch.testing.assert_close(normalized_mse(p, z), expected)


def test_normalized_mse_is_fp32_for_half_inputs_and_rejects_bad_shapes():
    p, z = torch.randn(5, 8).bfloat16(), torch.randn(5, 8).bfloat16()
    assert normalized_mse(p, z).dtype == torch.float32
    with pytest.raises(ValueError, match="normalized_mse"):
        normalized_mse(torch.randn(5, 8), torch.randn(4, 8))


def _byol(**kw):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", width=4, small_images=True)
    return build_method("byol", backbone, backbone.feat_dim, proj_hidden=32, proj_dim=16, pred_hidden=32, **kw)


def test_byol_loss_is_symmetric_sum_of_normalized_mse():
    method = _byol()
    v1, v2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    loss, logs = method([v1, v2])
    # The same computation written out: online predictions vs target projections of the other view.
    p1, p2 = (method.predictor(method.projector(method.backbone(v))) for v in (v1, v2))
    with torch.no_grad():
        z1, z2 = (method.target_projector(method.target_backbone(v)) for v in (v1, v2))
    expected = (normalized_mse_ref(p1, z2) + normalized_mse_ref(p2, z1)).mean()
    torch.testing.assert_close(loss, expected)
    assert 0.0 <= loss.item() <= 8.0 and logs["loss"] == loss.detach()


def test_byol_normalizes_each_view_with_its_own_batch_statistics():
    # The paper's implementation forwards each view alone; a view's predictions must not depend on the other
    # view's images through shared BatchNorm statistics (issue 18: sharing them learned 2.7 points slower). fastssl
    # forwards both views in one batch whose BatchNorms normalize each view apart (fastssl.models.norm).
    seen = []

    def first_view_predictions(v2):
        method = _byol()
        handle = method.predictor.register_forward_hook(lambda m, inp, out: seen.append(out[:6].detach()))
        method([v1, v2])
        handle.remove()
        return seen.pop()

    v1 = torch.randn(6, 3, 16, 16)
    a, b = first_view_predictions(torch.randn(6, 3, 16, 16)), first_view_predictions(3 + torch.randn(6, 3, 16, 16))
    torch.testing.assert_close(a, b)


def test_byol_target_gets_no_gradient_and_follows_ema():
    method = _byol(base_tau=0.9)
    loss, _ = method([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)])
    loss.backward()
    assert all(p.grad is None for p in method.target_backbone.parameters())
    assert all(p.grad is not None for p in method.backbone.parameters())
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in method.target_backbone.parameters()]
    method.on_step_end(0, 100)  # tau at step 0 is the base tau
    for t, before, o in zip(method.target_backbone.parameters(), t0, method.backbone.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * before + 0.1 * o)
    assert float(method.tau) == pytest.approx(0.9)
    # The optimizer never sees the target: only online parameters are trainable.
    trainable = {id(p) for g in method.param_groups(1e-6) for p in g["params"]}
    assert not trainable & {id(p) for p in method.target_backbone.parameters()}


def test_forward_by_resolution_runs_once_per_size_and_splits_back():
    calls = []

    class Probe(nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    views = [torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4),
             torch.randn(3, 3, 4, 4)]
    outs = SSLMethod.forward_by_resolution(Probe(), views)
    assert calls == [(6, 3, 8, 8), (9, 3, 4, 4)]
    assert len(outs) == 5
    for out, v in zip(outs, views, strict=True):
        torch.testing.assert_close(out, v.mean(dim=(2, 3)))


def test_bias_and_norm_parameters_are_excluded_from_adaptation():
    method = _byol()
    groups = method.param_groups(1.5e-6)
    excluded = [g for g in groups if g["lars_exclude"]][0]
    assert excluded["weight_decay"] == 0.0
    bn_weight = method.backbone.bn1.weight
    assert any(p is bn_weight for p in excluded["params"])
    adapted = [g for g in groups if not g["lars_exclude"]][0]
    assert any(p is method.backbone.conv1.weight for p in adapted["params"])


def test_head_precision_fp32_runs_the_heads_in_fp32_inside_a_bf16_autocast():
    from fastssl.config import load_config
    from fastssl.engine.trainer import build_model

    over = ["model.width=4", "method.proj_hidden=32", "method.proj_dim=16", "method.pred_hidden=32"]
    amp = build_model(load_config("byol_resnet18_fmnist", over))
    fp32 = build_model(load_config("byol_resnet18_fmnist", [*over, "train.head_precision=fp32"]))
    fp32.load_state_dict(amp.state_dict())  # same weights: the option adds no state
    x = torch.randn(6, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp32.backbone(x)
        assert y.dtype == torch.bfloat16  # the backbone stays in the autocast region
        assert amp.projector(y).dtype == torch.bfloat16
        p = fp32.projector(y)
    assert p.dtype == torch.float32
    # the fp32 head equals the same head run outside autocast on the same (bf16-rounded) features, bit for bit
    torch.testing.assert_close(p, fp32.projector(y.float()), rtol=0, atol=0)
    # and differs from the bf16 head by more than fp32 rounding (the option changes what is computed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (amp.projector(y).float() - p).abs().max() > 1e-4
        loss, _ = fp32([x, x.flip(-1)])
    loss.backward()
    assert fp32.predictor[0].weight.grad.dtype == torch.float32
    assert torch.isfinite(fp32.backbone.conv1.weight.grad).all()
