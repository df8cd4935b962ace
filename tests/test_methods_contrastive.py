"""SimCLR, MoCo v2, MoCo v3 and the ViT backbone: the losses against hand calculation, learning without
collapse, method state through checkpoints and world-size changes, 2 gloo ranks against one process,
and the training entry point for each recipe."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastssl.engine.checkpoint import load_checkpoint, save_checkpoint
from fastssl.engine.trainer import build_optimizer
from fastssl.kernels import info_nce, nt_xent
from fastssl.methods import build_method
from fastssl.models import VisionTransformer, build_backbone
from fastssl.train import main as train_main

T = 0.5
HEADS = {
    "simclr": {"proj_hidden": 32, "proj_dim": 16},
    "mocov2": {"proj_hidden": 32, "proj_dim": 16, "queue_size": 32, "momentum": 0.9},
    "mocov3": {"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one intra-op thread is faster, and far faster on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _method(name: str, seed: int = 0, backbone: str = "resnet18", **kw):
    torch.manual_seed(seed)
    bb = build_backbone(backbone, width=4, small_images=True)
    return build_method(name, bb, bb.feat_dim, **{**HEADS[name], **kw})


def _views(n: int = 8, size: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]


# ----------------------------------------------------------------------------- the formulas, by hand
def _nt_xent_by_hand(z1, z2, t):
    """Row by row: -log exp(s_i,pos / t) / sum_{m != i} exp(s_im / t) over the 2N unit vectors."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        denom = sum(math.exp(float(z[i] @ z[m]) / t) for m in range(n2) if m != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / denom)
    return total / n2


def _info_nce_by_hand(q, k, t, queue=None):
    """Row by row: positive k_i; negatives the other keys (no queue) or the queue rows."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / t)
        if queue is None:
            denom = sum(math.exp(float(q[i] @ k[j]) / t) for j in range(k.shape[0]))
        else:
            denom = pos + sum(math.exp(float(q[i] @ n) / t) for n in queue.double())
        total += -math.log(pos / denom)
    return total / q.shape[0]


def test_nt_xent_on_two_orthogonal_pairs_equals_closed_form():
    # Both views identical and the two images orthogonal: every row has cos 1 with its positive and
    # cos 0 with the 2 others, so each row's loss is log(1 + 2 exp(-1/T)).
    e = torch.eye(2)
    expected = math.log(1 + 2 * math.exp(-1 / T))
    assert float(nt_xent(e, e.clone(), T)) == pytest.approx(expected, rel=1e-6)
    z1, z2 = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]]), torch.tensor([[2.0, 1.0], [-1.0, 1.0], [1.0, 0.0]])
    assert float(nt_xent(z1, z2, T)) == pytest.approx(_nt_xent_by_hand(z1, z2, T), rel=1e-5)


def test_info_nce_with_queue_and_scaled_symmetric_equal_closed_form():
    q, k = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # logits 1/T (positive), 0, -1/T
    expected = math.log(1 + math.exp(-1 / T) + math.exp(-2 / T))
    assert float(info_nce(q, k, T, queue=queue)) == pytest.approx(expected, rel=1e-6)
    # MoCo v3: q_i = k_i, keys orthogonal: each row log(1 + exp(-1/T)), times 2T.
    e = torch.eye(2)
    assert float(info_nce(e, e.clone(), T, scale=2 * T)) == pytest.approx(2 * T * math.log(1 + math.exp(-1 / T)))


def test_simclr_loss_is_nt_xent_of_its_projections():
    method = _method("simclr", temperature=T)
    v1, v2 = _views()
    loss, logs = method([v1, v2])
    z = method.projector(method.backbone(torch.cat([v1, v2])))  # one forward for both views, as the method
    assert float(loss.detach()) == pytest.approx(_nt_xent_by_hand(*z.detach().chunk(2), T), rel=1e-5)
    assert logs["loss"] == loss.detach()


def test_mocov2_loss_is_info_nce_against_its_queue():
    method = _method("mocov2", temperature=T)
    v1, v2 = _views()
    loss, _ = method([v1, v2])
    with torch.no_grad():
        q = method.projector(method.backbone(v1))
        k = method.key_projector(method.key_backbone(v2))
    assert float(loss.detach()) == pytest.approx(_info_nce_by_hand(q, k, T, method.queue), rel=1e-5)


def test_mocov2_shuffle_bn_on_one_process_normalizes_parts_apart_and_shuffles_the_keys():
    """bn_splits = 4 on one process trains as MoCo's Shuffle-BN on 4 GPUs: each quarter of the queries is
    normalized by its own statistics, and the keys by those of a random quarter of a permutation; loss and
    gradients equal that written out with separate forwards (as 4 GPUs would run them)."""
    method = _method("mocov2", temperature=T, bn_splits=4)
    reference = _method("mocov2", temperature=T)  # the same weights (seed 0), plain BatchNorm
    v1, v2 = _views(n=16)
    torch.manual_seed(11)
    loss, _ = method([v1, v2])
    loss.backward()
    torch.manual_seed(11)
    order = torch.randperm(16)  # the permutation the method drew
    q = torch.cat([reference.projector(reference.backbone(part)) for part in v1.chunk(4)])
    with torch.no_grad():
        shuffled = torch.cat([reference.key_projector(reference.key_backbone(part)) for part in v2[order].chunk(4)])
        k = torch.empty_like(shuffled)
        k[order] = shuffled
    expected = info_nce(q, k, T, queue=reference.queue)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    expected.backward()
    theirs = _grads(reference)
    for name, grad in _grads(method).items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    # Without the shuffle (keys normalized with their queries' part statistics) the loss differs: the test sees it.
    with torch.no_grad():
        same = torch.cat([reference.key_projector(reference.key_backbone(part)) for part in v2.chunk(4)])
    assert abs(float(info_nce(q, same, T, queue=reference.queue)) - float(loss)) > 1e-4
    # The running statistics moved (one update per part), the parameters' names are those of plain BatchNorm (the
    # checkpoints load either way), and eval mode is plain BatchNorm.
    assert method.state_dict().keys() == reference.state_dict().keys()
    method.eval()
    reference.load_state_dict(method.state_dict())
    reference.eval()
    torch.testing.assert_close(method.backbone(v1), reference.backbone(v1))


def test_mocov2_says_when_shuffle_bn_is_off_and_refuses_an_uneven_split():
    with pytest.warns(UserWarning, match="method.bn_splits=1: Shuffle-BN"):
        _method("mocov2").on_step_end(0, 10)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _method("mocov2", bn_splits=2).on_step_end(0, 10)
    with pytest.raises(ValueError, match="a batch of 6 images per rank does not split into method.bn_splits=4"):
        _method("mocov2", bn_splits=4)(_views(n=6))
    with pytest.raises(ValueError, match="bn_splits >= 1"):
        _method("mocov2", bn_splits=0)


def test_mocov3_loss_is_symmetric_contrastive_scaled_by_2t():
    method = _method("mocov3", temperature=T)
    v1, v2 = _views()
    loss, logs = method([v1, v2])
    with torch.no_grad():
        # One forward per view, as the paper's code (BatchNorm statistics per view)
        q1, q2 = (method.predictor(method.projector(method.backbone(v))) for v in (v1, v2))
        k1, k2 = (method.momentum_projector(method.momentum_backbone(v)) for v in (v1, v2))
    expected = 2 * T * (_info_nce_by_hand(q1, k2, T) + _info_nce_by_hand(q2, k1, T))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(logs["tau"]) == pytest.approx(0.99)


# -------------------------------------------------------------------------------- learning, no collapse
def _toy_batches(steps: int, n: int = 32, size: int = 16, seed: int = 3):
    """Two noisy, randomly flipped views of n of 512 fixed random smooth images per step."""
    g = torch.Generator().manual_seed(seed)
    images = F.interpolate(torch.randn(512, 3, 4, 4, generator=g), size=size, mode="bilinear")
    for _ in range(steps):
        idx = torch.randperm(512, generator=g)[:n]
        views = []
        for _ in range(2):
            v = images[idx] + 0.1 * torch.randn(n, 3, size, size, generator=g)
            flip = torch.rand(n, generator=g) < 0.5
            views.append(torch.where(flip[:, None, None, None], v.flip(-1), v))
        yield views


# (method settings, AdamW lr): a fast-moving key encoder suits 20 steps; MoCo learns slower than SimCLR
# here (its BN-free v2 head starts with all images at cosine ~1), hence the milder bound below.
TOY = {
    "simclr": ({}, 1e-2),
    "mocov2": ({"momentum": 0.9, "proj_hidden": 64}, 3e-3),
    "mocov3": ({"base_tau": 0.5}, 1e-2),
}


@pytest.mark.parametrize("name", ["simclr", "mocov2", "mocov3"])
def test_twenty_steps_lower_the_loss_without_collapse(name):
    kw, lr = TOY[name]
    method = _method(name, temperature=0.2, **kw)
    opt = torch.optim.AdamW(method.param_groups(1e-4), lr=lr)
    losses = []
    for step, views in enumerate(_toy_batches(20)):
        loss, _ = method(views)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.on_step_end(step, 20)
        losses.append(float(loss.detach()))
    # Steps 2-5 vs the last 4 (MoCo v2's first steps see the random initial queue: easier negatives).
    first, last = sum(losses[2:6]) / 4, sum(losses[-4:]) / 4
    assert last < (0.8 if name == "simclr" else 0.95) * first, losses
    with torch.no_grad():
        z = F.normalize(method.projector(method.backbone(next(_toy_batches(1, seed=9))[0])), dim=1)
    # Unit vectors spread over D dims have per-dim std ~ 1/sqrt(D); collapsed ones ~ 0.
    assert z.std(dim=0).mean() > 0.3 / math.sqrt(z.shape[1])


# ---------------------------------------------------------------------------- state: checkpoints, ranks
def _train_a_few_steps(method, steps: int = 3):
    opt = torch.optim.SGD(method.param_groups(0.0), lr=0.05)
    for step, views in enumerate(_toy_batches(steps, n=16)):
        loss, _ = method(views)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.on_step_end(step, 10)


@pytest.mark.parametrize("name", ["simclr", "mocov2", "mocov3"])
def test_method_state_survives_a_checkpoint_round_trip(name, tmp_path):
    method = _method(name)
    _train_a_few_steps(method)
    if name == "mocov2":
        assert int(method.queue_ptr) == (3 * 16) % 32  # 3 steps of 16 keys into a ring of 32
    save_checkpoint({"model": method.state_dict()}, tmp_path / "last.pt")
    restored = _method(name, seed=123)  # different initial weights and queue
    restored.load_state_dict(load_checkpoint(tmp_path / "last.pt")["model"])
    for views in _toy_batches(2, n=16):  # identical outputs, and identical state after one more step each
        out = [m(views)[0] for m in (method, restored)]
        torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
        for m in (method, restored):
            m.on_step_end(5, 10)
    for (ka, a), (kb, b) in zip(method.state_dict().items(), restored.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=ka)


def test_mocov2_enqueues_the_newest_keys_over_the_oldest():
    method = _method("mocov2", queue_size=5)
    method.queue_ptr.fill_(3)
    keys = F.normalize(torch.randn(4, 16), dim=1)
    before = method.queue.clone()
    method._enqueue(keys)
    torch.testing.assert_close(method.queue[[3, 4, 0, 1]], keys)
    torch.testing.assert_close(method.queue[2], before[2])
    assert int(method.queue_ptr) == 2


WORLD, N = 2, 4  # per-rank batch; the 1-process reference uses the global batch WORLD * N


def _grads(module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in module.named_parameters() if p.grad is not None}


def _simclr_and_mocov2_step(rank: int, world: int, state: dict) -> dict:
    """One step of SimCLR and of MoCo v2 (from ``state``) on this rank's share of the global batch."""
    views = _views(WORLD * N, seed=7)
    mine = [v[rank * N:(rank + 1) * N] for v in views] if world > 1 else views
    wrap = (lambda m: DDP(m)) if world > 1 else (lambda m: m)
    out = {}
    # Eval-mode BatchNorm: each image's features no longer depend on which rank it sits on, so the gathered
    # negatives and the Shuffle-BN permutation are what is compared, exactly.
    simclr = _method("simclr").eval()
    ddp = wrap(simclr)  # kept alive until after backward: its hooks average the gradients
    loss, _ = ddp(mine)
    loss.backward()
    out["simclr"] = (loss.detach(), _grads(simclr))
    moco = _method("mocov2", seed=99, bn_splits=2)  # 2 ranks x 2 parts: the keys shuffle over 4 parts
    moco.load_state_dict(state)
    out["queue_loaded"] = moco.queue.clone()
    moco.eval()
    ddp = wrap(moco)
    loss, _ = ddp(mine)
    loss.backward()
    moco.on_step_end(0, 10)
    out["mocov2"] = (loss.detach(), _grads(moco), moco.queue.clone(), moco.queue_ptr.clone())
    moco.train()  # and a real Shuffle-BN step: the ranks still hold one queue
    ddp(mine)[0].backward()
    moco.on_step_end(1, 10)
    out["queue_after_train_step"] = moco.queue.clone()
    return out


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        state = torch.load(os.path.join(out_dir, "mocov2_1rank.pt"))
        torch.save(_simclr_and_mocov2_step(rank, WORLD, state), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_and_share_one_queue(tmp_path):
    # A MoCo v2 state from a 1-process run, with a filled queue and a pointer mid-ring.
    moco = _method("mocov2", seed=5)
    _train_a_few_steps(moco, steps=3)
    torch.save(moco.state_dict(), tmp_path / "mocov2_1rank.pt")
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    whole = _simclr_and_mocov2_step(0, 1, moco.state_dict())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in ("simclr", "mocov2"):
        loss, grads = whole[name][:2]
        torch.testing.assert_close(sum(r[name][0] for r in ranks) / WORLD, loss)
        for r in ranks:  # DDP averaged the ranks' gradients: the gradient of the global-batch loss
            assert r[name][1].keys() == grads.keys()
            for k in grads:
                torch.testing.assert_close(r[name][1][k], grads[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
    for r in ranks:
        # The queue saved by 1 process loaded unchanged, and after a step it equals the 1-process queue:
        # the global batch's keys in rank order, written at the same pointer.
        torch.testing.assert_close(r["queue_loaded"], moco.queue, rtol=0, atol=0)
        torch.testing.assert_close(r["mocov2"][2], whole["mocov2"][2], rtol=1e-5, atol=1e-6)
        assert int(r["mocov2"][3]) == int(whole["mocov2"][3]) == (3 * 16 + WORLD * N) % 32
    torch.testing.assert_close(ranks[0]["queue_after_train_step"], ranks[1]["queue_after_train_step"],
                               rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- ViT
def test_vit_variants_output_the_cls_feature_in_any_memory_format():
    tiny = build_backbone("vit_tiny")
    x = torch.randn(3, 3, 32, 32)
    out = tiny(x)
    assert out.shape == (3, tiny.feat_dim) == (3, 96)
    torch.testing.assert_close(tiny(x.contiguous(memory_format=torch.channels_last)), out)
    assert tiny(torch.randn(2, 3, 48, 48)).shape == (2, 96)  # another grid: its own sin-cos table
    learned = VisionTransformer(patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=32, pos_embed="learned")
    assert learned(torch.randn(2, 3, 48, 48)).shape == (2, 32)  # learned table resized
    small = build_backbone("vit_small")
    assert small.feat_dim == 384 and small.blocks[0].attn.num_heads == 12
    assert small(torch.randn(1, 3, 224, 224)).shape == (1, 384)
    base = build_backbone("vit_base")
    assert base.feat_dim == 768 and len(base.blocks) == 12
    assert 85e6 < sum(p.numel() for p in base.parameters()) < 87e6  # ViT-B/16 without a classifier
    assert base(torch.randn(1, 3, 32, 32)).shape == (1, 768)
    assert build_backbone("resnet18", width=4).feat_dim == 32  # the ResNets are still there


def test_frozen_patch_projection_gets_no_gradient_and_no_update():
    frozen = VisionTransformer(patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=32, frozen_patch_embed=True)
    assert not any(p.requires_grad for p in frozen.patch_embed.parameters())
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny")
    method = build_method("mocov3", vit, vit.feat_dim, **HEADS["mocov3"])  # frozen_patch_embed defaults on
    patch = [p.clone() for p in method.backbone.patch_embed.parameters()]
    others = [p.clone() for p in method.backbone.blocks.parameters()]
    optim = OmegaConf.create({"name": "adamw", "betas": [0.9, 0.95], "foreach": True})
    opt = build_optimizer(optim, method.param_groups(0.1), lr=1e-3)
    trainable = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not trainable & {id(p) for p in method.backbone.patch_embed.parameters()}
    loss, _ = method(_views(8, size=32))
    loss.backward()
    opt.step()
    method.on_step_end(0, 10)
    for p, before in zip(method.backbone.patch_embed.parameters(), patch, strict=True):
        assert p.grad is None and torch.equal(p, before)
    assert any(not torch.equal(p, b) for p, b in zip(method.backbone.blocks.parameters(), others, strict=True))


# ---------------------------------------------------------------------------------- the entry point
@pytest.mark.parametrize("recipe,extra", [
    ("simclr_resnet18_fmnist", {}),
    ("mocov2_resnet18_fmnist", {"method.queue_size": 64}),
    ("mocov3_resnet18_fmnist", {"method.pred_hidden": 32}),
    ("mocov3_resnet18_fmnist", {"method.pred_hidden": 32, "model.backbone": "vit_tiny", "optim.name": "adamw",
                                "optim.base_lr": 1.5e-4, "optim.weight_decay": 0.1}),
])
def test_train_entry_point_runs_each_recipe(recipe, extra, tiny_gray_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = {
        "data.path": tiny_gray_dataset, "data.num_workers": 0, "model.width": 4, "method.proj_hidden": 32,
        "method.proj_dim": 16, "train.batch_size": 16, "train.max_steps": 2, "train.log_every": 1,
        "train.progress": False, "train.threads": 1, "eval.batch_size": 64, "out_dir": out, **extra,
    }
    assert train_main(["--config", recipe, *(f"{k}={v}" for k, v in overrides.items())]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["steps"] == 2 and math.isfinite(results["final_loss"])
    assert 0.0 <= json.loads((out / "knn.json").read_text())["knn_top1"] <= 100.0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2


@pytest.mark.parametrize("pred_last_bn", [True, False])
def test_mocov3_heads_have_no_linear_bias_as_in_the_authors_code(pred_last_bn):
    """MoCo v3's MLPs: BN after every hidden Linear, an affine-free BN after the output one when ``last_bn``, and
    no Linear bias anywhere, the predictor without an output BN (the ResNet-50 setting) included."""
    method = _method("mocov3", pred_last_bn=pred_last_bn)
    linears = [m for head in (method.projector, method.predictor) for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 5  # 3-layer projector + 2-layer predictor
    assert all(m.bias is None for m in linears)
    assert isinstance(method.predictor[-1], nn.BatchNorm1d) == pred_last_bn
