"""SwAV, DINO, Barlow Twins and VICReg: each loss against its formula on hand-made vectors, a short training run
that lowers the loss without collapse, the state a method keeps between steps (SwAV's queue and prototype freeze,
DINO's centre and teacher) through a checkpoint and across a change of world size, and each Fashion-MNIST recipe
through the training entry point."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fastssl.methods.barlow import BarlowTwins, barlow_twins_loss
from fastssl.methods.dino import DINO, dino_loss, teacher_temperature
from fastssl.methods.swav import SwAV
from fastssl.methods.vicreg import VICReg, vicreg_loss
from fastssl.models import DINOHead, Prototypes

FEAT = 16  # the toy backbone's output width


def _toy_backbone(batchnorm: bool = True) -> nn.Module:
    """A small conv net that accepts any resolution: (B, 3, S, S) -> (B, FEAT)."""
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(), nn.Conv2d(8, FEAT, 3, stride=2, padding=1),
                         norm(FEAT), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _build(name: str, seed: int = 0, batchnorm: bool = True, **kw) -> nn.Module:
    torch.manual_seed(seed)
    backbone = _toy_backbone(batchnorm)
    if name == "swav":
        kw = {"proj_hidden": 32, "proj_dim": 16, "n_prototypes": 12, "freeze_prototypes_epochs": 0, **kw}
        method = SwAV(backbone, FEAT, **kw)
    elif name == "dino":
        kw = {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 8, "freeze_last_layer_epochs": 0,
              "warmup_teacher_temp_epochs": 0, **kw}
        method = DINO(backbone, FEAT, **kw)
    elif name == "barlow":
        method = BarlowTwins(backbone, FEAT, proj_hidden=32, proj_dim=32, **kw)
    else:
        method = VICReg(backbone, FEAT, proj_hidden=32, proj_dim=32, **kw)
    if not batchnorm:  # per-sample computation: one process and 2 ranks see the same embeddings
        for module in list(method.modules()):
            for child_name, child in module.named_children():
                if isinstance(child, nn.BatchNorm1d):
                    setattr(module, child_name, nn.Identity())
    return method


def _views(x: torch.Tensor, n_local: int, g: torch.Generator) -> list[torch.Tensor]:
    """Toy multi-crop: noisy, randomly flipped copies of x (B, 3, 16, 16); local views are 8 px."""
    def noisy(t):
        t = t + 0.3 * torch.randn(t.shape, generator=g)
        return t.flip(-1) if torch.rand((), generator=g) < 0.5 else t
    globals_ = [noisy(x) for _ in range(2)]
    locals_ = [F.avg_pool2d(noisy(x), 2) for _ in range(n_local)]
    return globals_ + locals_


def _toy_images(n: int = 64, n_classes: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.randn(n_classes, 3, 4, 4, generator=g), size=16, mode="bilinear")
    return protos[torch.arange(n) % n_classes] + 0.2 * torch.randn(n, 3, 16, 16, generator=g)


def _train_step(method, opt, views, step, total):
    loss, logs = method(views)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    method.on_before_optimizer_step(step)
    opt.step()
    method.on_step_end(step, total)
    return float(loss.detach())


# ------------------------------------------------------------------------------ losses against formulas
def test_swav_codes_and_swapped_prediction_on_hand_made_scores():
    from fastssl.kernels import sinkhorn, swav_loss

    # Symmetric scores: both prototypes already carry half the mass, so Sinkhorn's codes are each row's
    # softmax at eps: q = [1, e^-2] / (1 + e^-2) for a 0.1 score gap and eps 0.05.
    s1 = torch.tensor([[0.1, 0.0], [0.0, 0.1]])
    s2 = torch.tensor([[0.0, 0.3], [0.3, 0.0]])
    hi = 1 / (1 + math.exp(-2))
    q1 = torch.tensor([[hi, 1 - hi], [1 - hi, hi]])
    torch.testing.assert_close(sinkhorn(s1, 0.05, 3), q1)
    # Swapped prediction at T = 0.1: view 1's code from view 2's scores and back, averaged.
    p2_first = 1 / (1 + math.exp(3))  # softmax([0, 3]) [0]
    ce_12 = -(hi * math.log(p2_first) + (1 - hi) * math.log(1 - p2_first))  # row 0; row 1 is the mirror
    q2 = sinkhorn(s2, 0.05, 3)
    p1 = F.softmax(s1 / 0.1, dim=1)
    ce_21 = -(q2 * p1.log()).sum(1).mean()
    expected = (ce_12 + ce_21) / 2
    torch.testing.assert_close(swav_loss([s1, s2], [q1, q2], 0.1), expected.float())


def _sinkhorn_by_hand(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The paper's exp-domain Sinkhorn-Knopp in float64."""
    q = torch.exp(scores.double() / eps).T  # (K, B)
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True) * k
        q /= q.sum(dim=0, keepdim=True) * b
    return (q * b).T.float()


def test_swav_forward_is_sinkhorn_codes_and_swapped_cross_entropy_over_all_views():
    method = _build("swav")
    g = torch.Generator().manual_seed(1)
    views = _views(_toy_images(6), n_local=2, g=g)
    loss, _ = method(views)
    with torch.no_grad():
        feats = [method.backbone(torch.cat(views[:2])), method.backbone(torch.cat(views[2:]))]
        z = F.normalize(method.projector(torch.cat(feats)), dim=1)
        c = F.normalize(method.prototypes.weight, dim=1)  # unit rows
        scores = (z @ c.T).chunk(4)
        expected = 0.0
        for a in range(2):
            q = _sinkhorn_by_hand(scores[a], 0.05, 3)
            expected += sum(-(q * F.log_softmax(scores[v] / 0.1, dim=1)).sum(1).mean() for v in range(4) if v != a) / 3
        expected /= 2
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(12))


def test_dino_loss_on_hand_made_logits():
    # Teacher logits equal -> q = (1/2, 1/2); student logits (0, ln 3) at T = 1 -> p = (1/4, 3/4).
    t = torch.zeros(1, 2)
    s_global, s_local = torch.tensor([[0.0, math.log(3)]]), torch.tensor([[math.log(3), 0.0]])
    h = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))  # H(q, p): the same for both student logits
    loss = dino_loss([s_global, s_global, s_local], [t, t], torch.zeros(1, 2), 1.0, 1.0)
    assert loss.item() == pytest.approx(h, rel=1e-6)  # pairs (0,1) (0,2) (1,0) (1,2), all equal to h
    # Centring and sharpening: teacher logits (1, 0) minus centre (1, 0) -> q = (1/2, 1/2) at any temperature.
    loss = dino_loss([s_global, s_global], [torch.tensor([[1.0, 0.0]])] * 2, torch.tensor([[1.0, 0.0]]), 1.0, 0.04)
    assert loss.item() == pytest.approx(h, rel=1e-6)
    # Sharpening without centring: (1, 0) at T 0.5 -> q = (e^2, 1) / (e^2 + 1).
    q0 = math.exp(2) / (math.exp(2) + 1)
    loss = dino_loss([s_global, s_global], [torch.tensor([[1.0, 0.0]])] * 2, torch.zeros(1, 2), 1.0, 0.5)
    assert loss.item() == pytest.approx(-(q0 * math.log(0.25) + (1 - q0) * math.log(0.75)), rel=1e-6)


def test_dino_forward_teacher_sees_globals_and_centre_follows_the_teacher_mean():
    method = _build("dino", center_momentum=0.9)
    method.on_epoch_start(0)
    views = _views(_toy_images(6), n_local=2, g=torch.Generator().manual_seed(2))
    loss, logs = method(views)
    with torch.no_grad():
        s = method.head(torch.cat([method.backbone(torch.cat(views[:2])), method.backbone(torch.cat(views[2:]))]))
        t = method.teacher_head(method.teacher_backbone(torch.cat(views[:2])))
        s_out, t_out = s.chunk(4), t.chunk(2)
        expected = sum(-(F.softmax(t_out[a] / 0.07, dim=1) * F.log_softmax(s_out[v] / 0.1, dim=1)).sum(1).mean()
                       for a in range(2) for v in range(4) if v != a) / 6
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(method.center, 0.1 * t.mean(dim=0, keepdim=True))  # from a zero centre
    assert logs["teacher_temp"] == pytest.approx(0.07)  # no warm-up in _build


def test_dino_teacher_temperature_warms_up_linearly_then_stays():
    temps = [teacher_temperature(e, 0.04, 0.07, 30) for e in range(35)]
    assert temps[0] == pytest.approx(0.04) and temps[29] == pytest.approx(0.07) and temps[34] == pytest.approx(0.07)
    assert temps[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    method = _build("dino", warmup_teacher_temp_epochs=30)
    method.on_epoch_start(10)
    assert method.teacher_temp == pytest.approx(0.04 + 0.03 * 10 / 29)


def test_dino_head_last_layer_is_weight_normalized_with_unit_gain():
    head = DINOHead(8, out_dim=5, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(3, 8)
    bottleneck = F.normalize(head.mlp(x), dim=1)
    torch.testing.assert_close(head(x), bottleneck @ F.normalize(head.last_v, dim=1).T)
    assert not head.last_g.requires_grad
    assert head(x).abs().max() <= 1.0 + 1e-6  # cosines


def test_barlow_twins_loss_on_hand_made_vectors():
    z = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # standardized already; columns perfectly anti-correlated
    # C = [[1, -1], [-1, 1]]: diagonal at 1 (no invariance cost), two off-diagonal entries of 1.
    assert barlow_twins_loss(z, z, 0.0051).item() == pytest.approx(0.0051 * 2, rel=1e-4)
    # Opposite views: C = -[[1, -1], [-1, 1]] -> (1 - (-1))^2 * 2 + lambda * 2.
    assert barlow_twins_loss(z, -z, 0.0051).item() == pytest.approx(8 + 0.0051 * 2, rel=1e-4)
    # Scale and shift per column do not matter (standardized over the batch).
    assert barlow_twins_loss(3 * z + 5, z, 0.0051).item() == pytest.approx(0.0051 * 2, rel=1e-4)


def test_barlow_forward_is_the_loss_of_its_two_projected_views():
    method = _build("barlow")
    views = _views(_toy_images(8), n_local=0, g=torch.Generator().manual_seed(3))
    loss, _ = method(views)
    z1, z2 = (method.projector(method.backbone(v)) for v in views)  # one forward per view, as the paper's code
    n1, n2 = [(z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5) for z in (z1, z2)]
    c = n1.T @ n2 / 8
    expected = ((1 - c.diagonal()) ** 2).sum() + 0.0051 * (c ** 2 - torch.diag(c.diagonal() ** 2)).sum()
    torch.testing.assert_close(loss, expected)


def test_vicreg_loss_on_hand_made_vectors():
    z1 = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    z2 = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    # invariance: mean of (0, 1, 0, 1) = 0.5
    # variance: z1 std sqrt(2) in both dims -> 0; z2 dims std sqrt(2) and sqrt(1e-4) = 0.01 -> (0 + 0.99) / 2
    # covariance: Cov(z1) = [[2, 2], [2, 2]] -> (4 + 4) / 2 = 4; Cov(z2) = [[2, 0], [0, 0]] -> 0
    loss, terms = vicreg_loss(z1, z2)
    assert terms["invariance"].item() == pytest.approx(0.5)
    assert terms["variance"].item() == pytest.approx((0 + 0.495) / 2, rel=1e-5)
    assert terms["covariance"].item() == pytest.approx(4.0)
    assert loss.item() == pytest.approx(25 * 0.5 + 25 * 0.2475 + 4.0, rel=1e-5)


def test_vicreg_forward_is_the_loss_of_its_two_expanded_views():
    method = _build("vicreg")
    views = _views(_toy_images(8), n_local=0, g=torch.Generator().manual_seed(4))
    loss, logs = method(views)
    z1, z2 = (method.expander(method.backbone(v)) for v in views)  # one forward per view, as the paper's code
    std = lambda z: torch.sqrt(z.var(0) + 1e-4)  # noqa: E731
    cov = lambda z: (z - z.mean(0)).T @ (z - z.mean(0)) / 7  # noqa: E731
    off = lambda m: (m ** 2).sum() - (m.diagonal() ** 2).sum()  # noqa: E731
    expected = (25 * ((z1 - z2) ** 2).mean() + 25 * (F.relu(1 - std(z1)).mean() + F.relu(1 - std(z2)).mean()) / 2
                + (off(cov(z1)) + off(cov(z2))) / 32)
    torch.testing.assert_close(loss, expected)
    assert set(logs) == {"loss", "invariance", "variance", "covariance"}


# ---------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["swav", "dino", "barlow", "vicreg"])
def test_twenty_steps_lower_the_loss_without_collapse(name):
    # DINO: with BN in the head (the CNN option) the toy outputs differ between images from the start; without it
    # they start nearly equal, the loss starts near 0 and rises for a while as centring spreads the targets.
    method = _build(name, **({"use_bn_in_head": True} if name == "dino" else {}))
    n_local = 2 if name in ("swav", "dino") else 0
    images = _toy_images(64)
    g = torch.Generator().manual_seed(5)
    opt = torch.optim.SGD([p for grp in method.param_groups(1e-5) for p in grp["params"]], lr=0.05, momentum=0.9)
    method.on_train_start(20, 20)
    method.on_epoch_start(0)
    losses = []
    for step in range(20):
        batch = images[torch.randperm(64, generator=g)[:32]]
        losses.append(_train_step(method, opt, _views(batch, n_local, g), step, 20))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    with torch.no_grad():
        emb = F.normalize(method.backbone(images), dim=1)
    # Collapse (every image on one point) drives the per-dimension std to 0.
    assert emb.std(dim=0).mean() > 0.2 / math.sqrt(FEAT), emb.std(dim=0)


def test_swav_prototypes_stay_frozen_during_the_first_epoch_then_move():
    method = _build("swav", freeze_prototypes_epochs=1)
    opt = torch.optim.SGD([p for grp in method.param_groups(1e-4) for p in grp["params"]], lr=0.1, momentum=0.9,
                          weight_decay=1e-4)
    images, g = _toy_images(16), torch.Generator().manual_seed(6)
    method.on_train_start(steps_per_epoch=3, total_steps=6)
    before = method.prototypes.weight.detach().clone()
    backbone_before = method.backbone[0].weight.detach().clone()
    for step in range(6):
        if step % 3 == 0:
            method.on_epoch_start(step // 3)
        _train_step(method, opt, _views(images, 2, g), step, 6)
        if step == 2:  # end of the frozen epoch: bit-identical prototypes, a trained backbone
            assert torch.equal(method.prototypes.weight, before)
            assert not torch.equal(method.backbone[0].weight, backbone_before)
    assert not torch.allclose(method.prototypes.weight, before)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(12))  # renormalized after steps


def test_prototypes_are_unit_vectors_scoring_cosines():
    protos = Prototypes(4, 6)
    torch.testing.assert_close(protos.weight.norm(dim=1), torch.ones(6))
    z = F.normalize(torch.randn(3, 4), dim=1)
    torch.testing.assert_close(protos(z), z @ protos.weight.T)


# -------------------------------------------------------------------------------- state and resume
def _run_steps(method, n_steps, g, n_local=2, batch=8):
    images = _toy_images(32)
    opt = torch.optim.SGD([p for grp in method.param_groups(1e-5) for p in grp["params"]], lr=0.05)
    method.on_train_start(n_steps, n_steps)
    method.on_epoch_start(0)
    for step in range(n_steps):
        _train_step(method, opt, _views(images[torch.randperm(32, generator=g)[:batch]], n_local, g), step, n_steps)


@pytest.mark.parametrize("name", ["swav", "dino"])
def test_method_state_survives_a_checkpoint_round_trip(name):
    kw = {"queue_length": 16, "queue_start_epoch": 0} if name == "swav" else {}
    method = _build(name, **kw)
    _run_steps(method, 4, torch.Generator().manual_seed(7))
    state = {k: v.clone() for k, v in method.state_dict().items()}
    if name == "swav":
        assert int(state["queue_filled"]) == 16 and state["queue"].abs().sum() > 0
    else:
        assert state["center"].abs().sum() > 0
        assert not torch.equal(state["teacher_head.last_v"], state["head.last_v"])
    restored = _build(name, seed=123, **kw)  # other initial weights: everything must come from the state
    restored.load_state_dict(state)
    for m in (method, restored):  # what the trainer does after a resume
        m.on_train_start(4, 8)
        m.on_epoch_start(1)
    views = _views(_toy_images(8), 2, torch.Generator().manual_seed(8))
    out_a, logs_a = method(views)
    out_b, logs_b = restored(views)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    if name == "swav":
        assert logs_a["queue_used"] == logs_b["queue_used"] == 1.0
    for key, value in method.state_dict().items():  # the step's updates (queue, centre) agree too
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0, msg=key)


WORLD, PER_RANK = 2, 4


def _fixed_views(step: int) -> list[torch.Tensor]:
    return _views(_toy_images(WORLD * PER_RANK, seed=step), 2, torch.Generator().manual_seed(100 + step))


def _state_after_steps(method, rank: int, world: int, n_steps: int = 3) -> dict:
    """Forward + state updates (no optimizer) on this rank's share of fixed global batches."""
    rows = slice(rank * PER_RANK * WORLD // world, (rank + 1) * PER_RANK * WORLD // world)
    method.on_train_start(n_steps, n_steps)
    method.on_epoch_start(0)
    losses = []
    for step in range(n_steps):
        loss, _ = method([v[rows] for v in _fixed_views(step)])
        method.on_step_end(step, n_steps)
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "state": method.state_dict()}


def _world_size_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {name: _state_after_steps(_build(name, batchnorm=False, **kw), rank, WORLD)
               for name, kw in (("swav", {"queue_length": 8, "queue_start_epoch": 0}), ("dino", {}))}
        # Barlow Twins and VICReg: the loss and the rank's gradient on its rows vs one process.
        g = torch.Generator().manual_seed(9)
        z1, z2 = torch.randn(WORLD * PER_RANK, 6, generator=g), torch.randn(WORLD * PER_RANK, 6, generator=g)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for name, fn in (("barlow", lambda a, b: barlow_twins_loss(*_gathered(a, b))), ("vicreg", _vicreg)):
            a, b = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
            loss = fn(a, b)
            loss.backward()
            out[name] = (loss.detach(), a.grad, b.grad)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _gathered(a, b):
    from fastssl.kernels import all_gather_with_grad

    return all_gather_with_grad(a), all_gather_with_grad(b)


def _vicreg(a, b):
    return vicreg_loss(a, b)[0]


def test_state_is_global_and_resumes_on_another_world_size(tmp_path):
    mp.spawn(_world_size_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, kw in (("swav", {"queue_length": 8, "queue_start_epoch": 0}), ("dino", {})):
        single = _state_after_steps(_build(name, batchnorm=False, **kw), 0, 1)
        # Each rank's loss is its rows' mean: the ranks' average is the one-process loss.
        torch.testing.assert_close(sum(r[name]["losses"] for r in ranks) / WORLD, single["losses"])
        for key in ("queue", "queue_filled") if name == "swav" else ("center",):
            for r in ranks:  # the same global buffer on every rank, equal to the one-process buffer
                torch.testing.assert_close(r[name]["state"][key], single["state"][key], msg=f"{name}.{key}")
        # A 2-rank checkpoint continues in one process exactly as the one-process run does.
        a, b = _build(name, seed=1, batchnorm=False, **kw), _build(name, seed=2, batchnorm=False, **kw)
        a.load_state_dict(ranks[0][name]["state"])
        b.load_state_dict(single["state"])
        for m in (a, b):
            m.on_train_start(3, 6)
            m.on_epoch_start(1)
        views = _fixed_views(3)
        torch.testing.assert_close(a(views)[0], b(views)[0])
    g = torch.Generator().manual_seed(9)
    z1, z2 = torch.randn(WORLD * PER_RANK, 6, generator=g), torch.randn(WORLD * PER_RANK, 6, generator=g)
    for name, fn in (("barlow", barlow_twins_loss), ("vicreg", _vicreg)):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = fn(a, b)
        loss.backward()
        torch.testing.assert_close(sum(r[name][0] for r in ranks) / WORLD, loss.detach())
        for r, rank in enumerate(ranks):  # DDP averages: rank r's gradient / world = the one-process gradient
            rows = slice(r * PER_RANK, (r + 1) * PER_RANK)
            torch.testing.assert_close(rank[name][1] / WORLD, a.grad[rows], msg=name)
            torch.testing.assert_close(rank[name][2] / WORLD, b.grad[rows], msg=name)


# ------------------------------------------------------------------------------- the entry point
_TINY = {
    "swav": {"method.proj_hidden": 32, "method.proj_dim": 16, "method.n_prototypes": 10, "method.queue_length": 32},
    "dino": {"method.out_dim": 64, "method.hidden_dim": 32, "method.bottleneck_dim": 16},
    "barlow": {"method.proj_hidden": 32, "method.proj_dim": 32},
    "vicreg": {"method.proj_hidden": 32, "method.proj_dim": 32},
}


@pytest.mark.parametrize("name", ["swav", "dino", "barlow", "vicreg"])
def test_fmnist_recipe_trains_through_the_entry_point(name, tiny_gray_dataset, tmp_path, capsys):
    from fastssl.train import main

    out = tmp_path / name
    overrides = {"data.path": tiny_gray_dataset, "data.num_workers": 0, "data.global_size": 16, "data.local_size": 8,
                 "model.width": 4, "train.batch_size": 16, "train.max_steps": 2, "train.log_every": 1,
                 "train.progress": "false", "train.threads": 1, "eval.batch_size": 64, "out_dir": out, **_TINY[name]}
    assert main(["--config", f"{name}_resnet18_fmnist", *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["steps"] == 2 and math.isfinite(results["final_loss"])
    assert 0.0 <= results["knn_top1"] <= 100.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["img_s"] > 0 for r in rows)


def test_swav_enqueues_only_after_the_update():
    """A step the trainer skips (non-finite loss: no optimizer step, no on_step_end) leaves the queue alone."""
    method = _build("swav", queue_length=8, queue_start_epoch=0)
    method.on_train_start(10, 10)
    method.on_epoch_start(0)
    views = _views(_toy_images(4), 2, torch.Generator().manual_seed(0))
    method(views)
    assert int(method.queue_filled) == 0 and method.queue.abs().sum() == 0
    method.on_step_end(0, 10)
    assert int(method.queue_filled) == 4 and method.queue.abs().sum() > 0
