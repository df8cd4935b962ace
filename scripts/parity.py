"""Side-by-side learning-quality check: fastssl against an independent plain-PyTorch implementation.

    python scripts/parity.py --method byol --epochs 5 [--data data/fashion-mnist] [--out runs/parity/byol]

Both train the same method on the same converted dataset (fastssl-convert's shards; ``--source idx`` makes the
independent one read the raw IDX files instead), with the same hyper-parameters and seed, and both are
evaluated after every epoch by the same function (fastssl.engine.knn: weighted 20-NN, T = 0.07, over the same
eval loaders: train split as the bank, val split as the queries).

* fastssl: ``python -m fastssl.train`` in a subprocess with the method's recipe and the overrides below
  (``eval.knn_every=1``: the trainer's kNN monitor gives the per-epoch figure).
* independent: this file. Written from the papers, not from fastssl's modules: its own ResNet-18 layout
  (torchvision's BasicBlock, small-image stem, width multiplier), heads, losses, EMA, queue and Sinkhorn;
  torchvision transforms on PIL images in a DataLoader; SGD with momentum. It imports from fastssl only the
  evaluator (the same function for both) and, to check that the settings really are equal, fastssl's view spec.
  Its losses take the heads' outputs upcast to fp32 and run with autocast off, as fastssl's losses upcast theirs
  (``--indep-bf16-loss`` gives the BYOL / SimCLR records made before that default their old bf16 loss back). Each
  method's BatchNorm sees the batches its paper's code gives it (the class docstrings say which; recorded as
  ``batchnorm`` in the JSON). The independent side also scores its initial weights (``knn_init``).

Outputs in ``--out``: ``fastssl.json`` and ``independent.json`` (per-epoch kNN, img/s), ``parity.json``
(both + the gap), ``parity.png`` (kNN per epoch), and a markdown table on stdout. ``--impl`` runs one side
only (two processes can run the sides in parallel; the last one to finish, or ``--report``, merges them).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import io
import itertools
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as T
from torchvision.models.resnet import BasicBlock

REPO = Path(__file__).resolve().parents[1]
IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_MEAN, FMNIST_STD = 0.286, 0.353


# ---- the equal settings -------------------------------------------------------------------------------------

@dataclass
class View:
    """One view's augmentation, the papers' terms (torchvision semantics)."""

    size: int = 32
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


@dataclass
class Settings:
    """What both implementations train with. ``lr`` is the step size actually used (fastssl's base_lr is
    lr x 256 / batch); weight decay spares biases and normalization parameters in both (the papers' rule)."""

    method: str
    recipe: str  # fastssl recipe the run starts from (its data, model and eval sections)
    preset: str  # fastssl's data.spec
    views: list[View]
    heads: dict  # the method's own hyper-parameters (fastssl's method.* keys)
    width: int = 16
    batch: int = 256
    lr: float = 0.015
    weight_decay: float = 2e-3
    momentum: float = 0.9
    aug: dict = field(default_factory=dict)  # fastssl data.aug overrides that turn the preset into ``views``
    extra: list[str] = field(default_factory=list)  # further fastssl overrides (local views, ...)


def _byol() -> Settings:
    # The held-out check of issue 18: BYOL's torchvision augmentations without blur, solarize 0 / 0.2, heads
    # 1024 / 256, tau 0.99 -> 1, SGD; loss (2 - 2 cos) summed over the two directions, lr 0.015, wd 2e-3
    # (= lr 0.06, wd 5e-4 on the loss -1/2 (cos + cos)).
    views = [View(solarize_p=0.0), View(solarize_p=0.2)]
    return Settings("byol", "byol_resnet18_fmnist", "byol", views,
                    heads=dict(proj_hidden=1024, proj_dim=256, pred_hidden=1024, base_tau=0.99),
                    aug={"scale": [0.08, 1.0], "blur_p": 0.0})


def _simclr() -> Settings:
    # SimCLR: colour distortion strength 1 (0.8, 0.8, 0.8, 0.2), grayscale 0.2, no blur on 28 px images.
    v = View(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
    return Settings("simclr", "simclr_resnet18_fmnist", "simclr", [v, v],
                    heads=dict(proj_hidden=1024, proj_dim=128, temperature=0.2),
                    lr=0.06, weight_decay=5e-4, aug={"scale": [0.08, 1.0], "blur_p": 0.0})


def _mocov2() -> Settings:
    # MoCo v2: jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2; MLP head without BN; T 0.2; queue 4096;
    # momentum 0.99 (a short run). Shuffle-BN over 4 parts of 32 images, the paper's per-GPU batch (bn_splits=1 is
    # single-GPU MoCo without it): at epoch 5 the three-seed means gained 1.5 (independent) and 1.1 (fastssl) more.
    v = View(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    return Settings("mocov2", "mocov2_resnet18_fmnist", "simclr", [v, v],
                    heads=dict(proj_hidden=1024, proj_dim=128, queue_size=4096, temperature=0.2, momentum=0.99,
                               bn_splits=4),
                    lr=0.06, weight_decay=5e-4,
                    aug={"scale": [0.08, 1.0], "blur_p": 0.0, "brightness": 0.4, "contrast": 0.4,
                         "saturation": 0.4, "hue": 0.1})


def _mocov3() -> Settings:
    # MoCo v3 with the paper's ResNet heads (sec. 4: a 3-layer projector and a 2-layer predictor, BN after every
    # layer, the output ones included), scaled down like BYOL's (1024 hidden, 256 out); T 0.2, m 0.99 -> 1 (cosine);
    # BYOL's asymmetric views (the paper's augmentations) with the authors' ResNet crop-min 0.2, no blur on 28 px.
    views = [View(scale=(0.2, 1.0), solarize_p=0.0), View(scale=(0.2, 1.0), solarize_p=0.2)]
    return Settings("mocov3", "mocov3_resnet18_fmnist", "mocov3", views,
                    heads=dict(proj_hidden=1024, proj_dim=256, pred_hidden=1024, proj_layers=3, pred_last_bn=True,
                               temperature=0.2, base_tau=0.99),
                    lr=0.06, weight_decay=5e-4, aug={"scale": [0.2, 1.0], "blur_p": 0.0})


def _swav() -> Settings:
    # SwAV multi-crop adapted to 28 px images and a 5-epoch run (issue 26). The first settings, 2 x 32 px scale
    # (0.14, 1) + 4 x 16 px (0.05, 0.14), 100 prototypes, eps 0.05, prototypes frozen for 0.2 epoch and a queue of
    # 2,048 from the first step, collapsed on both sides: loss ln 100 (uniform codes) from step ~260 on. Each change
    # is one of the SwAV authors' remedies for a loss stuck at ln K (their README, "Common issues"), sized for 28 px:
    # - crops 2 x 32 px scale (0.3, 1) + 4 x 16 px scale (0.1, 0.3), colour strength 1, no blur: a 5 % crop of a
    #   28 px image is a 6 x 6 px patch, mostly background ("reduce the difficulty"; BYOL's recipe measured +1.6
    #   points for scale >= 0.3 on these images);
    # - eps 0.03 (their first remedy: sharper codes); T 0.1 and 3 Sinkhorn iterations as the paper;
    # - 30 prototypes, 3 per class as SwAV's 3,000 for ImageNet's 1,000: a batch of 256 shares 8.5 samples to each,
    #   enough for the equipartition without a queue (100 got 2.6);
    # - prototypes frozen for the first epoch, as SwAV's own schedules;
    # - no queue. A queue of 1,024 joining Sinkhorn at epoch 3 (of 5, batch 128: 8 batches over 30 prototypes)
    #   knocked both sides down ~10 points kNN on three seeds (loss 1.8 -> 3.6-6.5 within 150 steps; BENCHMARKS.md,
    #   session 10); the same seed-1 run without it kept learning (83.88 -> 85.43 % at epoch 3, where the queue's
    #   run fell to 68.08). A batch of 128 gives each of the 30 prototypes 4.3 crops per step, enough for the
    #   equipartition in the first two epochs of every run. SwAV's own runs start theirs at epoch 15.
    colour = dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
    views = [View(scale=(0.3, 1.0), **colour)] * 2 + [View(size=16, scale=(0.1, 0.3), **colour)] * 4
    return Settings("swav", "swav_resnet18_fmnist", "swav", views,
                    heads=dict(proj_hidden=512, proj_dim=64, n_prototypes=30, temperature=0.1, sinkhorn_eps=0.03,
                               sinkhorn_iters=3, freeze_prototypes_epochs=1.0, queue_length=0,
                               queue_start_epoch=2),  # the queue off; --setting heads.queue_length=1024 restores it
                    lr=0.06, weight_decay=5e-4, aug={"blur_p": 0.0, "scale": [0.3, 1.0]},
                    extra=["data.local_size=16", "data.n_local=4", "data.local_aug.scale=[0.1,0.3]"])


SETTINGS = {"byol": _byol, "simclr": _simclr, "mocov2": _mocov2, "mocov3": _mocov3, "swav": _swav}


def apply_settings(s: Settings, items: list[str]) -> Settings:
    """``KEY=VALUE`` edits of ``s`` for both sides alike (an ablation: one change on both sides; the records carry
    the settings, so ``--summarize`` keeps the variants apart): ``heads.NAME`` (the method's own hyper-parameters),
    ``lr``, ``weight_decay``, ``momentum``, and ``view.NAME`` (a scalar augmentation setting of every view, e.g.
    ``view.brightness=0.8``; fastssl gets it through data.aug, and ``check_same_views`` still stops a run whose two
    sides would differ). VALUE is JSON (a number, true / false) of the setting's type."""
    scalar_views = [f.name for f in fields(View) if f.type in ("float", "int", float, int)]
    for item in items:
        key, sep, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key.startswith("heads.") and key[6:] in s.heads:
            current = s.heads[key[6:]]
        elif key in ("lr", "weight_decay", "momentum"):
            current = getattr(s, key)
        elif key.startswith("view.") and key[5:] in scalar_views:
            current = getattr(s.views[0], key[5:])
        else:
            raise SystemExit(f"parity: --setting {item}: the keys are lr, weight_decay, momentum, heads.NAME with "
                             f"NAME one of {s.method}'s {', '.join(s.heads)}, and view.NAME with NAME one of "
                             f"{', '.join(scalar_views)}")
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        fits = {bool: isinstance(value, bool), int: numeric and value == int(value), float: numeric}
        if not sep or not fits.get(type(current), False):
            raise SystemExit(f"parity: --setting {item}: {key} is a {type(current).__name__} ({current!r} now)")
        value = type(current)(value)
        if key.startswith("heads."):
            s.heads[key[6:]] = value
        elif key.startswith("view."):
            s.views = [replace(v, **{key[5:]: value}) for v in s.views]
            s.aug[key[5:]] = value
        else:
            setattr(s, key, value)
    return s


def fastssl_overrides(s: Settings, args: argparse.Namespace, out_dir: Path) -> list[str]:
    """The fastssl command line's ``key=value`` overrides equal to ``s`` (plus run bookkeeping)."""
    ov = [f"data.path={args.data}", f"model.width={s.width}", f"train.batch_size={s.batch}", "optim.name=sgd",
          f"optim.base_lr={s.lr * 256 / s.batch!r}", f"optim.final_lr={s.lr!r}", "optim.warmup_epochs=0",
          f"optim.weight_decay={s.weight_decay!r}", f"optim.momentum={s.momentum!r}", f"train.epochs={args.epochs}",
          f"train.seed={args.seed}", f"train.precision={args.precision}", f"train.threads={args.threads}",
          "train.progress=false", "eval.probe=false", "eval.knn_every=1", "resume=none", f"out_dir={out_dir}",
          f"data.mean=[{FMNIST_MEAN},{FMNIST_MEAN},{FMNIST_MEAN}]",
          f"data.std=[{FMNIST_STD},{FMNIST_STD},{FMNIST_STD}]",
          f"data.global_size={s.views[0].size}", f"data.spec={s.preset}"]
    ov += [f"method.{k}={v!r}" for k, v in s.heads.items()]
    ov += [f"data.aug.{k}={json.dumps(v)}" for k, v in s.aug.items()]
    return ov + s.extra + list(args.fastssl_override)


def check_same_views(s: Settings, cfg) -> None:
    """Stop unless fastssl's view spec under these overrides is exactly ``s.views`` (the settings are equal)."""
    from fastssl.engine.trainer import build_spec

    spec = build_spec(cfg)
    if len(spec.views) != len(s.views):
        raise SystemExit(f"parity: fastssl builds {len(spec.views)} views, the independent one {len(s.views)}")
    for i, (ours, theirs) in enumerate(zip(s.views, spec.views, strict=True)):
        for key, value in asdict(ours).items():
            other = getattr(theirs, key)
            if not np.allclose(np.asarray(value, dtype=float), np.asarray(other, dtype=float)):
                raise SystemExit(f"parity: view {i} {key}: independent {value!r} != fastssl {other!r}")
    if not (np.allclose(spec.mean, FMNIST_MEAN) and np.allclose(spec.std, FMNIST_STD)):
        raise SystemExit(f"parity: fastssl normalizes with {spec.mean}/{spec.std}")


# ---- data ---------------------------------------------------------------------------------------------------

def read_shards(data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The converted split's images, decoded here with PIL: (N, H, W) uint8 gray and (N,) int64 labels."""
    manifest = json.loads((data / "manifest.json").read_text())
    images, labels = [], []
    for shard in manifest["splits"][split]["shards"]:
        pending: dict[str, dict] = {}
        with tarfile.open(data / shard["name"]) as tar:
            for member in tar:
                key, ext = member.name.rsplit(".", 1)
                if ext not in ("jpg", "cls"):
                    continue
                pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(pending):
            item = pending[key]
            images.append(np.asarray(Image.open(io.BytesIO(item["jpg"])).convert("L")))
            labels.append(int(item["cls"].decode()))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def read_idx_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST straight from the Debian package's IDX files (no JPEG round trip)."""
    prefix = {"train": "train", "val": "t10k"}[split]

    def load(path: Path, offset: int) -> np.ndarray:
        with gzip.open(path) as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)

    images = load(IDX_DIR / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = load(IDX_DIR / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return images, labels


def view_transform(v: View) -> T.Compose:
    """torchvision's pipeline for one view, on a gray PIL image -> (3, S, S) normalized float tensor."""
    ops = [T.RandomResizedCrop(v.size, scale=v.scale, ratio=v.ratio, antialias=True),
           T.RandomHorizontalFlip(v.flip_p)]
    if v.jitter_p > 0:
        ops.append(T.RandomApply([T.ColorJitter(v.brightness, v.contrast, v.saturation, v.hue)], p=v.jitter_p))
    if v.gray_p > 0:
        ops.append(T.RandomGrayscale(v.gray_p))
    if v.blur_p > 0:
        kernel = max(3, int(0.1 * v.size)) | 1
        ops.append(T.RandomApply([T.GaussianBlur(kernel, v.blur_sigma)], p=v.blur_p))
    if v.solarize_p > 0:
        ops.append(T.RandomSolarize(128, p=v.solarize_p))
    ops += [T.ToTensor(), T.Lambda(lambda x: x.expand(3, -1, -1)), T.Normalize([FMNIST_MEAN] * 3, [FMNIST_STD] * 3)]
    return T.Compose(ops)


class FastsslViews:
    """fastssl's training loader (``pipelines.build_loader`` with fastssl's view spec) as a plain iterable of
    view lists, one epoch per ``iter``: ``--source fastssl`` trains the independent model on fastssl's views,
    which tells a gap that comes from the data pipeline from one that comes from the trainer and model."""

    def __init__(self, cfg, batch: int, seed: int):
        import pipelines
        from fastssl.engine.trainer import build_spec

        self.loader = pipelines.build_loader(cfg.data.path, build_spec(cfg), batch, split="train", device="cpu",
                                             backend="torch", seed=seed, cache=cfg.data.cache, progress=False)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        for batch in self.loader:
            yield [v.expand(-1, 3, -1, -1).contiguous() for v in batch.views]


class MultiViewDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, views: list[View]):
        self.images, self.transforms = images, [view_transform(v) for v in views]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        img = Image.fromarray(self.images[i], "L")
        return [t(img) for t in self.transforms]


# ---- the independent models ---------------------------------------------------------------------------------

class SmallResNet18(nn.Module):
    """ResNet-18 (torchvision's BasicBlock, [2, 2, 2, 2]) at stem width ``width`` with the small-image stem
    (3x3 stride-1 conv, no max-pool); ``forward -> (B, 8 * width)`` pooled features."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, inplanes = [], width
        for i, planes in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            stages.append(nn.Sequential(BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feat_dim = 8 * width
        for m in self.modules():  # He init (fan-out) for convs, BN at identity: the ResNet paper's
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def mlp(in_dim: int, hidden: int, out: int, bn: bool = True) -> nn.Sequential:
    """Linear -> [BN] -> ReLU -> Linear: the BYOL / SimCLR / SwAV projector (MoCo v2's without BN)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), *([nn.BatchNorm1d(hidden)] if bn else []), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


def bn_mlp(in_dim: int, hidden: int, out: int, layers: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's heads: ``layers`` Linear layers, each hidden one followed by BN and ReLU, the output one by an
    affine-free BN when ``last_bn`` (the paper: "all layers in both MLPs have BN"). No Linear has a bias, as in the
    authors' code: a BN after it removes any shift. (B, in_dim) -> (B, out)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        mods.append(nn.Linear(in_dim if i == 0 else hidden, out if last else hidden, bias=False))
        if not last:
            mods += [nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(nn.BatchNorm1d(out, affine=False))
    return nn.Sequential(*mods)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL eq. 2: mean over the batch of || p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z)."""
    p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return ((p - z) ** 2).sum(dim=1).mean()


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent (eq. 1) averaged over all 2N anchors: the positive of anchor k is its other view."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    log_denominator = torch.logsumexp(sim.masked_fill(eye, -math.inf), dim=1)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    positive = sim[torch.arange(2 * n, device=z.device), partner]
    return (log_denominator - positive).mean()


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE (Algorithm 1): logits [q.k+, q.queue] / T, class 0 is the positive."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.t()
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def mocov3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's ctr(q, k) (Algorithm 1): cross-entropy of the N x N logits q k^T / T of the normalized queries
    and keys, positives on the diagonal (the other keys of the batch are the negatives), times 2T."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    labels = torch.arange(len(q), device=q.device)
    return 2 * temperature * F.cross_entropy(q @ k.t() / temperature, labels)


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """SwAV's Algorithm (appendix A.1), in float64: Q = exp(scores / eps)^T, rows (prototypes) to 1/K and
    columns (samples) to 1/B alternately; returns B Q^T, whose rows sum to 1. scores (B, K) -> (B, K)."""
    q = torch.exp((scores.double() - scores.double().max()) / eps).t()  # the max cancels in the normalization
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t().float()


def swav_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """SwAV's swapped prediction: each assigned crop's code predicted from every other crop's softmax."""
    total = 0.0
    for a, q in enumerate(codes):
        sub = 0.0
        for v, s in enumerate(scores):
            if v != a:
                sub = sub - (q * F.log_softmax(s / temperature, dim=1)).sum(dim=1).mean()
        total = total + sub / (len(scores) - 1)
    return total / len(codes)


def _params_of(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


@torch.no_grad()
def ema_(target: list[torch.Tensor], online: list[torch.Tensor], tau: float) -> None:
    """target <- tau target + (1 - tau) online, parameter by parameter."""
    for t, o in zip(target, online, strict=True):
        t.mul_(tau).add_(o.detach(), alpha=1.0 - tau)


def loss_region(fp32: bool, like: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where a loss is computed: with ``fp32``, autocast off (an upcast alone is not enough: autocast runs a matmul
    in bf16 whatever its inputs' dtype), so the loss is fp32 throughout; else the caller's autocast as it is (the
    independent BYOL / SimCLR before the fp32 default, ``--indep-bf16-loss``)."""
    return torch.autocast(like.device.type, enabled=False) if fp32 else contextlib.nullcontext()


def loss_inputs(fp32: bool, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The heads' outputs as the loss takes them: upcast to fp32 with ``fp32``, else as they are."""
    return [t.float() for t in tensors] if fp32 else list(tensors)


class IndependentBYOL(nn.Module):
    """BYOL (Grill et al., 2020): the online network predicts the EMA target's projection of the other view.

    BatchNorm: per view, as the paper's code (each network runs once on each view, so every BN normalizes one
    view by its own batch statistics)."""

    batchnorm = "per view"
    loss_fp32 = True  # the heads' outputs enter the loss in fp32, as fastssl's do (False: --indep-bf16-loss)

    def __init__(self, width: int, proj_hidden: int, proj_dim: int, pred_hidden: int, base_tau: float):
        super().__init__()
        self.backbone = SmallResNet18(width)
        self.projector = mlp(self.backbone.feat_dim, proj_hidden, proj_dim)
        self.predictor = mlp(proj_dim, pred_hidden, proj_dim)
        self.target_backbone, self.target_projector = copy.deepcopy(self.backbone), copy.deepcopy(self.projector)
        for p in _params_of(self.target_backbone, self.target_projector):
            p.requires_grad_(False)
        self.base_tau = base_tau

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        v1, v2 = views[:2]
        p1 = self.predictor(self.projector(self.backbone(v1)))
        p2 = self.predictor(self.projector(self.backbone(v2)))
        with torch.no_grad():
            z1 = self.target_projector(self.target_backbone(v1))
            z2 = self.target_projector(self.target_backbone(v2))
        with loss_region(self.loss_fp32, p1):
            p1, p2, z1, z2 = loss_inputs(self.loss_fp32, p1, p2, z1, z2)
            return byol_loss(p1, z2.detach()) + byol_loss(p2, z1.detach())

    def after_step(self, k: int, total: int) -> None:
        tau = 1 - (1 - self.base_tau) * (math.cos(math.pi * k / total) + 1) / 2
        ema_(_params_of(self.target_backbone, self.target_projector), _params_of(self.backbone, self.projector), tau)


class IndependentSimCLR(nn.Module):
    """SimCLR (Chen et al., 2020): NT-Xent over the 2N projections of a batch's two views.

    BatchNorm: over both views, as the paper's code (it stacks the two augmentations of every image into one
    batch of 2N before the encoder, so backbone and projector normalize the two views with shared statistics)."""

    batchnorm = "over both views"
    loss_fp32 = True  # as BYOL's (False: --indep-bf16-loss)

    def __init__(self, width: int, proj_hidden: int, proj_dim: int, temperature: float):
        super().__init__()
        self.backbone = SmallResNet18(width)
        self.projector = mlp(self.backbone.feat_dim, proj_hidden, proj_dim)
        self.temperature = temperature

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = self.projector(self.backbone(torch.cat(views[:2]))).chunk(2)
        with loss_region(self.loss_fp32, z1):
            return simclr_loss(*loss_inputs(self.loss_fp32, z1, z2), self.temperature)

    def after_step(self, k: int, total: int) -> None:
        pass


class IndependentMoCoV2(nn.Module):
    """MoCo v2 (Chen, Fan, Girshick & He, 2020): a query of view 1 against its key of view 2 (momentum encoder)
    and a queue of older keys; loss always in fp32 (the queue is fp32).

    BatchNorm: per view and per GPU, with Shuffle-BN, as the paper's code on ``bn_splits`` GPUs: the query encoder
    runs once per part of view 1 (each of ``bn_splits`` equal parts of the batch, one GPU's share), and the key
    encoder once per part of a random permutation of view 2, the keys put back in order afterwards; so no key is
    normalized with the statistics its query saw. The projector has no BN. ``bn_splits=1`` is single-GPU MoCo
    without the shuffle (the query and the key encoder normalize the same images together)."""

    batchnorm = "per view, per part (Shuffle-BN)"
    loss_fp32 = True  # always (--indep-bf16-loss is for the old BYOL / SimCLR records only)

    def __init__(self, width: int, proj_hidden: int, proj_dim: int, queue_size: int, temperature: float,
                 momentum: float, bn_splits: int = 1):
        super().__init__()
        self.bn_splits = bn_splits
        self.backbone = SmallResNet18(width)
        self.projector = mlp(self.backbone.feat_dim, proj_hidden, proj_dim, bn=False)
        self.key_backbone, self.key_projector = copy.deepcopy(self.backbone), copy.deepcopy(self.projector)
        for p in _params_of(self.key_backbone, self.key_projector):
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.ptr, self.temperature, self.momentum = 0, temperature, momentum
        self._keys: torch.Tensor | None = None

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        parts = self.bn_splits
        q = torch.cat([self.projector(self.backbone(x)) for x in views[0].chunk(parts)])
        with torch.no_grad():
            order = torch.randperm(len(views[1])) if parts > 1 else torch.arange(len(views[1]))
            shuffled = torch.cat([self.key_projector(self.key_backbone(x)) for x in views[1][order].chunk(parts)])
            k = torch.empty_like(shuffled)
            k[order] = shuffled  # row i: the key of image i again
            k = F.normalize(k.float(), dim=1)
        self._keys = k
        with loss_region(True, q):
            return moco_loss(q.float(), k, self.queue, self.temperature)

    @torch.no_grad()
    def after_step(self, k: int, total: int) -> None:
        ema_(_params_of(self.key_backbone, self.key_projector), _params_of(self.backbone, self.projector),
             self.momentum)
        keys, size = self._keys, self.queue.shape[0]
        rows = (self.ptr + torch.arange(len(keys))) % size  # dequeue the oldest, enqueue this batch
        self.queue[rows] = keys
        self.ptr = (self.ptr + len(keys)) % size


class IndependentMoCoV3(nn.Module):
    """MoCo v3 (Chen, Xie & He, 2021), Algorithm 1: queries q = h(g(f(x))) (online backbone f, projector g,
    predictor h), keys k = g'(f'(x)) from the momentum copies, no queue; loss ctr(q1, k2) + ctr(q2, k1), each the
    InfoNCE of a batch's N x N logits times 2T; after the optimizer step f', g' <- m f', g' + (1 - m) f, g with
    m rising from ``base_tau`` to 1 on a cosine over the run. Loss in fp32.

    BatchNorm: per view, as the paper's code (the encoder and the momentum encoder each run once on x1 and once on
    x2, so every BN normalizes one view by its own batch statistics)."""

    batchnorm = "per view"
    loss_fp32 = True  # always (--indep-bf16-loss is for the old BYOL / SimCLR records only)

    def __init__(self, width: int, proj_hidden: int, proj_dim: int, pred_hidden: int, proj_layers: int,
                 pred_last_bn: bool, temperature: float, base_tau: float):
        super().__init__()
        self.backbone = SmallResNet18(width)
        self.projector = bn_mlp(self.backbone.feat_dim, proj_hidden, proj_dim, proj_layers, last_bn=True)
        self.predictor = bn_mlp(proj_dim, pred_hidden, proj_dim, 2, last_bn=pred_last_bn)
        self.momentum_backbone = copy.deepcopy(self.backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in _params_of(self.momentum_backbone, self.momentum_projector):
            p.requires_grad_(False)
        self.temperature, self.base_tau = temperature, base_tau

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        x1, x2 = views[:2]
        q1 = self.predictor(self.projector(self.backbone(x1)))
        q2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))
            k2 = self.momentum_projector(self.momentum_backbone(x2))
        t = self.temperature
        with loss_region(True, q1):
            q1, q2, k1, k2 = loss_inputs(True, q1, q2, k1, k2)
            return mocov3_loss(q1, k2, t) + mocov3_loss(q2, k1, t)

    def after_step(self, k: int, total: int) -> None:
        m = 1 - (1 - self.base_tau) * (math.cos(math.pi * k / total) + 1) / 2
        ema_(_params_of(self.momentum_backbone, self.momentum_projector), _params_of(self.backbone, self.projector),
             m)


class IndependentSwAV(nn.Module):
    """SwAV (Caron et al., 2020): codes of the two global crops by Sinkhorn-Knopp (with a queue of past global
    embeddings once it is full), each predicted from every other crop's softmax over the prototypes; loss in fp32.

    BatchNorm: per resolution, as the paper's code (its ResNet concatenates the crops of one size into one backbone
    forward, so the 2 global crops share statistics and the local crops theirs, then runs the projection head once
    over the features of every crop)."""

    batchnorm = "per resolution"
    loss_fp32 = True  # always (--indep-bf16-loss is for the old BYOL / SimCLR records only)

    def __init__(self, width: int, proj_hidden: int, proj_dim: int, n_prototypes: int, temperature: float,
                 sinkhorn_eps: float, sinkhorn_iters: int, freeze_prototypes_epochs: float, queue_length: int,
                 queue_start_epoch: int):
        super().__init__()
        self.backbone = SmallResNet18(width)
        self.projector = mlp(self.backbone.feat_dim, proj_hidden, proj_dim)
        self.prototypes = nn.Linear(proj_dim, n_prototypes, bias=False)
        self.normalize_prototypes()
        self.temperature, self.eps, self.iters = temperature, sinkhorn_eps, sinkhorn_iters
        self.freeze_epochs, self.queue_start_epoch = freeze_prototypes_epochs, queue_start_epoch
        self.register_buffer("queue", torch.zeros(2, queue_length, proj_dim))
        self.filled = 0
        self.steps_per_epoch = 1
        self._new: list[torch.Tensor] | None = None

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        feats = [self.backbone(torch.cat(list(group))) for _, group in
                 itertools.groupby(views, key=lambda v: tuple(v.shape[-2:]))]  # consecutive crops of one size
        z = F.normalize(self.projector(torch.cat(feats)), dim=1).chunk(len(views))
        scores = [self.prototypes(zv) for zv in z]
        codes = []
        with torch.no_grad():
            for a in range(2):
                s = scores[a].detach().float()
                if self.queue.shape[1] and self.filled == self.queue.shape[1]:
                    s = torch.cat([self.prototypes(self.queue[a]).float(), s])
                codes.append(sinkhorn_knopp(s, self.eps, self.iters)[-len(views[a]):])
        self._new = [z[a].detach().float() for a in range(2)]
        with loss_region(True, scores[0]):
            return swav_loss(loss_inputs(True, *scores), codes, self.temperature)

    def before_update(self, k: int) -> None:
        if k < self.freeze_epochs * self.steps_per_epoch:
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def after_step(self, k: int, total: int) -> None:
        self.normalize_prototypes()
        length = self.queue.shape[1]
        if length and k // self.steps_per_epoch >= self.queue_start_epoch:
            self.queue.copy_(torch.cat([torch.stack(self._new), self.queue], dim=1)[:, :length])
            self.filled = min(length, self.filled + len(self._new[0]))


def build_independent(s: Settings) -> nn.Module:
    cls = {"byol": IndependentBYOL, "simclr": IndependentSimCLR, "mocov2": IndependentMoCoV2,
           "mocov3": IndependentMoCoV3, "swav": IndependentSwAV}[s.method]
    return cls(s.width, **s.heads)


def copy_fastssl_init(model: nn.Module, cfg, seed: int) -> None:
    """Give the independent model fastssl's initial weights for ``seed`` (fastssl's trainer seeds, then builds;
    see :func:`copy_weights`). A diagnosis: it takes the initialization out of a gap."""
    from fastssl.engine.trainer import build_model

    torch.manual_seed(seed)
    copy_weights(model, build_model(cfg).state_dict())


def copy_weights(model: nn.Module, theirs: dict) -> None:
    """Load fastssl's state dict ``theirs`` into the independent ``model`` (names are shared; the independent
    heads' first-Linear biases, which fastssl's heads do not have, are set to zero). Stops when fastssl's model
    has a weight or bias that the independent one lacks (the two would compute different functions; fastssl's
    own bookkeeping buffers such as ``tau`` or ``queue_ptr`` are left out)."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in theirs and not k.endswith(".bias")]
    if missing:
        raise SystemExit(f"parity: fastssl's model has no tensor for {missing[:3]}")
    extra = [k for k in theirs if k not in ours and k.endswith((".weight", ".bias"))]
    if extra:
        raise SystemExit(f"parity: the independent model has no tensor for fastssl's {extra[:3]}; "
                         "the two heads differ in layout")
    model.load_state_dict({k: theirs[k].clone() if k in theirs else torch.zeros_like(v) for k, v in ours.items()})


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict]:
    """Weight decay on weight matrices and kernels only (biases and BN spared), or on everything."""
    decay, spare = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decay_all or p.ndim > 1 else spare).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": spare, "weight_decay": 0.0}]


# ---- the shared evaluator -----------------------------------------------------------------------------------

class Evaluator:
    """fastssl's kNN evaluation, the function both sides are scored with (same loaders, k, T, precision)."""

    def __init__(self, cfg):
        import pipelines
        from fastssl.engine.trainer import build_spec

        self.cfg = cfg
        spec = build_spec(cfg, "eval")
        self.loaders = {split: pipelines.build_loader(cfg.data.path, spec, cfg.eval.batch_size, split=split,
                                                      device="cpu", backend="torch", cache=cfg.data.cache,
                                                      shuffle=False, drop_last=False, progress=False)
                        for split in ("train", "val")}

    def __call__(self, backbone: nn.Module) -> float:
        from fastssl.engine.knn import extract_features, knn_top1

        feats = {split: extract_features(backbone, loader, self.cfg.train.precision)
                 for split, loader in self.loaders.items()}
        return knn_top1(*feats["train"], *feats["val"], k=self.cfg.eval.knn_k, temperature=self.cfg.eval.knn_t)


# ---- the two runs -------------------------------------------------------------------------------------------

def run_fastssl(s: Settings, args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / "fastssl_run"
    cmd = [sys.executable, "-m", "fastssl.train", "--config", s.recipe, *fastssl_overrides(s, args, run_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    log = out / "fastssl.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"parity: fastssl exited with {rc}; see {log}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    knn = [r["knn_top1"] for r in rows if "knn_top1" in r]
    rates = [r["img_s"] for r in rows if "img_s" in r]
    return {"knn_top1": knn, "img_s": float(np.median(rates)) if rates else None,
            "wall_s": time.perf_counter() - t0, "command": " ".join(cmd[1:])}


def run_independent(s: Settings, args: argparse.Namespace, cfg, out: Path) -> dict:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.source == "fastssl":  # a diagnosis: the independent model and loop on fastssl's own views
        loader = FastsslViews(cfg, s.batch, args.seed)
    else:
        images, _ = read_idx_split("train") if args.source == "idx" else read_shards(Path(args.data), "train")
        dataset = MultiViewDataset(images, s.views)
        loader = torch.utils.data.DataLoader(dataset, batch_size=s.batch, shuffle=True, drop_last=True,
                                             num_workers=args.workers, persistent_workers=args.workers > 0,
                                             generator=torch.Generator().manual_seed(args.seed))
    model = build_independent(s)
    if args.indep_bf16_loss:  # only to compare with records made before the fp32 default (BYOL, SimCLR)
        model.loss_fp32 = False
    if args.indep_init == "fastssl":
        copy_fastssl_init(model, cfg, args.seed)
    if args.indep_channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, s.weight_decay, args.indep_decay_all), lr=s.lr, momentum=s.momentum)
    if hasattr(model, "steps_per_epoch"):
        model.steps_per_epoch = len(loader)
    evaluate = Evaluator(cfg)
    knn_init = None
    if args.knn_init:  # the bar reads each side's gain over the initial weights (both sides' with --indep-init fastssl)
        with torch.random.fork_rng():  # the training run draws the same numbers with or without this evaluation
            knn_init = evaluate(model.backbone)
        print(f"independent {s.method} initial weights ({args.indep_init}): kNN {knn_init:.2f} %", flush=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    total, step, knn, train_time = args.epochs * len(loader), 0, [], 0.0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        for views in loader:
            if args.indep_channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = model.loss(views)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hasattr(model, "before_update"):
                model.before_update(step)
            opt.step()
            model.after_step(step, total)
            step += 1
            if args.log_every and step % args.log_every == 0:
                rate = step * s.batch / max(train_time + time.perf_counter() - t0, 1e-9)
                print(f"independent step {step}/{total} loss {loss.item():.4f} {rate:.0f} img/s", flush=True)
        train_time += time.perf_counter() - t0
        knn.append(evaluate(model.backbone))
        print(f"independent {s.method} epoch {epoch + 1}: loss {loss.item():.4f} kNN {knn[-1]:.2f} %", flush=True)
    return {"knn_top1": knn, "knn_init": knn_init, "img_s": step * s.batch / max(train_time, 1e-9),
            "source": args.source, "decay_all": args.indep_decay_all, "init": args.indep_init,
            "channels_last": args.indep_channels_last, "batchnorm": model.batchnorm,
            "loss_precision": "fp32" if model.loss_fp32 or dtype is None else "bf16"}


# ---- report -------------------------------------------------------------------------------------------------

def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_figure(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, atomically (temp file + rename), then closed."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def report(out: Path, method: str) -> dict | None:
    """Merge fastssl.json and independent.json into parity.json + parity.png; print the markdown table."""
    sides = {n: json.loads((out / f"{n}.json").read_text()) for n in ("fastssl", "independent")
             if (out / f"{n}.json").is_file()}
    if len(sides) < 2:
        return None
    f, i = sides["fastssl"]["knn_top1"], sides["independent"]["knn_top1"]
    n = min(len(f), len(i))
    gap = [round(f[e] - i[e], 2) for e in range(n)]
    result = {"method": method, "settings": sides["independent"].get("settings"), **sides, "gap_points": gap}
    _atomic_write(out / "parity.json", (json.dumps(result, indent=2) + "\n").encode())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(f) + 1), f, "o-", label="fastssl")
    ax.plot(range(1, len(i) + 1), i, "s--", label="independent (plain PyTorch)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted 20-NN top-1 (%)")
    ax.set_xticks(range(1, max(len(f), len(i)) + 1))
    ax.set_title(f"{method}: fastssl vs independent")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, out / "parity.png")

    print(f"\n| {method} | " + " | ".join(f"epoch {e + 1}" for e in range(n)) + " | img/s |")
    print("|---|" + "---:|" * (n + 1))
    for name, knn in (("independent", i), ("fastssl", f)):
        rate = sides[name].get("img_s")
        print(f"| {name} | " + " | ".join(f"{k:.2f}" for k in knn[:n]) + f" | {rate:.0f} |")
    print("| gap (points) | " + " | ".join(f"{g:+.2f}" for g in gap) + " | |")
    return result


def _read_run(run: Path) -> dict:
    """One parity run's two sides (``fastssl.json`` + ``independent.json`` in ``run``)."""
    sides = {}
    for name in ("fastssl", "independent"):
        path = run / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"parity: {path} is missing: run that side first (--impl {name} --out {run})")
        sides[name] = json.loads(path.read_text())
    return sides


def independent_numerics(record: dict) -> dict:
    """How an independent run computed: {"batchnorm": statistics, "loss_precision": "fp32" | "bf16"}.

    Records made before these keys (issue 26) forwarded every view on its own ("per view"), and under bf16
    autocast their loss was fp32 only for BYOL with ``fp32_loss`` (no matmul in its loss) and for SwAV (log-softmax
    of upcast scores); SimCLR's and MoCo v2's logits came out of a bf16 matmul even with the upcast."""
    if "batchnorm" in record:
        return {"batchnorm": record["batchnorm"], "loss_precision": record["loss_precision"]}
    method = (record.get("settings") or {}).get("method")
    fp32 = record.get("precision") == "fp32" or method == "swav" or (method == "byol" and record.get("fp32_loss"))
    return {"batchnorm": "per view", "loss_precision": "fp32" if fp32 else "bf16"}


def summarize(runs: list[Path], out: Path, method: str | None = None) -> dict:
    """Seeds of one method, each a folder with both sides: per-epoch mean and spread of each side, the gap of
    every seed and its mean (with the standard error), ``summary.json`` + ``summary.png`` + a markdown table.

    Single runs of a few epochs differ by 1-4 points of kNN from one seed to the next (initial weights, data
    order, augmentation draws), so a gap between two single runs says little; the mean gap over paired seeds
    (both sides of a pair from the same initial weights, ``--indep-init fastssl``) is what the bar reads."""
    if len(runs) < 2:
        raise SystemExit("parity: --summarize needs at least two run folders (one per seed)")
    per_run = [_read_run(r) for r in runs]
    methods = {r["fastssl"].get("settings", {}).get("method") for r in per_run} | \
        {r["independent"].get("settings", {}).get("method") for r in per_run}
    if len(methods) != 1:
        raise SystemExit(f"parity: the runs mix methods {sorted(map(str, methods))}; summarize one method at a time")
    if method is not None and methods != {method}:
        raise SystemExit(f"parity: the runs are {methods.pop()}, not --method {method}")
    first = per_run[0]
    for run, r in zip(runs, per_run, strict=True):
        if r["independent"].get("seed") != r["fastssl"].get("seed"):
            raise SystemExit(f"parity: {run}: the two sides ran with different seeds")
        for name in ("fastssl", "independent"):
            for key in ("settings", "precision", "epochs"):  # both sides against the first run's shared settings
                if r[name].get(key) != first["fastssl"].get(key):
                    raise SystemExit(f"parity: {run / (name + '.json')}: its {key} differs from {runs[0]}'s; "
                                     "summarize runs of the same settings only")
        ours, theirs = independent_numerics(r["independent"]), independent_numerics(first["independent"])
        for key in ours:
            if ours[key] != theirs[key]:
                raise SystemExit(f"parity: {run / 'independent.json'}: its {key} differs from {runs[0]}'s "
                                 f"({ours[key]} against {theirs[key]}); summarize runs of one implementation only")
    seeds = [r["fastssl"].get("seed") for r in per_run]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"parity: the runs repeat a seed ({seeds}); give one folder per seed")
    n = min(min(len(r["fastssl"]["knn_top1"]), len(r["independent"]["knn_top1"])) for r in per_run)
    if n == 0:
        raise SystemExit("parity: a run has no kNN figure yet")
    f = np.array([r["fastssl"]["knn_top1"][:n] for r in per_run])
    i = np.array([r["independent"]["knn_top1"][:n] for r in per_run])
    gap = f - i
    k = len(runs)
    sem = gap.std(axis=0, ddof=1) / math.sqrt(k)
    result = {
        "method": methods.pop(), "seeds": seeds, "runs": [str(r) for r in runs],
        "init": sorted({str(r["independent"].get("init")) for r in per_run}),
        "fastssl": {"per_seed": f.round(2).tolist(), "mean": f.mean(0).round(2).tolist(),
                    "std": f.std(0, ddof=1).round(2).tolist(),
                    "img_s": [r["fastssl"].get("img_s") for r in per_run]},
        "independent": {"per_seed": i.round(2).tolist(), "mean": i.mean(0).round(2).tolist(),
                        "std": i.std(0, ddof=1).round(2).tolist(),
                        "img_s": [r["independent"].get("img_s") for r in per_run]},
        "gap_points": {"per_seed": gap.round(2).tolist(), "mean": gap.mean(0).round(2).tolist(),
                       "sem": sem.round(2).tolist()},
    }
    inits = [r["independent"].get("knn_init") for r in per_run]
    if all(v is not None for v in inits):  # the initial weights' kNN, and each side's gain over it at the end
        init = float(np.mean(inits))
        result["knn_init"] = {"per_seed": [round(v, 2) for v in inits], "mean": round(init, 2),
                              "gain_at_end": {"fastssl": round(float(f.mean(0)[-1]) - init, 2),
                                              "independent": round(float(i.mean(0)[-1]) - init, 2)}}
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "summary.json", (json.dumps(result, indent=2) + "\n").encode())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, n + 1)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, values, style in (("fastssl", f, "o-"), ("independent (plain PyTorch)", i, "s--")):
        line, = ax.plot(epochs, values.mean(0), style, label=f"{name}, mean of {k} seeds")
        ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
        for row in values:
            ax.plot(epochs, row, style[1:], color=line.get_color(), alpha=0.35, linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted 20-NN top-1 (%)")
    ax.set_xticks(epochs)
    ax.set_title(f"{result['method']}: fastssl vs independent ({k} seeds; band = min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out / "summary.png")

    head = " | ".join(f"epoch {e}" for e in epochs)
    print(f"\n| {result['method']}, seeds {seeds} | {head} |")
    print("|---|" + "---:|" * n)
    for name, values in (("independent", i), ("fastssl", f)):
        for seed, row in zip(seeds, values, strict=True):
            print(f"| {name}, seed {seed} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        print(f"| **{name}, mean** | " + " | ".join(f"{v:.2f}" for v in values.mean(0)) + " |")
    print("| **gap, mean +- s.e. (points)** | "
          + " | ".join(f"{g:+.2f} +- {s:.2f}" for g, s in zip(gap.mean(0), sem, strict=True)) + " |")
    if "knn_init" in result:
        k0 = result["knn_init"]
        print(f"\ninitial weights: kNN {k0['mean']:.2f} % (mean of {k}); gain at epoch {n}: fastssl "
              f"{k0['gain_at_end']['fastssl']:+.2f}, independent {k0['gain_at_end']['independent']:+.2f} points")
    else:
        print("\ninitial weights: not scored in every run (--knn-init), so no gain over them")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=sorted(SETTINGS), required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--data", default="data/fashion-mnist", help="converted Fashion-MNIST (fastssl-convert)")
    p.add_argument("--out", default=None, help="output folder (default runs/parity/METHOD)")
    p.add_argument("--impl", choices=("both", "fastssl", "independent"), default="both")
    p.add_argument("--report", action="store_true", help="only merge the two sides' JSON into parity.json/png")
    p.add_argument("--summarize", nargs="+", metavar="RUN", default=None,
                   help="only summarize finished runs of one method, one folder per seed, into --out "
                        "(summary.json, summary.png: mean, spread and the mean gap)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="both sides (autocast)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each side")
    p.add_argument("--workers", type=int, default=1, help="the independent side's DataLoader workers")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--log-every", type=int, default=20, help="the independent side prints every N steps (0: never)")
    p.add_argument("--source", choices=("shards", "idx", "fastssl"), default="shards",
                   help="the independent side's images: the converted JPEG shards, or the raw IDX files (both "
                        "through torchvision), or fastssl's own loader and views (a diagnosis)")
    p.add_argument("--indep-decay-all", action="store_true",
                   help="the independent side decays biases and BN parameters too")
    p.add_argument("--indep-init", choices=("own", "fastssl"), default="own",
                   help="the independent model's initial weights: its own, or fastssl's for the same seed")
    p.add_argument("--knn-init", action=argparse.BooleanOptionalAction, default=True,
                   help="the independent side also scores its initial weights (the bar's 'gain over random init')")
    p.add_argument("--indep-channels-last", action="store_true",
                   help="the independent side in channels-last memory format, as fastssl (a diagnosis)")
    p.add_argument("--indep-bf16-loss", action="store_true",
                   help="the independent BYOL / SimCLR take the heads' bf16 outputs into their loss under bf16 "
                        "autocast, as before the fp32 default (only to compare with those records)")
    p.add_argument("--indep-fp32-loss", action="store_true",
                   help="the default now (every independent loss takes fp32, as fastssl's); accepted so that the "
                        "recorded commands still run")
    p.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                   help="change one of the method's settings on BOTH sides (heads.NAME, lr, weight_decay, momentum, "
                        "view.NAME), "
                        "e.g. heads.sinkhorn_eps=0.05 to measure one change; recorded with the settings")
    p.add_argument("--fastssl-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra fastssl override (a hypothesis probe; recorded in the JSON)")
    args = p.parse_args(argv)
    if args.indep_bf16_loss and (args.indep_fp32_loss or args.method not in ("byol", "simclr")):
        p.error("--indep-bf16-loss recreates the BYOL / SimCLR records made before the fp32 default; "
                f"it does not combine with --indep-fp32-loss or --method {args.method}")
    args.data = str(Path(args.data).resolve())
    if args.summarize:
        out = Path(args.out or REPO / "runs" / "parity" / f"{args.method}_seeds").resolve()
        summarize([Path(r).resolve() for r in args.summarize], out, args.method)
        return 0
    out = Path(args.out or REPO / "runs" / "parity" / args.method).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        return 0 if report(out, args.method) else 1
    s = apply_settings(SETTINGS[args.method](), args.setting)
    if args.width:
        s.width = args.width
    if args.batch_size:
        s.batch = args.batch_size

    sys.path.insert(0, str(REPO))
    from fastssl.config import load_config

    cfg = load_config(s.recipe, [o for o in fastssl_overrides(s, args, out / "fastssl_run")])
    check_same_views(s, cfg)
    meta = {"settings": asdict(s), "epochs": args.epochs, "seed": args.seed, "precision": args.precision}
    if args.impl in ("both", "fastssl"):
        res = run_fastssl(s, args, out)
        _atomic_write(out / "fastssl.json", (json.dumps({**meta, **res}, indent=2) + "\n").encode())
        print(f"fastssl {args.method}: kNN per epoch {res['knn_top1']}", flush=True)
    if args.impl in ("both", "independent"):
        res = run_independent(s, args, cfg, out)
        _atomic_write(out / "independent.json", (json.dumps({**meta, **res}, indent=2) + "\n").encode())
    report(out, args.method)
    return 0


if __name__ == "__main__":
    sys.exit(main())
