"""Config: recipes, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from fastssl.config import CONFIG_DIR, ConfigError, load_config, validate


def test_every_recipe_loads():
    names = [p.stem for p in CONFIG_DIR.glob("*.yaml")]
    assert names
    for name in names:
        cfg = load_config(name)
        assert cfg.train.batch_size > 0


def test_overrides_apply_with_types():
    cfg = load_config("byol_resnet50_imagenet", ["train.batch_size=256", "train.max_steps=3", "data.backend=torch"])
    assert cfg.train.batch_size == 256 and cfg.train.max_steps == 3 and cfg.data.backend == "torch"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batchsize=4", "train.batchsize"),
        ("train.batch_size=lots", "train.batch_size"),
        ("data.backend=opencv", "data.backend"),
        ("train.precision=fp8", "train.precision"),
        ("train.batch_size=0", "train.batch_size"),
    ],
)
def test_bad_key_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("byol_resnet50_imagenet", [override])


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="byol_resnet50_imagenet"):
        load_config("no_such_recipe")


def test_batch_must_divide_by_world_size():
    cfg = load_config("byol_resnet50_imagenet", ["train.batch_size=10"])
    with pytest.raises(ConfigError, match="world size 4"):
        validate(cfg, world_size=4)
