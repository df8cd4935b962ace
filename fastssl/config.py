"""Run configuration: a dataclass schema, a YAML recipe from fastssl/configs, and ``key=value`` overrides.

``load_config("byol_resnet18_fmnist", ["train.batch_size=128"])`` merges schema <- recipe <- overrides
with OmegaConf; an unknown key, a wrong type, a value out of its range (every field has a check, in
``_RULES`` / ``_CHOICES`` / ``_METHOD_RULES``) or an impossible combination stops with a one-line ConfigError
that names the key and the valid range. ``resume_changes`` sorts the differences between a checkpoint's
config and the current one into those a resume accepts and those it refuses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import pipelines
from fastssl.models.backbones import BACKBONES

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what to do."""


@dataclass
class DataConfig:
    path: str = "data/fashion-mnist"
    backend: str = "auto"  # torch | dali | ffcv | auto
    spec: str = "byol"  # a preset of pipelines.spec
    global_size: int = 224
    local_size: int = 96
    n_local: int = 0
    num_workers: int | None = None
    cache: str = "auto"  # torch backend: ram | none | auto
    decode: str = "host"  # torch backend: host (PIL in workers) | device (nvJPEG: TorchCodec, else torchvision)
    # samples that do not decode (damaged after conversion) are skipped, each replaced in its batch by the next
    # one; more than this many distinct ones stop the run (0: stop at the first)
    max_bad_samples: int = 100
    mean: list[float] | None = None
    std: list[float] | None = None
    # ViewSpec fields set on every view of the preset, e.g. {scale: [0.3, 1.0], blur_p: 0.0} for 32 px data
    aug: dict[str, Any] = field(default_factory=dict)
    # ViewSpec fields set on the local views only (multi-crop presets: swav, dino), after ``aug``: small images
    # want other scale ranges for the globals and the locals, e.g. {scale: [0.1, 0.3]} beside aug.scale [0.3, 1]
    local_aug: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    width: int = 64
    small_images: bool = False


# The method section is open: ``name`` picks the class in fastssl.methods.METHODS and every other key is
# passed to its constructor, so each method declares its own hyper-parameters (checked in validate()).
def _default_method() -> dict[str, Any]:
    return {"name": "byol"}


@dataclass
class OptimConfig:
    name: str = "lars"  # lars | sgd | adamw
    base_lr: float = 0.2  # scaled by global_batch / 256
    weight_decay: float = 1.5e-6
    final_weight_decay: float | None = None  # set: cosine schedule from weight_decay to this (DINO)
    momentum: float = 0.9  # lars, sgd
    eta: float = 0.001  # lars trust coefficient
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    warmup_epochs: float = 10.0
    final_lr: float = 0.0
    foreach: bool = True


@dataclass
class TrainConfig:
    batch_size: int = 4096  # global, over all ranks
    epochs: int = 300
    max_steps: int = 0  # > 0: stop after this many steps
    precision: str = "bf16"  # bf16 | fp16 | fp32
    # The MLP heads (projector, predictor) under the run's autocast (amp) or in fp32 while the backbone keeps
    # ``precision`` (a few % of a small model's step; measured for the demo in BENCHMARKS.md, "The demo bar")
    head_precision: str = "amp"
    # The model's (and so the views') memory format: auto (CUDA: channels-last; CPU: measured once per model and
    # CPU, cached; fastssl.engine.layout) | true | false
    channels_last: Any = "auto"
    # A compiled model (torch.compile, fastssl.engine.compiled): auto (the measured default per device type:
    # BENCHMARKS.md, "Memory format and compile") | true | false; compile_mode: torch.compile's mode
    compile: Any = "auto"
    compile_mode: str = "default"
    seed: int = 0
    log_every: int = 20
    # Checkpoints (out_dir/checkpoints/step-XXXXXX.pt + last.pt) at each epoch end, at the end, on SIGTERM/SIGINT,
    # and every checkpoint_every steps (0: no extra ones); the newest keep_checkpoints step files are kept.
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    max_bad_steps: int = 20  # non-finite losses in a row (those steps are skipped) before the run stops
    deterministic: bool = False
    threads: int = 0  # CPU intra-op threads; 0: torch's default
    progress: bool = True


@dataclass
class LinearProtocolConfig:
    """The papers' linear evaluation (``fastssl-linear --protocol paper``): the frozen backbone (BatchNorm in eval
    mode) under a linear head trained with SGD on RandomResizedCrop + flip views, scored on the centre view.
    Defaults: SwAV's eval_linear.py; each recipe carries its paper's values."""

    epochs: int = 100
    batch_size: int = 256  # global, over all ranks
    base_lr: float = 0.3  # x batch_size / 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1.0e-6
    schedule: str = "cosine"  # cosine (to 0) | step (x gamma at each of milestones)
    milestones: list[int] = field(default_factory=list)  # epochs
    gamma: float = 0.1
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    center_crop: float = 0.875  # the scored view: this fraction of the shorter side, centred (Resize 256, crop 224)
    head_bn: bool = False  # BatchNorm without affine in front of the linear layer (MAE's linear probing)


@dataclass
class FinetuneProtocolConfig:
    """Semi-supervised fine-tuning of the whole network on a labelled subset (``fastssl-finetune``): backbone and
    linear head with their own learning rates, RandomResizedCrop + flip views, scored on the centre view.
    Defaults: SwAV's eval_semisup.py at 10 % (1 %: base_lr 0.02, head_lr 5)."""

    epochs: int = 20
    batch_size: int = 256  # global, over all ranks
    base_lr: float = 0.01  # the backbone's, x batch_size / 256
    head_lr: float = 0.2  # the linear head's, x batch_size / 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "step"
    milestones: list[int] = field(default_factory=lambda: [12, 16])
    gamma: float = 0.2
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    center_crop: float = 0.875


EVAL_AFTER = ("knn", "linear", "finetune")  # what eval.after may chain after training (fastssl-eval's protocols)


@dataclass
class EvalConfig:
    knn: bool = True
    knn_k: int = 20
    knn_t: float = 0.07
    knn_init: bool = False  # also evaluate the backbone at initialization (the baseline to beat)
    knn_max_train: int = 0  # > 0: use at most this many train images as the kNN bank
    knn_every: int = 0  # > 0: also run the kNN monitor every this many epochs during training
    batch_size: int = 512
    probe: bool = True  # online linear probe on the detached features of each batch's first global view
    probe_every: int = 1  # steps between probe updates
    probe_lr: float = 1.0e-3  # the probe's own Adam
    wandb: bool = False  # also log to Weights & Biases (when the wandb package is installed)
    wandb_project: str = "fastssl"
    # The protocols papers report (fastssl-linear --protocol paper, fastssl-finetune, fastssl-eval): the paper's
    # settings, per recipe.
    linear: LinearProtocolConfig = field(default_factory=LinearProtocolConfig)
    finetune_1pct: FinetuneProtocolConfig = field(
        default_factory=lambda: FinetuneProtocolConfig(base_lr=0.02, head_lr=5.0))
    finetune_10pct: FinetuneProtocolConfig = field(default_factory=FinetuneProtocolConfig)
    after: list[str] = field(default_factory=list)  # [knn, linear, finetune]: fastssl-eval on the run once trained


@dataclass
class SlurmConfig:
    """The run inside a SLURM job (fastssl-submit; engine/slurm_job.py): how often the job may requeue itself, and
    how long a requeued job waits for the previous job's hold on the run folder."""

    max_requeues: int = 50  # the job requeues itself at the time limit / on preemption at most this many times
    lock_wait_s: float = 300.0  # a requeued job waits this long for the old job to release the run folder


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: dict[str, Any] = field(default_factory=_default_method)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    out_dir: str = "runs/default"
    resume: str = "auto"  # auto: newest valid checkpoint in out_dir/checkpoints if any | none | a checkpoint path
    # Keys (or whole sections: "optim", "method") a resume may change although they change what is trained;
    # other such changes are refused (see resume_changes and the README's "Resuming with a changed config").
    resume_allow_changes: list[str] = field(default_factory=list)


_CHOICES = {
    "data.backend": ("torch", "dali", "ffcv", "auto"),
    "data.decode": ("host", "device"),
    "data.cache": ("ram", "none", "auto"),
    "data.spec": tuple(sorted(n for n in pipelines.PRESETS if n != "eval")),  # eval: one view, nothing to learn
    "optim.name": ("lars", "sgd", "adamw"),
    "train.precision": ("bf16", "fp16", "fp32"),
    "train.head_precision": ("amp", "fp32"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


# A range check: (what the value must be, for the message; the test).
Rule = tuple[str, Callable[[Any], bool]]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int(low: int, high: int | None = None) -> Rule:
    what = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return what, lambda v: _is_int(v) and v >= low and (high is None or v <= high)


def _real(low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False) -> Rule:
    if high is None:
        what = f"a number {'>' if open_low else '>='} {low:g}"
    else:
        what = f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def ok(v: Any) -> bool:
        if not _is_real(v):
            return False
        above = v > low if open_low else v >= low
        below = high is None or (v < high if open_high else v <= high)
        return above and below

    return what, ok


def _optional(rule: Rule, meaning: str) -> Rule:
    return f"{rule[0]}, or null ({meaning})", lambda v: v is None or rule[1](v)


def _numbers(n: int, element: Rule, each: str) -> Rule:
    return f"a list of {n} numbers, each {each}", \
        lambda v: isinstance(v, list | tuple) and len(v) == n and all(element[1](x) for x in v)


def _text() -> Rule:
    return "a non-empty string", lambda v: isinstance(v, str) and v.strip() != ""


def _auto_or_bool() -> Rule:
    return "auto, true or false", lambda v: v == "auto" or isinstance(v, bool)


_PROB = _real(0.0, 1.0)
# Every field of the schema that is not a choice (_CHOICES) or a bool (OmegaConf enforces bools); the test
# test_every_schema_field_has_a_check keeps it so when a field is added.
_RULES: dict[str, Rule] = {
    "data.path": _text(),
    "data.global_size": _int(1),
    "data.local_size": _int(1),
    "data.n_local": _int(0),
    "data.max_bad_samples": _int(0),
    "data.num_workers": _optional(_int(0), "this rank's share of the cores less one, at most 8"),
    "data.mean": _optional(_numbers(3, ("", _is_real), "finite (R, G, B)"), "the preset's"),
    "data.std": _optional(_numbers(3, _real(0.0, open_low=True), "> 0 (R, G, B)"), "the preset's"),
    "data.aug": ("a mapping of ViewSpec fields", lambda v: isinstance(v, dict)),  # values: checked by build_spec
    "data.local_aug": ("a mapping of ViewSpec fields", lambda v: isinstance(v, dict)),  # likewise
    "model.backbone": (f"one of {', '.join(BACKBONES)}", lambda v: v in BACKBONES),
    "model.width": _int(1),
    "optim.base_lr": _real(0.0, open_low=True),
    "optim.weight_decay": _real(0.0),
    "optim.final_weight_decay": _optional(_real(0.0), "a constant weight decay"),
    "optim.momentum": _real(0.0, 1.0, open_high=True),
    "optim.eta": _real(0.0, open_low=True),
    "optim.betas": _numbers(2, _real(0.0, 1.0, open_high=True), "in [0, 1)"),
    "optim.warmup_epochs": _real(0.0),
    "optim.final_lr": _real(0.0),
    "train.batch_size": _int(1),
    "train.epochs": _int(1),
    "train.max_steps": _int(0),
    "train.seed": _int(0, 2**32 - 1),  # numpy's seed range
    "train.log_every": _int(1),
    "train.checkpoint_every": _int(0),
    "train.keep_checkpoints": _int(1),
    "train.max_bad_steps": _int(1),
    "train.threads": _int(0),
    "train.channels_last": _auto_or_bool(),
    "train.compile": _auto_or_bool(),
    "eval.knn_k": _int(1),
    "eval.knn_t": _real(0.0, open_low=True),
    "eval.knn_max_train": _int(0),
    "eval.knn_every": _int(0),
    "eval.batch_size": _int(1),
    "eval.probe_every": _int(1),
    "eval.probe_lr": _real(0.0, open_low=True),
    "eval.wandb_project": _text(),
    "slurm.max_requeues": _int(0),
    "slurm.lock_wait_s": _real(0.0),
    "eval.after": (f"a list of {', '.join(EVAL_AFTER)}",
                   lambda v: isinstance(v, list | tuple) and all(x in EVAL_AFTER for x in v)),
    "out_dir": _text(),
    "resume": _text(),
    "resume_allow_changes": ("a list of config keys or sections, e.g. [method.base_tau,optim]",
                             lambda v: isinstance(v, list | tuple) and all(isinstance(k, str) for k in v)),
}
_SCHEDULES = ("cosine", "step")
for _section in ("eval.linear", "eval.finetune_1pct", "eval.finetune_10pct"):
    _CHOICES[f"{_section}.schedule"] = _SCHEDULES
    _RULES.update({
        f"{_section}.epochs": _int(1),
        f"{_section}.batch_size": _int(1),
        f"{_section}.base_lr": _real(0.0, open_low=True),
        f"{_section}.momentum": _real(0.0, 1.0, open_high=True),
        f"{_section}.weight_decay": _real(0.0),
        f"{_section}.milestones": ("a list of epochs (integers >= 1)",
                                   lambda v: isinstance(v, list | tuple) and all(_is_int(x) and x >= 1 for x in v)),
        f"{_section}.gamma": _real(0.0, 1.0, open_low=True),
        f"{_section}.crop_scale": ("a [low, high] pair with 0 < low <= high <= 1",
                                   lambda v: isinstance(v, list | tuple) and len(v) == 2 and all(_is_real(x) for x in v)
                                   and 0 < v[0] <= v[1] <= 1),
        f"{_section}.center_crop": _real(0.0, 1.0, open_low=True),
    })
    if "finetune" in _section:
        _RULES[f"{_section}.head_lr"] = _real(0.0, open_low=True)

# What a rule's message adds: how to turn the feature off, or what 0 means.
_HINTS = {
    "train.max_steps": " (0: no limit)",
    "data.max_bad_samples": " (0: stop at the first sample that does not decode)",
    "train.checkpoint_every": " (0: checkpoints only at epoch ends, at the end and on SIGTERM/SIGINT)",
    "train.threads": " (0: torch's default)",
    "eval.knn_max_train": " (0: the whole train split)",
    "eval.knn_every": " (0: no kNN monitor during training)",
    "eval.probe_every": " (eval.probe=false turns the probe off)",
    "train.epochs": " (train.max_steps stops a run earlier)",
    "slurm.max_requeues": " (0: a job never requeues itself)",
    "slurm.lock_wait_s": " (0: a requeued job does not wait for the previous one's hold on the run folder)",
}

# The methods' constructor arguments, by name (the same name means the same thing in every method).
_METHOD_RULES: dict[str, Rule] = {
    **{k: _int(1) for k in ("proj_hidden", "proj_dim", "pred_hidden", "proj_layers", "out_dim", "hidden_dim",
                            "bottleneck_dim", "n_prototypes", "queue_size", "sinkhorn_iters", "bn_splits")},
    **{k: _real(0.0, open_low=True) for k in ("temperature", "student_temp", "teacher_temp",
                                              "warmup_teacher_temp", "sinkhorn_eps")},
    **{k: _PROB for k in ("base_tau", "momentum", "center_momentum")},
    **{k: _real(0.0) for k in ("freeze_prototypes_epochs", "freeze_last_layer_epochs", "clip_grad", "lambd",
                               "sim_coeff", "std_coeff", "cov_coeff")},
    **{k: _int(0) for k in ("queue_length", "queue_start_epoch", "warmup_teacher_temp_epochs")},
    **{k: ("true or false", lambda v: isinstance(v, bool)) for k in ("use_bn_in_head", "norm_last_layer",
                                                                     "pred_last_bn", "frozen_patch_embed")},
}


def recipe_path(name: str) -> Path:
    """A recipe by name (``fastssl/configs/NAME.yaml``) or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = CONFIG_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"--config {name}: no such recipe file or name; known recipes: {', '.join(known)}")


def load_config(name: str | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema <- recipe ``name`` <- ``key=value`` overrides, validated. Returns a read-only DictConfig."""
    cfg = OmegaConf.structured(Config)
    try:
        if name:
            path = recipe_path(name)
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r}: expected key=value, e.g. train.batch_size=256")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"config key {key!r}: {_first_line(e)}") from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


def _check(key: str, value: Any, rule: Rule) -> None:
    what, ok = rule
    plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if not ok(plain):
        raise ConfigError(f"{key}={_show(plain)}: must be {what}{_HINTS.get(key, '')}")


def _show(value: Any) -> str:
    """A value as written on the command line: 0.5, resnet7, [2, 1]."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value) if not isinstance(value, str) or value else "''"


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Refuse impossible settings with a one-line message naming the key and its valid range.

    Checks every field against the schema's rules, then the combinations; needs no data (the checks against
    the dataset are the trainer's, before it reads any image: ``engine.trainer.check_dataset``)."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={_show(value)}: choose one of {', '.join(choices)}")
    for key, rule in _RULES.items():
        _check(key, OmegaConf.select(cfg, key), rule)
    if cfg.resume not in ("auto", "none") and not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint file; use auto (the newest valid checkpoint "
                          f"in out_dir/checkpoints, if any), none, or the path of a checkpoint")
    for key in cfg.resume_allow_changes:
        if not _names_a_key(key):
            raise ConfigError(f"resume_allow_changes: {key!r} is not a config key or section (e.g. method.base_tau, "
                              f"optim, train.batch_size)")
    if cfg.train.batch_size % world_size != 0:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must be divisible by the "
            f"world size {world_size}"
        )
    _validate_method(cfg.method, world_size)
    backend = cfg.data.backend
    if backend in ("dali", "ffcv") and cfg.data.decode != "host":
        raise ConfigError(f"data.decode={cfg.data.decode} is a torch-backend option; data.backend={backend} decodes "
                          "its own way (dali: nvJPEG on the GPU): drop data.decode or use data.backend=torch")
    if backend in ("dali", "ffcv") and cfg.data.cache == "ram":
        raise ConfigError(f"data.cache=ram is a torch-backend option; data.backend={backend} has its own caching: "
                          "drop data.cache or use data.backend=torch")
    if (cfg.data.mean is None) != (cfg.data.std is None):
        raise ConfigError("data.mean and data.std: set both or neither")
    spec = build_spec(cfg)  # the data.aug values, and every view the run will cut
    _validate_backbone(cfg, spec)


def _names_a_key(key: str) -> bool:
    """``key`` names a field or section of the schema (any key under ``method``: that section is open)."""
    import typing

    parts = key.split(".")
    if parts[0] == "method":
        return True
    node: Any = Config
    for part in parts:
        if not dataclasses.is_dataclass(node):
            return False
        hints = typing.get_type_hints(node)
        if part not in hints:
            return False
        node = hints[part]
    return True


def _validate_backbone(cfg: DictConfig, spec: pipelines.MultiCropSpec) -> None:
    """A ViT cuts its views into patches: every view size must be a multiple of the patch size."""
    from fastssl.models.vit import VITS

    name = cfg.model.backbone
    if name not in VITS:
        return
    patch = VITS[name][0] if not cfg.model.small_images else 4
    for key, size in (("data.global_size", cfg.data.global_size), ("data.local_size", cfg.data.local_size)):
        if size in spec.sizes and size % patch:
            raise ConfigError(f"{key}={size}: model.backbone={name} cuts {patch} px patches; use a multiple of "
                              f"{patch}")


def build_spec(cfg: DictConfig, name: str | None = None) -> pipelines.MultiCropSpec:
    """The MultiCropSpec of the run (or the preset ``name`` at the run's sizes and normalization); a data.aug
    key or value the views refuse raises ConfigError naming it."""
    d = cfg.data
    kwargs = {"global_size": d.global_size, "local_size": d.local_size}
    if d.n_local and (name or d.spec) != "eval":  # the eval view of a multi-crop run has no local views
        kwargs["n_local"] = d.n_local
    if d.mean is not None:
        kwargs["mean"], kwargs["std"] = tuple(d.mean), tuple(d.std)
    try:
        spec = pipelines.MultiCropSpec.preset(name or d.spec, **kwargs)
    except ValueError as e:
        raise ConfigError(f"data (spec={name or d.spec}, global_size={d.global_size}, local_size={d.local_size}, "
                          f"n_local={d.n_local}): {e}") from None
    if spec.name == "eval":
        return spec
    for key, first in (("aug", 0), ("local_aug", spec.n_global)):  # the local crops: the views after the globals
        if not d.get(key):
            continue
        if first == len(spec.views):
            raise ConfigError(f"data.{key}: the {spec.name} views have no local crops; it must go with a multi-crop "
                              "spec (swav, dino) whose data.local_size is below data.global_size")
        aug = {k: tuple(v) if isinstance(v, list | tuple) or OmegaConf.is_list(v) else v for k, v in d[key].items()}
        fields = [f.name for f in dataclasses.fields(pipelines.ViewSpec)]
        unknown = [k for k in aug if k not in fields]
        if unknown:
            raise ConfigError(f"data.{key}.{unknown[0]}: not a view setting; the keys are ViewSpec fields: "
                              f"{', '.join(fields)}")
        try:
            views = spec.views[:first] + tuple(dataclasses.replace(v, **aug) for v in spec.views[first:])
        except (TypeError, ValueError) as e:  # ViewSpec's messages start with the field's name
            raise ConfigError(f"data.{key}.{e}") from None
        spec = dataclasses.replace(spec, views=views)
    return spec


def _validate_method(method: DictConfig, world_size: int = 1) -> None:
    """method.name is a registered method and every other key is one of its constructor's arguments, in range."""
    import inspect

    from fastssl.methods import METHODS, method_class

    name = method.get("name")
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r}: choose one of {', '.join(sorted(METHODS))}")
    params = inspect.signature(method_class(name).__init__).parameters
    accepted = [k for k in params if k not in ("self", "backbone", "feat_dim")]
    for key in method:
        if key != "name" and key not in accepted:
            raise ConfigError(f"method.{key}: not a parameter of method {name!r}; its keys are {', '.join(accepted)}")
        if key in _METHOD_RULES:
            _check(f"method.{key}", method[key], _METHOD_RULES[key])
    queue = method.get("queue_length", 0) if name == "swav" else 0
    if queue % world_size:
        raise ConfigError(f"method.queue_length={queue}: must be divisible by the world size {world_size} (each rank "
                          f"holds an equal part)")


# ------------------------------------------------------------------------------------------------ resume
# Keys whose change at a resume leaves what is trained as it was: how the run is fed (the backends cut the same
# crops), watched, checkpointed and stopped. Any key under a listed section counts.
RESUME_ACCEPTED = (
    "data.backend", "data.cache", "data.decode", "data.num_workers", "data.max_bad_samples",
    "train.max_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.max_bad_steps",
    "train.deterministic", "train.threads", "train.progress", "train.channels_last", "train.compile",
    "train.compile_mode",
    "eval", "slurm", "out_dir", "resume", "resume_allow_changes",
)


@dataclass
class ConfigChange:
    """One key that differs between a checkpoint's config and this run's."""

    key: str
    saved: Any  # _ABSENT when the checkpoint's config has no such key
    current: Any
    accepted: bool  # does not change what is trained (or resume_allow_changes allows it)
    why: str  # for the message

    def __str__(self) -> str:
        return f"{self.key}: {_show_value(self.saved)} -> {_show_value(self.current)} ({self.why})"


_ABSENT = "(absent)"


def _show_value(value: Any) -> str:
    return value if value is _ABSENT else _show(value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            # data.aug and data.local_aug are one value each: their keys may come and go
            out.update(_flatten(v, key) if isinstance(v, dict) and key not in ("data.aug", "data.local_aug")
                       else {key: v})
        return out
    return {prefix: tree}


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def resume_changes(saved: dict, cfg: DictConfig) -> list[ConfigChange]:
    """Every key whose value differs between a checkpoint's config ``saved`` (a plain dict) and ``cfg``, each
    marked accepted (it does not change what is trained: ``RESUME_ACCEPTED``, a longer train.epochs, or a key
    ``cfg.resume_allow_changes`` allows) or not. A key the checkpoint's config lacks (written before the schema
    had it) counts as its default."""
    try:
        saved_cfg = OmegaConf.merge(OmegaConf.structured(Config), saved)
        saved = OmegaConf.to_container(saved_cfg)
    except OmegaConfBaseException:  # a key this schema no longer has: compare as written
        pass
    old, new = _flatten(saved), _flatten(OmegaConf.to_container(cfg))
    allowed = list(cfg.resume_allow_changes)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a == b:
            continue
        if _under(key, RESUME_ACCEPTED):
            change = ConfigChange(key, a, b, True, "accepted: does not change what is trained")
        elif key == "train.epochs" and a is not _ABSENT and b > a:
            change = ConfigChange(key, a, b, True, "accepted: a longer run; the learning-rate and momentum "
                                                   f"schedules now end at epoch {b}")
        elif _under(key, allowed):
            change = ConfigChange(key, a, b, True, "allowed by resume_allow_changes")
        else:
            change = ConfigChange(key, a, b, False, "changes what is trained")
        changes.append(change)
    return changes


def refused_changes_message(path: str, changes: list[ConfigChange]) -> str:
    """The error for a resume whose config changes what is trained: each refused key, and the ways out."""
    refused = [c for c in changes if not c.accepted]
    keys = ",".join(c.key for c in refused)
    lines = [f"resume from {path}: this config changes what the checkpoint's run trains:"]
    lines += [f"  {c}" for c in refused]
    lines.append(f"Restore these values, start a new run (another out_dir, or resume=none), or resume with these "
                 f"changes anyway: resume_allow_changes=[{keys}]")
    return "\n".join(lines)
