"""Run configuration: a dataclass schema, a YAML recipe from fastssl/configs, and ``key=value`` overrides.

``load_config("byol_resnet18_fmnist", ["train.batch_size=128"])`` merges schema <- recipe <- overrides
with OmegaConf; an unknown key, a wrong type or an impossible combination stops with a ConfigError
that names the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
    channels_last: bool = True
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


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: dict[str, Any] = field(default_factory=_default_method)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/default"
    resume: str = "auto"  # auto: newest valid checkpoint in out_dir/checkpoints if any | none | a checkpoint path


_CHOICES = {
    "data.backend": ("torch", "dali", "ffcv", "auto"),
    "data.decode": ("host", "device"),
    "data.cache": ("ram", "none", "auto"),
    "optim.name": ("lars", "sgd", "adamw"),
    "train.precision": ("bf16", "fp16", "fp32"),
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


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Refuse impossible settings with a message naming the key."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(choices)}")
    positive = ["train.batch_size", "data.global_size", "eval.knn_k", "eval.batch_size", "model.width"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be > 0")
    if cfg.eval.probe_every <= 0:
        raise ConfigError(f"eval.probe_every={cfg.eval.probe_every}: must be > 0 (eval.probe=false turns it off)")
    if cfg.eval.knn_every < 0:
        raise ConfigError(f"eval.knn_every={cfg.eval.knn_every}: must be >= 0 (0: no kNN monitor during training)")
    if cfg.train.epochs <= 0 and cfg.train.max_steps <= 0:
        raise ConfigError("train.epochs and train.max_steps are both <= 0: nothing to train")
    for key in ("train.log_every", "train.keep_checkpoints", "train.max_bad_steps"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be >= 1")
    if cfg.data.max_bad_samples < 0:
        raise ConfigError(f"data.max_bad_samples={cfg.data.max_bad_samples}: must be >= 0 (0: stop at the first "
                          "sample that does not decode)")
    if cfg.train.checkpoint_every < 0:
        raise ConfigError(f"train.checkpoint_every={cfg.train.checkpoint_every}: must be >= 0 (0: checkpoints "
                          f"only at epoch ends, at the end and on SIGTERM/SIGINT)")
    if cfg.resume not in ("auto", "none") and not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint file; use auto (the newest valid checkpoint "
                          f"in out_dir/checkpoints, if any), none, or the path of a checkpoint")
    if cfg.train.batch_size % world_size != 0:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must be divisible by the "
            f"world size {world_size}"
        )
    _validate_method(cfg.method)
    backend = cfg.data.backend
    if backend in ("dali", "ffcv") and cfg.data.decode != "host":
        raise ConfigError(f"data.decode={cfg.data.decode} is a torch-backend option; data.backend={backend} decodes "
                          "its own way (dali: nvJPEG on the GPU): drop data.decode or use data.backend=torch")
    if backend in ("dali", "ffcv") and cfg.data.cache == "ram":
        raise ConfigError(f"data.cache=ram is a torch-backend option; data.backend={backend} has its own caching: "
                          "drop data.cache or use data.backend=torch")
    if (cfg.data.mean is None) != (cfg.data.std is None):
        raise ConfigError("data.mean and data.std: set both or neither")


def _validate_method(method: DictConfig) -> None:
    """method.name is a registered method and every other key is one of its constructor's arguments."""
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
    if "base_tau" in method and not 0.0 <= method.base_tau <= 1.0:
        raise ConfigError(f"method.base_tau={method.base_tau}: must be in [0, 1]")
