"""The training entry point end to end on CPU: run folder, resume, and 2-rank DDP over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastssl.config import load_config
from fastssl.engine.checkpoint import load_checkpoint
from fastssl.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _overrides(data: Path, out: Path, **extra) -> list[str]:
    base = {
        "data.path": data, "data.num_workers": 0, "model.width": 4, "method.proj_hidden": 32,
        "method.proj_dim": 16, "method.pred_hidden": 32, "train.batch_size": 16, "train.epochs": 2,
        "train.log_every": 1, "train.progress": False, "train.threads": 1, "eval.batch_size": 64, "out_dir": out,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _fit(data: Path, out: Path, **extra) -> dict:
    cfg = load_config("byol_resnet18_fmnist", _overrides(data, out, **extra))
    return Trainer(cfg).fit()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_writes_the_run_folder(tiny_gray_dataset, tmp_path, capfd):
    out = tmp_path / "run"
    results = _fit(tiny_gray_dataset, out, **{"eval.knn_init": "true"})
    # train.progress=false silences every bar, the loaders' RAM-cache fills included (train and kNN splits)
    assert "into RAM" not in capfd.readouterr().err
    assert (out / "config.yaml").is_file()
    assert load_config(str(out / "config.yaml")).train.batch_size == 16
    rows = _metrics(out)
    steps_per_epoch = 96 // 16
    assert [r["step"] for r in rows] == list(range(1, 2 * steps_per_epoch + 1))
    assert all(r["img_s"] > 0 and 0 <= r["data_wait_pct"] <= 100 and r["loss"] == r["loss"] for r in rows)
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 * steps_per_epoch and ckpt["epoch"] == 2
    knn = json.loads((out / "knn.json").read_text())
    assert 0.0 <= knn["knn_top1"] <= 100.0 and knn["k"] == 20
    assert knn["knn_top1"] == pytest.approx(results["knn_top1"])
    assert "knn_top1_init" in knn


def test_resumed_run_continues_with_same_step_count_and_lr(tiny_gray_dataset, tmp_path):
    steps_per_epoch = 96 // 16
    full = tmp_path / "full"
    _fit(tiny_gray_dataset, full, **{"eval.knn": "false"})
    part = tmp_path / "part"
    first = _fit(tiny_gray_dataset, part, **{"eval.knn": "false", "train.max_steps": steps_per_epoch})
    assert first["steps"] == steps_per_epoch  # stopped at the epoch checkpoint
    second = _fit(tiny_gray_dataset, part, **{"eval.knn": "false"})
    assert second["steps"] == 2 * steps_per_epoch
    full_rows, part_rows = _metrics(full), _metrics(part)
    assert [r["step"] for r in part_rows] == [r["step"] for r in full_rows]
    for a, b in zip(full_rows, part_rows, strict=True):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["tau"] == pytest.approx(b["tau"], rel=1e-12)
    # Same data order, crops and RNG after the resume: the weights match the uninterrupted run.
    wa = load_checkpoint(full / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(part / "checkpoints" / "last.pt")["model"]
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], msg=name)


def test_torchrun_two_ranks_gloo_finish_with_identical_weights(tiny_gray_dataset, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "fastssl" / "train.py"), "--config", "byol_resnet18_fmnist",
           *_overrides(tiny_gray_dataset, out, **{"train.max_steps": 4, "eval.knn": "true"})]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["steps"] == 4
    digests = results["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # rank 0's kNN evaluation while rank 1 waits in the long-timeout gloo group (distributed.wait_for_main)
    assert 0.0 <= results["knn_top1"] <= 100.0
    # The checkpoint rank 0 wrote holds those weights, and training moved them.
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_other_precisions_train_a_few_steps(tiny_gray_dataset, tmp_path, precision):
    out = tmp_path / precision
    results = _fit(tiny_gray_dataset, out, **{"train.precision": precision, "train.max_steps": 3, "eval.knn": "false"})
    assert results["steps"] == 3 and results["final_loss"] == results["final_loss"]  # not NaN
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    if precision == "fp16":  # the GradScaler ran and its state is checkpointed
        assert state["scaler"]["scale"] > 0
    assert state["loader"] == {"epoch": 0, "batch": 3}


def test_checkpoint_write_that_fails_leaves_the_previous_file_intact(tmp_path):
    from fastssl.engine.checkpoint import save_checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"step": 1, "w": torch.arange(4.0)}, path)
    with pytest.raises(Exception):  # noqa: B017 (pickling a lambda fails inside torch.save)
        save_checkpoint({"step": 2, "bad": lambda: None}, path)
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left behind


def test_a_run_refused_for_its_data_leaves_no_run_folder(tmp_path, monkeypatch):
    from pipelines.formats import DatasetFormatError

    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetFormatError, match=rf"no_data: no such dataset folder \(relative to the current "
                                                 rf"directory {tmp_path}\).*fastssl-convert SRC no_data"):
        _fit(Path("no_data"), out)
    assert not out.exists()


def _train_only_copy(data: Path, dest: Path) -> Path:
    """The tiny dataset as an ImageFolder of class folders converts it: a train split only."""
    from pipelines.formats import load_manifest, write_manifest

    manifest = load_manifest(data)
    dest.mkdir()
    for shard in manifest["splits"]["train"]["shards"]:
        (dest / shard["name"]).symlink_to(data / shard["name"])
    write_manifest(dest, {**manifest, "splits": {"train": manifest["splits"]["train"]}})
    return dest


def test_a_dataset_without_val_split_is_refused_before_training_unless_knn_is_off(tiny_gray_dataset, tmp_path,
                                                                                   capsys):
    """The kNN evaluation's queries come from the val split: without one, the run used to train to the end and
    only then exit 2. Now it stops before the first step, naming the ways out; with eval.knn=false it trains."""
    from fastssl.train import main

    data = _train_only_copy(tiny_gray_dataset, tmp_path / "train_only")
    out = tmp_path / "run"
    args = ["--config", "byol_resnet18_fmnist", *_overrides(data, out, **{"train.max_steps": 2})]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert "eval.knn=true" in err[0] and "no val split" in err[0] and "its splits: train" in err[0], err
    assert "eval.knn=false" in err[0] and "convert the dataset with a val split" in err[0], err
    assert not out.exists()  # refused before the run folder, the RAM cache and the first step
    with pytest.raises(SystemExit) as exc:  # the kNN monitor needs it too
        main([*args, "eval.knn=false", "eval.knn_every=1"])
    assert exc.value.code == 2 and "eval.knn_every=1: " in capsys.readouterr().err
    assert main([*args, "eval.knn=false"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
