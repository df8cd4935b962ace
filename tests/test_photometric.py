"""The shared photometric stage against torchvision's own functional ops and the spec's rates."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from scipy import stats

from pipelines.photometric import (
    _SHIFTED_BLUR_MAX_KERNEL,
    apply_photometric,
    blur_kernel_size,
    sample_photometric_params,
)
from pipelines.spec import ViewSpec, eval_view

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
JITTER_FNS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
JITTER_KEYS = ("brightness", "contrast", "saturation", "hue")


def _images(b: int = 4, s: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)


def _params(view: ViewSpec, b: int, **override) -> dict:
    params = sample_photometric_params(view, b, torch.Generator().manual_seed(123))
    params.update(override)
    return params


def _off(b: int) -> torch.Tensor:
    return torch.zeros(b, dtype=torch.bool)


def _on(b: int) -> torch.Tensor:
    return torch.ones(b, dtype=torch.bool)


def test_output_contract_and_plain_normalization():
    x = _images(5, 20)
    out = apply_photometric(x, eval_view(20), MEAN, STD)
    assert out.dtype == torch.float32 and out.shape == (5, 3, 20, 20) and out.device == x.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = TF.normalize(x.float() / 255, MEAN, STD)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), ref.mean(dim=(0, 2, 3)), atol=1e-5, rtol=0)


def test_channels_last_uint8_input_is_accepted_and_never_modified():
    x = _images(4, 16).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # (B, 3, S, S) channels-last view
    before = x.clone()
    apply_photometric(x, ViewSpec(16, jitter_p=1, gray_p=1, blur_p=1, solarize_p=1), MEAN, STD)
    assert torch.equal(x, before)
    f = x.float() / 255
    f_before = f.clone()
    apply_photometric(f, ViewSpec(16, jitter_p=1, solarize_p=1), MEAN, STD)
    assert torch.equal(f, f_before)  # float input is only overwritten with inplace=True


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
def test_colour_jitter_matches_torchvision_in_the_drawn_order(order):
    b = 6
    x = _images(b, 24)
    view = ViewSpec(24, jitter_p=1.0, brightness=0.6, contrast=0.6, saturation=0.6, hue=0.3, gray_p=0)
    params = _params(view, b, order=order, jitter=_on(b))
    out = apply_photometric(x, view, ZERO, ONE, params=params)
    for i in range(b):
        ref = x[i].float() / 255
        for op in order:
            ref = JITTER_FNS[op](ref, float(params[JITTER_KEYS[op]][i]))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("op", range(4))
def test_each_jitter_op_alone_matches_torchvision(op):
    b = 4
    x = _images(b, 16, seed=op)
    factors = {"brightness": torch.tensor([0.5, 0.9, 1.2, 1.4]), "contrast": torch.tensor([0.6, 0.8, 1.3, 1.5]),
               "saturation": torch.tensor([0.0, 0.5, 1.5, 2.0]), "hue": torch.tensor([-0.5, -0.2, 0.1, 0.45])}
    ident = {"brightness": torch.ones(b), "contrast": torch.ones(b), "saturation": torch.ones(b),
             "hue": torch.zeros(b)}
    name = JITTER_KEYS[op]
    params = _params(ViewSpec(16), b, jitter=_on(b), gray=_off(b), blur=_off(b), solarize=_off(b),
                     **{**ident, name: factors[name]})
    out = apply_photometric(x, ViewSpec(16), ZERO, ONE, params=params)
    for i in range(b):
        ref = JITTER_FNS[op](x[i].float() / 255, float(factors[name][i]))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_hue_shift_handles_gray_pixels_primaries_and_ties():
    pixels = torch.tensor([
        [0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0], [0, 0, 255],
        [255, 255, 0], [0, 255, 255], [255, 0, 255], [200, 200, 10], [10, 200, 200], [200, 10, 200],
        [1, 0, 0], [254, 255, 255], [30, 60, 90], [90, 60, 30],
    ], dtype=torch.uint8)
    x = pixels.T.reshape(1, 3, 4, 4).expand(5, 3, 4, 4).contiguous()
    shifts = torch.tensor([-0.5, -0.25, 0.0, 1 / 6, 0.4999])
    params = _params(ViewSpec(4), 5, jitter=_on(5), brightness=torch.ones(5), contrast=torch.ones(5),
                     saturation=torch.ones(5), hue=shifts, gray=_off(5), blur=_off(5), solarize=_off(5))
    out = apply_photometric(x, ViewSpec(4), ZERO, ONE, params=params)
    for i, s in enumerate(shifts.tolist()):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i].float() / 255, s), atol=1e-5, rtol=0)


def test_grayscale_matches_torchvision_and_has_equal_channels():
    b = 4
    x = _images(b, 16)
    view = ViewSpec(16, jitter_p=0, gray_p=1.0)
    out = apply_photometric(x, view, ZERO, ONE)
    ref = TF.rgb_to_grayscale(x.float() / 255, num_output_channels=3)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


@pytest.mark.parametrize("size", [24, 40, 96, 224])  # kernels 3, 5 (shifted sums), 9, 23 (grouped conv)
def test_blur_matches_torchvision(size):
    b = 3
    x = _images(b, size)
    view = ViewSpec(size, jitter_p=0, gray_p=0, blur_p=1.0)
    params = _params(view, b, sigma=torch.tensor([0.1, 0.9, 2.0]))
    out = apply_photometric(x, view, ZERO, ONE, params=params)
    k = blur_kernel_size(size)
    assert k % 2 == 1 and (k <= _SHIFTED_BLUR_MAX_KERNEL) == (size < 80)
    for i in range(b):
        ref = TF.gaussian_blur(x[i].float() / 255, [k, k], [float(params["sigma"][i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=2e-6, rtol=0)


def test_blur_kernel_is_ten_percent_of_the_view_and_odd():
    assert blur_kernel_size(224) == 23 and blur_kernel_size(96) == 9
    assert blur_kernel_size(32) == 3 and blur_kernel_size(8) == 3


def test_solarize_matches_torchvision():
    x = _images(3, 16)
    out = apply_photometric(x, ViewSpec(16, jitter_p=0, gray_p=0, solarize_p=1.0), ZERO, ONE)
    torch.testing.assert_close(out, TF.solarize(x.float() / 255, 0.5), atol=1e-6, rtol=0)


def test_each_image_runs_its_own_jitter_order_as_torchvision():
    b = 24
    x = _images(b, 16, seed=7)
    view = ViewSpec(16, jitter_p=1.0, brightness=0.6, contrast=0.6, saturation=0.6, hue=0.3, gray_p=0)
    params = _params(view, b, jitter=_on(b))
    order = params["order"]
    assert order.shape == (b, 4) and len({tuple(r) for r in order.tolist()}) > 10  # many orders in one batch
    out = apply_photometric(x, view, ZERO, ONE, params=params)
    for i in range(b):
        ref = x[i].float() / 255
        for op in order[i].tolist():
            ref = JITTER_FNS[op](ref, float(params[JITTER_KEYS[op]][i]))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_gray_input_runs_each_images_order_of_brightness_and_contrast():
    # On (B, 1) input only brightness and contrast act; their order per image still matters (clamping).
    b = 8
    x = _images(b, 12, seed=3)[:, :1]
    view = ViewSpec(12, jitter_p=1.0, brightness=0.8, contrast=0.8, saturation=0.0, hue=0.0, gray_p=0)
    params = _params(view, b, jitter=_on(b))
    params["order"] = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]] * (b // 2))
    out = apply_photometric(x, view, ZERO, ONE, params=params)
    for i in range(b):
        ref = x[i].float().expand(3, -1, -1) / 255
        for op in params["order"][i].tolist():
            ref = JITTER_FNS[op](ref, float(params[JITTER_KEYS[op]][i]))
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)


def test_a_bad_order_is_an_error_naming_the_row():
    params = _params(ViewSpec(8), 3)
    params["order"] = torch.tensor([[0, 1, 2, 3], [0, 0, 2, 3], [3, 2, 1, 0]])
    with pytest.raises(ValueError, match="row 1"):
        apply_photometric(_images(3, 8), ViewSpec(8, jitter_p=1.0), MEAN, STD, params=params)
    params["order"] = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        apply_photometric(_images(3, 8), ViewSpec(8, jitter_p=1.0), MEAN, STD, params=params)


def test_full_chain_matches_torchvision_with_forced_decisions():
    b = 4
    x = _images(b, 32)
    view = ViewSpec(32, jitter_p=1, gray_p=1, blur_p=1, solarize_p=1)
    params = _params(view, b, jitter=_on(b), gray=torch.tensor([True, False, True, False]),
                     blur=torch.tensor([True, True, False, False]), solarize=torch.tensor([False, True, True, False]))
    out = apply_photometric(x, view, MEAN, STD, params=params)
    for i in range(b):
        ref = x[i].float() / 255
        for op in params["order"][i].tolist():
            ref = JITTER_FNS[op](ref, float(params[JITTER_KEYS[op]][i]))
        if params["gray"][i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if params["blur"][i]:
            ref = TF.gaussian_blur(ref, [3, 3], [float(params["sigma"][i])] * 2)
        if params["solarize"][i]:
            ref = TF.solarize(ref, 0.5)
        torch.testing.assert_close(out[i], TF.normalize(ref, MEAN, STD), atol=2e-5, rtol=0)


def test_decision_rates_and_factor_ranges_follow_the_view():
    n = 20000
    view = ViewSpec(8, jitter_p=0.8, brightness=0.4, contrast=0.3, saturation=1.5, hue=0.1, gray_p=0.2,
                    blur_p=0.5, blur_sigma=(0.1, 2.0), solarize_p=0.2)
    p = sample_photometric_params(view, n, torch.Generator().manual_seed(0))
    for key, rate in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("solarize", 0.2)):
        sd = (rate * (1 - rate) / n) ** 0.5
        assert abs(p[key].float().mean().item() - rate) < 5 * sd, key
    for key, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.7, 1.3), ("saturation", 0.0, 2.5),
                        ("hue", -0.1, 0.1), ("sigma", 0.1, 2.0)):
        values = p[key].double().numpy()
        assert values.min() >= lo and values.max() <= hi, key
        assert stats.kstest(values, stats.uniform(lo, hi - lo).cdf).pvalue > 0.01, key
    assert p["order"].shape == (n, 4) and p["order"].dtype == torch.int64
    assert torch.equal(p["order"].sort(dim=1).values, torch.arange(4).expand(n, 4))


def test_each_images_order_is_uniform_over_permutations_and_independent_within_a_batch():
    # torchvision draws the order per image: within one batch the 24 orders come up equally often, and
    # two images' orders are independent (a per-batch order fails both).
    p = sample_photometric_params(ViewSpec(8), 4800, torch.Generator().manual_seed(0))
    codes = (p["order"] * torch.tensor([64, 16, 4, 1])).sum(1)  # one code per permutation
    counts = torch.unique(codes, return_counts=True)[1]
    assert len(counts) == 24
    assert stats.chisquare(counts.tolist()).pvalue > 0.01
    first = p["order"][:, 0].view(2400, 2)  # (first op of image 2k, of image 2k + 1)
    table = torch.zeros(4, 4)
    table.index_put_((first[:, 0], first[:, 1]), torch.ones(2400), accumulate=True)
    assert stats.chi2_contingency(table.numpy()).pvalue > 0.01


def test_gray_rate_in_the_output_matches_gray_p():
    n = 4000
    x = _images(n, 4)
    out, params = apply_photometric(x, ViewSpec(4, jitter_p=0, gray_p=0.3), MEAN, STD,
                                    torch.Generator().manual_seed(1), return_params=True)
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    equal = ((pixels[:, 0] - pixels[:, 1]).abs().amax((1, 2)) < 1e-5) & (
        (pixels[:, 1] - pixels[:, 2]).abs().amax((1, 2)) < 1e-5)
    assert torch.equal(equal, params["gray"])
    assert abs(equal.float().mean().item() - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5


def test_gray_single_channel_input_matches_the_expanded_rgb_path():
    b = 8
    gray = _images(b, 16)[:, :1]
    view = ViewSpec(16, jitter_p=1.0, gray_p=0.5, blur_p=0.5, solarize_p=0.5)
    params = _params(view, b)
    one = apply_photometric(gray, view, MEAN, STD, params=params)
    three = apply_photometric(gray.expand(b, 3, 16, 16), view, MEAN, STD, params=params)
    assert one.shape == three.shape and one.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(one, three, atol=2e-3, rtol=0)  # luma weights sum to 0.9999, not 1


def test_same_generator_state_gives_the_same_augmentation():
    x = _images(8, 16)
    view = ViewSpec(16, blur_p=0.5, solarize_p=0.5)
    a = apply_photometric(x, view, MEAN, STD, torch.Generator().manual_seed(7))
    b = apply_photometric(x, view, MEAN, STD, torch.Generator().manual_seed(7))
    c = apply_photometric(x, view, MEAN, STD, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_seed():
    x = _images(16, 48)
    view = ViewSpec(48, blur_p=0.5, solarize_p=0.5)
    cpu = apply_photometric(x, view, MEAN, STD, torch.Generator().manual_seed(3))
    gpu = apply_photometric(x.cuda(), view, MEAN, STD, torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda" and gpu.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
