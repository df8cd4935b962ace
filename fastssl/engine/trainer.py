"""The training loop: loader -> method -> AMP backward (DDP) -> LARS -> EMA, with checkpoints and kNN."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import pipelines
from fastssl.config import ConfigError, validate
from fastssl.engine import distributed
from fastssl.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fastssl.engine.knn import extract_features, knn_top1
from fastssl.methods import build_method
from fastssl.models import build_backbone
from fastssl.optim.lars import LARS
from fastssl.optim.schedules import scaled_lr, warmup_cosine
from pipelines.formats import atomic_write_bytes, load_manifest

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def build_spec(cfg: DictConfig, name: str | None = None) -> pipelines.MultiCropSpec:
    """The MultiCropSpec of the run (or the preset ``name`` at the run's sizes and normalization)."""
    d = cfg.data
    kwargs = {"global_size": d.global_size, "local_size": d.local_size}
    if d.n_local:
        kwargs["n_local"] = d.n_local
    if d.mean is not None:
        kwargs["mean"], kwargs["std"] = tuple(d.mean), tuple(d.std)
    spec = pipelines.MultiCropSpec.preset(name or d.spec, **kwargs)
    if d.aug and spec.name != "eval":
        aug = {k: tuple(v) if isinstance(v, list | tuple) or OmegaConf.is_list(v) else v for k, v in d.aug.items()}
        try:
            views = tuple(dataclasses.replace(v, **aug) for v in spec.views)
        except TypeError as e:
            fields = ", ".join(f.name for f in dataclasses.fields(pipelines.ViewSpec))
            raise ConfigError(f"data.aug: {e}; the keys are ViewSpec fields: {fields}") from None
        except ValueError as e:
            raise ConfigError(f"data.aug: {e}") from None
        spec = dataclasses.replace(spec, views=views)
    return spec


def build_model(cfg: DictConfig) -> nn.Module:
    backbone = build_backbone(cfg.model.backbone, cfg.model.width, cfg.model.small_images)
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.method).items() if k != "name"}
    return build_method(cfg.method.name, backbone, backbone.feat_dim, **kwargs)


class Trainer:
    """Runs one configured job in this process (one rank of a torchrun job, or alone)."""

    def __init__(self, cfg: DictConfig, dist: distributed.DistInfo | None = None):
        self.dist = dist or distributed.init_distributed()
        validate(cfg, self.dist.world_size)
        self.cfg = cfg
        self.device = self.dist.device
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_path = self.out_dir / "checkpoints" / "last.pt"
        self._eval_loader_cache: dict | None = None

    # ----------------------------------------------------------------------------------------- setup
    def _seed(self) -> None:
        seed = self.cfg.train.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if self.cfg.train.threads > 0:
            torch.set_num_threads(self.cfg.train.threads)
        if self.cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)

    def _setup(self) -> None:
        cfg, d = self.cfg, self.dist
        self._seed()
        if d.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.out_dir / "config.yaml", OmegaConf.to_yaml(cfg).encode())
        self.spec = build_spec(cfg)
        self.loader = pipelines.build_loader(
            cfg.data.path, self.spec, cfg.train.batch_size // d.world_size, split="train", rank=d.rank,
            world_size=d.world_size, device=self.device, seed=cfg.train.seed, backend=cfg.data.backend,
            num_workers=cfg.data.num_workers, cache=cfg.data.cache,
        )
        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.train.seed)
        method = build_model(cfg).to(self.device)
        if cfg.train.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if self.device.type == "cuda" and d.world_size > 1:
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        self.method = method
        self.model = DDP(method, device_ids=[d.local_rank] if self.device.type == "cuda" else None) \
            if d.world_size > 1 else method
        o = cfg.optim
        self.peak_lr = scaled_lr(o.base_lr, cfg.train.batch_size)
        self.optimizer = build_optimizer(o, method.param_groups(o.weight_decay), self.peak_lr)
        self.amp_dtype = _AMP_DTYPES[cfg.train.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.path={cfg.data.path}: fewer training images per rank than one batch of "
                f"{cfg.train.batch_size // d.world_size}; lower train.batch_size"
            )
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, cfg.train.max_steps) if cfg.train.max_steps > 0 \
            else self.total_steps
        self.warmup_steps = min(int(round(o.warmup_epochs * self.steps_per_epoch)), self.total_steps)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.peak_lr, self.cfg.optim.final_lr)

    def weight_decay_at(self, step: int) -> float | None:
        """The weight decay of step ``step`` when optim.final_weight_decay sets a cosine schedule, else None."""
        o = self.cfg.optim
        if o.final_weight_decay is None:
            return None
        return o.final_weight_decay + (o.weight_decay - o.final_weight_decay) * 0.5 * (
            1 + math.cos(math.pi * min(step, self.total_steps) / max(self.total_steps, 1)))

    # ----------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "loader": {"epoch": self.epoch, "batch": self.batch_in_epoch},
            "rng": rng_state(),
            "config": OmegaConf.to_container(self.cfg),
            "world_size": self.dist.world_size,
        }

    def save(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.state_dict(), self.ckpt_path)
        distributed.barrier()

    def _resume(self) -> bool:
        mode = self.cfg.resume
        if mode == "none":
            return False
        path = self.ckpt_path if mode == "auto" else Path(mode)
        if mode == "auto" and not path.is_file():
            return False
        state = load_checkpoint(path)
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["loader"]["batch"])
        self.loader.load_state_dict(dict(state["loader"]))
        if state.get("world_size") == self.dist.world_size:
            set_rng_state(state["rng"])
        if self.dist.is_main:
            tqdm.write(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        return True

    # ------------------------------------------------------------------------------------------- fit
    def _train_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        lr, wd = self.lr_at(self.step), self.weight_decay_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if wd is not None and not group.get("lars_exclude", False):  # excluded groups keep no decay
                group["weight_decay"] = wd
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss, logs = self.model(views)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.method.on_before_optimizer_step(self.step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.on_step_end(self.step, self.total_steps)
        return loss, logs

    def fit(self) -> dict:
        """Train to the end (or ``train.max_steps``), checkpointing each epoch, then the kNN evaluation."""
        self._setup()
        self._resume()
        cfg, main = self.cfg, self.dist.is_main
        results: dict = {}
        if cfg.eval.knn and cfg.eval.knn_init:
            # The same seed rebuilds the exact initial weights, so this baseline holds after a resume too.
            torch.manual_seed(cfg.train.seed)
            results["knn_top1_init"] = self.knn_eval(build_model(cfg).to(self.device).backbone)
        metrics = open(self.out_dir / "metrics.jsonl", "a") if main else None
        tb = _tensorboard(self.out_dir / "tb") if main else None
        bar = tqdm(total=self.stop_step, initial=self.step, disable=not (main and cfg.train.progress),
                   unit="step", dynamic_ncols=True, desc=f"{cfg.method.name}")
        global_batch = cfg.train.batch_size
        window = {"n": 0, "time": 0.0, "wait": 0.0}
        loss = None
        self.method.on_train_start(self.steps_per_epoch, self.total_steps)
        try:
            while self.step < self.stop_step:
                if self.batch_in_epoch == 0:
                    self.loader.set_epoch(self.epoch)
                self.method.on_epoch_start(self.epoch)
                t_prev = time.perf_counter()
                for batch in self.loader:
                    t_data = time.perf_counter()
                    loss, logs = self._train_step(batch.views)
                    self.step += 1
                    self.batch_in_epoch += 1
                    if self.device.type == "cuda" and self.step % cfg.train.log_every == 0:
                        torch.cuda.synchronize()
                    t_end = time.perf_counter()
                    window["n"] += 1
                    window["time"] += t_end - t_prev
                    window["wait"] += t_data - t_prev
                    t_prev = t_end
                    bar.update(1)
                    if self.step % cfg.train.log_every == 0 or self.step == self.stop_step:
                        row = self._log_row(logs, window, global_batch)
                        window = {"n": 0, "time": 0.0, "wait": 0.0}
                        if main:
                            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.3g}",
                                            img_s=f"{row['img_s']:.0f}", wait=f"{row['data_wait_pct']:.0f}%")
                            metrics.write(json.dumps(row) + "\n")
                            metrics.flush()
                            for k, v in row.items():
                                if k not in ("step", "epoch"):
                                    tb.add_scalar(f"train/{k}", v, self.step)
                    if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                        self.save()
                    if self.step >= self.stop_step:
                        break
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    self.save()
            if self.batch_in_epoch:  # stopped mid-epoch by train.max_steps
                self.save()
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
            if tb is not None:
                tb.close()
        results.update({"steps": self.step, "epochs": self.epoch,
                        "weight_digests": distributed.weight_digests(self.method)})
        if loss is not None:
            results["final_loss"] = float(loss.detach())
        if cfg.eval.knn:
            results["knn_top1"] = self.knn_eval()
            if main:
                knn = {k: v for k, v in results.items() if k.startswith("knn")}
                knn.update(k=cfg.eval.knn_k, t=cfg.eval.knn_t, step=self.step)
                atomic_write_bytes(self.out_dir / "knn.json", (json.dumps(knn, indent=2) + "\n").encode())
        return results

    def _log_row(self, logs: dict, window: dict, global_batch: int) -> dict:
        row = {"step": self.step, "epoch": self.epoch, "lr": self.lr_at(self.step - 1)}
        row.update({k: float(v) for k, v in logs.items()})
        row["img_s"] = window["n"] * global_batch / max(window["time"], 1e-9)
        row["data_wait_pct"] = 100.0 * window["wait"] / max(window["time"], 1e-9)
        return row

    # ------------------------------------------------------------------------------------------- kNN
    def _eval_loaders(self) -> dict:
        """Deterministic loaders over the train (kNN bank) and val (queries) splits, built once per run so
        the init and final evaluations share one decode."""
        if self._eval_loader_cache is None:
            cfg = self.cfg
            spec = build_spec(cfg, "eval")
            self._eval_loader_cache = {
                split: pipelines.build_loader(
                    cfg.data.path, spec, cfg.eval.batch_size, split=split, device=self.device, backend="torch",
                    num_workers=cfg.data.num_workers, cache=cfg.data.cache, shuffle=False, drop_last=False,
                )
                for split in ("train", "val")
            }
        return self._eval_loader_cache

    @torch.no_grad()
    def knn_eval(self, backbone: nn.Module | None = None) -> float:
        """Weighted kNN top-1 (%) of the frozen backbone: train split as the bank, val split as queries.

        Runs on rank 0 over the whole dataset; the other ranks wait. ``backbone`` defaults to the trained one.
        """
        backbone = backbone if backbone is not None else self.method.backbone
        cfg = self.cfg
        top1 = float("nan")
        if self.dist.is_main:
            manifest = load_manifest(cfg.data.path)
            feats = {}
            for split, loader in self._eval_loaders().items():
                feats[split] = extract_features(backbone, _limit(loader, cfg.eval.knn_max_train)
                                                if split == "train" else loader, cfg.train.precision)
            top1 = knn_top1(*feats["train"], *feats["val"], k=cfg.eval.knn_k, temperature=cfg.eval.knn_t,
                            num_classes=len(manifest["classes"]))
        distributed.barrier()
        return top1


def build_optimizer(o: DictConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """optim.name -> the optimizer over the method's parameter groups (lars_exclude groups carry no decay)."""
    if o.name == "lars":
        return LARS(groups, lr=lr, momentum=o.momentum, eta=o.eta, foreach=o.foreach)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, foreach=o.foreach)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), foreach=o.foreach)
    raise ValueError(f"optim.name={o.name!r}: choose one of lars, sgd, adamw")


def _limit(loader, max_images: int):
    """The first batches of ``loader`` up to ``max_images`` images (all when max_images <= 0)."""
    seen = 0
    for batch in loader:
        if 0 < max_images <= seen:
            return
        seen += batch.labels.shape[0]
        yield batch


def _tensorboard(path: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))


def run(cfg: DictConfig) -> dict:
    """Train ``cfg`` in this process (a torchrun rank or alone) and shut the process group down."""
    dist = distributed.init_distributed()
    try:
        return Trainer(cfg, dist).fit()
    finally:
        distributed.shutdown()


__all__ = ["Trainer", "run", "build_spec", "build_model"]
