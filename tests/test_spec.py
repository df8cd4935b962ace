"""MultiCropSpec / ViewSpec: presets follow the papers, validation names the bad field."""

from __future__ import annotations

import dataclasses

import pytest

from pipelines import PRESETS, MultiCropSpec, ViewSpec
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD


def test_byol_preset_has_the_papers_asymmetric_views():
    spec = MultiCropSpec.preset("byol")
    assert spec.n_views == 2 and spec.sizes == (224,)
    v1, v2 = spec.views
    assert (v1.blur_p, v1.solarize_p) == (1.0, 0.0)
    assert (v2.blur_p, v2.solarize_p) == (0.1, 0.2)
    for v in spec.views:
        assert v.scale == (0.08, 1.0) and v.flip_p == 0.5
        assert (v.jitter_p, v.brightness, v.contrast, v.saturation, v.hue) == (0.8, 0.4, 0.4, 0.2, 0.1)
        assert v.gray_p == 0.2 and v.blur_sigma == (0.1, 2.0)
    assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD


def test_mocov3_uses_byols_views():
    assert MultiCropSpec.preset("mocov3").views == MultiCropSpec.preset("byol").views


def test_simclr_preset_has_strength_one_colour_distortion():
    spec = MultiCropSpec.preset("simclr", global_size=32)
    assert spec.n_views == 2 and spec.sizes == (32,)
    for v in spec.views:
        assert (v.jitter_p, v.brightness, v.contrast, v.saturation, v.hue) == (0.8, 0.8, 0.8, 0.8, 0.2)
        assert (v.gray_p, v.blur_p, v.solarize_p) == (0.2, 0.5, 0.0)


def test_swav_preset_has_two_global_and_v_local_views():
    spec = MultiCropSpec.preset("swav")
    assert spec.n_views == 8 and spec.sizes == (224, 96)
    assert (spec.n_global, spec.n_local) == (2, 6)
    assert spec.groups == ((224, (0, 1)), (96, (2, 3, 4, 5, 6, 7)))
    assert all(v.scale == (0.14, 1.0) for v in spec.views[:2])
    assert all(v.scale == (0.05, 0.14) for v in spec.views[2:])
    assert all(v.blur_p == 0.5 and v.brightness == 0.8 and v.hue == 0.2 for v in spec.views)
    small = MultiCropSpec.preset("swav", global_size=32, local_size=16, n_local=4)
    assert small.n_views == 6 and small.sizes == (32, 16)


def test_dino_preset_follows_the_reference_defaults():
    spec = MultiCropSpec.preset("dino")
    assert spec.n_views == 10 and spec.sizes == (224, 96)
    g1, g2, *locs = spec.views
    assert g1.scale == g2.scale == (0.4, 1.0)
    assert (g1.blur_p, g1.solarize_p, g2.blur_p, g2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert all(v.scale == (0.05, 0.4) and v.blur_p == 0.5 and v.solarize_p == 0.0 for v in locs)


def test_eval_preset_is_one_deterministic_view():
    spec = MultiCropSpec.preset("eval", global_size=64)
    assert spec.n_views == 1 and spec.is_deterministic and not spec.views[0].has_photometric
    assert spec.views[0].scale == (1.0, 1.0) and spec.views[0].ratio == (1.0, 1.0)
    assert MultiCropSpec.preset("byol").eval_spec().views == spec.eval_spec(224).views
    assert not MultiCropSpec.preset("byol").is_deterministic


def test_every_preset_builds_at_small_sizes():
    for name in PRESETS:
        spec = MultiCropSpec.preset(name, global_size=32, local_size=16)
        assert spec.sizes[0] == 32


def test_preset_overrides_normalization():
    spec = MultiCropSpec.preset("byol", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.25, 0.25, 0.25)


def test_lists_from_yaml_become_tuples_and_specs_are_hashable():
    v = ViewSpec(32, scale=[0.2, 1.0], ratio=[0.75, 1.25], blur_sigma=[0.5, 1.0])
    assert v.scale == (0.2, 1.0) and v.ratio == (0.75, 1.25) and v.blur_sigma == (0.5, 1.0)
    spec = MultiCropSpec([v, v], mean=[0.1, 0.2, 0.3], std=[1, 1, 1])
    assert isinstance(spec.views, tuple) and spec.mean == (0.1, 0.2, 0.3)
    assert hash(spec) == hash(MultiCropSpec((v, v), mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.size = 64


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"size": 0}, "size"),
        ({"size": 32.0}, "size"),
        ({"size": 32, "scale": (0.0, 1.0)}, "scale"),
        ({"size": 32, "scale": (0.5, 0.2)}, "scale"),
        ({"size": 32, "scale": (0.5, 1.5)}, "scale"),
        ({"size": 32, "scale": 0.5}, "scale"),
        ({"size": 32, "ratio": (0.0, 1.0)}, "ratio"),
        ({"size": 32, "ratio": (2.0, 1.0)}, "ratio"),
        ({"size": 32, "flip_p": 1.5}, "flip_p"),
        ({"size": 32, "jitter_p": -0.1}, "jitter_p"),
        ({"size": 32, "gray_p": 2}, "gray_p"),
        ({"size": 32, "blur_p": -1}, "blur_p"),
        ({"size": 32, "solarize_p": 1.01}, "solarize_p"),
        ({"size": 32, "brightness": -0.1}, "brightness"),
        ({"size": 32, "contrast": float("inf")}, "contrast"),
        ({"size": 32, "saturation": -1}, "saturation"),
        ({"size": 32, "hue": 0.6}, "hue"),
        ({"size": 32, "blur_sigma": (0.0, 1.0)}, "blur_sigma"),
        ({"size": 32, "blur_sigma": (2.0, 1.0)}, "blur_sigma"),
    ],
)
def test_view_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ViewSpec(**kwargs)


@pytest.mark.parametrize(
    "args, field",
    [
        (((),), "views"),
        (((ViewSpec(32), "not a view"),), "views"),
        (((ViewSpec(32),), (0.5, 0.5)), "mean"),
        (((ViewSpec(32),), (0.5, 0.5, 0.5), (0.2, 0.0, 0.2)), "std"),
        (((ViewSpec(32),), (0.5, 0.5, 0.5), "abc"), "std"),
    ],
)
def test_multicrop_validation_names_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        MultiCropSpec(*args)


def test_preset_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown preset"):
        MultiCropSpec.preset("barlow")
    with pytest.raises(ValueError, match="n_local"):
        MultiCropSpec.preset("byol", n_local=2)
    with pytest.raises(ValueError, match="n_local"):
        MultiCropSpec.preset("swav", n_local=-1)
    assert MultiCropSpec.preset("byol", n_local=0).n_views == 2
