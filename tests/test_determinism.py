"""train.deterministic=true on CUDA, checked on a CPU: cuBLAS's workspace setting is made before the first matmul,
and a training step's aten ops (ResNet, multi-crop ViT) include none that has no deterministic CUDA kernel."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from fastssl.config import ConfigError
from fastssl.engine import determinism
from fastssl.engine.trainer import Trainer
from fastssl.models import build_backbone
from fastssl.models.vit import VisionTransformer


@pytest.fixture
def deterministic_mode():
    """Leaves torch's global switches as they were."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1:]


def _seeded_trainer(device: torch.device) -> Trainer:
    trainer = Trainer.__new__(Trainer)  # only what _seed reads: no data, no distributed setup
    trainer.cfg = OmegaConf.create({"train": {"seed": 0, "threads": 0, "deterministic": True}})
    trainer.device = device
    return trainer


def test_deterministic_on_cuda_sets_the_cublas_workspace_before_the_first_matmul(monkeypatch, deterministic_mode):
    """Without CUBLAS_WORKSPACE_CONFIG, use_deterministic_algorithms(True) makes the first cuBLAS matmul raise."""
    monkeypatch.delenv(determinism.CUBLAS_VARIABLE, raising=False)
    _seeded_trainer(torch.device("cuda", 0))._seed()
    assert os.environ[determinism.CUBLAS_VARIABLE] in determinism.CUBLAS_DETERMINISTIC
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.deterministic


def test_a_nondeterministic_cublas_setting_is_refused_in_one_line(monkeypatch, deterministic_mode):
    monkeypatch.setenv(determinism.CUBLAS_VARIABLE, ":0:0")
    with pytest.raises(ConfigError, match=r"CUBLAS_WORKSPACE_CONFIG=':0:0'.*:4096:8 or :16:8") as e:
        _seeded_trainer(torch.device("cuda", 0))._seed()
    assert "\n" not in str(e.value)
    monkeypatch.delenv(determinism.CUBLAS_VARIABLE)
    _seeded_trainer(torch.device("cpu"))._seed()  # a CPU run needs no cuBLAS setting
    assert determinism.CUBLAS_VARIABLE not in os.environ and torch.are_deterministic_algorithms_enabled()


class _Ops(TorchDispatchMode):
    """Records the aten op of every kernel call (forward and backward: on CPU the backward runs on this thread)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _step_ops(model: torch.nn.Module, sizes: tuple[int, ...]) -> set[str]:
    ops = _Ops()
    with ops:
        loss = sum(model(torch.randn(2, 3, s, s).to(memory_format=torch.channels_last)).square().mean()
                   for s in sizes)
        loss.backward()
    return ops.names


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_a_training_step_runs_no_op_that_throws_on_cuda_in_deterministic_mode(name, deterministic_mode):
    """ResNet (global pool, channels-last) and a ViT with a learned table resized for 16 px local views."""
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    if name == "resnet":
        model, sizes = build_backbone("resnet18", width=4, small_images=True), (32, 16)
    else:
        model = VisionTransformer(patch_size=4, embed_dim=32, depth=1, num_heads=2, img_size=32, pos_embed="learned")
        sizes = (32, 16)
    names = _step_ops(model, sizes)
    assert "convolution_backward" in names  # the backward was recorded too
    assert not names & determinism.THROWING_ON_CUDA, names & determinism.THROWING_ON_CUDA


def test_the_vits_matrix_resize_is_the_bicubic_interpolation(deterministic_mode):
    """Deterministic mode resizes the learned position table with the bicubic weights as matrices: the same table
    and gradients as F.interpolate, up to rounding."""
    torch.manual_seed(1)
    vit = VisionTransformer(patch_size=4, embed_dim=8, depth=1, num_heads=2, img_size=28, pos_embed="learned")
    g = torch.randn(5 * 3, 8)
    reference = vit._pos(5, 3)
    (reference * g).sum().backward()
    grad = vit.pos_embed.grad.clone()
    vit.pos_embed.grad = None
    torch.use_deterministic_algorithms(True)
    resized = vit._pos(5, 3)
    (resized * g).sum().backward()
    torch.testing.assert_close(resized, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vit.pos_embed.grad, grad, rtol=1e-5, atol=1e-6)
