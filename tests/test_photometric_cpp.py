"""The fused C++ photometric kernel (csrc/photometric_cpu.cpp) against the torch path, on the same decisions.

Both paths are forced through FASTSSL_PHOTOMETRIC (cpp / torch); the torch path is the reference twin, itself
tested against torchvision in tests/test_photometric.py. The first run compiles the kernel (cached after).
"""

from __future__ import annotations

import itertools
import shutil
import warnings

import pytest
import torch

from pipelines import native, photometric
from pipelines.photometric import apply_photometric, blur_kernel_size, photometric_path, sample_photometric_params
from pipelines.spec import MultiCropSpec, ViewSpec

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="needs a C++ compiler")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ATOL = 1e-5  # on the normalized scale (1 / std ~ 4.4 x the [0, 1] scale)
EVERYTHING = ViewSpec(12, jitter_p=0.8, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.5, gray_p=0.3,
                      blur_p=0.5, solarize_p=0.5)


def _images(b: int, h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w or h), generator=g, dtype=torch.uint8)


def _params(view: ViewSpec, b: int, seed: int = 0, **override) -> dict:
    params = sample_photometric_params(view, b, torch.Generator().manual_seed(seed))
    params.update(override)
    return params


def _both(x, view, params, monkeypatch, mean=MEAN, std=STD):
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "torch")
    ref = apply_photometric(x, view, mean, std, params=params)
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "cpp")
    out = apply_photometric(x, view, mean, std, params=params)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    return out, ref


def _mixed(b: int, view: ViewSpec = EVERYTHING, seed: int = 0, order=None) -> dict:
    """Random factors; every op fires on some image, one image has nothing at all."""
    params = _params(view, b, seed)
    if order is not None:
        params["order"] = list(order)
    params["jitter"][:] = True
    params["jitter"][-1] = False
    pattern = torch.arange(b)
    params["gray"][:] = pattern % 3 == 1
    params["blur"][:] = pattern % 2 == 0
    params["solarize"][:] = pattern % 4 < 2
    return params


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_cpp_matches_torch_for_every_jitter_order(order, monkeypatch):
    x = _images(6, 12, 10, seed=order[0])
    out, ref = _both(x, EVERYTHING, _mixed(6, seed=sum(i * o for i, o in enumerate(order)), order=order),
                     monkeypatch)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_cpp_runs_each_images_own_order(monkeypatch):
    # All 24 orders in one batch, each image with its own; mixed decisions (one image without jitter).
    b = 24
    params = _mixed(b, seed=11)
    params["order"] = torch.tensor(list(itertools.permutations(range(4))))
    out, ref = _both(_images(b, 9, 11, seed=4), EVERYTHING, params, monkeypatch)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # and the order matters: the same images with the orders handed out in reverse come out different
    params["order"] = params["order"].flip(0)
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "cpp")
    other = apply_photometric(_images(b, 9, 11, seed=4), EVERYTHING, MEAN, STD, params=params)
    assert (other - out).abs().amax() > 1e-2


def test_cpp_refuses_an_order_that_is_not_a_permutation():
    module = native.load_photometric_cpu()
    x = _images(2, 4)
    args = (torch.ones(2, 4), torch.zeros(2, dtype=torch.int32), torch.ones(2), 3, torch.ones(3), torch.zeros(3))
    with pytest.raises(RuntimeError, match="permutation"):
        module.photometric(x, args[0], torch.tensor([[0, 1, 2, 3], [0, 1, 1, 3]]), *args[1:])
    with pytest.raises(RuntimeError, match="order"):
        module.photometric(x, args[0], torch.tensor([0, 1, 2, 3]), *args[1:])


@pytest.mark.parametrize("op", range(4))
def test_each_jitter_op_alone_matches_torch(op, monkeypatch):
    b = 5
    factors = {"brightness": torch.tensor([0.0, 0.5, 0.9, 1.2, 1.8]),
               "contrast": torch.tensor([0.0, 0.6, 1.0, 1.3, 1.8]),
               "saturation": torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0]),
               "hue": torch.tensor([-0.5, -0.2, 0.0, 0.1, 0.5])}
    ident = {"brightness": torch.ones(b), "contrast": torch.ones(b), "saturation": torch.ones(b),
             "hue": torch.zeros(b)}
    name = photometric.JITTER_OPS[op]
    off = torch.zeros(b, dtype=torch.bool)
    params = _params(ViewSpec(16), b, jitter=~off, gray=off, blur=off, solarize=off, **{**ident, name: factors[name]})
    out, ref = _both(_images(b, 16, 13, seed=op), ViewSpec(16), params, monkeypatch)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_hue_handles_gray_pixels_primaries_ties_and_shifts_beyond_half_a_turn(monkeypatch):
    pixels = torch.tensor([
        [0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0], [0, 0, 255],
        [255, 255, 0], [0, 255, 255], [255, 0, 255], [200, 200, 10], [10, 200, 200], [200, 10, 200],
        [1, 0, 0], [254, 255, 255], [30, 60, 90], [90, 60, 30],
    ], dtype=torch.uint8)
    shifts = torch.tensor([-0.5, -0.25, 1 / 6, 0.4999, 0.5, 0.75, -0.9, 1.3])  # > 0.5: the general remainder
    b = len(shifts)
    x = pixels.T.reshape(1, 3, 4, 4).expand(b, 3, 4, 4).contiguous()
    off = torch.zeros(b, dtype=torch.bool)
    params = _params(ViewSpec(4), b, jitter=~off, brightness=torch.ones(b), contrast=torch.ones(b),
                     saturation=torch.ones(b), hue=shifts, gray=off, blur=off, solarize=off)
    out, ref = _both(x, ViewSpec(4), params, monkeypatch, mean=(0.0,) * 3, std=(1.0,) * 3)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)))
def test_gray_blur_solarize_combinations_with_and_without_jitter(flags, monkeypatch):
    gray, blur, solarize = (torch.full((4,), f) for f in flags)
    params = _params(EVERYTHING, 4, seed=5, gray=gray, blur=blur, solarize=solarize,
                     jitter=torch.tensor([True, True, False, True]))
    out, ref = _both(_images(4, 11, 14, seed=2), EVERYTHING, params, monkeypatch)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "hwc_view", "strided", "float", "float64"])
def test_any_input_layout_and_dtype(layout, monkeypatch):
    x = _images(6, 13, 9, seed=3)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "hwc_view":  # what the loaders hand over: (B, S, S, C) storage seen as (B, C, S, S)
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    elif layout == "strided":  # neither layout: every other column of a wider batch
        x = _images(6, 13, 18, seed=3)[..., ::2]
    elif layout == "float":
        x = x.float() / 255.0
    elif layout == "float64":
        x = x.double() / 255.0
    before = x.clone()
    out, ref = _both(x, EVERYTHING, _mixed(6, seed=4), monkeypatch)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert torch.equal(x, before)  # the input is never modified


def test_float_input_outside_the_unit_range_matches_torch(monkeypatch):
    x = torch.randn(6, 3, 10, 12, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.5
    out, ref = _both(x, EVERYTHING, _mixed(6, seed=9), monkeypatch)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("h", "w"), [(9, 11), (11, 9), (2, 9), (1, 9), (30, 230), (8, 224), (11, 224), (5, 96)])
def test_blur_padding_and_kernel_sizes(h, w, monkeypatch):
    # Kernel from the width: 3 (w < 40), 9 (96) or 23 (>= 220); reflect where pad < min(H, W), else replicate.
    b = 4
    on = torch.ones(b, dtype=torch.bool)
    params = _params(EVERYTHING, b, seed=h + w, blur=on, sigma=torch.tensor([0.1, 0.7, 1.3, 2.0]))
    out, ref = _both(_images(b, h, w, seed=1), EVERYTHING, params, monkeypatch)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert blur_kernel_size(w) in (3, 9, 23)


@pytest.mark.parametrize("recipe", ["byol", "swav", "simclr", "dino"])
def test_recipe_views_over_random_decisions(recipe, monkeypatch):
    spec = MultiCropSpec.preset(recipe, global_size=40, local_size=20)
    for i, view in enumerate(spec.views[:3]):
        for seed in range(2):
            x = _images(8, view.size, seed=seed + 10 * i)
            out, ref = _both(x, view, _params(view, 8, seed=seed + 10 * i), monkeypatch, spec.mean, spec.std)
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_result_does_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "cpp")
    x = _images(9, 20, 18)
    params = _mixed(9, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = apply_photometric(x, EVERYTHING, MEAN, STD, params=params)
        torch.set_num_threads(max(2, threads))
        many = apply_photometric(x, EVERYTHING, MEAN, STD, params=params)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_empty_batch(monkeypatch):
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "cpp")
    out = apply_photometric(_images(0, 8), EVERYTHING, MEAN, STD)
    assert out.shape == (0, 3, 8, 8) and out.dtype == torch.float32


def test_auto_mode_picks_cpp_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "auto")
    x = _images(4, 12)
    assert photometric_path(x) == "cpp"
    assert photometric_path(x[:, :1]) == "cpp"  # the path for colour input; gray (B, 1) input runs torch ops
    params = _mixed(4, seed=1)
    auto = apply_photometric(x, EVERYTHING, MEAN, STD, params=params)
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "cpp")
    assert torch.equal(auto, apply_photometric(x, EVERYTHING, MEAN, STD, params=params))


def test_gray_single_channel_input_keeps_the_torch_path(monkeypatch):
    gray = _images(6, 12)[:, :1]
    out, ref = _both(gray, EVERYTHING, _mixed(6, seed=2), monkeypatch)
    assert torch.equal(out, ref)


def test_auto_falls_back_to_torch_with_one_warning_when_the_build_fails(monkeypatch):
    def broken():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(native, "load_photometric_cpu", broken)
    monkeypatch.setattr(photometric, "_cpp_warned", False)
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "auto")
    x = _images(2, 8)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU kernel is unavailable"):
        assert photometric_path(x) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert photometric_path(x) == "torch"  # warned once
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "cpp")
    with pytest.raises(RuntimeError, match="no compiler"):  # forced: the failure is an error
        apply_photometric(x, EVERYTHING, MEAN, STD)


def test_forced_cpp_refuses_non_cpu_tensors(monkeypatch):
    monkeypatch.setenv("FASTSSL_PHOTOMETRIC", "cpp")
    with pytest.raises(ValueError, match="CPU tensors only"):
        photometric_path(torch.empty(1, 3, 2, 2, device="meta"))
