"""Taking a backbone out: fastssl-export into torchvision (strict=True) and safetensors, and the offline
fastssl-knn / fastssl-linear evaluations on the tiny fixture datasets."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from fastssl.config import load_config
from fastssl.engine.checkpoint import load_checkpoint, save_checkpoint
from fastssl.engine.trainer import Trainer, build_model
from fastssl.eval import export, knn, linear
from fastssl.eval.linear import train_linear
from fastssl.eval.weights import ExportError, load_backbone

ROOT = Path(__file__).resolve().parents[1]
HEADS = ["method.proj_hidden=32", "method.proj_dim=16", "method.pred_hidden=32"]


def _method_checkpoint(path: Path, backbone: str, width: int = 64, small_images: bool = False,
                       method: str = "byol", heads: list[str] = HEADS) -> nn.Module:
    """A method built from a recipe and saved the way the trainer saves it; its BatchNorm statistics are
    scrambled so the export must carry buffers, not just parameters."""
    cfg = load_config(f"{method}_resnet18_fmnist", [f"model.backbone={backbone}", f"model.width={width}",
                                                    f"model.small_images={small_images}", *heads])
    torch.manual_seed(0)
    model = build_model(cfg).to(memory_format=torch.channels_last)  # as trained: channels-last weights
    gen = torch.Generator().manual_seed(1)
    for m in model.backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=gen))
            m.num_batches_tracked.fill_(5)
    save_checkpoint({"model": model.state_dict(), "config": OmegaConf.to_container(cfg), "step": 7, "epoch": 1},
                    path)
    return model


@pytest.mark.parametrize(("name", "method"), [("resnet18", "byol"), ("resnet50", "simclr")])
def test_export_loads_into_torchvision_resnet_with_strict_true(tmp_path, capsys, name, method):
    ckpt = tmp_path / "last.pt"
    model = _method_checkpoint(ckpt, name, method=method, heads=HEADS if method == "byol" else HEADS[:2])
    out = tmp_path / "export"
    assert export.main([str(ckpt), str(out)]) == 0
    assert "m.fc = torch.nn.Identity()" in capsys.readouterr().out
    state = torch.load(out / "backbone.pth", weights_only=True)
    assert all(t.is_contiguous() for t in state.values())

    # strict=True over every trunk parameter and buffer (BN running stats, num_batches_tracked); SSL trains no fc.
    tv = getattr(torchvision.models, name)()
    tv.fc = nn.Identity()
    tv.load_state_dict(state, strict=True)
    # A stock torchvision model misses exactly its classifier and finds nothing unexpected.
    missing, unexpected = getattr(torchvision.models, name)().load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), model.backbone.eval()(x), rtol=1e-4, atol=1e-4)
    safe = load_file(out / "backbone.safetensors")
    assert safe.keys() == state.keys() and all(torch.equal(safe[k], state[k]) for k in state)
    meta = json.loads((out / "export.json").read_text())
    assert meta["torchvision"] == name and meta["step"] == 7 and meta["feat_dim"] == model.backbone.feat_dim
    assert meta["files"] == ["backbone.safetensors", "backbone.pth"]


def test_momentum_branch_and_small_image_stem_export(tmp_path, capsys):
    ckpt = tmp_path / "last.pt"
    model = _method_checkpoint(ckpt, "resnet18", small_images=True)
    with torch.no_grad():
        model.target_backbone.conv1.weight.mul_(2)  # the EMA copy differs from the online backbone
    save_checkpoint({**load_checkpoint(ckpt), "model": model.state_dict()}, ckpt)
    out = tmp_path / "target"
    assert export.main([str(ckpt), str(out), "--branch", "momentum"]) == 0
    note = capsys.readouterr().out
    assert "m.maxpool = torch.nn.Identity()" in note
    tv = torchvision.models.resnet18()
    tv.fc, tv.maxpool = nn.Identity(), nn.Identity()
    tv.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    tv.load_state_dict(torch.load(out / "backbone.pth", weights_only=True), strict=True)
    torch.testing.assert_close(tv.conv1.weight, model.target_backbone.conv1.weight)
    # An export holds one branch: asking it for the other is an error, not the exported branch in disguise.
    for path in (out, out / "backbone.safetensors", out / "backbone.pth"):
        assert load_backbone(path, "momentum")[1]["branch"] == load_backbone(path)[1]["branch"] == "momentum"
        with pytest.raises(ExportError, match="an export of the momentum branch; --branch online needs the training"):
            load_backbone(path, "online")


def test_vit_exports_as_safetensors_only_and_loads_back(tmp_path, capsys):
    ckpt = tmp_path / "vit.pt"
    model = _method_checkpoint(ckpt, "vit_tiny")
    out = tmp_path / "vit"
    assert export.main([str(ckpt), str(out)]) == 0
    assert "no torchvision-compatible .pth" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["backbone.safetensors", "export.json"]
    backbone, meta = load_backbone(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model.backbone.eval()(x))
    assert meta["backbone"] == "vit_tiny" and meta["torchvision"] is None
    assert export.main([str(ckpt), str(tmp_path / "vit_pth"), "--formats", "pth"]) == 2
    assert "ResNets; export this backbone as safetensors only" in capsys.readouterr().err


def test_export_and_eval_errors_name_the_file(tmp_path, capsys, tiny_gray_dataset):
    missing = tmp_path / "nope.pt"
    assert export.main([str(missing), str(tmp_path / "o")]) == 2
    assert f"{missing}: no such checkpoint" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 not a checkpoint at all" * 10)
    assert export.main([str(corrupt), str(tmp_path / "o")]) == 2
    assert "cannot be read as a fastssl checkpoint" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pt"
    save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, foreign)
    assert export.main([str(foreign), str(tmp_path / "o")]) == 2
    assert "not a fastssl training checkpoint" in capsys.readouterr().err
    simclr = tmp_path / "simclr.pt"
    _method_checkpoint(simclr, "resnet18", width=4, method="simclr", heads=HEADS[:2])
    assert export.main([str(simclr), str(tmp_path / "o"), "--branch", "momentum"]) == 2
    assert "keeps no momentum copy" in capsys.readouterr().err
    bad_safe = tmp_path / "bad" / "backbone.safetensors"
    bad_safe.parent.mkdir()
    bad_safe.write_bytes(b"garbage")
    for cli in (knn, linear):
        assert cli.main([str(bad_safe), "--data", str(tiny_gray_dataset)]) == 2
        assert "cannot be read as safetensors" in capsys.readouterr().err
        assert cli.main([str(missing), "--data", str(tiny_gray_dataset)]) == 2
        assert "no such checkpoint or export" in capsys.readouterr().err
    assert knn.main([str(simclr), "--data", str(tmp_path / "no-data")]) == 2
    assert "no such dataset folder" in capsys.readouterr().err


def test_tiny_run_exports_and_offline_evaluations_reproduce_its_knn(tiny_gray_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = {"data.path": tiny_gray_dataset, "data.num_workers": 0, "model.width": 4, "method.proj_hidden": 32,
                 "method.proj_dim": 16, "method.pred_hidden": 32, "train.batch_size": 16, "train.epochs": 1,
                 "train.progress": False, "train.threads": 1, "eval.batch_size": 64, "out_dir": run}
    Trainer(load_config("byol_resnet18_fmnist", [f"{k}={v}" for k, v in overrides.items()])).fit()
    run_knn = json.loads((run / "knn.json").read_text())["knn_top1"]
    ckpt = run / "checkpoints" / "last.pt"
    out = tmp_path / "export"
    assert export.main([str(ckpt), str(out)]) == 0
    assert "torchvision's constructor has no stem width" in capsys.readouterr().out

    common = ["--data", str(tiny_gray_dataset), "--batch-size", "64", "--num-workers", "0", "--no-progress"]
    for source, result in ((ckpt, run / "checkpoints" / "last.knn.json"), (out, out / "knn.json"),
                           (out / "backbone.pth", out / "backbone.knn.json")):
        assert knn.main([str(source), *common]) == 0
        written = json.loads(result.read_text())
        # Same view, k, T and precision (the run's bf16) as the run's own monitor: the same figure.
        assert written["knn_top1"] == pytest.approx(run_knn) and written["bank"] == 96 and written["queries"] == 32
        assert f"kNN top-1 {run_knn:.2f}%" in capsys.readouterr().out
    assert knn.main([str(out), *common, "--k", "1", "--temperature", "0.5", "--precision", "fp32",
                     "--out", str(tmp_path / "k1.json")]) == 0
    k1 = json.loads((tmp_path / "k1.json").read_text())
    assert k1["k"] == 1 and k1["t"] == 0.5 and k1["precision"] == "fp32" and 0 <= k1["knn_top1"] <= 100

    assert linear.main([str(out), *common, "--epochs", "3", "--out", str(tmp_path / "lin.json")]) == 0
    lin = json.loads((tmp_path / "lin.json").read_text())
    assert 0 <= lin["top1"] <= 100 and lin["epochs"] == 3 and lin["train_images"] == 96 and lin["val_images"] == 32
    assert f"linear top-1 {lin['top1']:.2f}%" in capsys.readouterr().out
    assert knn.main([str(ckpt), *common, "--branch", "momentum", "--out", str(tmp_path / "t.json")]) == 0


def test_linear_classifier_separates_clusters_and_uses_standardized_features():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=gen)
    labels = torch.arange(3).repeat(40)
    # Huge, shifted feature scale: the standardization inside the classifier makes it irrelevant.
    make = lambda: 1e3 + 1e3 * (centres[labels] + 0.1 * torch.randn(120, 8, generator=gen))
    result = train_linear((make(), labels), (make(), labels), 3, epochs=20, lr=1e-2, batch_size=32, progress=False)
    assert result["top1"] == 100.0 and result["train_top1"] > 95.0


def test_console_scripts_point_at_callables():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("fastssl-export", "fastssl-knn", "fastssl-linear"):
        module, func = scripts[name].split(":")
        assert callable(getattr(importlib.import_module(module), func))
