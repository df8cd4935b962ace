"""train.compile: a compiled step trains like the eager one, resumes exactly, keeps one graph for multi-crop, fp16
with GradScaler and 2 gloo ranks, says what it does, and falls back with one warning where it cannot compile.

Each distinct model compiles once per test session (about a minute on 2 cores); the inductor cache under the test
session's FASTSSL_CACHE_DIR serves the repeats."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import ROOT, _metrics, _overrides

from fastssl.config import load_config
from fastssl.engine import compiled
from fastssl.engine.checkpoint import load_checkpoint
from fastssl.engine.trainer import Trainer, build_model
from fastssl.models.norm import view_norms

pytestmark = pytest.mark.timeout(900)


def _fit(data, out, recipe: str = "byol_resnet18_fmnist", **extra) -> dict:
    base = {"eval.knn": "false", "train.channels_last": "true", "train.precision": "fp32"}
    cfg = load_config(recipe, _overrides(data, out, **{**base, **extra}))
    return Trainer(cfg).fit()


def _weights(out) -> dict:
    return load_checkpoint(out / "checkpoints" / "last.pt")["model"]


def test_compiled_run_steps_like_eager_and_resumes_exactly(tiny_gray_dataset, tmp_path, capfd):
    steps_per_epoch = 96 // 16
    _fit(tiny_gray_dataset, tmp_path / "full", **{"train.compile": "true"})
    err = capfd.readouterr()
    shown = err.out + err.err
    assert "train.compile: compiling the training step" in shown and "train.compile: compiled in" in shown
    assert "No CUDA runtime" not in shown  # inductor's note on a machine without a GPU is filtered
    rows = _metrics(tmp_path / "full")
    assert [r["compiled_graphs"] for r in rows] == [1] * len(rows)  # one graph, never recompiled

    # Killed after the first epoch (its checkpoint), then resumed: the same weights as the uninterrupted compiled
    # run, bit for bit (inductor's CPU code is deterministic for a fixed thread count).
    part = tmp_path / "part"
    _fit(tiny_gray_dataset, part, **{"train.compile": "true", "train.max_steps": steps_per_epoch})
    _fit(tiny_gray_dataset, part, **{"train.compile": "true"})
    full, resumed = _weights(tmp_path / "full"), _weights(part)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name

    # Against eager on the same batch: the first step's loss (later steps drift apart, as between any two kernels:
    # this tiny model's BatchNorms see 8 near-flat gray images per view, which amplifies rounding differences).
    _fit(tiny_gray_dataset, tmp_path / "eager1", **{"train.compile": "false", "train.max_steps": 1})
    (a,), b = _metrics(tmp_path / "eager1"), rows[0]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_compiled_method_forward_and_gradients_equal_eager():
    """The compiled BYOL step (per-view BatchNorm, EMA target, loss twin) on fresh random views: loss, every
    gradient and every running statistic equal the eager ones up to float reordering. In float64: in fp32 a few
    ReLU inputs within rounding of 0 flip between the two, which moves this tiny model's gradients by up to 0.3 %
    (a real difference in the step's arithmetic, not an error), while float64 leaves no such ties. The loss twin
    still computes in fp32 (its contract), so agreement is to about 1e-7, not 1e-16."""
    cfg = load_config("byol_resnet18_fmnist", ["model.width=4", "method.proj_hidden=32", "method.proj_dim=16",
                                               "method.pred_hidden=32"])
    torch.manual_seed(0)
    eager = build_model(cfg).double().to(memory_format=torch.channels_last)
    fast = copy.deepcopy(eager)
    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(16, 3, 32, 32, generator=gen, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last) for _ in range(2)]
    loss_a, _ = eager(views)
    loss_a.backward()
    compiled.prepare(torch.device("cpu"))
    loss_b, _ = torch.compile(fast, dynamic=False)(views)
    loss_b.backward()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-8)
    for (name, pa), pb in zip(eager.named_parameters(), fast.parameters(), strict=True):
        if pa.grad is not None:  # scaled to each gradient's size: some are ~1e-9 (a bias before a BatchNorm)
            assert (pb.grad - pa.grad).abs().max() <= 1e-5 * pa.grad.abs().max() + 1e-12, name
    for (name, ba), bb in zip(eager.named_buffers(), fast.buffers(), strict=True):
        torch.testing.assert_close(bb, ba, rtol=1e-6, atol=1e-9, msg=name)
    assert all(m.views == 1 for m in view_norms(fast))  # the per-view context was undone after the compiled step


def test_compiled_multicrop_fp16_keeps_one_graph_and_its_queue(tiny_gray_dataset, tmp_path, monkeypatch):
    """SwAV with 2 global + 2 local crops, fp16 with GradScaler, the queue filling from the first step: one graph
    for the whole step until the full queue joins Sinkhorn (another program: one recompilation, then none), and the
    same losses, queue filling and loss scale as the eager run (the queue is filled after the step, outside the
    graph, from embeddings the compiled forward hands over)."""
    monkeypatch.setenv("FASTSSL_COMPILE_BACKEND", "aot_eager")  # dynamo + AOT autograd: minutes of C++ less
    extra = {"train.precision": "fp16", "train.max_steps": 8, "data.n_local": 2, "method.proj_hidden": 32,
             "method.proj_dim": 16, "method.n_prototypes": 10, "method.queue_length": 32,
             "method.queue_start_epoch": 0, "method.freeze_prototypes_epochs": 0.0, "eval.knn": "false",
             "train.channels_last": "true"}
    trainers = {}
    for mode in ("false", "true"):
        cfg = load_config("swav_resnet18_fmnist", [o for o in _overrides(
            tiny_gray_dataset, tmp_path / mode, **{**extra, "train.compile": mode})
            if not o.startswith("method.pred_hidden")])
        trainers[mode] = Trainer(cfg)
        assert trainers[mode].fit()["steps"] == 8
    rows = _metrics(tmp_path / "true")
    assert 0 < sum(r["queue_used"] for r in rows) < 8  # the queue joined Sinkhorn during the run
    # every crop size inside one graph; one more when the queue joins, never one per step
    assert [r["compiled_graphs"] for r in rows] == [1 + int(r["queue_used"]) for r in rows]
    eager, fast = trainers["false"], trainers["true"]
    assert fast.scaler.is_enabled() and fast.scaler.get_scale() == eager.scaler.get_scale()
    assert fast.method._filled == eager.method._filled and fast.method._full
    # fp16 steps of a tiny model drift apart as any two kernels' do (see the BYOL test); the first steps agree.
    losses = [r["loss"] for r in rows], [r["loss"] for r in _metrics(tmp_path / "false")]
    assert losses[0][:5] == pytest.approx(losses[1][:5], rel=1e-4)


def test_compile_without_a_cxx_compiler_warns_once_and_trains_eagerly(tiny_gray_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "_cxx_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C.. compiler") as caught:
        results = _fit(tiny_gray_dataset, tmp_path / "run", **{"train.compile": "true", "train.max_steps": 2})
    assert len([w for w in caught if "train.compile" in str(w.message)]) == 1
    assert results["steps"] == 2
    assert all("compiled_graphs" not in r for r in _metrics(tmp_path / "run"))


def test_auto_compile_follows_the_measured_default_per_device_type():
    assert compiled.wanted("auto", torch.device("cpu")) is compiled.DEFAULT_COMPILE["cpu"]
    assert compiled.wanted("auto", torch.device("cuda")) is compiled.DEFAULT_COMPILE["cuda"]
    assert compiled.wanted(True, torch.device("cpu")) and not compiled.wanted(False, torch.device("cuda"))


def test_compiled_two_ranks_gloo_finish_with_identical_weights(tiny_gray_dataset, tmp_path):
    out = tmp_path / "ddp"
    # aot_eager: DDP's graph splitting and AOT autograd across 2 ranks, without two inductor builds on 2 cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FASTSSL_COMPILE_BACKEND": "aot_eager"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "fastssl" / "train.py"), "--config", "byol_resnet18_fmnist",
           *_overrides(tiny_gray_dataset, out, **{"train.max_steps": 3, "eval.knn": "false", "train.compile": "true",
                                                  "train.channels_last": "true", "train.precision": "fp32"})]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["steps"] == 3
    digests = results["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert [r["compiled_graphs"] for r in _metrics(out)][-1] >= 1


_SMALL_HEADS = {
    "byol": {"method.proj_hidden": 32, "method.proj_dim": 16, "method.pred_hidden": 32},
    "simclr": {"method.proj_hidden": 32, "method.proj_dim": 16},
    "mocov2": {"method.proj_hidden": 32, "method.proj_dim": 16, "method.queue_size": 64},
    "mocov3": {"method.proj_hidden": 32, "method.proj_dim": 16, "method.pred_hidden": 32},
    "swav": {"method.proj_hidden": 32, "method.proj_dim": 16, "method.n_prototypes": 10, "method.queue_length": 0},
    "dino": {"method.out_dim": 32},
    "barlow": {"method.proj_hidden": 32, "method.proj_dim": 32},
    "vicreg": {"method.proj_hidden": 32, "method.proj_dim": 32},
}


@pytest.mark.parametrize("method", sorted(_SMALL_HEADS))
def test_every_method_compiles_into_one_graph_that_is_reused(method, tiny_gray_dataset, tmp_path, monkeypatch):
    """Every method's training forward traces into one graph that later steps reuse (no recompilation at each
    step: a Python number a forward reads and the step changes would recompile, as SwAV's queue count did), and
    the compiled run's first loss equals the eager one."""
    monkeypatch.setenv("FASTSSL_COMPILE_BACKEND", "aot_eager")
    losses = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        drop = {"method.proj_hidden", "method.proj_dim", "method.pred_hidden"} - set(_SMALL_HEADS[method])  # BYOL's
        cfg = load_config(f"{method}_resnet18_fmnist", [
            o for o in _overrides(tiny_gray_dataset, out, **{
                "eval.knn": "false", "eval.probe": "false", "train.channels_last": "true", "train.max_steps": 3,
                "train.compile": mode, **_SMALL_HEADS[method]}) if o.split("=")[0] not in drop])
        assert Trainer(cfg).fit()["steps"] == 3
        losses[mode] = [r["loss"] for r in _metrics(out)]
    assert [r["compiled_graphs"] for r in _metrics(tmp_path / "true")] == [1, 1, 1]
    assert losses["true"][0] == pytest.approx(losses["false"][0], rel=1e-4)


def test_a_compiler_failure_at_the_first_step_warns_once_and_trains_eagerly(tiny_gray_dataset, tmp_path,
                                                                             monkeypatch):
    """The compiler fails inside the first step (after the forward may have moved BatchNorm statistics): one
    warning naming the error, the statistics put back, and the eager model trains the same step and the rest."""
    calls = []

    def broken(model, mode, device):
        def forward(views):
            calls.append(len(views))
            model(views)  # moves the running statistics, as a half-run compiled call could
            raise RuntimeError("lowering failed: an op the backend does not know\nmore detail")
        return forward

    monkeypatch.setattr(compiled, "compile_model", broken)
    with pytest.warns(RuntimeWarning, match="compiling failed .RuntimeError: lowering failed: an op the backend "
                                            "does not know.; training eagerly") as caught:
        results = _fit(tiny_gray_dataset, tmp_path / "run", **{"train.compile": "true", "train.max_steps": 2})
    assert calls == [2] and results["steps"] == 2
    assert len([w for w in caught if "train.compile" in str(w.message)]) == 1
    eager = _fit(tiny_gray_dataset, tmp_path / "eager", **{"train.compile": "false", "train.max_steps": 2})
    assert results["weight_digests"] == eager["weight_digests"]
    broken_state, eager_state = _weights(tmp_path / "run"), _weights(tmp_path / "eager")
    for name in eager_state:  # BatchNorm running statistics included: the failed call left no trace
        assert torch.equal(broken_state[name], eager_state[name]), name
