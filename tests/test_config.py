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
        ("method.name=moco_v9", "method.name"),
        ("method.temprature=0.2", "method.temprature"),
        ("method.base_tau=1.5", "method.base_tau"),
        ("optim.name=adam", "optim.name"),
        (["data.backend=dali", "data.decode=device"], "data.decode=device is a torch-backend option"),
        (["data.backend=ffcv", "data.cache=ram"], "data.cache=ram is a torch-backend option"),
    ],
)
def test_bad_key_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("byol_resnet50_imagenet", override if isinstance(override, list) else [override])


def test_overrides_may_stand_on_either_side_of_config(capsys):
    """`train.py a=1 --config R b=2`: argparse's plain parse_args would call b=2 an unrecognized argument."""
    from fastssl.train import main

    with pytest.raises(SystemExit) as exc:  # both sides reach load_config, which names the bad value
        main(["train.batch_size=0", "--config", "byol_resnet18_fmnist", "train.max_steps=2"])
    assert exc.value.code == 2 and "train.batch_size=0: must be > 0" in capsys.readouterr().err


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="byol_resnet50_imagenet"):
        load_config("no_such_recipe")


def test_batch_must_divide_by_world_size():
    cfg = load_config("byol_resnet50_imagenet", ["train.batch_size=10"])
    with pytest.raises(ConfigError, match="world size 4"):
        validate(cfg, world_size=4)


def test_method_keys_reach_the_constructor_and_optimizers_build():
    import torch

    from fastssl.engine.trainer import build_model, build_optimizer

    cfg = load_config("byol_resnet18_fmnist", ["method.proj_dim=24", "optim.name=adamw", "optim.betas=[0.9,0.95]"])
    method = build_model(cfg)
    assert method.projector[-1].out_features == 24
    opt = build_optimizer(cfg.optim, method.param_groups(0.05), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    sgd = build_optimizer(load_config("byol_resnet18_fmnist", ["optim.name=sgd"]).optim, method.param_groups(0.1), 0.1)
    assert isinstance(sgd, torch.optim.SGD)
