"""The supervised loop the papers' evaluations share: a backbone under a linear head, trained with SGD on
RandomResizedCrop + flip views from fastssl's own loaders, scored top-1 / top-5 on the centre view of the val split.

Two protocols use it:

* ``linear`` (fastssl-linear --protocol paper): the backbone is frozen, its BatchNorm layers stay in eval mode
  (training mode would move their running statistics, which are part of the trained model, even without a
  gradient), and only the head trains;
* ``finetune`` (fastssl-finetune): the whole network trains, backbone and head at their own learning rates, on
  a labelled subset of the train split (``subset``).

Like training: torchrun ranks (DDP; each rank reads its part of the data; SyncBatchNorm on CUDA when fine-tuning),
the chosen loader backend, bf16/fp16 autocast, a checkpoint in ``work_dir/checkpoints`` at each epoch end and on
SIGTERM / SIGINT (the step in flight finishes, then the run saves and stops with status 128 + the signal), a rerun
of the same command resumes from it (exactly: loader position, RNG streams), a progress bar on rank 0. The score is
that of the last epoch, never the best one (choosing the best epoch on the val split would tune on it). Every val
image is scored exactly once: each rank scores a contiguous part of the split and the counts are summed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import pipelines
from fastssl.engine import distributed
from fastssl.engine.checkpoint import CheckpointDir, load_checkpoint, rng_state, set_rng_state
from fastssl.eval import group
from pipelines.formats import atomic_write_bytes, load_manifest
from pipelines.progress import progress_bar
from pipelines.progress import write as say

RESULT = "result.json"
SCORE_BATCH = 128  # at least this many val images per forward when scoring (a 1 % fine-tune may train in pairs)
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class Protocol:
    """One evaluation's settings (a recipe's ``eval.linear`` or ``eval.finetune_*`` section, see fastssl.config).

    Learning rates are per 256 images: the peak is ``lr * batch_size / 256`` (``head_lr`` for the head; the
    linear protocol trains the head alone, at ``base_lr``). ``schedule``: ``cosine`` (per step, from the peak to 0)
    or ``step`` (x ``gamma`` at each epoch of ``milestones``)."""

    mode: str  # linear | finetune
    epochs: int
    batch_size: int  # global
    base_lr: float
    head_lr: float
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)
    center_crop: float = 0.875
    head_bn: bool = False  # a BatchNorm without affine in front of the linear layer (MAE's linear probing)

    def __post_init__(self) -> None:
        if self.mode not in ("linear", "finetune"):
            raise ValueError(f"mode={self.mode!r}: linear or finetune")
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"schedule={self.schedule!r}: cosine or step")
        if self.epochs < 1 or self.batch_size < 1 or self.base_lr <= 0 or self.head_lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1, the learning rates > 0")
        if not 0 < self.center_crop <= 1:
            raise ValueError(f"center_crop={self.center_crop}: a fraction in (0, 1]")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        object.__setattr__(self, "crop_scale", tuple(float(s) for s in self.crop_scale))

    @classmethod
    def from_section(cls, mode: str, section: dict, **overrides) -> Protocol:
        """From a config section (a dict), with ``overrides`` (None values ignored) applied on top."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in section.items() if k in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if mode == "linear":
            values["head_lr"] = values["base_lr"]
        return cls(mode=mode, **values)

    def lr_factor(self, step: int, steps_per_epoch: int) -> float:
        """The schedule's multiplier of the peak learning rate at ``step`` (0-based)."""
        total = self.epochs * steps_per_epoch
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        epoch = step // steps_per_epoch
        return self.gamma ** sum(epoch >= m for m in self.milestones)


class Classifier(nn.Module):
    """``backbone`` -> ``Linear(feat_dim, num_classes)``. With ``frozen`` the backbone gets no gradient and stays in
    eval mode whatever ``train()`` is called with (its BatchNorm statistics are part of what is evaluated).
    ``head_bn``: a ``BatchNorm1d(affine=False)`` in front of the linear layer, part of the head (MAE's linear
    probing; SwAV's eval_linear.py ``--use_bn``): it standardizes features whose scales differ, which plain SGD on
    the raw features converges on slowly."""

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int, frozen: bool, head_bn: bool = False):
        super().__init__()
        self.backbone, self.frozen = backbone, frozen
        linear = nn.Linear(feat_dim, num_classes)
        # The papers' head init (SwAV, MoCo, Barlow Twins): N(0, 0.01), zero bias.
        nn.init.normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(feat_dim, affine=False), linear) if head_bn else linear
        if frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) float -> (B, num_classes) fp32 logits (the backbone under the caller's autocast)."""
        if self.frozen:
            with torch.no_grad():
                feats = self.backbone(x)
        else:
            feats = self.backbone(x)
        with torch.autocast(x.device.type, enabled=False):  # the head in fp32: small, and its logits feed the loss
            return self.head(feats.float())


@dataclass
class Job:
    """What one evaluation run is: the backbone to start from and the data, besides the protocol."""

    data: str
    protocol: Protocol
    work_dir: Path
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    precision: str = "fp32"
    source: str = ""  # the checkpoint / export evaluated, for the record ("random init" for the baseline)
    subset: np.ndarray | None = None  # finetune: sample ids of the labelled train images
    subset_file: str | None = None  # where their names are written
    backend: str = "auto"
    num_workers: int | None = None
    device: str = "auto"
    seed: int = 0
    resume: str = "auto"  # auto | none
    eval_every: int = 0  # > 0: also score the val split every this many epochs (metrics.jsonl; never the result)
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in the result as is

    def identity(self) -> dict:
        """What a checkpoint must share with this job to be resumed by it."""
        subset = None if self.subset is None else \
            hashlib.sha256(np.asarray(self.subset, np.int64).tobytes()).hexdigest()
        return {"data": os.path.abspath(self.data), "source": self.source,
                "protocol": _jsonable(asdict(self.protocol)), "image_size": self.image_size, "seed": self.seed,
                "subset_sha256": subset}


class StopRequested(Exception):
    """SIGTERM / SIGINT: every rank finished the same step and the checkpoint is written."""

    def __init__(self, signum: int, path: Path):
        import signal

        self.signum, self.path = signum, path
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {path}. Run the same command again "
                         "to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def run(backbone: nn.Module, feat_dim: int, num_classes: int, job: Job, shutdown: bool = True) -> dict:
    """Train and score ``job`` in this process (a torchrun rank, or alone); returns the result (every rank) and
    writes it to ``job.work_dir/result.json`` (rank 0). ``backbone``: the module to start from, on the CPU.
    ``shutdown``: leave torchrun's process group at the end (False: a caller runs several evaluations in it).

    Raises StopRequested after a SIGTERM / SIGINT (checkpoint written), ValueError for settings the data cannot
    serve, DatasetFormatError for a broken dataset."""
    dist = group.join(job.device)
    try:
        return _Run(backbone, feat_dim, num_classes, job, dist).fit()
    finally:
        if shutdown:
            group.leave()


class _Run:
    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int, job: Job, dist: distributed.DistInfo):
        p = job.protocol
        self.job, self.p, self.dist, self.device = job, p, dist, dist.device
        if p.batch_size % dist.world_size:
            raise ValueError(f"batch size {p.batch_size}: the global batch must be divisible by the world size "
                             f"{dist.world_size}")
        self.manifest = load_manifest(job.data)
        if not self.manifest["splits"].get("val", {}).get("count"):
            raise ValueError(f"{job.data}: no val split to score on; convert a tree with train/ and val/ folders")
        self.num_classes = num_classes
        view = pipelines.ViewSpec(job.image_size, scale=p.crop_scale, flip_p=0.5, jitter_p=0.0, brightness=0.0,
                                  contrast=0.0, saturation=0.0, hue=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
        spec = pipelines.MultiCropSpec((view,), job.mean, job.std, name=f"{p.mode}-train")
        self.loader = pipelines.build_loader(
            job.data, spec, p.batch_size // dist.world_size, split="train", rank=dist.rank,
            world_size=dist.world_size, device=self.device, seed=job.seed, backend=job.backend,
            num_workers=job.num_workers, shuffle=True, drop_last=False, augment=True,
            progress=dist.is_main and job.progress, subset=job.subset)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = p.epochs * self.steps_per_epoch
        torch.manual_seed(job.seed)  # the head's init: the same on every rank
        model = Classifier(backbone, feat_dim, num_classes, frozen=p.mode == "linear", head_bn=p.head_bn)
        model = model.to(self.device).to(memory_format=torch.channels_last)
        if self.device.type == "cuda" and dist.world_size > 1:
            if p.mode == "finetune":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:  # the frozen backbone's BatchNorm stays as it is; the head's, if any, sees the global batch
                model.head = nn.SyncBatchNorm.convert_sync_batchnorm(model.head)
        self.model = model
        self.ddp = DDP(model, device_ids=[dist.local_rank] if self.device.type == "cuda" else None) \
            if dist.world_size > 1 else model
        scale = p.batch_size / 256
        groups = [{"params": list(model.head.parameters()), "peak": p.head_lr * scale}]
        if p.mode == "finetune":
            groups.append({"params": list(model.backbone.parameters()), "peak": p.base_lr * scale})
        for g in groups:
            g["lr"] = g["peak"]
        self.optimizer = torch.optim.SGD(groups, lr=groups[0]["peak"], momentum=p.momentum, nesterov=p.nesterov,
                                         weight_decay=p.weight_decay)
        self.amp = _AMP[job.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=job.precision == "fp16")
        self.checkpoints = CheckpointDir(Path(job.work_dir) / "checkpoints", keep=1)
        self.step = 0
        self.seconds_before = 0.0  # the time the runs this one resumes spent (checkpointed): a result's "seconds"
        self.t0 = time.perf_counter()
        self.signals = distributed.StopSignals(announce=dist.is_main)

    # ---------------------------------------------------------------------------------------- resume
    def _state(self) -> dict:
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        return {"model": self.model.state_dict() if self.p.mode == "finetune" else self.model.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "loader": {"epoch": epoch, "batch": batch}, "identity": self.job.identity(),
                "seconds": self.seconds_before + time.perf_counter() - self.t0,
                "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world_size}

    def save(self) -> Path:
        rngs = distributed.all_gather_objects(rng_state())
        path = self.checkpoints.path_for(self.step)
        if self.dist.is_main:
            state = self._state()
            state["rng"] = rngs
            self.checkpoints.save(state, self.step)
        group.wait_for_main()
        return path

    def resume(self) -> bool:
        if self.job.resume == "none":
            return False
        found = None
        if self.dist.is_main:
            self.checkpoints.remove_temp_files()
            hit = self.checkpoints.newest_valid(required=("model", "step", "identity"))
            found = str(hit[0]) if hit else None
        path = distributed.broadcast_object(found)
        if path is None:
            return False
        state = load_checkpoint(path)
        mine = self.job.identity()
        changed = [k for k in mine if state["identity"].get(k) != mine[k]]
        if changed:
            raise ValueError(f"{self.job.work_dir}: holds an evaluation with other {', '.join(changed)} ({path}); "
                             "use another work folder, or --resume none to start this one afresh there")
        if int(state["steps_per_epoch"]) != self.steps_per_epoch:
            raise ValueError(f"{path}: {state['steps_per_epoch']} steps per epoch there, {self.steps_per_epoch} here "
                             f"(world size {state['world_size']} -> {self.dist.world_size}); resume on the same "
                             "number of ranks, or --resume none")
        (self.model if self.p.mode == "finetune" else self.model.head).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.seconds_before = float(state.get("seconds", 0.0))
        self.loader.load_state_dict(state["loader"])
        if len(state["rng"]) == self.dist.world_size:
            set_rng_state(state["rng"][self.dist.rank])
        if self.dist.is_main:
            say(f"resumed {self.p.mode} from {path} at step {self.step} of {self.total_steps}")
        return True

    # ------------------------------------------------------------------------------------------- fit
    def fit(self) -> dict:
        job, p, main = self.job, self.p, self.dist.is_main
        t0 = self.t0 = time.perf_counter()
        self.resume()
        work = Path(job.work_dir)
        if main:
            work.mkdir(parents=True, exist_ok=True)
        metrics = open(work / "metrics.jsonl", "a") if main else None
        bar = progress_bar(total=self.total_steps, initial=self.step, unit="step", desc=p.mode,
                           disable=not (main and job.progress), dynamic_ncols=True)
        sums = torch.zeros(3, device=self.device)  # loss x n, correct, n of the epoch
        self.signals.install()
        try:
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                if self.step % self.steps_per_epoch == 0:
                    self.loader.set_epoch(epoch)
                    sums.zero_()
                self.ddp.train()
                t_epoch, n_epoch = time.perf_counter(), 0
                for batch in self.loader:
                    self._train_step(batch, sums)
                    n_epoch += batch.labels.shape[0]
                    self.step += 1
                    bar.update(1)
                    signum = int(distributed.max_across_ranks(
                        torch.full((1,), float(self.signals.signum or 0), device=self.device))[0])
                    if signum:
                        path = self.save()
                        raise StopRequested(signum, path)
                loss_sum, correct, n = sums.tolist()
                row = {"epoch": epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                       "loss": loss_sum / max(n, 1), "train_top1": 100 * correct / max(n, 1),
                       "img_s": n_epoch * self.dist.world_size / max(time.perf_counter() - t_epoch, 1e-9)}
                bar.set_postfix(loss=f"{row['loss']:.3f}", train_top1=f"{row['train_top1']:.1f}%")
                last = self.step >= self.total_steps
                if job.eval_every and (epoch + 1) % job.eval_every == 0 and not last:
                    row.update({f"val_{k}": v for k, v in self.score().items()})
                    bar.unpause()
                if main:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                self.save()
            scores = self.score()
        finally:
            self.signals.restore()
            bar.close()
            if metrics is not None:
                metrics.close()
        result = {"protocol": p.mode, **scores, "epochs": p.epochs, "steps": self.step,
                  "train_images": int(len(job.subset)) if job.subset is not None else
                  int(self.manifest["splits"]["train"]["count"]),
                  "val_images": int(self.manifest["splits"]["val"]["count"]),
                  "settings": _jsonable(asdict(p)), "world_size": self.dist.world_size,
                  "backend": type(self.loader).__name__, "precision": job.precision, "source": job.source,
                  "data": str(job.data), "image_size": job.image_size, "seed": job.seed,
                  "seconds": round(self.seconds_before + time.perf_counter() - t0, 1), "identity": job.identity(),
                  **job.extra}
        if job.subset_file:
            result["labels_file"] = job.subset_file
        if main:
            atomic_write_bytes(work / RESULT, (json.dumps(result, indent=2) + "\n").encode())
        return result

    def _train_step(self, batch: pipelines.Batch, sums: torch.Tensor) -> None:
        factor = self.p.lr_factor(self.step, self.steps_per_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = g["peak"] * factor
        x, y = batch.views[0], batch.labels
        if self.p.head_bn and x.shape[0] < 2:
            return  # an epoch's last batch of one image: a BatchNorm needs two (every rank has the same batch sizes)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.ddp(x)
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            n = y.shape[0]
            sums[0] += loss.detach() * n
            sums[1] += (logits.argmax(dim=1) == y).sum()
            sums[2] += n

    @torch.no_grad()
    def score(self) -> dict:
        """Top-1 and top-5 (%) on the val split's centre view; each rank scores its contiguous part."""
        job, p = self.job, self.p
        total = int(self.manifest["splits"]["val"]["count"])
        lo, hi = self.dist.rank * total // self.dist.world_size, (self.dist.rank + 1) * total // self.dist.world_size
        counts = torch.zeros(3, device=self.device)  # top-1 hits, top-5 hits, images
        if self.dist.world_size > 1:
            # Each rank's BatchNorm statistics saw its own last batches (without SyncBatchNorm: on CPUs, and the
            # linear head's off CUDA): every rank scores with rank 0's, the ones its checkpoint holds.
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        was_training = self.model.training
        self.model.eval()
        if hi > lo:
            # The papers' centre view: Resize(S / crop) then CenterCrop(S): the centred square's middle crop share.
            size = round(job.image_size / p.center_crop)
            spec = pipelines.MultiCropSpec.preset("eval", global_size=size, mean=job.mean, std=job.std)
            loader = pipelines.build_loader(job.data, spec, max(SCORE_BATCH, p.batch_size // self.dist.world_size),
                                            split="val", device=self.device, backend=job.backend,
                                            num_workers=job.num_workers, augment=False, progress=False,
                                            subset=np.arange(lo, hi))
            off = (size - job.image_size) // 2
            k = min(5, self.num_classes)
            for batch in loader:
                x = batch.views[0][:, :, off:off + job.image_size, off:off + job.image_size]
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    logits = self.model(x)
                top = logits.float().topk(k, dim=1).indices
                hit = top == batch.labels[:, None]
                counts += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                                       torch.tensor(x.shape[0], device=self.device)]).float()
        self.model.train(was_training)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(counts)
        top1, top5, n = counts.tolist()
        return {"top1": 100 * top1 / n, "top5": 100 * top5 / n}


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


__all__ = ["Classifier", "Job", "Protocol", "RESULT", "StopRequested", "run"]
