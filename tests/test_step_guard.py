"""The NaN guard of the training step: a finite loss with a non-finite gradient changes nothing and is counted and
logged like a non-finite loss (bf16, fp32); fp16 leaves the gradients to its GradScaler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastssl.config import load_config
from fastssl.engine.checkpoint import CheckpointDir, load_checkpoint
from fastssl.engine.trainer import Trainer
from fastssl.methods import METHODS
from fastssl.methods.byol import BYOL


class InfGradBYOL(BYOL):
    """BYOL whose first backbone parameter gets an inf/NaN gradient at the (1-based) steps ``bad_grad_at``, while
    the loss stays finite (a hook on the parameter, as a faulty custom op or an overflowing layer would)."""

    def __init__(self, backbone, feat_dim, proj_hidden: int = 4096, proj_dim: int = 256, pred_hidden: int = 4096,
                 base_tau: float = 0.996, bad_grad_at: str = ""):
        super().__init__(backbone, feat_dim, proj_hidden, proj_dim, pred_hidden, base_tau)
        self.bad_grad_at = {int(s) for s in str(bad_grad_at).split(",") if s.strip()}
        self.calls = 0

    def forward(self, views):
        self.calls += 1
        loss, logs = super().forward(views)
        if self.calls in self.bad_grad_at:
            weight = next(self.backbone.parameters())
            handle = None

            def poison(grad):
                handle.remove()
                out = grad.clone()
                out[0, ..., 0] = float("inf")
                out[0, ..., -1] = float("nan")
                return out

            handle = weight.register_hook(poison)
        return loss, logs


@pytest.fixture
def inf_grad_method(monkeypatch):
    monkeypatch.setitem(METHODS, "inf_grad_byol", f"{__name__}:InfGradBYOL")


def _fit(data: Path, out: Path, **extra) -> dict:
    base = {
        "data.path": data, "data.num_workers": 0, "model.width": 4, "train.batch_size": 16, "train.max_steps": 6,
        "train.log_every": 1, "train.progress": False, "train.threads": 1, "train.deterministic": True,
        "eval.knn": False, "eval.probe": False, "method.name": "inf_grad_byol", "method.proj_hidden": 32,
        "method.proj_dim": 16, "method.pred_hidden": 32, "train.checkpoint_every": 1, "train.keep_checkpoints": 10,
        "out_dir": out,
    }
    base.update(extra)
    return Trainer(load_config("byol_resnet18_fmnist", [f"{k}={v}" for k, v in base.items()])).fit()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_nonfinite_gradient_with_a_finite_loss_skips_the_update_and_is_logged(tiny_gray_dataset, tmp_path,
                                                                                inf_grad_method, precision):
    out = tmp_path / "run"
    results = _fit(tiny_gray_dataset, out, **{"method.bad_grad_at": "'3'", "train.precision": precision})
    assert results["steps"] == 6 and results["bad_steps"] == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["event"]) for r in rows if "event" in r] == [(3, "nonfinite_grad")]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)  # the loss stayed finite
    ckpt = {s: load_checkpoint(p) for s, p in CheckpointDir(out / "checkpoints").step_files()}
    assert _same(ckpt[2]["model"], ckpt[3]["model"])  # weights, EMA target, BatchNorm statistics untouched
    assert not _same(ckpt[3]["model"], ckpt[4]["model"])  # and training goes on
    assert all(torch.isfinite(t).all() for t in ckpt[6]["model"].values() if t.is_floating_point())


def test_fp16_leaves_a_nonfinite_gradient_to_the_grad_scaler(tiny_gray_dataset, tmp_path, inf_grad_method):
    out = tmp_path / "run"
    results = _fit(tiny_gray_dataset, out, **{"method.bad_grad_at": "'3'", "train.precision": "fp16"})
    assert results["bad_steps"] == 0  # the scaler's own skip, not a bad step
    ckpt = {s: load_checkpoint(p) for s, p in CheckpointDir(out / "checkpoints").step_files()}
    assert ckpt[3]["scaler"]["scale"] < ckpt[2]["scaler"]["scale"]
    assert all(torch.isfinite(t).all() for t in ckpt[6]["model"].values() if t.is_floating_point())
