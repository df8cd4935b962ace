"""Seeing a run learn: the online linear probe, the kNN monitor during training, the data-wait advice and the
optional W&B sink."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastssl.config import ConfigError, load_config
from fastssl.engine.checkpoint import load_checkpoint
from fastssl.engine.monitor import DataWaitMonitor, data_wait_warning
from fastssl.engine.probes import OnlineLinearProbe
from fastssl.engine.trainer import Trainer, build_model, build_spec
from fastssl.methods import METHODS


# ------------------------------------------------------------------------------------------------ the probe
def _clusters(n: int, centres: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    classes, dim = centres.shape
    labels = torch.randint(0, classes, (n,), generator=gen)
    return centres[labels] + 0.5 * torch.randn(n, dim, generator=gen), labels


def test_probe_trains_on_detached_features_and_leaves_backbone_gradients_alone():
    torch.manual_seed(0)
    backbone = nn.Linear(8, 6)
    probe = OnlineLinearProbe(backbone, 6, 3, lr=0.1)
    x, labels = torch.randn(16, 8), torch.randint(0, 3, (16,))
    probe.arm(0)
    ssl_loss = backbone(x).pow(2).mean()  # stands in for the method's loss
    ssl_loss.backward()
    grads = [p.grad.clone() for p in backbone.parameters()]
    weights = [p.detach().clone() for p in backbone.parameters()]
    probe.update(labels)
    for p, g, w in zip(backbone.parameters(), grads, weights, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)  # the probe's backward never reached the backbone
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=0)
    assert probe.head[1].weight.abs().sum() > 0  # the probe itself moved
    row = probe.log_window()
    assert row["probe_loss"] == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-5)  # zero init: uniform
    assert 0.0 <= row["probe_top1"] <= 100.0
    assert probe.log_window() == {}  # a new, empty window


def test_probe_learns_separable_features_and_counts_only_probe_steps():
    gen = torch.Generator().manual_seed(0)
    backbone = nn.Identity()
    probe = OnlineLinearProbe(backbone, 16, 4, lr=0.05, every=2)
    centres = 3 * torch.randn(4, 16, generator=gen)
    rows = []
    for step in range(200):
        x, labels = _clusters(32, centres, gen)
        probe.arm(step)
        backbone(x)
        probe.update(labels)
        if step % 50 == 49:
            assert probe._sums[2].item() == 25 * 32  # every=2: 25 of the window's 50 steps, 32 images each
            rows.append(probe.log_window())
    assert rows[-1]["probe_top1"] > 95.0 and rows[-1]["probe_loss"] < rows[0]["probe_loss"]


def test_probe_uses_the_first_rows_of_the_first_backbone_call_only():
    backbone = nn.Identity()
    probe = OnlineLinearProbe(backbone, 4, 2)
    view0, view1 = torch.zeros(4, 4), torch.ones(4, 4)
    probe.arm(0)
    backbone(torch.cat([view0, view1]))
    backbone(torch.full((4, 4), 7.0))  # a later call (e.g. a local-view resolution) is not kept
    assert torch.equal(probe._feats[:4], view0)


def test_probe_turns_itself_off_with_a_warning_when_the_backbone_is_not_called():
    probe = OnlineLinearProbe(nn.Identity(), 4, 2)
    probe.arm(0)
    with pytest.warns(UserWarning, match="no backbone call"):
        probe.update(torch.tensor([0, 1]))
    assert not probe.enabled
    probe.arm(1)
    probe.update(torch.tensor([0, 1]))  # silent from now on


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_its_online_backbone_first_on_view_0(name):
    # The probe's contract with the methods: the first rows of the online backbone's first output in a step
    # are the first global view's features. Eval mode makes BatchNorm per-sample, so rows can be compared.
    cfg = load_config(f"{name}_resnet18_fmnist", ["model.width=4"])
    torch.manual_seed(0)
    method = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, v.size, v.size, generator=gen) for v in build_spec(cfg).views]
    first = []
    hook = method.backbone.register_forward_hook(lambda m, i, o: first.append(o.detach()) if not first else None)
    with torch.no_grad():
        method(views)
        hook.remove()
        alone = method.backbone(views[0])
    torch.testing.assert_close(first[0][:4], alone, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ data-wait advice
FACTS = {"backend": "torch", "num_workers": 1, "ram_cache": False, "cpus": 8}


def test_data_wait_warning_needs_the_median_of_n_windows_above_the_threshold():
    assert data_wait_warning([50.0] * 4, device_type="cpu", windows=5, **FACTS) is None  # too few windows yet
    assert data_wait_warning([90.0] + [3.0] * 4, device_type="cpu", windows=5, **FACTS) is None  # start-up spike
    assert data_wait_warning([9.0] * 5, device_type="cpu", windows=5, **FACTS) is None
    message = data_wait_warning([3.0, 30.0, 40.0, 25.0, 35.0], device_type="cpu", windows=5, **FACTS)
    assert message is not None and "30%" in message
    assert "data.num_workers=7 (now 1; 8 cores here)" in message and "data.cache=ram" in message
    assert "data.backend=ffcv" in message and "dali" not in message  # no GPU here: no GPU decode advice


def test_data_wait_advice_follows_the_running_loader():
    on_gpu = data_wait_warning([20.0] * 3, device_type="cuda", windows=3, **FACTS)
    assert "data.backend=dali" in on_gpu and "data.decode=device" in on_gpu
    decoding_on_gpu = data_wait_warning([20.0] * 3, device_type="cuda", windows=3,
                                        **{**FACTS, "device_decode": True})
    assert "data.decode=device" not in decoding_on_gpu and "data.cache=ram" not in decoding_on_gpu
    assert "data.backend=dali" in decoding_on_gpu
    cached = data_wait_warning([20.0] * 3, device_type="cpu", windows=3,
                               **{**FACTS, "ram_cache": True, "num_workers": 0})
    assert "data.cache=ram" not in cached and "num_workers" not in cached  # the RAM cache uses no workers
    dali = data_wait_warning([20.0] * 3, device_type="cuda", windows=3,
                             **{**FACTS, "backend": "dali", "num_workers": 7})
    assert "data.backend=dali" not in dali and "num_workers" not in dali and "ffcv" in dali


def test_data_wait_monitor_warns_at_most_once_per_n_windows():
    class FakeLoader:  # what the monitor reads off a torch-backend loader
        num_workers, mode = 2, "workers"

    FakeLoader.__module__ = "pipelines.torch_loader"
    monitor = DataWaitMonitor(FakeLoader(), "cpu", windows=4)
    assert monitor.facts["backend"] == "torch" and monitor.facts["num_workers"] == 2
    warned = [monitor.update(50.0) is not None for _ in range(12)]
    assert warned == [False, False, False, True] * 3
    assert not any(monitor.update(1.0) for _ in range(10))


# ----------------------------------------------------------------------------------------------- the trainer
def _overrides(data: Path, out: Path, **extra) -> list[str]:
    base = {
        "data.path": data, "data.num_workers": 0, "model.width": 4, "method.proj_hidden": 32,
        "method.proj_dim": 16, "method.pred_hidden": 32, "train.batch_size": 16, "train.epochs": 2,
        "train.log_every": 1, "train.progress": False, "train.threads": 1, "eval.batch_size": 64,
        "eval.knn_every": 1, "out_dir": out,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _fit(data: Path, out: Path, **extra) -> dict:
    return Trainer(load_config("byol_resnet18_fmnist", _overrides(data, out, **extra))).fit()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_logs_probe_and_knn_monitor_and_resumes_the_probe(tiny_gray_dataset, tmp_path):
    steps_per_epoch = 96 // 16
    full = tmp_path / "full"
    results = _fit(tiny_gray_dataset, full)
    rows = _rows(full)
    train_rows = [r for r in rows if "loss" in r]
    knn_rows = [r for r in rows if "knn_top1" in r]
    assert all(0 <= r["probe_top1"] <= 100 and r["probe_loss"] > 0 for r in train_rows)
    assert [(r["step"], r["epoch"]) for r in knn_rows] == [(steps_per_epoch, 1), (2 * steps_per_epoch, 2)]
    # The monitor at the last epoch is the final evaluation: computed once, reported in both places.
    assert knn_rows[-1]["knn_top1"] == pytest.approx(results["knn_top1"])
    assert json.loads((full / "knn.json").read_text())["knn_top1"] == pytest.approx(results["knn_top1"])
    assert list((full / "tb").glob("events.out.tfevents.*"))
    probe_full = load_checkpoint(full / "checkpoints" / "last.pt")["probe"]
    assert probe_full["head"]["1.weight"].shape == (10, 32)

    part = tmp_path / "part"
    _fit(tiny_gray_dataset, part, **{"train.max_steps": steps_per_epoch})
    _fit(tiny_gray_dataset, part)
    state = load_checkpoint(part / "checkpoints" / "last.pt")
    for key, value in probe_full["head"].items():
        torch.testing.assert_close(state["probe"]["head"][key], value, msg=key)
    torch.testing.assert_close(state["probe"]["optimizer"]["state"], probe_full["optimizer"]["state"])
    part_rows = _rows(part)
    assert [r.get("probe_top1") for r in part_rows] == pytest.approx([r.get("probe_top1") for r in rows])


def test_probe_off_and_bad_probe_settings(tiny_gray_dataset, tmp_path):
    out = tmp_path / "off"
    _fit(tiny_gray_dataset, out, **{"eval.probe": "false", "eval.knn": "false", "eval.knn_every": 0,
                                    "train.max_steps": 2})
    assert not any("probe_top1" in r or "knn_top1" in r for r in _rows(out))
    assert load_checkpoint(out / "checkpoints" / "last.pt")["probe"] is None
    with pytest.raises(ConfigError, match="eval.probe_every"):
        load_config("byol_resnet18_fmnist", ["eval.probe_every=0"])
    with pytest.raises(ConfigError, match="eval.knn_every"):
        load_config("byol_resnet18_fmnist", ["eval.knn_every=-1"])


def test_wandb_sink_logs_rows_and_continues_the_same_run_after_resume(tiny_gray_dataset, tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "wb"
    extra = {"eval.wandb": "true", "eval.knn": "false", "eval.knn_every": 0}
    _fit(tiny_gray_dataset, out, **extra, **{"train.max_steps": 2})
    _fit(tiny_gray_dataset, out, **extra, **{"train.max_steps": 3})
    assert len(calls["init"]) == 2 and calls["init"][0]["id"] == calls["init"][1]["id"]
    assert calls["init"][0]["resume"] == "allow" and calls["finish"] == 2
    assert [s for s, _ in calls["log"]] == [1, 2, 3]
    assert {"train/loss", "train/lr", "train/probe_top1"} <= set(calls["log"][0][1])


def test_probe_features_are_float_and_nan_steps_stay_out():
    backbone = nn.Identity()
    probe = OnlineLinearProbe(backbone, 4, 2, lr=0.1)
    probe.arm(0)
    backbone(torch.tensor([[float("nan"), 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16))
    probe.update(torch.tensor([0, 1]))
    assert all(torch.isfinite(p).all() for p in probe.head.parameters())
    logits = probe.head(F.normalize(torch.randn(3, 4), dim=1))
    assert logits.dtype == torch.float32
