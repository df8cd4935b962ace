"""scripts/parity.py: the independent implementations' losses against hand calculations, its backbone
against fastssl's, the settings map, and a tiny end-to-end run that writes the JSON and the plot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load_parity():
    spec = importlib.util.spec_from_file_location("parity_script", REPO / "scripts" / "parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["parity_script"] = module
    spec.loader.exec_module(module)
    return module


parity = _load_parity()


def test_byol_loss_matches_hand_values():
    p = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    z = torch.tensor([[0.0, 2.0], [5.0, 0.0], [1.0, 1.0]])
    # rows: orthogonal -> 2, parallel -> 0, 45 degrees -> 2 - 2 / sqrt(2); mean over rows
    expected = (2.0 + 0.0 + (2.0 - math.sqrt(2.0))) / 3
    assert parity.byol_loss(p, z).item() == pytest.approx(expected, abs=1e-6)


def test_simclr_loss_matches_hand_value():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z1 = torch.stack([e1, e2])
    z2 = torch.stack([2 * e1, 3 * e2])  # scale must not matter
    # Every anchor sees its positive at cos 1 and two negatives at cos 0 (T = 1): log(e + 2) - 1.
    assert parity.simclr_loss(z1, z2, 1.0).item() == pytest.approx(math.log(math.e + 2) - 1, abs=1e-6)
    # T = 0.5 doubles every logit: log(e^2 + 2) - 2.
    assert parity.simclr_loss(z1, z2, 0.5).item() == pytest.approx(math.log(math.e ** 2 + 2) - 2, abs=1e-6)


def test_moco_loss_matches_hand_value():
    q, k = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # logits (1, 0, -1) / 0.5 = (2, 0, -2), class 0.
    expected = -2.0 + math.log(math.exp(2) + 1 + math.exp(-2))
    assert parity.moco_loss(q, k, queue, 0.5).item() == pytest.approx(expected, abs=1e-6)


def test_mocov3_loss_matches_hand_value():
    q = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # scale must not matter
    # logits q k^T / T with T = 0.5: [[2, 0], [0, 2]]; each row's positive on the diagonal:
    # CE = log(e^2 + 1) - 2; times 2T = 1.
    expected = math.log(math.exp(2) + 1) - 2
    assert parity.mocov3_loss(q, k, 0.5).item() == pytest.approx(expected, abs=1e-6)
    # T = 0.25: logits [[4, 0], [0, 4]], times 2T = 0.5
    assert parity.mocov3_loss(q, k, 0.25).item() == pytest.approx(0.5 * (math.log(math.exp(4) + 1) - 4), abs=1e-6)


def test_mocov3_heads_follow_the_paper_layout():
    """Every Linear without bias, BN + ReLU after each hidden layer, an affine-free BN after the output one (or
    none: the authors' ResNet predictor), and the layer names of fastssl's MLP (so --indep-init can copy)."""
    head = parity.bn_mlp(8, 16, 4, layers=3, last_bn=True)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in head if isinstance(m, torch.nn.Linear))
    assert not head[-1].affine
    assert [type(m).__name__ for m in parity.bn_mlp(8, 16, 4, 2, last_bn=False)][-1] == "Linear"


def test_sinkhorn_uniform_scores_give_uniform_codes_and_marginals_hold():
    q = parity.sinkhorn_knopp(torch.zeros(4, 2), eps=0.05, iters=3)
    assert torch.allclose(q, torch.full((4, 2), 0.5))
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.7, 0.0, 0.3], [0.1, 0.2, 0.9]])
    q = parity.sinkhorn_knopp(scores, eps=0.5, iters=200)
    assert torch.allclose(q.sum(1), torch.ones(4), atol=1e-5)  # each sample: a distribution
    assert torch.allclose(q.sum(0), torch.full((3,), 4 / 3), atol=1e-4)  # each prototype: B / K of the mass


def test_sinkhorn_one_iteration_by_hand():
    # 2 samples x 2 prototypes, eps = 1: Q0 = exp(scores)^T / sum; rows of Q0 (prototypes) -> 1/2, then
    # columns (samples) -> 1/2, times B = 2.
    scores = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    e = math.e
    a = [[e, 1.0], [1.0, 1.0]]  # a[k][b] = exp(score[b][k])
    rows = [[a[k][b] / sum(a[k]) / 2 for b in range(2)] for k in range(2)]
    cols = [[rows[k][b] / (rows[0][b] + rows[1][b]) / 2 * 2 for b in range(2)] for k in range(2)]
    expected = torch.tensor(cols).t()
    assert torch.allclose(parity.sinkhorn_knopp(scores, eps=1.0, iters=1), expected, atol=1e-6)


def test_swav_loss_matches_hand_value():
    s1 = torch.tensor([[1.0, 0.0]])
    s2 = torch.tensor([[0.0, 1.0]])
    q1 = torch.tensor([[1.0, 0.0]])
    q2 = torch.tensor([[0.0, 1.0]])
    # Code of view 1 (class 0) predicted by view 2's scores / T (T = 1): -log softmax((0, 1))[0] = log(1 + e);
    # code of view 2 (class 1) predicted by view 1: the same; averaged.
    assert parity.swav_loss([s1, s2], [q1, q2], 1.0).item() == pytest.approx(math.log(1 + math.e), abs=1e-6)


def test_independent_backbone_is_fastssls_architecture():
    from fastssl.models import build_backbone

    ours = parity.SmallResNet18(4).eval()
    theirs = build_backbone("resnet18", width=4, small_images=True).eval()
    a, b = ours.state_dict(), theirs.state_dict()
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    ours.load_state_dict(b, strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def _run_args(data, *overrides: str):
    """The command-line namespace ``fastssl_overrides`` reads: a 1-epoch fp32 seed-0 run on ``data``."""
    return parity.argparse.Namespace(data=str(data), epochs=1, seed=0, precision="fp32", threads=1,
                                     fastssl_override=list(overrides))


@pytest.mark.parametrize("method", sorted(parity.SETTINGS))
def test_settings_equal_fastssls_spec_and_independent_steps(method, tmp_path):
    from fastssl.config import load_config

    s = parity.SETTINGS[method]()
    args = _run_args(tmp_path)
    cfg = load_config(s.recipe, parity.fastssl_overrides(s, args, tmp_path / "run"))
    parity.check_same_views(s, cfg)  # raises SystemExit when fastssl would train other views
    # Two steps of the independent method on random views: the loss is finite and the update runs.
    s.width = 2
    model = parity.build_independent(s)
    model.steps_per_epoch = 1
    opt = torch.optim.SGD(parity.param_groups(model, s.weight_decay, False), lr=s.lr, momentum=0.9)
    for step in range(2):
        views = [torch.randn(4, 3, v.size, v.size) for v in s.views]
        loss = model.loss(views)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        if hasattr(model, "before_update"):
            model.before_update(step)
        opt.step()
        model.after_step(step, 2)


def _fastssl_and_independent(method: str, tmp_path: Path, **heads):
    """fastssl's method (built as its trainer builds it) and the independent one with its weights, width 4."""
    from fastssl.config import load_config
    from fastssl.engine.trainer import build_model

    s = parity.SETTINGS[method]()
    s.width = 4
    s.heads.update(heads)
    args = _run_args(tmp_path)
    cfg = load_config(s.recipe, parity.fastssl_overrides(s, args, tmp_path / "run"))
    torch.manual_seed(0)
    theirs = build_model(cfg).train()
    ours = parity.build_independent(s).train()
    parity.copy_weights(ours, theirs.state_dict())
    return s, theirs, ours


HEADS = {"byol": dict(proj_hidden=32, proj_dim=16, pred_hidden=32),
         "simclr": dict(proj_hidden=32, proj_dim=16),
         "mocov2": dict(proj_hidden=32, proj_dim=16, queue_size=64),
         "mocov3": dict(proj_hidden=32, proj_dim=16, pred_hidden=32),
         "swav": dict(proj_hidden=32, proj_dim=16, n_prototypes=10, queue_length=64)}


@pytest.mark.parametrize("method", sorted(parity.SETTINGS))
def test_independent_loss_and_gradients_equal_fastssls_from_the_same_weights(method, tmp_path):
    """One forward + backward from the same weights on the same views: the loss and every gradient agree. This
    pins each independent method's BatchNorm statistics to fastssl's, which follow the papers' code (per view for
    BYOL, MoCo v2/v3; over both views for SimCLR; per resolution for SwAV's backbone and over all crops for its
    projector): a SimCLR forwarding its views one by one, or a SwAV forwarding each crop alone, fails here."""
    s, theirs, ours = _fastssl_and_independent(method, tmp_path, **HEADS[method])
    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 3, v.size, v.size, generator=gen) for v in s.views]
    torch.manual_seed(3)  # MoCo v2's Shuffle-BN draws one permutation on each side: the same one
    loss_theirs, _ = theirs([v.clone() for v in views])
    torch.manual_seed(3)
    loss_ours = ours.loss(views)
    assert loss_theirs.item() == pytest.approx(loss_ours.item(), rel=1e-5)
    loss_theirs.backward()
    loss_ours.backward()
    grads = dict(ours.named_parameters())
    compared = 0
    for name, p in theirs.named_parameters():
        if p.grad is None or p.grad.norm() < 1e-6:  # e.g. BYOL's projector bias before the predictor's BN
            continue
        assert _rel(p.grad, grads[name].grad) < 1e-3, (name, _rel(p.grad, grads[name].grad))
        compared += 1
    assert compared > 20  # the backbone's convolutions and BNs and the heads


@pytest.mark.parametrize("method,backbone,projector", [("byol", [8, 8], [8, 8]), ("mocov3", [8, 8], [8, 8]),
                                                       ("simclr", [16], [16]), ("swav", [16, 32], [48])])
def test_independent_batchnorm_sees_the_batches_of_its_papers_code(method, backbone, projector, tmp_path):
    """The batch sizes the online backbone's first BN and the projector's first BN see in one training forward of
    B = 8: one view at a time (BYOL, MoCo v3), both views at once (SimCLR), per resolution in the backbone and all
    six crops at once in the projector (SwAV: 2 x 32 px + 4 x 16 px)."""
    s, _, ours = _fastssl_and_independent(method, tmp_path, **HEADS[method])
    seen: dict[str, list[int]] = {"backbone": [], "projector": []}
    hooks = [ours.backbone.bn1.register_forward_pre_hook(lambda m, x: seen["backbone"].append(x[0].shape[0])),
             ours.projector[1].register_forward_pre_hook(lambda m, x: seen["projector"].append(x[0].shape[0]))]
    with torch.no_grad():
        ours.loss([torch.randn(8, 3, v.size, v.size) for v in s.views])
    for h in hooks:
        h.remove()
    assert seen == {"backbone": backbone, "projector": projector}


def test_setting_changes_both_sides_and_refuses_what_it_cannot_set(tmp_path):
    s = parity.apply_settings(parity.SETTINGS["swav"](), ["heads.sinkhorn_eps=0.05", "heads.n_prototypes=100",
                                                          "heads.freeze_prototypes_epochs=1", "lr=0.03"])
    assert (s.heads["sinkhorn_eps"], s.heads["n_prototypes"], s.lr) == (0.05, 100, 0.03)
    assert isinstance(s.heads["freeze_prototypes_epochs"], float) and isinstance(s.heads["n_prototypes"], int)
    args = _run_args(tmp_path)
    ov = parity.fastssl_overrides(s, args, tmp_path / "run")
    assert {"method.sinkhorn_eps=0.05", "method.n_prototypes=100", "optim.final_lr=0.03"} <= set(ov)
    assert parity.build_independent(s).prototypes.weight.shape[0] == 100
    for bad, says in (("heads.nope=1", "the keys are lr, weight_decay, momentum, heads.NAME"),
                      ("view.scale=0.5", "view.NAME with NAME one of size, flip_p"), ("view.hue=strong", "hue is a"),
                      ("width=8", "the keys are"), ("heads.n_prototypes=2.5", "n_prototypes is a int"),
                      ("heads.sinkhorn_eps=small", "sinkhorn_eps is a float"), ("lr", "lr is a float"),
                      ("heads.pred_last_bn=1", "the keys are")):
        with pytest.raises(SystemExit, match=says):
            parity.apply_settings(parity.SETTINGS["swav"](), [bad])
    with pytest.raises(SystemExit, match="pred_last_bn is a bool"):
        parity.apply_settings(parity.SETTINGS["mocov3"](), ["heads.pred_last_bn=1"])
    assert parity.apply_settings(parity.SETTINGS["mocov3"](), ["heads.pred_last_bn=false"]).heads["pred_last_bn"] \
        is False
    # view.NAME: every view and fastssl's data.aug alike, so the run's check of the two sides' views passes.
    from fastssl.config import load_config

    s = parity.apply_settings(parity.SETTINGS["mocov2"](), ["view.brightness=0.8", "view.hue=0.2"])
    assert [(v.brightness, v.hue, v.contrast) for v in s.views] == [(0.8, 0.2, 0.4)] * 2
    ov = parity.fastssl_overrides(s, args, tmp_path / "run")
    assert {"data.aug.brightness=0.8", "data.aug.hue=0.2"} <= set(ov)
    parity.check_same_views(s, load_config(s.recipe, ov))
    assert parity.SETTINGS["mocov2"]().views[0].brightness == 0.4  # the defaults untouched


def test_swav_settings_cut_milder_local_crops_than_globals_on_both_sides(tmp_path):
    """The 28 px SwAV settings: globals (0.3, 1), locals (0.1, 0.3), which fastssl reaches through data.aug plus
    data.local_aug; check_same_views compares every view's scale, so a local_aug that did not land stops it."""
    from fastssl.config import load_config
    from fastssl.engine.trainer import build_spec

    s = parity.SETTINGS["swav"]()
    args = _run_args(tmp_path)
    cfg = load_config(s.recipe, parity.fastssl_overrides(s, args, tmp_path / "run"))
    parity.check_same_views(s, cfg)
    assert [v.scale for v in build_spec(cfg).views] == [(0.3, 1.0)] * 2 + [(0.1, 0.3)] * 4
    s.extra.remove("data.local_aug.scale=[0.1,0.3]")
    cfg = load_config(s.recipe, parity.fastssl_overrides(s, args, tmp_path / "run"))
    with pytest.raises(SystemExit, match="view 2 scale"):
        parity.check_same_views(s, cfg)


def test_check_same_views_refuses_a_different_spec(tmp_path):
    from fastssl.config import load_config

    s = parity.SETTINGS["byol"]()
    args = _run_args(tmp_path, "data.aug.gray_p=0.5")
    cfg = load_config(s.recipe, parity.fastssl_overrides(s, args, tmp_path / "run"))
    with pytest.raises(SystemExit, match="gray_p"):
        parity.check_same_views(s, cfg)


def test_parity_runs_end_to_end_and_writes_json_and_png(tmp_path):
    from fastssl.convert import convert

    data = tmp_path / "fmnist"
    convert("fashion-mnist", data, limit={"train": 128, "val": 64}, workers=0, progress=False)
    out = tmp_path / "out"
    rc = parity.main(["--method", "byol", "--epochs", "2", "--data", str(data), "--out", str(out),
                      "--width", "2", "--batch-size", "64", "--workers", "0"])
    assert rc == 0
    result = json.loads((out / "parity.json").read_text())
    for side in ("fastssl", "independent"):
        knn = result[side]["knn_top1"]
        assert len(knn) == 2 and all(0.0 <= k <= 100.0 for k in knn)
    assert len(result["gap_points"]) == 2
    assert (out / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parity_mocov3_runs_end_to_end_from_fastssls_weights(tmp_path):
    """The MoCo v3 pair through the command line: both sides one epoch on 128 images, the independent one from
    fastssl's initial weights (--indep-init fastssl copies MoCo v3's heads and momentum encoder); its record says
    how it computed (per-view BN, fp32 loss)."""
    from fastssl.convert import convert

    data = tmp_path / "fmnist"
    convert("fashion-mnist", data, limit={"train": 128, "val": 64}, workers=0, progress=False)
    out = tmp_path / "out"
    rc = parity.main(["--method", "mocov3", "--epochs", "1", "--data", str(data), "--out", str(out), "--width", "2",
                      "--batch-size", "64", "--workers", "0", "--indep-init", "fastssl", "--precision", "bf16"])
    assert rc == 0
    result = json.loads((out / "parity.json").read_text())
    assert len(result["fastssl"]["knn_top1"]) == len(result["independent"]["knn_top1"]) == 1
    record = json.loads((out / "independent.json").read_text())
    assert (record["init"], record["batchnorm"], record["loss_precision"]) == ("fastssl", "per view", "fp32")
    assert 0.0 <= record["knn_init"] <= 100.0  # the shared initial weights, scored before training
    assert record["settings"]["heads"]["proj_layers"] == 3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: BYOL's gradients sum terms that nearly cancel, so single elements near zero differ in
    their last digits between two correct orders of summation; whole tensors agree to ~1e-6 in fp32."""
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_fastssl_byol_steps_equal_the_independent_steps_from_the_same_weights(tiny_gray_dataset, tmp_path):
    """Issue 18's diagnosis as a test: from the same initial weights and views, three steps of fastssl's Trainer
    (BYOL forward per view, loss, SGD with its parameter groups, EMA with the cosine tau) and of the independent
    loop give the same loss, the same gradients and the same online and target weights (fp32, contiguous).
    A defect in any of them (a shared-BN forward, a missing term, the EMA a step off) breaks it."""
    from fastssl.config import load_config
    from fastssl.engine.trainer import Trainer

    s = parity.SETTINGS["byol"]()
    s.width, s.batch = 4, 16
    s.heads.update(proj_hidden=32, proj_dim=16, pred_hidden=32)
    args = _run_args(tiny_gray_dataset, "train.channels_last=false", "data.num_workers=0")
    cfg = load_config(s.recipe, parity.fastssl_overrides(s, args, tmp_path / "run"))
    trainer = Trainer(cfg)
    trainer._setup()
    ours = parity.build_independent(s)
    parity.copy_weights(ours, trainer.method.state_dict())
    opt = torch.optim.SGD(parity.param_groups(ours, s.weight_decay, False), lr=s.lr, momentum=s.momentum)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        views = [torch.rand(s.batch, 3, 32, 32, generator=gen) * 2 - 1 for _ in range(2)]
        trainer.step = step
        loss_fastssl, _ = trainer._train_step([v.clone() for v in views])
        loss_ours = ours.loss(views)
        opt.zero_grad(set_to_none=True)
        loss_ours.backward()
        opt.step()
        ours.after_step(step, trainer.total_steps)
        assert loss_fastssl.item() == pytest.approx(loss_ours.item(), rel=1e-5)
        grads = dict(ours.named_parameters())
        for name, p in trainer.method.named_parameters():
            if p.grad is None:
                continue
            if name == "projector.3.bias":  # the predictor's BN removes any shift of z: a zero gradient, up to rounding
                scale = grads["projector.3.weight"].grad.norm()
                assert p.grad.norm() < 1e-4 * scale and grads[name].grad.norm() < 1e-4 * scale
                continue
            assert _rel(p.grad, grads[name].grad) < 1e-3, (step, name, _rel(p.grad, grads[name].grad))
        theirs = ours.state_dict()
        for name, t in trainer.method.state_dict().items():
            if name in theirs and t.is_floating_point() and "running" not in name:
                assert _rel(t, theirs[name]) < 1e-4, (step, name, _rel(t, theirs[name]))


def _float64_trainer_and_independent(s, data: Path, tmp_path: Path):
    """fastssl's Trainer (set up, not fitted) and the independent model under ``s``, both in float64 from the same
    weights, and the independent side's SGD: the multi-step equality tests' start."""
    from fastssl.config import load_config
    from fastssl.engine.trainer import Trainer

    args = _run_args(data, "train.channels_last=false", "data.num_workers=0")
    cfg = load_config(s.recipe, parity.fastssl_overrides(s, args, tmp_path / "run"))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        trainer = Trainer(cfg)
        trainer._setup()
        ours = parity.build_independent(s)
    finally:
        torch.set_default_dtype(default)
    assert next(trainer.method.parameters()).dtype == torch.float64
    parity.copy_weights(ours, trainer.method.state_dict())
    opt = torch.optim.SGD(parity.param_groups(ours, s.weight_decay, False), lr=s.lr, momentum=s.momentum)
    return trainer, ours, opt


def _step_both(trainer, ours, opt, step: int, views: list[torch.Tensor], rng_seed: int | None = None) -> None:
    """One step of fastssl's Trainer and one of the independent loop (as ``run_independent``) on ``views``; the
    losses agree. ``rng_seed`` seeds the global RNG before each side (draws such as Shuffle-BN's permutation)."""
    trainer.step = step
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    loss_fastssl, _ = trainer._train_step([v.clone() for v in views])
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    loss_ours = ours.loss(views)
    opt.zero_grad(set_to_none=True)
    loss_ours.backward()
    if hasattr(ours, "before_update"):
        ours.before_update(step)
    opt.step()
    ours.after_step(step, trainer.total_steps)
    assert loss_fastssl.item() == pytest.approx(loss_ours.item(), rel=1e-6), step


def _assert_same_gradients(trainer, ours, step: int, frozen_prefix: str) -> None:
    """Every trained parameter's gradient agrees (over 40 of them); only ``frozen_prefix`` ones have none."""
    grads = dict(ours.named_parameters())
    compared = 0
    for name, p in trainer.method.named_parameters():
        if p.grad is None:
            assert name.startswith(frozen_prefix) and grads[name].grad is None
            continue
        assert _rel(p.grad, grads[name].grad) < 1e-4, (step, name, _rel(p.grad, grads[name].grad))
        compared += 1
    assert compared > 40


def _assert_same_weights(trainer, ours, step: int, skip: tuple[str, ...] = ("running",)) -> tuple[dict, dict]:
    """Every floating-point state entry the two sides share agrees (names containing a ``skip`` part aside);
    returns (fastssl's, the independent one's) state dicts."""
    theirs, mine = ours.state_dict(), trainer.method.state_dict()
    for name, t in mine.items():
        if name in theirs and t.is_floating_point() and not any(part in name for part in skip):
            assert _rel(t, theirs[name]) < 1e-6, (step, name, _rel(t, theirs[name]))
    return mine, theirs


def test_fastssl_mocov3_steps_equal_the_independent_steps_from_the_same_weights(tiny_gray_dataset, tmp_path):
    """As the BYOL test, for MoCo v3: fastssl's Trainer forwards both views in ONE batched forward whose BatchNorms
    normalize each view apart (fastssl.models.norm), the independent side once per view as the paper's code. From
    the same weights and views, four steps (loss, SGD with the parameter groups, momentum update with the cosine m)
    give the same loss, gradients, online weights and momentum-encoder weights. A pooled-BN forward, a one-sided
    loss, a missing 2T factor, or an m a step late breaks it.

    Both sides in float64 (their losses still take fp32, as written), at lr 0.006: in fp32, this width-4 model at
    fastssl's seed-0 draw carries 3e-4 of rounding in its first gradients, and SGD at lr 0.06 amplifies that
    ~50x a step (the independent code run in fp32 and in float64 parts by 2 % at step 2), which would hide a
    defect; in float64 the two sides agree to ~1e-6 over four steps."""
    s = parity.SETTINGS["mocov3"]()
    s.width, s.batch, s.lr = 4, 16, 0.006
    s.heads.update(proj_hidden=32, proj_dim=16, pred_hidden=32)
    trainer, ours, opt = _float64_trainer_and_independent(s, tiny_gray_dataset, tmp_path)
    assert trainer.total_steps == 6  # 96 images / 16: the cosine m rises from 0.99 by 1.7e-4 .. 2.5e-3 a step
    start = {n: t.clone() for n, t in ours.state_dict().items()
             if n.startswith("momentum_") and n.endswith(("weight", "bias"))}
    assert len(start) > 40
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        views = [torch.rand(s.batch, 3, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(2)]
        _step_both(trainer, ours, opt, step, views)
        _assert_same_gradients(trainer, ours, step, "momentum_")
        mine, theirs = _assert_same_weights(trainer, ours, step)
        # The momentum encoder's displacement from its start, (1 - m) of the online one's per step: an m a step late
        # (1 - m off by 7 % at step 0 of 6) or a missing update fails here.
        for name, t0 in start.items():
            assert _rel(mine[name] - t0, theirs[name] - t0) < 1e-3, (step, name)


def test_fastssl_mocov2_steps_equal_the_independent_steps_from_the_same_weights(tiny_gray_dataset, tmp_path):
    """As the MoCo v3 test, for MoCo v2 with its queue and Shuffle-BN (the settings' 4 parts; one process): from the
    same weights, queue and views, and the same permutation drawn on each side, four steps of fastssl's Trainer and
    of the independent loop give the same loss, gradients, query weights, key-encoder weights and queue. A key
    normalized with its query's part, a queue written a step late or at another row, or the momentum update before
    the optimizer step breaks it. float64 and lr 0.006, as the MoCo v3 test says why."""
    s = parity.SETTINGS["mocov2"]()
    assert s.heads["bn_splits"] == 4
    s.width, s.batch, s.lr = 4, 16, 0.006
    s.heads.update(proj_hidden=32, proj_dim=16, queue_size=40)  # 2.5 batches: the ring wraps mid-batch at step 2
    trainer, ours, opt = _float64_trainer_and_independent(s, tiny_gray_dataset, tmp_path)
    ours.queue = ours.queue.float()  # its fp32 loss (float64 default dtype made it float64)
    torch.testing.assert_close(ours.queue, trainer.method.queue.float())
    start = {n: t.clone() for n, t in ours.state_dict().items()
             if n.startswith("key_") and n.endswith(("weight", "bias"))}
    assert len(start) > 40
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        views = [torch.rand(s.batch, 3, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(2)]
        _step_both(trainer, ours, opt, step, views, rng_seed=100 + step)
        _assert_same_gradients(trainer, ours, step, "key_")
        mine, theirs = _assert_same_weights(trainer, ours, step)
        assert int(mine["queue_ptr"]) == ours.ptr == (step + 1) * 16 % 40
        assert _rel(mine["queue"].float(), ours.queue) < 1e-5, step
        for name, t0 in start.items():  # (1 - m) of the query encoder's displacement per step, after the step
            assert _rel(mine[name] - t0, theirs[name] - t0) < 1e-3, (step, name)


def test_fastssl_swav_steps_equal_the_independent_steps_from_the_same_weights(tiny_gray_dataset, tmp_path):
    """As the MoCo tests, for SwAV's multi-crop settings (2 x 32 px + 4 x 16 px): four steps with the prototypes
    frozen (the first epoch, where fastssl leads the independent side by 1.8 kNN points on three seeds), then two
    after they unfreeze; loss, gradients, weights and prototypes agree from the same weights and views. A frozen
    prototype that still moves (decay, momentum), a missed renormalization or codes from another crop break it."""
    s = parity.SETTINGS["swav"]()
    s.width, s.batch, s.lr = 4, 16, 0.006
    s.heads.update(proj_hidden=32, proj_dim=16, n_prototypes=10, freeze_prototypes_epochs=4 / 6)
    trainer, ours, opt = _float64_trainer_and_independent(s, tiny_gray_dataset, tmp_path)
    assert trainer.total_steps == 6
    trainer.method.on_train_start(trainer.steps_per_epoch, trainer.total_steps)  # as fit() does
    ours.steps_per_epoch = trainer.total_steps  # one epoch: frozen for steps 0-3
    start = ours.prototypes.weight.detach().clone()
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        views = [torch.rand(s.batch, 3, v.size, v.size, generator=gen, dtype=torch.float64) * 2 - 1 for v in s.views]
        _step_both(trainer, ours, opt, step, views)
        _assert_same_weights(trainer, ours, step, skip=("running", "queue"))
        moved = float((ours.prototypes.weight.detach() - start).norm())
        assert (moved < 1e-12) == (step < 4), (step, moved)  # frozen (up to renormalizing) while the schedule says


def _fake_run(folder: Path, seed: int, fastssl: list[float], independent: list[float],
              changed: dict | None = None) -> Path:
    """A finished parity run's two JSON files; ``changed`` = {side: {key: value}} edits one side's record."""
    settings = {"method": "byol", "width": 16}
    folder.mkdir(parents=True)
    for name, knn in (("fastssl", fastssl), ("independent", independent)):
        doc = {"settings": settings, "epochs": len(knn), "seed": seed, "precision": "bf16", "knn_top1": knn,
               "img_s": 100.0, **({"init": "fastssl"} if name == "independent" else {})}
        doc.update((changed or {}).get(name, {}))
        (folder / f"{name}.json").write_text(json.dumps(doc))
    return folder


def test_summarize_gives_the_seed_means_and_the_mean_gap(tmp_path, capsys):
    runs = [_fake_run(tmp_path / "s0", 0, [76.0, 80.0], [75.0, 81.0]),
            _fake_run(tmp_path / "s1", 1, [75.0, 81.0], [77.0, 80.0]),
            _fake_run(tmp_path / "s2", 2, [78.0, 82.5], [77.0, 82.0])]
    out = tmp_path / "summary"
    rc = parity.main(["--method", "byol", "--summarize", *map(str, runs), "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "summary.json").read_text())
    assert result["seeds"] == [0, 1, 2]
    assert result["fastssl"]["mean"] == [pytest.approx(76.33, abs=0.01), pytest.approx(81.17, abs=0.01)]
    assert result["independent"]["mean"] == [pytest.approx(76.33, abs=0.01), pytest.approx(81.0, abs=0.01)]
    assert result["gap_points"]["per_seed"] == [[1.0, -1.0], [-2.0, 1.0], [1.0, 0.5]]
    assert result["gap_points"]["mean"] == [0.0, pytest.approx(0.17, abs=0.01)]
    # standard error of the mean gap at epoch 1: sample std of (1, -2, 1) = sqrt(3), / sqrt(3) = 1
    assert result["gap_points"]["sem"][0] == pytest.approx(1.0, abs=0.01)
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "+0.00 +- 1.00" in printed and "no gain over them" in printed
    assert "knn_init" not in result


def test_summarize_gives_each_sides_gain_over_the_initial_weights(tmp_path, capsys):
    runs = [_fake_run(tmp_path / f"s{k}", k, [76.0, 80.0 + k], [75.0, 81.0], changed={"independent": {"knn_init": v}})
            for k, v in enumerate([66.0, 67.0, 68.0])]
    result = parity.summarize(runs, tmp_path / "out")
    # fastssl's last epoch: mean of 80, 81, 82 = 81; independent 81; the initial weights 67
    assert result["knn_init"] == {"per_seed": [66.0, 67.0, 68.0], "mean": 67.0,
                                  "gain_at_end": {"fastssl": 14.0, "independent": 14.0}}
    assert "gain at epoch 2: fastssl +14.00, independent +14.00 points" in capsys.readouterr().out


def test_summarize_refuses_mixed_settings_repeated_seeds_and_missing_sides(tmp_path):
    a = _fake_run(tmp_path / "a", 0, [76.0], [75.0])
    b = _fake_run(tmp_path / "b", 0, [75.0], [77.0])
    with pytest.raises(SystemExit, match="repeat a seed"):
        parity.summarize([a, b], tmp_path / "out")
    c = _fake_run(tmp_path / "c", 1, [75.0], [77.0], changed={"independent": {"precision": "fp32"}})
    with pytest.raises(SystemExit, match="precision differs"):
        parity.summarize([a, c], tmp_path / "out")
    (c / "independent.json").unlink()
    with pytest.raises(SystemExit, match="independent.json is missing"):
        parity.summarize([a, c], tmp_path / "out")
    with pytest.raises(SystemExit, match="at least two"):
        parity.summarize([a], tmp_path / "out")


def test_summarize_refuses_runs_whose_independent_loss_precision_differs(tmp_path):
    a = _fake_run(tmp_path / "a", 0, [76.0], [75.0])  # a record from before the option: bf16 loss
    b = _fake_run(tmp_path / "b", 1, [75.0], [77.0], changed={"independent": {"fp32_loss": False}})
    assert parity.summarize([a, b], tmp_path / "out")["seeds"] == [0, 1]
    c = _fake_run(tmp_path / "c", 2, [75.0], [77.0], changed={"independent": {"fp32_loss": True}})
    with pytest.raises(SystemExit, match="loss_precision differs"):
        parity.summarize([a, c], tmp_path / "out")
    # today's default record (fp32 loss) goes with the old --indep-fp32-loss BYOL records, not with the bf16 ones
    d = _fake_run(tmp_path / "d", 3, [75.0], [77.0],
                  changed={"independent": {"batchnorm": "per view", "loss_precision": "fp32"}})
    assert parity.summarize([c, d], tmp_path / "out")["seeds"] == [2, 3]
    with pytest.raises(SystemExit, match=r"loss_precision differs .*\(fp32 against bf16\)"):
        parity.summarize([a, d], tmp_path / "out")


@pytest.mark.parametrize("method", ["byol", "simclr"])
def test_the_independent_loss_takes_fp32_by_default_and_bf16_only_when_asked(method):
    """The default: under bf16 autocast the loss of the same weights and views is the fp32 loss of the heads'
    outputs (as fastssl's losses upcast them); ``loss_fp32 = False`` (--indep-bf16-loss, the records from before the
    default) moves it away towards the bf16 value."""
    torch.manual_seed(0)
    s = parity.SETTINGS[method]()
    model = parity.build_independent(s).eval()
    assert model.loss_fp32
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    with torch.no_grad():
        exact = model.loss(views).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            default = model.loss(views)
            model.loss_fp32 = False
            low = model.loss(views).float().item()
    assert default.dtype == torch.float32
    assert abs(default.item() - exact) < abs(low - exact)


def test_bf16_loss_option_is_refused_where_no_old_record_needs_it(tmp_path, capsys):
    for argv in (["--method", "mocov3", "--indep-bf16-loss"], ["--method", "byol", "--indep-bf16-loss",
                                                                "--indep-fp32-loss"]):
        with pytest.raises(SystemExit):
            parity.main([*argv, "--out", str(tmp_path / "out")])
        assert "--indep-bf16-loss recreates the BYOL / SimCLR records" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_summarize_refuses_runs_whose_independent_batchnorm_differs(tmp_path):
    """Records from before the ``batchnorm`` key forwarded every view on its own: an old BYOL record goes with a
    new one ("per view"), an old SimCLR record not with one whose BN spans both views."""
    old = _fake_run(tmp_path / "old", 0, [76.0], [75.0])  # BYOL, bf16 loss (before --indep-fp32-loss)
    bf16 = {"batchnorm": "per view", "loss_precision": "bf16"}  # a run with --indep-bf16-loss today
    new_byol = _fake_run(tmp_path / "new", 1, [75.0], [77.0], changed={"independent": bf16})
    assert parity.summarize([old, new_byol], tmp_path / "out")["seeds"] == [0, 1]
    both = _fake_run(tmp_path / "both", 2, [75.0], [77.0],
                     changed={"independent": {**bf16, "batchnorm": "over both views"}})
    with pytest.raises(SystemExit, match="batchnorm differs"):
        parity.summarize([old, both], tmp_path / "out")


def test_summarize_refuses_another_method_before_writing_anything(tmp_path):
    runs = [_fake_run(tmp_path / "s0", 0, [76.0], [75.0]), _fake_run(tmp_path / "s1", 1, [75.0], [77.0])]
    with pytest.raises(SystemExit, match="the runs are byol, not --method simclr"):
        parity.main(["--method", "simclr", "--summarize", *map(str, runs), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "summary.json").exists()


def test_swav_settings_run_without_the_queue_that_knocked_both_sides_down(tmp_path):
    """Session 10: a 1,024 queue entering at epoch 3 cost both sides ~10 kNN points; the settings turn it off on
    both sides, and ``--setting heads.queue_length=N`` brings it back on both."""
    args = _run_args(tmp_path)
    s = parity.SETTINGS["swav"]()
    assert "method.queue_length=0" in parity.fastssl_overrides(s, args, tmp_path / "run")
    assert parity.build_independent(s).queue.shape[1] == 0
    s = parity.apply_settings(parity.SETTINGS["swav"](), ["heads.queue_length=1024"])
    assert {"method.queue_length=1024", "method.queue_start_epoch=2"} <= set(
        parity.fastssl_overrides(s, args, tmp_path / "run"))
    assert parity.build_independent(s).queue.shape[1] == 1024
