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
    assert exc.value.code == 2 and "train.batch_size=0: must be an integer >= 1" in capsys.readouterr().err


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


def test_local_aug_sets_the_local_crops_only_after_aug():
    from fastssl.config import build_spec

    cfg = load_config("swav_resnet18_fmnist", ["data.aug.scale=[0.3,1.0]", "data.local_aug.scale=[0.1,0.3]",
                                               "data.local_aug.flip_p=0.0"])
    spec = build_spec(cfg)
    assert [v.size for v in spec.views] == [32, 32, 16, 16, 16, 16]
    assert [v.scale for v in spec.views] == [(0.3, 1.0)] * 2 + [(0.1, 0.3)] * 4
    assert [v.flip_p for v in spec.views] == [0.5] * 2 + [0.0] * 4
    assert build_spec(cfg, "eval").views[0].scale == (1.0, 1.0)  # the eval view stays deterministic
    with pytest.raises(ConfigError, match="data.local_aug.bogus"):
        build_spec(load_config("swav_resnet18_fmnist", ["data.local_aug.bogus=1"]))
    with pytest.raises(ConfigError, match="data.local_aug.scale"):
        build_spec(load_config("swav_resnet18_fmnist", ["data.local_aug.scale=[0.5,0.1]"]))


# ------------------------------------------------------------------------------------------ every value checked
# (override, the key the message must name): one at a time on the BYOL recipe, through the CLI.
_WRONG_VALUES = [
    ("optim.base_lr=-1", "optim.base_lr"),
    ("optim.base_lr=nan", "optim.base_lr"),
    ("model.backbone=resnet7", "model.backbone"),
    ("model.width=0", "model.width"),
    ("data.n_local=-2", "data.n_local"),
    ("data.aug.scale=[2,1]", "data.aug.scale"),
    ("data.aug.bogus=1", "data.aug.bogus"),
    ("data.local_aug.scale=[0.1,0.3]", "data.local_aug"),  # BYOL's views have no local crops
    ("data.global_size=0", "data.global_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.std=[0,1,1]", "data.std"),
    ("data.spec=eval", "data.spec"),
    ("train.batch_size=512", "train.batch_size"),  # more than the 96 training images
    ("optim.momentum=2", "optim.momentum"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim.eta=0", "optim.eta"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
    ("optim.final_lr=-1", "optim.final_lr"),
    ("train.epochs=0", "train.epochs"),
    ("train.seed=-1", "train.seed"),
    ("train.threads=-1", "train.threads"),
    ("eval.knn_t=0", "eval.knn_t"),
    ("eval.knn_max_train=-1", "eval.knn_max_train"),
    ("eval.probe_lr=0", "eval.probe_lr"),
    ("method.proj_dim=0", "method.proj_dim"),
    ("method.base_tau=2", "method.base_tau"),
    ("resume_allow_changes=[optim.nope]", "resume_allow_changes"),
]


@pytest.mark.parametrize("override, key", _WRONG_VALUES, ids=[o for o, _ in _WRONG_VALUES])
def test_a_wrong_value_stops_the_cli_before_any_work_naming_the_key(tiny_gray_dataset, tmp_path, monkeypatch,
                                                                    capsys, override, key):
    """Exit 2, one line naming the key and the valid range, no traceback, no run folder."""
    from fastssl.train import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    # A value the checks miss would train: one tiny step, so such a failure stays cheap.
    base = [f"data.path={tiny_gray_dataset}", f"out_dir={out}", "model.width=4", "train.max_steps=1",
            "train.batch_size=16", "train.progress=false", "data.num_workers=0"]
    with pytest.raises(SystemExit) as exc:
        main(["--config", "byol_resnet18_fmnist", *base, override])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastssl/train.py: error: ") and key in lines[0], err
    assert "must" in lines[0] or "choose one of" in lines[0] or "not a " in lines[0], err  # says what is valid
    assert not out.exists()


def _schema_leaves(cls, prefix: str = "") -> dict[str, object]:
    import dataclasses
    import typing

    leaves = {}
    for name, hint in typing.get_type_hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            leaves.update(_schema_leaves(hint, f"{key}."))
        else:
            leaves[key] = hint
    return leaves


def test_every_schema_field_has_a_check():
    """A range or choice for each field (bools: OmegaConf refuses anything else), so a new field cannot slip
    through unchecked; the open method section: a rule for every constructor argument of every method."""
    import inspect

    from fastssl.config import _CHOICES, _METHOD_RULES, _RULES, Config
    from fastssl.methods import METHODS, method_class

    leaves = _schema_leaves(Config)
    unchecked = [k for k, hint in leaves.items() if hint is not bool and k not in _RULES and k not in _CHOICES
                 and k != "method"]
    assert not unchecked
    assert not [k for k in _RULES if k not in leaves]  # no rule for a field that no longer exists
    for name in METHODS:
        params = [p for p in inspect.signature(method_class(name).__init__).parameters
                  if p not in ("self", "backbone", "feat_dim")]
        assert not [p for p in params if p not in _METHOD_RULES], name


def test_every_recipe_passes_the_range_checks_at_its_world_size():
    """The recipes' own values are in range (the *_imagenet ones at 8 ranks, their usual world size)."""
    for path in CONFIG_DIR.glob("*.yaml"):
        validate(load_config(path.stem), world_size=8 if "imagenet" in path.stem else 1)


def test_a_vit_needs_view_sizes_that_are_multiples_of_its_patch():
    with pytest.raises(ConfigError, match=r"data.global_size=30: model.backbone=vit_tiny cuts 4 px patches"):
        load_config("mocov3_vit_small_imagenet", ["model.backbone=vit_tiny", "data.global_size=30"])
