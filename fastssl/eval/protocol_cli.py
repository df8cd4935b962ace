"""The command-line half that fastssl-linear --protocol paper and fastssl-finetune share: their options, where
the paper settings come from, the starting backbone, and the run with its user-facing ends (exit statuses)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from fastssl.eval.supervised import Job, Protocol, StopRequested

SECTIONS = {"linear": "linear", "1%": "finetune_1pct", "10%": "finetune_10pct"}


def add_protocol_args(parser: argparse.ArgumentParser, finetune: bool, features_defaults: dict | None = None) -> None:
    """The options of a paper-protocol run (besides fastssl.eval.features.add_input_args). ``features_defaults``:
    fastssl-linear's other protocol, whose defaults the help then names too."""
    f = features_defaults or {}

    def default(key: str) -> str:
        return "the recipe's" + (f"; --protocol features: {f[key]:g}" if key in f else "")

    g = parser.add_argument_group("paper protocol (the recipe's eval section, unless overridden here)")
    g.add_argument("--recipe", default=None, metavar="NAME_OR_YAML",
                   help="take the protocol's settings from this recipe (default: the run's own config, kept in the "
                        "checkpoint; an export has none: the defaults, SwAV's)")
    g.add_argument("--epochs", type=int, default=None, help=f"epochs (default: {default('epochs')})")
    g.add_argument("--lr", type=float, default=None,
                   help=("the backbone's lr" if finetune else "the head's lr") + " per 256 images (default: "
                        f"{default('lr')}; the features probe's AdamW lr is not scaled)")
    if finetune:
        g.add_argument("--head-lr", type=float, default=None, help="the head's lr per 256 images (the recipe's)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help=f"weight decay (default: {default('weight_decay')})")
    g.add_argument("--train-batch", type=int, default=None,
                   help=f"global batch over all ranks (default: {default('train_batch')})")
    g.add_argument("--seed", type=int, default=None, help="order and crops of the training views, head init (0)")
    g.add_argument("--backend", choices=("auto", "torch", "dali", "ffcv"), default="auto",
                   help="the loader (the same backends as training; auto: DALI on a GPU when installed, else torch)")
    g.add_argument("--init", choices=("checkpoint", "random"), default="checkpoint",
                   help="random: the same architecture from random init (seed 0), the baseline the SSL result is "
                        "compared with")
    g.add_argument("--work-dir", default=None, metavar="DIR",
                   help="checkpoints, metrics.jsonl and result.json of this evaluation (default: RUN/eval/<name> for "
                        "RUN/checkpoints/*.pt, EXPORT/eval/<name> for an export folder)")
    g.add_argument("--resume", choices=("auto", "none"), default="auto",
                   help="auto: continue from the work folder's checkpoint (a rerun after a stop); none: start afresh")
    g.add_argument("--eval-every", type=int, default=0,
                   help="> 0: also score the val split every N epochs (metrics.jsonl; the result is the last epoch's)")


def default_work_dir(source: str | os.PathLike, name: str) -> Path:
    """``RUN/eval/<name>`` for ``RUN/checkpoints/FILE``, ``FOLDER/eval/<name>`` for an export folder, else beside
    the file."""
    path = Path(source)
    if path.is_dir():
        return path / "eval" / name
    if path.parent.name == "checkpoints":
        return path.parent.parent / "eval" / name
    return path.parent / "eval" / name


def saved_config(source: str | os.PathLike) -> dict | None:
    """The training config kept in a checkpoint (a plain dict), or None for an export."""
    path = Path(source)
    if path.is_dir() or path.suffix in (".safetensors", ".pth") and (path.parent / "export.json").is_file():
        return None
    from fastssl.engine.checkpoint import load_checkpoint

    try:
        config = load_checkpoint(path, verify=False).get("config")
    except (FileNotFoundError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def section_settings(section: str, recipe: str | None, source: str | os.PathLike) -> tuple[dict, str]:
    """The settings of ``eval.<section>`` and where they come from: ``recipe`` when given, else the checkpoint's
    own config, else the schema's defaults. Each on top of the schema's defaults, so a config from before a key
    existed still gives every setting."""
    from omegaconf import OmegaConf

    from fastssl.config import EvalConfig, load_config

    defaults = dataclasses.asdict(EvalConfig())[section]
    if recipe is not None:
        return dict(OmegaConf.to_container(load_config(recipe).eval[section])), f"recipe {recipe}"
    config = saved_config(source)
    found = (config or {}).get("eval", {}).get(section)
    if isinstance(found, dict):
        return {**defaults, **found}, "the run's config"
    return defaults, "the defaults (SwAV's protocol): pass --recipe for a paper's"


def make_protocol(mode: str, section: str, args: argparse.Namespace) -> tuple[Protocol, str]:
    settings, origin = section_settings(section, args.recipe, args.checkpoint)
    overrides = {"epochs": args.epochs, "base_lr": args.lr, "weight_decay": args.weight_decay,
                 "batch_size": args.train_batch, "head_lr": getattr(args, "head_lr", None)}
    return Protocol.from_section(mode, settings, **overrides), origin


def starting_backbone(args: argparse.Namespace):
    """(backbone module on the CPU, its description): the checkpoint's, or the same architecture at random init."""
    import torch

    from fastssl.eval.features import apply_threads
    from fastssl.eval.weights import build_from_meta, load_backbone

    apply_threads(args.threads)
    backbone, meta = load_backbone(args.checkpoint, args.branch)
    if args.init == "random":
        torch.manual_seed(0)
        backbone = build_from_meta(meta, str(args.checkpoint))
    return backbone, meta


def make_job(args: argparse.Namespace, meta: dict, protocol: Protocol, name: str, **extra) -> Job:
    return Job(
        data=args.data, protocol=protocol, work_dir=Path(args.work_dir or default_work_dir(args.checkpoint, name)),
        image_size=args.image_size or int(meta["image_size"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
        precision=args.precision or meta.get("precision", "fp32"),
        source="random init" if args.init == "random" else f"{args.checkpoint} ({meta.get('branch', 'online')}, "
                                                             f"step {meta.get('step')})",
        backend=args.backend, num_workers=args.num_workers, device=args.device, seed=args.seed or 0,
        resume=args.resume, eval_every=args.eval_every, progress=not args.no_progress, **extra)


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_job(prog: str, backbone, meta: dict, num_classes: int, job: Job) -> tuple[int, dict | None]:
    """Run ``job`` with the ends a user sees: (exit status, result). 2: settings or data the run cannot use;
    128 + N: stopped by signal N (checkpoint written, rerun to resume)."""
    from fastssl.eval.supervised import run
    from pipelines.formats import DatasetFormatError

    try:
        return 0, run(backbone, int(meta["feat_dim"]), num_classes, job)
    except StopRequested as e:
        if is_main_rank():
            print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code, None
    except (ValueError, DatasetFormatError, ImportError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2, None


def describe_protocol(p: Protocol, origin: str) -> str:
    lr = f"lr {p.base_lr:g}" + (f", head {p.head_lr:g}" if p.mode == "finetune" else "")
    sched = "cosine" if p.schedule == "cosine" else f"x{p.gamma:g} at epochs {', '.join(map(str, p.milestones))}"
    return (f"{p.epochs} epochs, batch {p.batch_size}, SGD {lr} (x batch/256), momentum {p.momentum:g}"
            f"{' Nesterov' if p.nesterov else ''}, wd {p.weight_decay:g}, {sched}, crops {list(p.crop_scale)}"
            f"{', BatchNorm head' if p.head_bn else ''}; from {origin}")
