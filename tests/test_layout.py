"""train.channels_last=auto (fastssl.engine.layout): measured once per model and CPU, cached, and the views follow
the chosen layout end to end (photometric stage, loaders, trainer)."""

from __future__ import annotations

import json

import pytest
import torch

from fastssl.config import load_config
from fastssl.engine import layout
from fastssl.engine.trainer import Trainer, build_model
from pipelines import ViewSpec, build_loader
from pipelines.photometric import apply_photometric

CPU = torch.device("cpu")


def _method():
    torch.manual_seed(0)
    return build_model(load_config("byol_resnet18_fmnist", ["model.width=4", "method.proj_hidden=32",
                                                           "method.proj_dim=16", "method.pred_hidden=32"]))


def test_explicit_settings_are_obeyed_and_cuda_is_channels_last_without_measuring():
    def never(*a, **k):
        raise AssertionError("measured although the setting decides")

    method = _method()
    assert layout.choose_channels_last(True, method, [16, 16], 8, None, CPU, {}, measure_fn=never) is True
    assert layout.choose_channels_last(False, method, [16, 16], 8, None, CPU, {}, measure_fn=never) is False
    assert layout.choose_channels_last("auto", method, [16, 16], 8, None, torch.device("cuda"), {},
                                       measure_fn=never) is True


def test_auto_measures_once_then_reads_the_cache(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("FASTSSL_CACHE_DIR", str(tmp_path))
    calls = []

    def nchw_faster(method, sizes, batch, amp, device):
        calls.append((sizes, batch))
        return {"channels_last": 0.2, "contiguous": 0.1}

    method = _method()
    args = (method, [16, 16], 8, torch.bfloat16, CPU, {"model": "tiny"})
    assert layout.choose_channels_last("auto", *args, measure_fn=nchw_faster) is False
    assert "memory format: NCHW" in capfd.readouterr().out
    assert layout.choose_channels_last("auto", *args, measure_fn=nchw_faster) is False
    assert len(calls) == 1  # the second run decides from the cache
    cached = json.loads((tmp_path / "memory_format.json").read_text())
    (key,) = cached
    assert json.loads(key)["cpu"] == layout.cpu_model() and cached[key]["ms"] == {"channels_last": 200.0,
                                                                                  "contiguous": 100.0}
    # Another batch is another question.
    assert layout.choose_channels_last("auto", method, [16, 16], 16, torch.bfloat16, CPU, {"model": "tiny"},
                                       measure_fn=lambda *a: {"channels_last": 0.1, "contiguous": 0.2}) is True
    assert len(json.loads((tmp_path / "memory_format.json").read_text())) == 2


def test_measuring_leaves_the_model_and_the_rng_untouched():
    method = _method()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    rng = torch.get_rng_state()
    ms = layout.measure(method, [16, 16], 8, torch.bfloat16, CPU, steps=1)
    assert set(ms) == {"channels_last", "contiguous"} and all(v > 0 for v in ms.values())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in method.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in method.parameters())


@pytest.mark.parametrize("path", ["torch", "cpp"])
def test_photometric_stage_writes_the_requested_layout(path, monkeypatch):
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", path)
    x = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    view = ViewSpec(size=12, jitter_p=1.0, gray_p=0.3, solarize_p=0.5, blur_p=0.5)
    outs = {}
    for fmt in (torch.channels_last, torch.contiguous_format):
        outs[fmt] = apply_photometric(x, view, (0.5,) * 3, (0.25,) * 3, torch.Generator().manual_seed(1),
                                      memory_format=fmt)
    assert outs[torch.contiguous_format].is_contiguous()
    assert outs[torch.channels_last].is_contiguous(memory_format=torch.channels_last)
    assert not outs[torch.channels_last].is_contiguous()
    torch.testing.assert_close(outs[torch.contiguous_format], outs[torch.channels_last])


def test_loader_views_follow_its_memory_format(tiny_dataset):
    loader = build_loader(tiny_dataset, "byol", 8, device="cpu", num_workers=0, backend="torch", progress=False)
    loader.memory_format = torch.contiguous_format
    views = next(iter(loader)).views
    assert all(v.is_contiguous() and not v.is_contiguous(memory_format=torch.channels_last) for v in views)


def test_trainer_runs_the_model_and_its_views_in_the_chosen_layout(tiny_gray_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSSL_CACHE_DIR", str(tmp_path / "cache"))  # not an earlier test's cached choice
    monkeypatch.setattr(layout, "measure", lambda *a, **k: {"channels_last": 0.3, "contiguous": 0.1})
    seen = []
    cfg = load_config("byol_resnet18_fmnist", [
        f"data.path={tiny_gray_dataset}", "data.num_workers=0", "model.width=4", "method.proj_hidden=32",
        "method.proj_dim=16", "method.pred_hidden=32", "train.batch_size=16", "train.max_steps=2",
        "train.progress=false", "train.threads=1", "eval.knn=false", f"out_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    original = Trainer._train_step

    def spy(self, views):
        seen.append([v.is_contiguous() for v in views])
        conv = self.method.backbone.conv1.weight
        seen.append([conv.is_contiguous()])
        return original(self, views)

    monkeypatch.setattr(Trainer, "_train_step", spy)
    trainer.fit()
    assert trainer.channels_last is False
    assert seen and all(all(flags) for flags in seen)  # NCHW views and NCHW weights
