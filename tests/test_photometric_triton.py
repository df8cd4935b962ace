"""The fused Triton photometric chain against the torch path, on the same per-image decisions.

Without CUDA the kernel runs on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports the kernel module); tiny images keep that fast.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from pipelines.photometric import apply_photometric, sample_photometric_params, use_fused  # noqa: E402
from pipelines.spec import ViewSpec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(b, h, w=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w or h), generator=g, dtype=torch.uint8)


def _both(x, view, params, monkeypatch):
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "torch")
    ref = apply_photometric(x.to(DEVICE), view, MEAN, STD, params=params)
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "triton")
    fused = apply_photometric(x.to(DEVICE), view, MEAN, STD, params=params)
    return fused, ref


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 3, 1, 0], [1, 0, 3, 2]])
def test_fused_chain_matches_torch_for_every_op_and_order(order, monkeypatch):
    b = 6
    view = ViewSpec(12, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, gray_p=0.3,
                    blur_p=0.5, solarize_p=0.5)
    params = sample_photometric_params(view, b, torch.Generator().manual_seed(sum(order) + order[0]))
    params["order"] = order
    # Every op on at least one image, and one image with nothing at all.
    params["jitter"][:5] = True
    params["jitter"][5] = False
    params["gray"][:] = torch.tensor([False, True, False, False, True, False])
    params["blur"][:] = torch.tensor([True, False, False, True, False, False])
    params["solarize"][:] = torch.tensor([True, True, False, False, False, True])
    x = _images(b, 12, 10, seed=order[0])
    fused, ref = _both(x, view, params, monkeypatch)
    assert fused.dtype == torch.float32 and fused.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=1e-5)


def test_fused_chain_runs_each_images_own_order(monkeypatch):
    b = 24
    view = ViewSpec(8, jitter_p=1.0, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2, gray_p=0.2,
                    blur_p=0.3, solarize_p=0.3)
    params = sample_photometric_params(view, b, torch.Generator().manual_seed(5))
    params["order"] = torch.tensor(list(itertools.permutations(range(4))))  # all 24, one per image
    fused, ref = _both(_images(b, 8, 6, seed=6), view, params, monkeypatch)
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "float"])
def test_fused_chain_reads_any_input_layout_and_dtype(layout, monkeypatch):
    view = ViewSpec(9, jitter_p=1.0, gray_p=0.5, blur_p=0.0, solarize_p=0.5)
    params = sample_photometric_params(view, 4, torch.Generator().manual_seed(2))
    x = _images(4, 9, seed=3)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "float":
        x = x.float() / 255.0
    fused, ref = _both(x, view, params, monkeypatch)
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=1e-5)


def test_fused_chain_with_the_swav_and_byol_views_over_random_decisions(monkeypatch):
    for view, seed in itertools.product([ViewSpec(16, blur_p=1.0), ViewSpec(16, blur_p=0.1, solarize_p=0.2)], (0, 1)):
        params = sample_photometric_params(view, 8, torch.Generator().manual_seed(seed))
        fused, ref = _both(_images(8, 16, seed=seed), view, params, monkeypatch)
        torch.testing.assert_close(fused, ref, atol=2e-5, rtol=1e-5)


def test_mode_switch(monkeypatch):
    x = torch.zeros(1, 3, 2, 2)
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "torch")
    assert not use_fused(x)
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "auto")
    assert use_fused(x) == x.is_cuda
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "fast")
    with pytest.raises(ValueError, match="FASTSSL_PHOTOMETRIC"):
        use_fused(x)
