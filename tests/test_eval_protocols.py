"""The evaluations papers report, end to end on tiny data: fastssl-linear --protocol paper (frozen backbone, BatchNorm
in eval mode, last epoch's top-1 / top-5 over every val image), fastssl-finetune (the labelled subset, the whole
network), resume after SIGTERM, fastssl-eval's report beside random init, and train.py eval.after under torchrun."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

import pipelines
from fastssl.config import ConfigError, load_config
from fastssl.engine.checkpoint import load_checkpoint, save_checkpoint
from fastssl.engine.trainer import build_model
from fastssl.eval import finetune, linear, report
from fastssl.eval.supervised import Classifier, Job, Protocol, run
from fastssl.eval.weights import load_backbone
from pipelines.formats import load_names

ROOT = Path(__file__).resolve().parents[1]
# Tiny settings in the run's own config, as a CPU recipe carries them: the protocols read them from the checkpoint.
EVAL = ["eval.linear.epochs=2", "eval.linear.batch_size=20", "eval.linear.base_lr=2.0",
        "eval.linear.crop_scale=[0.5,1]", "eval.linear.center_crop=1.0",
        "eval.finetune_1pct.epochs=2", "eval.finetune_1pct.batch_size=2", "eval.finetune_1pct.center_crop=1.0",
        "eval.finetune_10pct.epochs=2", "eval.finetune_10pct.batch_size=10", "eval.finetune_10pct.center_crop=1.0",
        "eval.batch_size=50"]
MODEL = ["model.width=4", "method.proj_hidden=32", "method.proj_dim=16", "method.pred_hidden=32"]


def _config(data: Path, out: Path, *extra: str):
    return load_config("byol_resnet18_fmnist", [*MODEL, *EVAL, f"data.path={data}", f"out_dir={out}",
                                                "train.precision=fp32", *extra])


@pytest.fixture(scope="module")
def run_dir(tiny_gray_named, tmp_path_factory) -> Path:
    """A run folder whose checkpoint holds a BYOL model with scrambled BatchNorm statistics (so an evaluation that
    let them move, or that started from random init, shows)."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = _config(tiny_gray_named, out)
    torch.manual_seed(5)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(1)
    for m in model.backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=gen))
    save_checkpoint({"model": model.state_dict(), "config": OmegaConf.to_container(cfg), "step": 7, "epoch": 1},
                    out / "checkpoints" / "last.pt")
    return out


def _cli(*args: str) -> list[str]:
    return [*args, "--threads", "1", "--num-workers", "0", "--no-progress"]


def _score_by_hand(model: nn.Module, data: Path, size: int, mean, std) -> tuple[float, float]:
    """Top-1 / top-5 (%) of ``model`` over every val image's centre view, in one process, fp32."""
    spec = pipelines.MultiCropSpec.preset("eval", global_size=size, mean=tuple(mean), std=tuple(std))
    hits1 = hits5 = n = 0
    model.eval()
    with torch.no_grad():
        for batch in pipelines.build_loader(data, spec, 7, split="val", backend="torch", num_workers=0):
            top = model(batch.views[0]).topk(5, dim=1).indices
            hits1 += int((top[:, 0] == batch.labels).sum())
            hits5 += int((top == batch.labels[:, None]).any(dim=1).sum())
            n += batch.labels.shape[0]
    assert n == 40
    return 100 * hits1 / n, 100 * hits5 / n


@pytest.mark.parametrize("head_bn", [False, True])
def test_paper_linear_trains_the_head_alone_and_never_moves_the_backbone(run_dir, tiny_gray_named, tmp_path,
                                                                         head_bn):
    backbone, meta = load_backbone(run_dir / "checkpoints" / "last.pt")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    section = OmegaConf.to_container(_config(tiny_gray_named, run_dir).eval.linear)
    protocol = Protocol.from_section("linear", {**section, "head_bn": head_bn})
    job = Job(data=str(tiny_gray_named), protocol=protocol, work_dir=tmp_path / "lin", image_size=32,
              mean=tuple(meta["mean"]), std=tuple(meta["std"]), precision="fp32", num_workers=0, progress=False)
    result = run(backbone, meta["feat_dim"], 10, job)
    # BatchNorm in eval mode the whole time: running statistics (and every weight) exactly as trained
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    clf = Classifier(backbone, meta["feat_dim"], 10, frozen=True, head_bn=head_bn).train()
    assert clf.training and not any(m.training for m in clf.backbone.modules())
    assert result["steps"] == 2 * 10 and result["train_images"] == 200 and result["val_images"] == 40
    rows = [json.loads(line) for line in (tmp_path / "lin" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    # The score is the last epoch's head over every val image once: recomputed by hand from the saved head.
    head = load_checkpoint(tmp_path / "lin" / "checkpoints" / "last.pt")["model"]
    # with head_bn the head's BatchNorm learned the features' statistics (its running mean moved off zero)
    assert ("0.running_mean" in head and head["0.running_mean"].abs().sum() > 0) == head_bn
    clf.head.load_state_dict(head)
    top1, top5 = _score_by_hand(clf, tiny_gray_named, 32, meta["mean"], meta["std"])
    assert (result["top1"], result["top5"]) == pytest.approx((top1, top5))
    assert top5 > top1 > 0


def test_the_linear_cli_reads_the_runs_settings_and_its_overrides(run_dir, tiny_gray_named, tmp_path, capsys):
    work = tmp_path / "w"
    rc = linear.main(_cli(str(run_dir / "checkpoints" / "last.pt"), "--data", str(tiny_gray_named), "--protocol",
                          "paper", "--epochs", "1", "--work-dir", str(work), "--precision", "fp32"))
    assert rc == 0
    out = capsys.readouterr().out
    assert "1 epochs, batch 20, SGD lr 2 (x batch/256)" in out and "from the run's config" in out
    result = json.loads((work / "result.json").read_text())
    assert result["settings"]["crop_scale"] == [0.5, 1.0] and result["epochs"] == 1 and result["steps"] == 10
    # Another checkpoint's evaluation in the same work folder is refused, not mixed.
    rc = linear.main(_cli(str(run_dir / "checkpoints" / "last.pt"), "--data", str(tiny_gray_named), "--protocol",
                          "paper", "--epochs", "2", "--work-dir", str(work)))
    assert rc == 2 and "holds an evaluation with other protocol" in capsys.readouterr().err


def test_finetune_trains_the_whole_network_on_the_written_subset(run_dir, tiny_gray_named, capsys):
    ckpt = run_dir / "checkpoints" / "last.pt"
    assert finetune.main(_cli(str(ckpt), "--data", str(tiny_gray_named), "--labels", "10%", "--precision",
                              "fp32")) == 0
    work = run_dir / "eval" / "finetune-10pct"
    result = json.loads((work / "result.json").read_text())
    assert result["train_images"] == result["labelled_images"] == 20 and result["labelled_per_class"] == [2] * 10
    assert result["settings_section"] == "finetune_10pct" and result["steps"] == 2 * 2
    listed = [line for line in (work / "labels.txt").read_text().splitlines() if not line.startswith("#")]
    names = load_names(tiny_gray_named, "train")
    assert len(listed) == 20 and set(listed) <= set(names)
    # Every weight of the backbone moved from the checkpoint's (fine-tuning, not a frozen probe).
    start, _ = load_backbone(ckpt)
    tuned = load_checkpoint(work / "checkpoints" / "last.pt")["model"]
    moved = [k for k, v in start.state_dict().items() if not torch.equal(tuned[f"backbone.{k}"], v)]
    assert "conv1.weight" in moved and "bn1.running_mean" in moved
    # The written list selects the same images again, and random init starts elsewhere.
    assert finetune.main(_cli(str(ckpt), "--data", str(tiny_gray_named), "--labels", str(work / "labels.txt"),
                              "--init", "random", "--settings", "10%", "--precision", "fp32")) == 0
    again = json.loads((run_dir / "eval" / "finetune-labels-random" / "result.json").read_text())
    assert again["source"] == "random init" and again["train_images"] == 20
    capsys.readouterr()
    bad = run_dir / "bad.txt"
    bad.write_text(f"{listed[0]}\ntrain/c3/nope.png\n")
    assert finetune.main(_cli(str(ckpt), "--data", str(tiny_gray_named), "--labels", str(bad))) == 2
    assert "1 of the 2 listed images are not in the dataset: train/c3/nope.png" in capsys.readouterr().err


def test_a_finetune_stopped_by_sigterm_resumes_to_the_uninterrupted_result(run_dir, tiny_gray_named, tmp_path):
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FASTSSL_PROGRESS": "log"}

    def command(work: Path) -> list[str]:
        return [sys.executable, "-m", "fastssl.eval.finetune", *_cli(ckpt, "--data", str(tiny_gray_named),
                "--labels", "50%", "--epochs", "12", "--train-batch", "20", "--precision", "fp32",
                "--work-dir", str(work))]

    whole = subprocess.run(command(tmp_path / "whole"), env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    work = tmp_path / "stopped"
    proc = subprocess.Popen(command(work), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    metrics = work / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the first epoch is done: the signal handlers are in place
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, f"finished before the signal? {err[-2000:]}"
    assert "stopped by SIGTERM" in err
    stopped_at = load_checkpoint(work / "checkpoints" / "last.pt")["step"]
    assert 0 < stopped_at < 12 * 5
    again = subprocess.run(command(work), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed finetune from" in again.stdout and f"at step {stopped_at} of 60" in again.stdout
    a = json.loads((tmp_path / "whole" / "result.json").read_text())
    b = json.loads((work / "result.json").read_text())
    assert (a["top1"], a["top5"], a["steps"]) == (b["top1"], b["top5"], b["steps"])
    wa = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(work / "checkpoints" / "last.pt")["model"]
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_fastssl_eval_reports_every_protocol_beside_random_init(run_dir, tiny_gray_named, capsys, no_network):
    assert report.main([str(run_dir), "--data", str(tiny_gray_named), "--threads", "1", "--num-workers", "0",
                        "--no-progress"]) == 0
    folder = run_dir / "eval"
    rep = json.loads((folder / "report.json").read_text())
    assert [(r["protocol"], r["labels"]) for r in rep["rows"]] == [("knn", "100%"), ("linear", "100%"),
                                                                     ("finetune", "1%"), ("finetune", "10%")]
    for row in rep["rows"]:
        assert 0 <= row["random"]["top1"] <= 100 and 0 <= row["checkpoint"]["top1"] <= 100
        if row["protocol"] != "knn":
            assert row["random"]["source"] == "random init" and row["checkpoint"]["source"].endswith("step 7)")
    assert rep["rows"][2]["images"] == 2 and rep["rows"][3]["images"] == 20
    assert rep["machine"]["cpu"] and rep["step"] == 7
    md = (folder / "report.md").read_text()
    header = ["protocol", "labels", "top-1", "top-5", "random init top-1", "random init top-5", "gain (top-1)",
              "compute time"]
    assert "| " + " | ".join(header) + " |" in md
    assert "fine-tune on 10% (20 images, 2 epochs)" in md
    png = Image.open(io.BytesIO((folder / "report.png").read_bytes()))
    assert png.format == "PNG" and png.size == (760, 480)
    pixels = np.asarray(png.convert("RGB")).reshape(-1, 3)
    for colour in (report.SSL_COLOUR, report.RANDOM_COLOUR):
        assert (pixels == colour).all(axis=1).sum() > 100  # both series are drawn
    # A rerun reuses the finished evaluations (the same checkpoint and settings): nothing is trained again.
    names = [f"{p}{s}" for p in ("knn", "linear", "finetune-1pct", "finetune-10pct") for s in ("", "-random")]
    results = {n: (folder / n / "result.json").stat().st_mtime_ns for n in names}
    assert report.main([str(run_dir), "--data", str(tiny_gray_named), "--threads", "1", "--no-progress"]) == 0
    assert {n: (folder / n / "result.json").stat().st_mtime_ns for n in names} == results
    again = json.loads((folder / "report.json").read_text())["rows"]
    assert [(r["checkpoint"]["top1"], r["random"]["top1"]) for r in again] == \
        [(r["checkpoint"]["top1"], r["random"]["top1"]) for r in rep["rows"]]
    capsys.readouterr()
    assert report.main([str(run_dir), "eval.linear.epochs=0"]) == 2
    assert "eval.linear.epochs=0: must be an integer >= 1" in capsys.readouterr().err


def test_eval_after_must_name_protocols():
    with pytest.raises(ConfigError, match=r"eval.after=\[knn, probe\]: must be a list of knn, linear, finetune"):
        load_config("byol_resnet18_fmnist", ["eval.after=[knn,probe]"])


def test_train_with_eval_after_under_torchrun_reports_in_the_same_ranks(tiny_gray_named, tmp_path):
    """Two gloo ranks train, then evaluate in a process group of their own (the trainer's is gone, torchrun's
    store keeps its keys); every val image is scored once over the two ranks."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    overrides = [*MODEL, *EVAL, f"data.path={tiny_gray_named}", f"out_dir={out}", "train.precision=fp32",
                 "train.batch_size=40", "train.max_steps=3", "train.progress=false", "data.num_workers=0",
                 "eval.after=[knn,linear,finetune]"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "fastssl" / "train.py"), "--config", "byol_resnet18_fmnist", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["eval_report"] == str(out / "eval" / "report.json")
    rep = json.loads((out / "eval" / "report.json").read_text())
    assert rep["world_size"] == 2 and [r["protocol"] for r in rep["rows"]] == ["knn", "linear", "finetune",
                                                                               "finetune"]
    lin = rep["rows"][1]["checkpoint"]
    assert lin["world_size"] == 2 and lin["val_images"] == 40
    backbone, meta = load_backbone(out / "checkpoints" / "last.pt")
    clf = Classifier(backbone, meta["feat_dim"], 10, frozen=True, head_bn=lin["settings"]["head_bn"])
    clf.head.load_state_dict(load_checkpoint(out / "eval" / "linear" / "checkpoints" / "last.pt")["model"])
    assert (lin["top1"], lin["top5"]) == pytest.approx(_score_by_hand(clf, tiny_gray_named, 32, meta["mean"],
                                                                      meta["std"]))
