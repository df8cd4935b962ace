"""The training loop: loader -> method -> AMP backward (DDP) -> LARS -> EMA, with checkpoints and kNN."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import pipelines
from fastssl.config import ConfigError, build_spec, refused_changes_message, resume_changes, validate
from fastssl.engine import compiled, determinism, distributed, launch, layout, slurm_job
from fastssl.engine.checkpoint import CheckpointDir, CheckpointDiskFull, load_checkpoint, rng_state, set_rng_state
from fastssl.engine.knn import extract_features, knn_top1
from fastssl.engine.monitor import DataWaitMonitor, open_wandb
from fastssl.engine.probes import OnlineLinearProbe
from fastssl.engine.run_folder import RunFolderBusy, RunFolderLock, hold_run_folder
from fastssl.methods import build_method
from fastssl.models import MLP, build_backbone
from fastssl.models.norm import sync_batchnorm
from fastssl.optim.lars import LARS
from fastssl.optim.schedules import scaled_lr, warmup_cosine
from pipelines import progress
from pipelines.formats import DatasetFormatError, atomic_write_bytes, load_manifest, shard_counts, shard_paths

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def build_model(cfg: DictConfig) -> nn.Module:
    backbone = build_backbone(cfg.model.backbone, cfg.model.width, cfg.model.small_images)
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.method).items() if k != "name"}
    method = build_method(cfg.method.name, backbone, backbone.feat_dim, **kwargs)
    if cfg.train.head_precision == "fp32":  # the MLP heads leave the autocast region (the backbone stays in it)
        for module in method.modules():
            if isinstance(module, MLP):
                module.fp32 = True
    return method


class Trainer:
    """Runs one configured job in this process (one rank of a torchrun job, or alone)."""

    def __init__(self, cfg: DictConfig, dist: distributed.DistInfo | None = None):
        self.dist = dist or distributed.init_distributed()
        validate(cfg, self.dist.world_size)
        self.cfg = cfg
        self.device = self.dist.device
        self.out_dir = Path(cfg.out_dir)
        self.checkpoints = CheckpointDir(self.out_dir / "checkpoints", cfg.train.keep_checkpoints)
        self.ckpt_path = self.checkpoints.last  # a second name of the newest step-XXXXXX.pt
        self.stop_signals = distributed.StopSignals(announce=self.dist.is_main)
        self.run_lock: RunFolderLock | None = None  # rank 0's hold on out_dir while fit() runs
        self.bad_steps = {"in_row": 0, "total": 0}  # non-finite losses or gradients: those updates were skipped
        self._skipped = ""  # why the last step's update was skipped: "nonfinite_loss", "nonfinite_grad" or ""
        self._bad_samples_seen = 0  # entries of loader.bad_samples already reported
        self._new_bad_samples = False  # some rank's batch held a bad sample not reported yet (all-reduced)
        self.bad_samples: dict[int, str] = {}  # global id -> message: distinct bad samples met by all ranks
        # (each replaced in its batch), this run and the runs it resumes (checkpointed: counted once each)
        self._stop_signum = 0  # > 0: every rank agreed to stop after this step (the signal's number)
        self._saved_step = -1
        self._eval_loader_cache: dict | None = None
        self.probe: OnlineLinearProbe | None = None
        self._knn_at_step: dict[int, float] = {}  # kNN monitor results by step, reused by the final evaluation

    # ----------------------------------------------------------------------------------------- setup
    def _seed(self) -> None:
        seed = self.cfg.train.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if self.cfg.train.threads > 0:
            torch.set_num_threads(self.cfg.train.threads)
        if self.cfg.train.deterministic:
            determinism.enable(self.device)  # on CUDA: cuBLAS's workspace setting, before the first matmul

    def _setup(self) -> None:
        cfg, d = self.cfg, self.dist
        self._seed()
        self.spec = build_spec(cfg)
        self.loader = pipelines.build_loader(
            cfg.data.path, self.spec, cfg.train.batch_size // d.world_size, split="train", rank=d.rank,
            world_size=d.world_size, device=self.device, seed=cfg.train.seed, backend=cfg.data.backend,
            num_workers=cfg.data.num_workers, cache=cfg.data.cache, decode=cfg.data.decode,
            progress=d.is_main and cfg.train.progress, skip_bad_samples=True,
        )
        if d.is_main:  # after the data checks: a run refused for its data leaves no run folder behind
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.out_dir / "config.yaml", OmegaConf.to_yaml(cfg).encode())
        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.train.seed)
        method = build_model(cfg).to(self.device)
        self.amp_dtype = _AMP_DTYPES[cfg.train.precision]
        self.channels_last = layout.choose_channels_last(
            cfg.train.channels_last, method, [v.size for v in self.spec.views], cfg.train.batch_size // d.world_size,
            self.amp_dtype, self.device, {"model": OmegaConf.to_container(cfg.model),
                                          "method": OmegaConf.to_container(cfg.method)}, is_main=d.is_main)
        if self.channels_last:
            method = method.to(memory_format=torch.channels_last)
        self.loader.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        # A method may opt out (sync_batchnorm = False), e.g. MoCo v2's Shuffle-BN. Per-view BatchNorms stay per view,
        # each view normalized by its global statistics.
        if self.device.type == "cuda" and d.world_size > 1 and getattr(method, "sync_batchnorm", True):
            method = sync_batchnorm(method)
        self.method = method
        self.model = DDP(method, device_ids=[d.local_rank] if self.device.type == "cuda" else None,
                         **_no_forward_buffer_sync()) if d.world_size > 1 else method
        self.train_forward = compiled.TrainingForward(self.model, cfg.train.compile, cfg.train.compile_mode,
                                                      self.device, announce=d.is_main)
        o = cfg.optim
        self.peak_lr = scaled_lr(o.base_lr, cfg.train.batch_size)
        self.optimizer = build_optimizer(o, method.param_groups(o.weight_decay), self.peak_lr)
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
        self._norm_buffers = _norm_buffers(method)
        self._norm_snapshot = [b.clone() for b in self._norm_buffers]
        if cfg.eval.probe:
            self.probe = OnlineLinearProbe(
                method.backbone, method.backbone.feat_dim, len(load_manifest(cfg.data.path)["classes"]),
                lr=cfg.eval.probe_lr, every=cfg.eval.probe_every, device=self.device, world_size=d.world_size)

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
        epoch, batch = self.epoch, self.batch_in_epoch
        if batch >= self.steps_per_epoch:  # saved at an epoch's last step, before the loop moves on: next epoch
            epoch, batch = epoch + 1, 0
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "probe": self.probe.state_dict() if self.probe is not None else None,
            "step": self.step,
            "epoch": epoch,
            "loader": {"epoch": epoch, "batch": batch},
            "rng": [rng_state()],  # one per rank, in rank order (save() gathers them)
            "config": OmegaConf.to_container(self.cfg),
            "world_size": self.dist.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "bad_steps": dict(self.bad_steps),
            "bad_samples": {str(k): v for k, v in self.bad_samples.items()},
        }

    def save(self) -> None:
        """Checkpoint this step (once per step): rank 0 writes, with every rank's RNG states; all ranks wait, and
        all raise CheckpointDiskFull when it did not fit."""
        if self.step == self._saved_step:
            return
        rngs = distributed.all_gather_objects(rng_state())
        full = None
        if self.dist.is_main:
            state = self.state_dict()
            state["rng"] = rngs
            try:
                self.checkpoints.save(state, self.step)
            except CheckpointDiskFull as e:
                full = e
        self._saved_step = self.step
        full = distributed.broadcast_from_main(full)
        if full is not None:
            raise self._fail_together(full)

    def _fail_together(self, error: RunFolderBusy | CheckpointDiskFull) -> Exception:
        """An error every rank raises at once (rank 0's outcome, broadcast): its one line is printed once (rank 0),
        and a signal that reaches a rank while it exits (torchrun and srun stop the others as soon as one rank
        has exited) ends it with the error's own status, not -SIGTERM. train.py prints through ``error.signals``."""
        line = f"fastssl/train.py: error: {error}\n" if self.dist.is_main else ""
        self.stop_signals.finish(line, error.exit_status)
        error.signals = self.stop_signals
        return error

    def _find_checkpoint(self) -> tuple[str, dict] | None:
        """The checkpoint ``cfg.resume`` names, loaded, or None: ``auto`` = the newest valid one of out_dir (rank 0
        picks, every rank loads that file), or a path. Its config is compared with this run's first
        (``_check_config_changes``): a refused change stops the run before anything is built or written."""
        mode = self.cfg.resume
        if mode == "none":
            return None
        if mode == "auto":
            found = None
            if self.dist.is_main:
                self.checkpoints.remove_temp_files()
                found = self.checkpoints.newest_valid()
            path = distributed.broadcast_object(str(found[0]) if found else None)
            if path is None:
                return None
            state = found[1] if found else load_checkpoint(path)
        else:
            path, state = mode, load_checkpoint(mode)
        self._check_config_changes(path, state)
        return path, state

    def _check_config_changes(self, path: str, state: dict) -> None:
        """Every difference between the checkpoint's config and this run's: a line each for those that leave what
        is trained as it was; ConfigError listing those that do not, unless resume_allow_changes allows them."""
        if state.get("config") is None:
            return
        changes = resume_changes(state["config"], self.cfg)
        if any(not c.accepted for c in changes):
            raise ConfigError(refused_changes_message(path, changes))
        if self.dist.is_main:
            for change in changes:
                progress.write(f"resume: config changed since the checkpoint: {change}")

    def _resume(self, found: tuple[str, dict] | None) -> bool:
        """Load the checkpoint ``_find_checkpoint`` found into the built run. A checkpoint from another world size
        continues at the same fraction of its epoch, with the step (the schedules' clock) counted in this run's
        steps per epoch."""
        if found is None:
            return False
        path, state = found
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.probe is not None and state.get("probe") is not None:
            self.probe.load_state_dict(state["probe"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.resumed_step = self.step  # in the checkpoint's own count (the rows metrics.jsonl holds)
        loader = dict(state["loader"])
        self.batch_in_epoch = int(loader["batch"])
        saved_steps_per_epoch = int(state.get("steps_per_epoch", self.steps_per_epoch))
        if saved_steps_per_epoch != self.steps_per_epoch:  # another world size (or data) cuts epochs differently
            self.batch_in_epoch = self.batch_in_epoch * self.steps_per_epoch // saved_steps_per_epoch
            loader["batch"] = self.batch_in_epoch
            if self.dist.is_main:
                progress.write(f"{path}: {saved_steps_per_epoch} steps per epoch there, {self.steps_per_epoch} here "
                               f"(world size {state.get('world_size')} -> {self.dist.world_size}): step {self.step} "
                               f"becomes {self.epoch * self.steps_per_epoch + self.batch_in_epoch}")
            self.step = self.epoch * self.steps_per_epoch + self.batch_in_epoch
        self.loader.load_state_dict(loader)
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]] * int(state.get("world_size", 1))
        if len(rngs) == self.dist.world_size:  # on another world size the streams cannot continue: keep fresh ones
            set_rng_state(rngs[self.dist.rank])
        self.bad_steps = {k: int(v) for k, v in state.get("bad_steps", self.bad_steps).items()}
        self.bad_samples = {int(k): str(v) for k, v in state.get("bad_samples", {}).items()}
        if self.dist.is_main:
            progress.write(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        return True

    # ------------------------------------------------------------------------------------------- fit
    def _train_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        lr, wd = self.lr_at(self.step), self.weight_decay_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if wd is not None and not group.get("lars_exclude", False):  # excluded groups keep no decay
                group["weight_decay"] = wd
        if self._norm_buffers:
            torch._foreach_copy_(self._norm_snapshot, self._norm_buffers)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss, logs = self.train_forward(views, restore=self._restore_norm_buffers)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # One all-reduce a step, so that every rank decides alike: skip this update (some rank's loss, or the
        # gradients, are not finite), stop after this step (some rank got SIGTERM/SIGINT; the largest signal number
        # wins), and whether some rank met a new bad sample in this batch (then, rarely, they exchange which).
        # Built on the device from Python scalars (kernel arguments): torch.tensor(..., device=cuda) would copy
        # from pageable host memory and wait for the whole backward first.
        flags = (~torch.isfinite(loss.detach())).any().float().repeat(4)
        flags[1].zero_()
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not self.scaler.is_enabled():  # fp16: the GradScaler checks the gradients (and skips) itself
            # max |g| per tensor is inf or NaN iff some element is: one fused pass over all gradients, and no
            # sum of squares that finite but large gradients could overflow
            flags[1].copy_((~torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))))).any())
        flags[2].fill_(float(self.stop_signals.signum or 0))
        flags[3].fill_(float(len(self.loader.bad_samples) > self._bad_samples_seen))
        nonfinite_loss, nonfinite_grad, signum, new_bad = distributed.max_across_ranks(flags)
        self._stop_signum = int(signum)
        self._skipped = "nonfinite_loss" if nonfinite_loss > 0 else "nonfinite_grad" if nonfinite_grad > 0 else ""
        self._new_bad_samples = new_bad > 0
        if self._skipped:
            # No update at all: optimizer, GradScaler, EMA/momentum untouched, and the normalization layers'
            # running statistics, which this forward changed, put back.
            self._restore_norm_buffers()
            return loss, logs
        self.method.on_before_optimizer_step(self.step)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # fp16: the GradScaler skipped the optimizer step (inf/NaN gradients) iff it lowered the scale; the
        # EMA/momentum update is skipped with it, as for a non-finite loss (not counted as a bad step: that is
        # the scaler calibrating, and it recovers by itself).
        if scale is None or self.scaler.get_scale() >= scale:
            self.method.on_step_end(self.step, self.total_steps)
        return loss, logs

    def _restore_norm_buffers(self) -> None:
        """The normalization layers' running statistics as they were before this step's forward."""
        if self._norm_buffers:
            torch._foreach_copy_(self._norm_buffers, self._norm_snapshot)

    def fit(self) -> dict:
        """Train to the end (or ``train.max_steps``), checkpointing each epoch, then the kNN evaluation; the run
        folder is held meanwhile (a second run on it is refused: RunFolderBusy)."""
        # From the start: a stop signal that comes during the setup (SLURM's time-limit warning included, whose
        # default action would kill the process) stops the run after its first step.
        self.stop_signals.install()
        try:
            check_dataset(self.cfg, self.dist.world_size)  # before the loader reads an image or the folder exists
            wait = self.cfg.slurm.lock_wait_s if slurm_job.is_requeue() else 0.0  # the old job may be exiting
            try:
                self.run_lock = hold_run_folder(self.out_dir, is_main=self.dist.is_main, wait_s=wait,
                                                agree=distributed.broadcast_from_main, say=progress.write)
            except RunFolderBusy as e:
                raise self._fail_together(e) from None
            return self._fit()
        finally:
            if not self.stop_signals.finished:
                self.stop_signals.restore()
            if self.run_lock is not None:
                self.run_lock.release()

    def _fit(self) -> dict:
        found = self._find_checkpoint()
        self._setup()
        resumed = self._resume(found)
        cfg, main = self.cfg, self.dist.is_main
        if resumed and main:  # rows the lost steps wrote after this checkpoint are written again from here
            trim_metrics(self.out_dir / "metrics.jsonl", self.resumed_step)
            self.checkpoints.warn_if_next_will_not_fit()
        results: dict = {}
        if cfg.eval.knn and cfg.eval.knn_init:
            # The same seed rebuilds the exact initial weights, so this baseline holds after a resume too; the
            # run's RNG streams (restored by a resume) are put back afterwards.
            rng = rng_state()
            torch.manual_seed(cfg.train.seed)
            results["knn_top1_init"] = self.knn_eval(build_model(cfg).to(self.device).backbone)
            set_rng_state(rng)
        metrics = open(self.out_dir / "metrics.jsonl", "a") if main else None
        tb = _tensorboard(self.out_dir / "tb") if main else None
        wb = open_wandb(cfg, self.out_dir) if main else None
        data_wait = DataWaitMonitor(self.loader, self.device.type)
        bar = progress.progress_bar(total=self.stop_step, initial=self.step, disable=not (main and cfg.train.progress),
                                    unit="step", dynamic_ncols=True, desc=f"{cfg.method.name}")
        global_batch = cfg.train.batch_size
        window = {"n": 0, "time": 0.0, "wait": 0.0}
        loss = None
        self.method.on_train_start(self.steps_per_epoch, self.total_steps)
        try:
            while self.step < self.stop_step and not self._stop_signum:
                if self.batch_in_epoch == 0:
                    self.loader.set_epoch(self.epoch)
                self.method.on_epoch_start(self.epoch)
                t_prev = time.perf_counter()
                for batch in self.loader:
                    t_data = time.perf_counter()
                    if self.probe is not None:
                        self.probe.arm(self.step)
                    loss, logs = self._train_step(batch.views)
                    if self.probe is not None:  # every rank agrees on _skipped (an all-reduced flag)
                        self.probe.discard() if self._skipped else self.probe.update(batch.labels)
                    self.step += 1
                    self.batch_in_epoch += 1
                    self._count_bad_step(metrics)
                    self._count_bad_samples(metrics)
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
                        if self.probe is not None:
                            row.update(self.probe.log_window())
                        if main:
                            advice = data_wait.update(row["data_wait_pct"])
                            if advice is not None:
                                bar.write(f"warning: {advice}")
                            if wb is not None:
                                wb.log(row, self.step)
                            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.3g}",
                                            img_s=f"{row['img_s']:.0f}", wait=f"{row['data_wait_pct']:.0f}%")
                            metrics.write(json.dumps(row) + "\n")
                            metrics.flush()
                            for k, v in row.items():
                                if k not in ("step", "epoch"):
                                    tb.add_scalar(f"train/{k}", v, self.step)
                    if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                        self.save()
                    if self.step >= self.stop_step or self._stop_signum:
                        break
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    self.save()
                    if cfg.eval.knn_every and self.epoch % cfg.eval.knn_every == 0 and not self._stop_signum:
                        self._knn_monitor(metrics, tb, wb)
                        bar.unpause()  # the evaluation's time stays out of the bar's rate and ETA
            if self.batch_in_epoch:  # stopped mid-epoch by train.max_steps
                self.save()
            if self._stop_signum:
                self.save()
                raise self._stopped()
        finally:
            if not self.stop_signals.finished:
                self.stop_signals.restore()
            bar.close()
            if metrics is not None:
                metrics.close()
            if tb is not None:
                tb.close()
            if wb is not None:
                wb.close()
        results.update({"steps": self.step, "epochs": self.epoch,
                        "weight_digests": distributed.weight_digests(self.method)})
        results["bad_steps"] = self.bad_steps["total"]
        results["bad_samples"] = self.bad_sample_total
        if loss is not None:
            results["final_loss"] = float(loss.detach())
        if cfg.eval.knn:
            top1 = self._knn_at_step.get(self.step)
            results["knn_top1"] = top1 if top1 is not None else self.knn_eval()
            if main:
                knn = {k: v for k, v in results.items() if k.startswith("knn")}
                knn.update(k=cfg.eval.knn_k, t=cfg.eval.knn_t, step=self.step)
                atomic_write_bytes(self.out_dir / "knn.json", (json.dumps(knn, indent=2) + "\n").encode())
        return results

    def _stopped(self) -> TrainingInterrupted:
        """After a stop's checkpoint: what a SLURM job does next (rank 0 decides, every rank learns it; see
        engine/slurm_job.py), the stop's message and exit status, and the signal handlers kept to the end: a
        peer's exit makes torchrun signal this rank while it exits, and SLURM signals a job it requeues."""
        signum, main = self._stop_signum, self.dist.is_main
        resubmit = launch.resume_command() if main else ""
        outcome = slurm_job.stop_outcome(signum, self.cfg.slurm.max_requeues, resubmit) if main else None
        outcome = distributed.broadcast_from_main(outcome)
        path = self.checkpoints.path_for(self.step)
        stopped = TrainingInterrupted(signum, self.step, path, self.stop_signals, outcome.note, outcome.status)
        self.stop_signals.finish(f"fastssl/train.py: {stopped}\n" if main else "", stopped.exit_code)
        if outcome.requeue:
            distributed.wait_for_main()  # every rank knows its exit status before the requeue signals them
            done = slurm_job.requeue(outcome, signum, resubmit) if main else outcome
            if done is not outcome:  # scontrol refused: say why, and exit as a stop without a requeue
                stopped = TrainingInterrupted(signum, self.step, path, self.stop_signals, done.note, done.status)
                self.stop_signals.finish(f"fastssl/train.py: {stopped}\n", stopped.exit_code)
        return stopped

    def _knn_monitor(self, metrics, tb, wb) -> None:
        """kNN top-1 of the current backbone as a metrics row (``{"step", "epoch", "knn_top1"}``)."""
        rng = rng_state()  # eval loader workers draw their seeds from it; the run's streams must not notice
        top1 = self.knn_eval()
        set_rng_state(rng)
        self._knn_at_step[self.step] = top1
        if self.dist.is_main:
            row = {"step": self.step, "epoch": self.epoch, "knn_top1": top1}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            tb.add_scalar("eval/knn_top1", top1, self.step)
            if wb is not None:
                wb.log(row, self.step, prefix="eval")
            progress.write(f"epoch {self.epoch} step {self.step}: kNN top-1 {top1:.2f}%")

    def _count_bad_step(self, metrics) -> None:
        """After each step: a skipped one (non-finite loss or gradients) is counted, logged as a metrics row
        ``{"step", "epoch", "event": "nonfinite_loss" | "nonfinite_grad", ...}``, and ends the run after
        train.max_bad_steps in a row."""
        if not self._skipped:
            self.bad_steps["in_row"] = 0
            return
        self.bad_steps["in_row"] += 1
        self.bad_steps["total"] += 1
        in_row, limit = self.bad_steps["in_row"], self.cfg.train.max_bad_steps
        what = "the loss" if self._skipped == "nonfinite_loss" else "a gradient"
        if self.dist.is_main:
            row = {"step": self.step, "epoch": self.epoch, "event": self._skipped, "bad_steps_in_row": in_row,
                   "bad_steps_total": self.bad_steps["total"]}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            progress.write(f"warning: step {self.step}: {what} is not finite (on at least one rank); update "
                           f"skipped ({in_row} in a row, {self.bad_steps['total']} in all; "
                           f"train.max_bad_steps={limit})")
        if in_row >= limit:
            raise TrainingDiverged(
                f"stopped at step {self.step}: the loss or the gradients were not finite for {in_row} steps in a row "
                f"(train.max_bad_steps={limit}); those updates were skipped, so the weights are still those of step "
                f"{self.step - in_row}, and no checkpoint was written. The newest one is {self.checkpoints.last}. "
                f"Look for NaN/inf in the data, lower optim.base_lr, or try train.precision=fp32.")

    @property
    def bad_sample_total(self) -> int:
        return len(self.bad_samples)

    def _count_bad_samples(self, metrics) -> None:
        """After a step whose batch, on some rank, held a bad sample not met before (a flag of the step's
        all-reduce, so every rank comes here together): the ranks exchange their new ones, rank 0 warns once
        per sample (naming its shard) and logs a metrics row ``{"step", "epoch", "event": "bad_samples",
        "new", "bad_samples_total", "samples"}``, and past data.max_bad_samples the run stops on every rank."""
        if not self._new_bad_samples:
            return
        found = list(self.loader.bad_samples.items())
        mine, self._bad_samples_seen = found[self._bad_samples_seen:], len(found)
        fresh = {}  # met again after a resume: known from the checkpoint, neither counted nor reported twice
        for rank_new in distributed.all_gather_objects(mine):
            fresh.update((k, msg) for k, msg in rank_new if k not in self.bad_samples)
        if not fresh:
            return
        self.bad_samples.update(fresh)
        new = list(fresh.values())
        limit = self.cfg.data.max_bad_samples
        if self.dist.is_main:
            row = {"step": self.step, "epoch": self.epoch, "event": "bad_samples", "new": len(new),
                   "bad_samples_total": self.bad_sample_total, "samples": new}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            for msg in new:
                progress.write(f"warning: step {self.step}: skipped a bad sample, replaced in its batch by the next "
                               f"one: {msg} ({self.bad_sample_total} so far; data.max_bad_samples={limit})")
        if self.bad_sample_total > limit:
            raise TooManyBadSamples(
                f"stopped at step {self.step}: bad samples (that do not decode) in {self.cfg.data.path}: "
                f"{self.bad_sample_total}, more than data.max_bad_samples={limit} (each was skipped; the last: "
                f"{new[-1]}). The data is damaged: reconvert it with fastssl-convert (and check the disk), or raise "
                f"data.max_bad_samples. The newest checkpoint, if any: {self.checkpoints.last}.")

    def _log_row(self, logs: dict, window: dict, global_batch: int) -> dict:
        row = {"step": self.step, "epoch": self.epoch, "lr": self.lr_at(self.step - 1)}
        row.update({k: float(v) for k, v in logs.items()})
        row["img_s"] = window["n"] * global_batch / max(window["time"], 1e-9)
        row["data_wait_pct"] = 100.0 * window["wait"] / max(window["time"], 1e-9)
        row.update(self.train_forward.log_row())
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
                    num_workers=cfg.data.num_workers, cache=cfg.data.cache, decode=cfg.data.decode, shuffle=False,
                    drop_last=False, progress=self.dist.is_main and cfg.train.progress, skip_bad_samples=True,
                )
                for split in ("train", "val")
            }
        return self._eval_loader_cache

    @torch.no_grad()
    def knn_eval(self, backbone: nn.Module | None = None) -> float:
        """Weighted kNN top-1 (%) of the frozen backbone: train split as the bank, val split as queries.

        Runs on rank 0 over the whole dataset; the other ranks wait (``distributed.wait_for_main``: not in an
        NCCL collective, which would time out on a large dataset). ``backbone`` defaults to the trained one.
        """
        backbone = backbone if backbone is not None else self.method.backbone
        top1 = float("nan")
        if self.dist.is_main:
            with _all_local_cores(self.device, self.dist.world_size):
                top1 = self._knn_top1(backbone)
        distributed.wait_for_main()
        return top1

    def _knn_top1(self, backbone: nn.Module) -> float:
        cfg = self.cfg
        manifest = load_manifest(cfg.data.path)
        feats = {}
        for split, loader in self._eval_loaders().items():
            seen = len(loader.bad_samples)
            feats[split] = extract_features(backbone, _limit(loader, cfg.eval.knn_max_train)
                                            if split == "train" else loader, cfg.train.precision)
            for msg in list(loader.bad_samples.values())[seen:]:  # once each: the loaders live for the run
                progress.write(f"warning: kNN evaluation: skipped a bad sample, replaced by the next one: {msg}")
        return knn_top1(*feats["train"], *feats["val"], k=cfg.eval.knn_k, temperature=cfg.eval.knn_t,
                        num_classes=len(manifest["classes"]))


@contextlib.contextmanager
def _all_local_cores(device: torch.device, world_size: int):
    """Rank 0 works alone (the kNN evaluation) while the other ranks of this host wait: on a CPU it borrows their
    intra-op threads meanwhile (LOCAL_WORLD_SIZE x its own), and gives them back after."""
    local = min(world_size, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    before = torch.get_num_threads()
    if device.type == "cpu" and local > 1:
        torch.set_num_threads(before * local)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_dataset(cfg: DictConfig, world_size: int = 1) -> None:
    """The start-of-run checks against the converted dataset, from its manifest alone (no image is read): a run
    the data cannot serve stops before the RAM cache fills, the run folder exists or a step runs. Raises
    DatasetFormatError (a missing or broken dataset, naming the file) or ConfigError (naming the key)."""
    path = cfg.data.path
    manifest = load_manifest(path)
    shard_paths(path, "train", manifest)  # the split and its shard files exist
    per_rank_batch = cfg.train.batch_size // world_size
    plan = pipelines.Loader(shard_counts(manifest, "train"), build_spec(cfg), 1, world_size=world_size)
    if per_rank_batch > plan.samples_per_epoch:
        per_rank = plan.samples_per_epoch
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size}: must be <= {per_rank * world_size} here: the train split of "
            f"{path} gives each of the {world_size} rank(s) {per_rank} images per epoch, not one batch")
    # The kNN evaluation takes its queries from the val split; without one, the run would train to the end and
    # only then fail.
    wanted = [k for k, on in (("eval.knn=true", cfg.eval.knn), (f"eval.knn_every={cfg.eval.knn_every}",
                                                                 cfg.eval.knn_every > 0)) if on]
    val = manifest["splits"].get("val")
    if wanted and (val is None or int(val.get("count", 0)) == 0):
        off = "eval.knn=false" + (" eval.knn_every=0" if cfg.eval.knn_every > 0 else "")
        raise ConfigError(
            f"{' and '.join(wanted)}: {path} has no val split for the kNN evaluation's queries (its splits: "
            f"{', '.join(sorted(manifest['splits']))}); train without it ({off}), or convert the dataset with a val "
            f"split (SRC/train/<class>/ and SRC/val/<class>/ folders)")
    if wanted:
        shard_paths(path, "val", manifest)


def _no_forward_buffer_sync() -> dict:
    """DDP's option to stop sending rank 0's buffers at every forward (MoCo v2's 32 MiB queue, SwAV's queue,
    DINO's centre, every BatchNorm statistic): ``forward_sync_buffers=False`` where this torch has it (buffers
    still synced once at construction), else the older ``broadcast_buffers=False`` (deprecated in recent torch;
    the buffers start equal anyway: same seed on every rank, or the same checkpoint). The methods keep their
    buffers equal on every rank by construction (gathered keys, all-reduced centre), SyncBatchNorm the
    statistics on GPUs; where BatchNorm stays per rank (CPU, MoCo v2's Shuffle-BN), checkpoints hold rank 0's."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def trim_metrics(path: Path, last_step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` after ``last_step`` (and a line torn by a kill), atomically; returns
    how many lines went. After a resume from step s, the steps after s run again and write their rows again:
    without this the file would hold two rows for each of them."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # torn by the kill: the step it describes runs again
            continue
        if not line.endswith("\n") or int(row.get("step", 0)) > last_step:
            continue
        kept.append(line)
    if len(kept) != len(lines):
        atomic_write_bytes(path, "".join(kept).encode())
    return len(lines) - len(kept)


class TrainingInterrupted(Exception):
    """SIGTERM, SIGINT or SIGUSR1: every rank finished the same step and its checkpoint is written. ``note``: what
    happens next (a SLURM job's requeue), instead of the resume hint; ``status``: the exit status, when not
    128 + the signal number."""

    def __init__(self, signum: int, step: int, path: Path, signals: distributed.StopSignals | None = None,
                 note: str = "", status: int | None = None):
        self.signum, self.step, self.path, self.signals, self.status = signum, step, path, signals, status
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        hint = note or (f"To resume, run the same command again (resume=auto, the default, takes the newest valid "
                        f"checkpoint in out_dir), or pass resume={path}")
        super().__init__(f"stopped by {name} after step {step}; checkpoint {path}. {hint}")

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention for "ended by this signal" (0 for a requeued job)."""
        return 128 + self.signum if self.status is None else self.status


class TrainingDiverged(RuntimeError):
    """The loss or the gradients were not finite for train.max_bad_steps steps in a row."""


class TooManyBadSamples(DatasetFormatError):
    """More than data.max_bad_samples samples did not decode (each was skipped): the data is damaged."""


def _norm_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The running statistics of every normalization layer: the state a training forward pass changes."""
    from torch.nn.modules.batchnorm import _NormBase

    return [b for m in module.modules() if isinstance(m, _NormBase) for b in m.buffers(recurse=False)]


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


__all__ = [
    "Trainer", "TooManyBadSamples", "TrainingDiverged", "TrainingInterrupted", "run", "build_spec", "build_model",
    "check_dataset",
]
